"""The wire format: codecs, size rules and framing for every request 1..43.

Round trips go through real Unix sockets (a socketpair) with real fds, via
both ``MessageSocket`` (front-end side) and ``AsyncMessageSocket`` (back-end
side); malformed input must end in ``ProtocolError``/``ConnectionClosed``
with every attached fd closed.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connection.errors import ConnectionClosed, ProtocolError
from connection.executor import Executor
from connection.protocol import (CONFIG_HEADER, FLAG_NEED_REPLY, FLAG_REPLY, HEADER, INFLIGHT, LOG,
                                 MAX_CONFIG_SIZE, MAX_FDS, MAX_PAYLOAD, MAX_TABLE_REGIONS, SHARED_OBJECT,
                                 VERSION, FrontendReq, InflightInfo, MemoryRegion, Message, VringAddr,
                                 check_payload_size, decode_config, decode_inflight, decode_mem_table,
                                 decode_single_region, decode_u64, decode_vring_addr,
                                 decode_vring_fd_payload, decode_vring_state, encode_config,
                                 encode_inflight, encode_mem_table, encode_single_region, encode_u64,
                                 encode_vring_addr, encode_vring_state, request_name, vring_fd_payload)
from connection.transport import AsyncMessageSocket, MessageSocket, encode_message
from tests.conftest import open_fds

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
regions = st.builds(MemoryRegion, u64, u64, u64, u64)

R = FrontendReq
REGION = MemoryRegion(0x1000, 0x20000, 0x7F00_0000_0000, 0x1000)

#: A valid payload for every request 1..43, and how many fds it may carry.
VALID: dict[int, tuple[bytes, int]] = {
    R.GET_FEATURES: (b"", 0),
    R.SET_FEATURES: (encode_u64(1 << 32 | 1 << 30), 0),
    R.SET_OWNER: (b"", 0),
    R.RESET_OWNER: (b"", 0),
    R.SET_MEM_TABLE: (encode_mem_table([REGION, REGION._replace(guest_phys_addr=1 << 32)]), 2),
    R.SET_LOG_BASE: (LOG.pack(4096, 0), 1),
    R.SET_LOG_FD: (b"", 1),
    R.SET_VRING_NUM: (encode_vring_state(0, 256), 0),
    R.SET_VRING_ADDR: (encode_vring_addr(VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)), 0),
    R.SET_VRING_BASE: (encode_vring_state(0, 7), 0),
    R.GET_VRING_BASE: (encode_vring_state(0, 0), 0),
    R.SET_VRING_KICK: (vring_fd_payload(0), 1),
    R.SET_VRING_CALL: (vring_fd_payload(3), 1),
    R.SET_VRING_ERR: (vring_fd_payload(255, nofd=True), 0),
    R.GET_PROTOCOL_FEATURES: (b"", 0),
    R.SET_PROTOCOL_FEATURES: (encode_u64(0x9), 0),
    R.GET_QUEUE_NUM: (b"", 0),
    R.SET_VRING_ENABLE: (encode_vring_state(0, 1), 0),
    R.SEND_RARP: (encode_u64(0x0000_5254_0012_3456), 0),
    R.NET_SET_MTU: (encode_u64(1500), 0),
    R.SET_BACKEND_REQ_FD: (b"", 1),
    R.IOTLB_MSG: (struct.pack("=QQQBB6x", 0x1000, 0x1000, 0x7000, 3, 2), 0),
    R.SET_VRING_ENDIAN: (encode_vring_state(0, 0), 0),
    R.GET_CONFIG: (encode_config(0, 0, bytes(60)), 0),
    R.SET_CONFIG: (encode_config(32, 0, b"\x01"), 0),
    R.CREATE_CRYPTO_SESSION: (bytes(64), 0),
    R.CLOSE_CRYPTO_SESSION: (encode_u64(5), 0),
    R.POSTCOPY_ADVISE: (b"", 0),
    R.POSTCOPY_LISTEN: (b"", 0),
    R.POSTCOPY_END: (b"", 0),
    R.GET_INFLIGHT_FD: (encode_inflight(InflightInfo(0, 0, 2, 256)), 0),
    R.SET_INFLIGHT_FD: (encode_inflight(InflightInfo(8192, 0, 2, 256)), 1),
    R.GPU_SET_SOCKET: (b"", 1),
    R.RESET_DEVICE: (b"", 0),
    R.VRING_KICK: (encode_vring_state(1, 0), 0),
    R.GET_MAX_MEM_SLOTS: (b"", 0),
    R.ADD_MEM_REG: (encode_single_region(REGION), 1),
    R.REM_MEM_REG: (encode_single_region(REGION), 0),
    R.SET_STATUS: (encode_u64(0xF), 0),
    R.GET_STATUS: (b"", 0),
    R.GET_SHARED_OBJECT: (bytes(range(16)), 0),
    R.SET_DEVICE_STATE_FD: (struct.pack("=II", 0, 0), 1),
    R.CHECK_DEVICE_STATE: (b"", 0),
}
ALL_REQUESTS = sorted(VALID)

#: Requests whose size rule is "only the cap" (known by number, never served).
CAP_ONLY = {R.IOTLB_MSG, R.CREATE_CRYPTO_SESSION}


def invalid_sizes(request: int) -> list[int]:
    """Payload sizes ``check_payload_size`` must refuse for ``request``."""
    valid = len(VALID[request][0])
    if request in CAP_ONLY:
        return [MAX_PAYLOAD + 1]
    if request == R.SET_MEM_TABLE:
        return [0, 7, 9, 8 + 31, 8 + 32 * (MAX_TABLE_REGIONS + 1), MAX_PAYLOAD + 1]
    if request in (R.GET_CONFIG, R.SET_CONFIG):
        return [0, CONFIG_HEADER.size - 1, CONFIG_HEADER.size + MAX_CONFIG_SIZE + 1, MAX_PAYLOAD + 1]
    if valid == 0:
        return [1, 4, 16, MAX_PAYLOAD + 1]
    return [s for s in (0, valid - 1, valid + 1, 2 * valid, MAX_PAYLOAD + 1) if s != valid]


def test_every_request_has_a_name_and_a_sample() -> None:
    assert [int(r) for r in ALL_REQUESTS] == list(range(1, 44))
    for r in ALL_REQUESTS:
        assert request_name(r) == R(r).name
    assert request_name(99) == "UNKNOWN(99)"
    assert request_name(0) == "NONE"


@pytest.mark.parametrize("req", ALL_REQUESTS, ids=lambda r: R(r).name)
def test_payload_size_rules(req: int) -> None:
    check_payload_size(req, len(VALID[req][0]))
    for size in invalid_sizes(req):
        with pytest.raises(ProtocolError) as exc:
            check_payload_size(req, size)
        assert str(size) in str(exc.value)
        assert request_name(req) in str(exc.value) or "SET_MEM_TABLE" in str(exc.value)


def test_getters_accept_a_zero_u64() -> None:
    for r in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
              R.GET_STATUS, R.SET_OWNER, R.RESET_OWNER, R.RESET_DEVICE, R.CHECK_DEVICE_STATE):
        check_payload_size(r, 8)
    for r in (R.SET_BACKEND_REQ_FD, R.SET_LOG_FD, R.POSTCOPY_LISTEN, R.GPU_SET_SOCKET):
        with pytest.raises(ProtocolError):
            check_payload_size(r, 8)


def test_unknown_request_codes_only_have_the_cap() -> None:
    for r in (0, 44, 1000, 0xFFFF_FFFF):
        check_payload_size(r, 0)
        check_payload_size(r, MAX_PAYLOAD)
        with pytest.raises(ProtocolError):
            check_payload_size(r, MAX_PAYLOAD + 1)


# --------------------------------------------------------------------------
# Codecs

@given(u64)
def test_u64_round_trip(value: int) -> None:
    assert decode_u64(R.SET_FEATURES, encode_u64(value)) == value


@given(u32, u32)
def test_vring_state_round_trip(index: int, num: int) -> None:
    assert decode_vring_state(encode_vring_state(index, num)) == (index, num)


@given(st.builds(VringAddr, u32, u32, u64, u64, u64, u64))
def test_vring_addr_round_trip(addr: VringAddr) -> None:
    data = encode_vring_addr(addr)
    assert len(data) == 40
    assert decode_vring_addr(data) == addr


@given(st.lists(regions, max_size=MAX_TABLE_REGIONS))
def test_mem_table_round_trip(table: list[MemoryRegion]) -> None:
    data = encode_mem_table(table)
    assert len(data) == 8 + 32 * len(table)
    check_payload_size(R.SET_MEM_TABLE, len(data))
    assert decode_mem_table(data) == table


@given(regions)
def test_single_region_round_trip(region: MemoryRegion) -> None:
    data = encode_single_region(region)
    assert len(data) == 40 and data[:8] == bytes(8)
    assert decode_single_region(data) == region


@given(st.builds(InflightInfo, u64, u64, u16, u16))
def test_inflight_round_trip(info: InflightInfo) -> None:
    data = encode_inflight(info)
    assert len(data) == INFLIGHT.size == 24
    assert decode_inflight(data) == info


@given(u32, u32, st.binary(max_size=MAX_CONFIG_SIZE))
def test_config_round_trip(offset: int, flags: int, data: bytes) -> None:
    payload = encode_config(offset, flags, data)
    check_payload_size(R.SET_CONFIG, len(payload))
    access = decode_config(R.SET_CONFIG, payload)
    assert access == (offset, len(data), flags, data)


@given(u8, st.booleans())
def test_vring_fd_payload_round_trip(index: int, nofd: bool) -> None:
    assert decode_vring_fd_payload(R.SET_VRING_KICK, vring_fd_payload(index, nofd)) == (index, nofd)


def test_vring_fd_payload_unknown_bits() -> None:
    with pytest.raises(ProtocolError, match="unknown bits"):
        decode_vring_fd_payload(R.SET_VRING_CALL, encode_u64(0x200))
    with pytest.raises(ProtocolError, match="unknown bits"):
        decode_vring_fd_payload(R.SET_VRING_CALL, encode_u64(1 << 63))


def test_mem_table_count_mismatch() -> None:
    data = encode_mem_table([REGION])
    bad = struct.pack("=II", 2, 0) + data[8:]
    with pytest.raises(ProtocolError, match="nregions 2"):
        decode_mem_table(bad)
    with pytest.raises(ProtocolError, match="nregions 9"):
        decode_mem_table(struct.pack("=II", 9, 0) + bytes(32 * 9))


def test_config_size_mismatch() -> None:
    with pytest.raises(ProtocolError, match="size field 5"):
        decode_config(R.SET_CONFIG, CONFIG_HEADER.pack(0, 5, 0) + b"abc")
    with pytest.raises(ProtocolError, match="size field 257"):
        decode_config(R.GET_CONFIG, CONFIG_HEADER.pack(0, 257, 0) + bytes(257))


@pytest.mark.parametrize("decode", [
    lambda p: decode_u64(R.SET_FEATURES, p), decode_vring_state, decode_vring_addr, decode_mem_table,
    decode_single_region, decode_inflight, lambda p: decode_config(R.GET_CONFIG, p),
    lambda p: decode_vring_fd_payload(R.SET_VRING_KICK, p),
], ids=["u64", "vring_state", "vring_addr", "mem_table", "single_region", "inflight", "config", "vring_fd"])
@given(payload=st.binary(max_size=80))
def test_decoders_raise_only_protocol_error(decode, payload: bytes) -> None:
    """Any bytes, even of a size the transport would have refused: the
    decoders answer or raise ProtocolError, never struct.error."""
    try:
        decode(payload)
    except ProtocolError:
        pass


# --------------------------------------------------------------------------
# Framing over real sockets

def _pair() -> tuple[MessageSocket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return MessageSocket(a), b


def _fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.mark.parametrize("req", ALL_REQUESTS, ids=lambda r: R(r).name)
def test_blocking_round_trip(req: int) -> None:
    payload, nfds = VALID[req]
    front, back_sock = _pair()
    back = MessageSocket(back_sock)
    sent = _fds(nfds)
    try:
        front.send(req, VERSION | FLAG_NEED_REPLY, payload, sent)
        msg = back.recv(expect_reply=False)
        assert (msg.request, msg.flags, msg.payload) == (req, VERSION | FLAG_NEED_REPLY, payload)
        assert msg.need_reply and not msg.is_reply
        assert len(msg.fds) == nfds
        assert all(_same_file(a, b) for a, b in zip(sent, msg.fds))
        received = list(msg.fds)
        msg.close_fds()
        assert msg.fds == []
        for fd in received:
            with pytest.raises(OSError):
                os.fstat(fd)
        # and the reply direction
        back.send(req, VERSION | FLAG_REPLY, payload)
        reply = front.recv(expect_reply=True)
        assert (reply.request, reply.is_reply, reply.payload) == (req, True, payload)
    finally:
        _close(sent)
        front.close()
        back.close()


@pytest.mark.parametrize("req", ALL_REQUESTS, ids=lambda r: R(r).name)
def test_async_round_trip(req: int) -> None:
    payload, nfds = VALID[req]
    front, back_sock = _pair()
    sent = _fds(nfds)
    with Executor() as ex:
        back = AsyncMessageSocket(back_sock, ex.loop)

        async def run() -> Message:
            # header and payload in separate writes: the reader must wait for both
            raw = encode_message(req, VERSION, payload)
            front.sock.sendmsg([raw[:5]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            struct.pack(f"{nfds}i", *sent))] if nfds else [])
            ex.loop.call_later(0.01, front.sock.sendall, raw[5:])
            return await back.recv()

        try:
            msg = ex.run_until_complete(run())
            assert (msg.request, msg.flags, msg.payload) == (req, VERSION, payload)
            assert len(msg.fds) == nfds
            msg.close_fds()
        finally:
            _close(sent)
            front.close()
            back.close()


def _async_recv_error(raw_parts: list[bytes], nfds: int = 0, close_after: bool = False) -> BaseException:
    """Feed raw bytes (the fds go with the first part) to an AsyncMessageSocket
    and return what its recv raised; fds it received must all be closed."""
    front, back_sock = _pair()
    sent = _fds(nfds)
    before = open_fds()
    with Executor() as ex:
        back = AsyncMessageSocket(back_sock, ex.loop)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *sent))] if nfds else []
        front.sock.sendmsg([raw_parts[0]], anc)
        for part in raw_parts[1:]:
            front.sock.sendall(part)
        if close_after:
            front.sock.shutdown(socket.SHUT_WR)
        try:
            ex.run_until_complete(back.recv())
        except BaseException as e:  # noqa: BLE001 - returned for the caller to check
            err = e
        else:
            raise AssertionError("recv accepted a malformed message")
        back.close()
    after = open_fds()
    _close(sent)
    front.close()
    # nothing new is open (the back-end socket itself was closed: allow it gone)
    assert after - before == set(), f"fds leaked: {after - before}"
    return err


@pytest.mark.parametrize("req", ALL_REQUESTS, ids=lambda r: R(r).name)
def test_async_rejects_bad_sizes_and_closes_fds(req: int) -> None:
    for size in invalid_sizes(req):
        err = _async_recv_error([HEADER.pack(req, VERSION, size)], nfds=2)
        assert isinstance(err, ProtocolError), err
        assert str(size) in str(err)


@pytest.mark.parametrize("req", ALL_REQUESTS, ids=lambda r: R(r).name)
def test_async_rejects_bad_header_flags(req: int) -> None:
    payload, _ = VALID[req]
    for flags in (0, 2, 3, VERSION | FLAG_REPLY):
        err = _async_recv_error([encode_message(req, flags, payload)], nfds=1)
        assert isinstance(err, ProtocolError), (flags, err)
        assert request_name(req) in str(err)


@pytest.mark.parametrize("req", ALL_REQUESTS, ids=lambda r: R(r).name)
def test_async_truncated_payload(req: int) -> None:
    payload, _ = VALID[req]
    raw = encode_message(req, VERSION, payload)
    err = _async_recv_error([raw[:-1] if payload else raw[:7]], nfds=1, close_after=True)
    assert isinstance(err, ConnectionClosed), err


def test_async_too_many_fds() -> None:
    err = _async_recv_error([encode_message(R.SET_MEM_TABLE, VERSION, encode_mem_table([]))],
                            nfds=MAX_FDS + 1)
    assert isinstance(err, ProtocolError) and "more than" in str(err)


def test_async_eof_is_connection_closed() -> None:
    front, back_sock = _pair()
    with Executor() as ex:
        back = AsyncMessageSocket(back_sock, ex.loop)
        front.close()
        with pytest.raises(ConnectionClosed):
            ex.run_until_complete(back.recv())
        back.close()


def _queued(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def test_async_cancel_mid_message_closes_fds() -> None:
    """A reader cancelled between header and payload (the loop shutting down)
    still closes the fds that came with the header."""
    front, back_sock = _pair()
    sent = _fds(1)
    before: set[int] = set()
    with Executor() as ex:
        back = AsyncMessageSocket(back_sock, ex.loop)
        front.sock.sendmsg([HEADER.pack(R.SET_VRING_KICK, VERSION, 8)],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", sent[0]))])

        async def run() -> None:
            before.update(open_fds())   # with the loop running: uvloop opens some fds on its first run
            task = ex.spawn(back.recv())
            # cancel once the reader took the header and its fd off the socket
            deadline = time.monotonic() + 5
            while _queued(back_sock):
                assert time.monotonic() < deadline, "the reader never took the header"
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        ex.run_until_complete(run())
        back.close()
    assert open_fds() - before == set()
    _close(sent)
    front.close()


def _blocking_case(raw: bytes, expect_reply: bool | None) -> Message:
    front, back_sock = _pair()
    back = MessageSocket(back_sock)
    try:
        front.sock.sendall(raw)
        return back.recv(expect_reply=expect_reply)
    finally:
        front.close()
        back.close()


def test_blocking_recv_checks() -> None:
    # a reply where a request was expected and vice versa
    with pytest.raises(ProtocolError, match="REPLY flag"):
        _blocking_case(encode_message(R.GET_FEATURES, VERSION | FLAG_REPLY, encode_u64(1)), False)
    with pytest.raises(ProtocolError, match="REPLY flag"):
        _blocking_case(encode_message(R.GET_FEATURES, VERSION), True)
    # expect_reply=None: neither the flag nor the request size rules (an empty
    # GET_CONFIG reply is the spec's refusal, not a malformed request)
    msg = _blocking_case(encode_message(R.GET_CONFIG, VERSION | FLAG_REPLY), None)
    assert msg.request == R.GET_CONFIG and msg.payload == b""
    # an oversized payload is refused even for replies
    with pytest.raises(ProtocolError, match="exceeds cap"):
        _blocking_case(HEADER.pack(R.GET_CONFIG, VERSION | FLAG_REPLY, MAX_PAYLOAD + 1), True)
    # EOF inside a header
    with pytest.raises(ConnectionClosed, match="inside a header"):
        front, back_sock = _pair()
        back = MessageSocket(back_sock)
        front.sock.sendall(b"\x01\x00\x00")
        front.close()
        try:
            back.recv()
        finally:
            back.close()


def test_blocking_recv_closes_fds_on_timeout() -> None:
    """A socket error in the middle of a message (here a timeout) must not
    leak the fds that came with the header."""
    front, back_sock = _pair()
    back = MessageSocket(back_sock)
    sent = _fds(2)
    before = open_fds()
    try:
        front.sock.sendmsg([HEADER.pack(R.SET_MEM_TABLE, VERSION, 8 + 64)],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", *sent))])
        back_sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            back.recv(expect_reply=False)
        assert open_fds() - before == set()
    finally:
        _close(sent)
        front.close()
        back.close()


def test_message_take_fd() -> None:
    fds = _fds(2)
    msg = Message(R.SET_VRING_KICK, VERSION, vring_fd_payload(0), list(fds))
    assert msg.take_fd() == fds[0]
    assert msg.fds == [fds[1]]
    msg.close_fds()
    os.close(fds[0])
    with pytest.raises(ProtocolError, match="expected a file descriptor"):
        msg.take_fd()
    assert "SET_VRING_KICK" in repr(msg)


def test_shared_object_size() -> None:
    assert SHARED_OBJECT.size == 16
    check_payload_size(R.GET_SHARED_OBJECT, 16)


@settings(max_examples=200, deadline=None)
@given(request=u32, flags=u32, payload=st.binary(max_size=300))
def test_blocking_framing_any_header(request: int, flags: int, payload: bytes) -> None:
    """Whatever header arrives, recv returns the exact message or raises a
    typed error; it never hangs on a well-framed message."""
    front, back_sock = _pair()
    back = MessageSocket(back_sock)
    try:
        front.sock.sendall(encode_message(request, flags, payload))
        try:
            msg = back.recv(expect_reply=False)
        except ProtocolError:
            ok_flags = flags & 3 == VERSION and not flags & FLAG_REPLY
            if ok_flags:
                with pytest.raises(ProtocolError):
                    check_payload_size(request, len(payload))
        else:
            assert (msg.request, msg.flags, msg.payload) == (request, flags, payload)
    finally:
        front.close()
        back.close()
