"""DeviceRequestHandler against a real front-end over a real listener path.

The back-end runs on an Executor loop in a thread; the front-end is either
the bare ``RawFrontend`` (exact messages, for the protocol rules) or the
full ``VhostUserFrontend`` driver (rings in guest memory, for queues end to
end).  Nothing is mocked: fds are real eventfds and memfds.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Iterator
from typing import Any

import pytest

from connection.connection import VhostUserListener
from connection.errors import ProtocolError
from frontend.vhost_user import VhostUserFrontend
from connection.handler import GENERIC_PROTOCOL_FEATURES, DeviceRequestHandler
from connection.protocol import (CONFIG_HEADER, MAX_MEM_SLOTS, FrontendReq, InflightInfo,
                                 MemoryRegion, ProtocolFeature, VirtioFeature, VringAddr,
                                 decode_config, decode_inflight, decode_vring_state, encode_config,
                                 encode_inflight, encode_mem_table, encode_single_region, encode_u64,
                                 encode_vring_addr, encode_vring_state, vring_fd_payload)
from tests.conftest import open_fds, wait_broken
from tests.connection.support import (CONFIG_SIZE, HoldingXorDevice, LoopThread, RawFrontend,
                                      XorDevice)

R = FrontendReq
PF = ProtocolFeature
VF = VirtioFeature
KEY = 0x5A


class Server:
    """One listener serving one DeviceRequestHandler, in a loop thread."""

    def __init__(self, lt: LoopThread, path: str, device: XorDevice | None = None, **kwargs: Any) -> None:
        self.lt = lt
        self.path = path
        self.listener = VhostUserListener(path)
        self.device = device or XorDevice(lt.ex, **kwargs)
        self.handler = DeviceRequestHandler(self.device, lt.ex)
        self.fut = lt.submit(self.listener.run_req_handler(self.handler, lt.ex))

    def serve_again(self, device: XorDevice | None = None) -> None:
        """Accept the next front-end (same handler unless a device is given)."""
        self.fut.result(5)
        if device is not None:
            self.device = device
            self.handler = DeviceRequestHandler(device, self.lt.ex)
        self.fut = self.lt.submit(self.listener.run_req_handler(self.handler, self.lt.ex))

    def call(self, fn: Any, *args: Any) -> Any:
        return self.lt.call(fn, *args)

    def wait(self) -> None:
        self.fut.result(5)

    def close(self) -> None:
        if not self.fut.done():
            self.fut.cancel()
        self.listener.close()


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt


@pytest.fixture
def server(lt: LoopThread, sock_path: str) -> Iterator[Server]:
    s = Server(lt, sock_path)
    yield s
    s.close()


@pytest.fixture
def raw(server: Server) -> Iterator[RawFrontend]:
    fe = RawFrontend(server.path)
    yield fe
    fe.close()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _negotiate(raw: RawFrontend, protocol: int = int(GENERIC_PROTOCOL_FEATURES | PF.CONFIG),
               features: int | None = None) -> None:
    offered = raw.u64(R.GET_FEATURES)
    raw.send(R.SET_PROTOCOL_FEATURES, encode_u64(protocol))
    raw.send(R.SET_OWNER)
    raw.send(R.SET_FEATURES, encode_u64(offered if features is None else features))


# --------------------------------------------------------------------------
# Features and negotiation

def test_get_features_offers_device_bits_and_protocol_features(raw: RawFrontend) -> None:
    offered = raw.u64(R.GET_FEATURES)
    assert offered & VF.PROTOCOL_FEATURES
    assert offered & VF.VERSION_1 and offered & VF.RING_EVENT_IDX and offered & 1
    assert not offered & VF.RING_PACKED, "split rings only: packed is never offered"


def test_protocol_features_are_what_the_handler_implements(raw: RawFrontend) -> None:
    offered = raw.u64(R.GET_PROTOCOL_FEATURES)
    expected = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.INFLIGHT_SHMFD | PF.CONFIGURE_MEM_SLOTS \
        | PF.RESET_DEVICE | PF.STATUS
    assert offered == expected, "BACKEND_REQ asked by the device is not implemented, so not offered"
    assert offered < 1 << 20


def test_no_config_feature_without_a_config_space(lt: LoopThread, sock_path: str) -> None:
    s = Server(lt, sock_path, config=False)
    fe = RawFrontend(sock_path)
    try:
        assert not fe.u64(R.GET_PROTOCOL_FEATURES) & PF.CONFIG
    finally:
        fe.close()
        s.close()


def test_set_features_with_bits_not_offered_ends_the_connection(server: Server, raw: RawFrontend,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "vhost.connection")
    raw.send(R.SET_FEATURES, encode_u64(VF.VERSION_1 | VF.RING_PACKED | 1 << 50))
    raw.assert_closed()
    server.wait()
    assert any("bits 0x4000400000000" in r.getMessage() for r in caplog.records), caplog.text


def test_set_features_refused_with_failure_ack(server: Server, raw: RawFrontend) -> None:
    _negotiate(raw)
    assert raw.ack(R.SET_FEATURES, encode_u64(1 << 40)) == 1
    # the connection goes on and the previous features stand
    assert raw.ack(R.SET_FEATURES, encode_u64(VF.VERSION_1)) == 0
    assert server.call(lambda: server.handler.acked_features) == VF.VERSION_1
    assert server.device.acked == VF.VERSION_1


def test_set_protocol_features_not_offered(server: Server, raw: RawFrontend) -> None:
    raw.send(R.SET_PROTOCOL_FEATURES, encode_u64(PF.BACKEND_REQ | PF.REPLY_ACK))
    raw.assert_closed()


def test_reply_ack_for_every_request_once_negotiated(server: Server, raw: RawFrontend) -> None:
    # before REPLY_ACK is negotiated, NEED_REPLY gets nothing back
    raw.send(R.SET_OWNER, need_reply=True)
    assert raw.u64(R.GET_FEATURES) & VF.PROTOCOL_FEATURES     # ... and the next reply is this one
    raw.send(R.SET_PROTOCOL_FEATURES, encode_u64(PF.REPLY_ACK | PF.MQ | PF.STATUS))
    assert raw.ack(R.SET_FEATURES, encode_u64(VF.VERSION_1 | VF.PROTOCOL_FEATURES)) == 0
    assert raw.ack(R.SET_VRING_NUM, encode_vring_state(0, 64)) == 0
    assert raw.ack(R.SET_STATUS, encode_u64(0xF)) == 0
    # requests with a reply of their own get that reply, not an ack
    raw.send(R.GET_STATUS, need_reply=True)
    msg = raw.recv()
    assert msg.request == R.GET_STATUS and msg.payload == encode_u64(0xF)
    raw.send(R.GET_QUEUE_NUM, need_reply=True)
    assert raw.recv().payload == encode_u64(2)
    # failures are acked non-zero and the connection continues
    assert raw.ack(R.SET_VRING_NUM, encode_vring_state(0, 3)) == 1
    assert raw.ack(R.SET_VRING_NUM, encode_vring_state(7, 64)) == 1
    assert raw.ack(R.SET_STATUS, encode_u64(0x100)) == 1
    assert raw.ack(R.SET_OWNER) == 1, "a second SET_OWNER is refused"
    assert raw.u64(R.GET_STATUS) == 0xF


@pytest.mark.parametrize("req,payload", [
    (R.GET_QUEUE_NUM, b""),                               # needs MQ
    (R.GET_MAX_MEM_SLOTS, b""),                           # needs CONFIGURE_MEM_SLOTS
    (R.GET_STATUS, b""),                                  # needs STATUS
    (R.RESET_DEVICE, b""),                                # needs RESET_DEVICE
    (R.GET_CONFIG, encode_config(0, 0, bytes(4))),        # needs CONFIG
    (R.GET_INFLIGHT_FD, encode_inflight(InflightInfo(0, 0, 1, 64))),   # needs INFLIGHT_SHMFD
], ids=lambda v: v.name if isinstance(v, R) else "")
def test_request_not_negotiated_ends_the_connection(server: Server, raw: RawFrontend, req: R,
                                                    payload: bytes) -> None:
    raw.send(R.SET_PROTOCOL_FEATURES, encode_u64(0))
    raw.send(req, payload)
    raw.assert_closed()
    server.wait()


@pytest.mark.parametrize("req,payload", [
    (0, b""), (44, b""), (1000, bytes(16)), (R.SET_LOG_BASE, bytes(16)), (R.SET_LOG_FD, b""),
    (R.SEND_RARP, bytes(8)), (R.SET_BACKEND_REQ_FD, b""), (R.VRING_KICK, bytes(8)),
    (R.SET_DEVICE_STATE_FD, bytes(8)), (R.POSTCOPY_LISTEN, b""), (R.SET_VRING_ENDIAN, bytes(8)),
])
def test_unknown_or_unimplemented_requests(server: Server, raw: RawFrontend, req: int, payload: bytes) -> None:
    """Refused with a failure ack when one is asked for, else the connection ends."""
    raw.send(R.SET_PROTOCOL_FEATURES, encode_u64(PF.REPLY_ACK))
    if req not in (R.SET_LOG_BASE, R.SET_DEVICE_STATE_FD):      # these always reply: no ack form
        assert raw.ack(req, payload) == 1
        assert raw.u64(R.GET_FEATURES)                            # still served
    raw.send(req, payload)
    raw.assert_closed()
    server.wait()


def test_fds_on_a_request_that_takes_none_are_refused_and_closed(server: Server, raw: RawFrontend) -> None:
    _negotiate(raw)
    raw.u64(R.GET_FEATURES)          # the back-end's fds are all open now
    fds = [_eventfd() for _ in range(3)]
    before = open_fds()
    assert raw.ack(R.SET_VRING_NUM, encode_vring_state(0, 64), fds) == 1
    assert raw.ack(R.SET_VRING_CALL, vring_fd_payload(0, nofd=True), fds[:1]) == 1
    assert raw.ack(R.SET_VRING_CALL, vring_fd_payload(0), fds[:2]) == 1
    assert open_fds() == before, "the back-end's copies were closed"
    for fd in fds:
        os.close(fd)


# --------------------------------------------------------------------------
# Config space

def test_get_config_replies_with_exactly_the_size_asked(raw: RawFrontend) -> None:
    _negotiate(raw)
    for offset, size in ((0, CONFIG_SIZE), (4, 4), (15, 1)):
        msg = raw.request(R.GET_CONFIG, encode_config(offset, 0, bytes(size)))
        assert len(msg.payload) == CONFIG_HEADER.size + size
        access = decode_config(R.GET_CONFIG, msg.payload)
        assert access.offset == offset and access.data == bytes(range(offset, offset + size))


def test_get_config_refused_is_an_empty_reply(raw: RawFrontend) -> None:
    _negotiate(raw)
    msg = raw.request(R.GET_CONFIG, encode_config(8, 0, bytes(CONFIG_SIZE)))
    assert msg.payload == b""
    # still connected
    assert raw.u64(R.GET_FEATURES)


def test_set_config_flags_and_read_only_fields(server: Server, raw: RawFrontend) -> None:
    _negotiate(raw)
    assert raw.ack(R.SET_CONFIG, encode_config(8, 0, b"\xAA\xBB")) == 0
    assert raw.ack(R.SET_CONFIG, encode_config(9, 1, b"\xCC")) == 0        # MIGRATION
    assert raw.ack(R.SET_CONFIG, encode_config(0, 0, b"\x01")) == 1        # read-only field
    assert raw.ack(R.SET_CONFIG, encode_config(8, 2, b"\x01")) == 1        # unknown flags
    assert raw.ack(R.SET_CONFIG, encode_config(250, 0, bytes(10))) == 1    # beyond any config space
    raw.send(R.SET_CONFIG, encode_config(0, 0, b"\x01"))                   # refused, no ack: logged only
    assert raw.u64(R.GET_FEATURES)
    assert bytes(server.device.config[8:10]) == b"\xAA\xCC"
    assert server.device.config[0] == 0
    raw.send(R.SET_CONFIG, encode_config(8, 5, b"\x01"))                   # bad flags, no ack: ends
    raw.assert_closed()


# --------------------------------------------------------------------------
# Rings

def _queue_setup(fe: VhostUserFrontend, index: int = 0, size: int = 64):
    q = fe.setup_queue(index, size)
    return q


def _roundtrip(q, data: bytes) -> bytes:
    src, sv = q.alloc(len(data))
    sv[:] = data
    dst, dv = q.alloc(len(data))
    head = q.submit([(src, len(data))], [(dst, len(data))])
    q.kick()
    done = q.wait_used(5)
    assert done == [(head, len(data))]
    return bytes(dv)


def _xor(data: bytes) -> bytes:
    return bytes(b ^ KEY for b in data)


def test_queues_end_to_end(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        q0 = _queue_setup(fe, 0)
        q1 = _queue_setup(fe, 1, 128)
        for i in range(20):
            data = os.urandom(1 + i * 37)
            assert _roundtrip(q0 if i % 2 else q1, data) == _xor(data)
        # a chain with several readable and writable buffers, indirect
        parts = [q0.alloc(n) for n in (3, 100, 7)]
        for gpa, view in parts:
            view[:] = os.urandom(len(view))
        outs = [q0.alloc(n) for n in (50, 60)]
        head = q0.submit([(g, len(v)) for g, v in parts], [(g, len(v)) for g, v in outs], indirect=True)
        q0.kick()
        assert q0.wait_used(5) == [(head, 110)]
        assert b"".join(bytes(v) for _, v in outs) == _xor(b"".join(bytes(v) for _, v in parts))
    server.wait()
    assert server.device.served == 21
    assert ("stop", 0) in server.device.events and ("stop", 1) in server.device.events


def test_rings_enabled_at_once_without_protocol_features_bit(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate(features=VF.VERSION_1 | VF.RING_EVENT_IDX)
        # negotiate() acks bit 30 whenever it is offered; set the features again without it
        fe.request(R.SET_FEATURES, encode_u64(VF.VERSION_1 | VF.RING_EVENT_IDX))
        fe.acked_features = VF.VERSION_1 | VF.RING_EVENT_IDX
        fe.setup_memory(4 << 20)
        q = _queue_setup(fe, 0)
        assert ("start", 0, True) in server.device.events
        assert _roundtrip(q, b"abc") == _xor(b"abc")
        with pytest.raises(ProtocolError, match="acked failure"):
            fe.enable_queue(0, False)        # SET_VRING_ENABLE needs bit 30 acked
    server.wait()


def test_rings_disabled_until_set_vring_enable_with_bit_30(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        assert fe.acked_features & VF.PROTOCOL_FEATURES
        fe.setup_memory(4 << 20)
        fe.setup_queue(0, 64)            # KICK (starts, disabled) ... then ENABLE(1)
        assert ("start", 0, False) in server.device.events
        assert server.call(lambda: server.handler.queues[0].enabled) is True
        fe.enable_queue(0, False)
        assert server.call(lambda: server.handler.queues[0].enabled) is False
        assert server.call(lambda: server.handler.queues[0].started) is True, "enable does not stop"


def test_get_vring_base_stops_and_a_restart_resumes(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        q = _queue_setup(fe, 0, 16)
        for _ in range(5):
            _roundtrip(q, b"x")
        base = fe.stop_queue(0)
        assert base == 5
        ev = server.device.events
        assert ev[-1] == ("stop", 0)
        assert server.call(lambda: server.handler.queues[0].started) is False
        # configuring a stopped ring is fine; the same on a started one is refused
        fe._start_queue(q, base)
        assert _roundtrip(q, b"after restart") == _xor(b"after restart")
        with pytest.raises(ProtocolError, match="acked failure"):
            fe.request(R.SET_VRING_NUM, encode_vring_state(0, 16))
        with pytest.raises(ProtocolError, match="acked failure"):
            fe.request(R.SET_VRING_BASE, encode_vring_state(0, 0))
        # GET_VRING_BASE of a ring that is not started just reports its base
        assert fe.stop_queue(1) == 0


def test_set_vring_addr_on_a_running_ring(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        q = fe.setup_queue(0, 16)
        fe.request(R.SET_VRING_ADDR, encode_vring_addr(q.vring_addr()))      # same rings: fine
        assert _roundtrip(q, b"still") == _xor(b"still")
        bad = q.vring_addr()._replace(used=0x1000)                           # not guest memory
        with pytest.raises(ProtocolError, match="acked failure"):
            fe.request(R.SET_VRING_ADDR, encode_vring_addr(bad))


def test_nofd_kick_polls_the_ring(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        q = fe.setup_queue(0, 16)
        fe.stop_queue(0)
        # restart in polling mode: no kick fd at all
        fe.request(R.SET_VRING_KICK, vring_fd_payload(0, nofd=True))
        fe.request(R.SET_VRING_CALL, vring_fd_payload(0), fds=[q.call_fd])
        src, sv = q.alloc(4)
        sv[:] = b"poll"
        dst, dv = q.alloc(4)
        head = q.submit([(src, 4)], [(dst, 4)])      # no kick
        assert q.wait_used(5) == [(head, 4)]
        assert bytes(dv) == _xor(b"poll")


def test_kick_fd_must_be_an_eventfd(server: Server, raw: RawFrontend) -> None:
    _negotiate(raw)
    memfd = os.memfd_create("not-an-eventfd")
    r, w = os.pipe()
    raw.u64(R.GET_FEATURES)
    before = open_fds()
    try:
        assert raw.ack(R.SET_VRING_KICK, vring_fd_payload(0), [memfd]) == 1
        assert raw.ack(R.SET_VRING_CALL, vring_fd_payload(0), [w]) == 1
        assert open_fds() == before
    finally:
        for fd in (memfd, r, w):
            os.close(fd)


def test_vring_started_before_addresses_is_refused(raw: RawFrontend) -> None:
    _negotiate(raw)
    kick = _eventfd()
    assert raw.ack(R.SET_VRING_NUM, encode_vring_state(0, 64)) == 0
    assert raw.ack(R.SET_VRING_KICK, vring_fd_payload(0), [kick]) == 1
    # addresses outside any memory: start fails, the ring stays stopped
    assert raw.ack(R.SET_VRING_ADDR, encode_vring_addr(VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))) == 0
    assert raw.ack(R.SET_VRING_KICK, vring_fd_payload(0), [kick]) == 1
    assert raw.ack(R.SET_VRING_ADDR, encode_vring_addr(VringAddr(0, 2, 0, 0, 0, 0))) == 1   # unknown flag
    msg = raw.request(R.GET_VRING_BASE, encode_vring_state(0, 0))
    assert decode_vring_state(msg.payload) == (0, 0)
    os.close(kick)


# --------------------------------------------------------------------------
# Memory

def _memfd(size: int) -> int:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


def test_set_mem_table_fd_count_must_match(server: Server, raw: RawFrontend) -> None:
    _negotiate(raw)
    raw.u64(R.GET_FEATURES)
    fds = [_memfd(1 << 20) for _ in range(3)]
    table = encode_mem_table([MemoryRegion(0, 1 << 20, 0x10_0000_0000, 0),
                              MemoryRegion(1 << 30, 1 << 20, 0x20_0000_0000, 0)])
    before = open_fds()
    assert raw.ack(R.SET_MEM_TABLE, table, fds) == 1
    assert raw.ack(R.SET_MEM_TABLE, table, fds[:1]) == 1
    assert open_fds() == before
    assert raw.ack(R.SET_MEM_TABLE, table, fds[:2]) == 0
    assert len(server.call(lambda: server.handler.mem.regions)) == 2
    for fd in fds:
        os.close(fd)


def test_add_and_remove_memory_regions(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate(protocol_features=int(GENERIC_PROTOCOL_FEATURES))
        assert fe.acked_protocol_features & PF.CONFIGURE_MEM_SLOTS
        assert fe._get_u64(R.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS
        from frontend.vhost_user import DriverMemory
        fe.mem = DriverMemory(4 << 20)
        for region in fe.mem.table():
            fe.request(R.ADD_MEM_REG, encode_single_region(region), fds=[fe.mem.fd])
        assert len(server.call(lambda: server.handler.mem.regions)) == 2
        q = fe.setup_queue(0, 16)
        data = os.urandom(64)
        assert _roundtrip(q, data) == _xor(data)
        # removing a region that does not exist is refused; the right one works
        bogus = MemoryRegion(0x1234000, 4096, 0x99_0000_0000, 0)
        with pytest.raises(ProtocolError, match="acked failure"):
            fe.request(R.REM_MEM_REG, encode_single_region(bogus))
        region1 = fe.mem.table()[1]
        fe.request(R.REM_MEM_REG, encode_single_region(region1._replace(mmap_offset=0)))
        assert len(server.call(lambda: server.handler.mem.regions)) == 1
        # the rings live in region 0: the queue still works with buffers there
        src, sv = fe.mem.alloc(8, region=0)
        sv[:] = b"region-0"
        dst, dv = fe.mem.alloc(8, region=0)
        head = q.submit([(src, 8)], [(dst, 8)])
        q.kick()
        assert q.wait_used(5) == [(head, 8)] and bytes(dv) == _xor(b"region-0")
        # a buffer in the removed region breaks only this queue
        src, _ = fe.mem.alloc(8, region=1)
        q.submit([(src, 8)], [(dst, 8)])
        q.kick()
        wait_broken(q)


def test_mem_table_replaced_while_running_remaps_rings(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        q = fe.setup_queue(0, 16)
        assert _roundtrip(q, b"before") == _xor(b"before")
        old = server.call(lambda: server.handler.mem.regions)
        fe.setup_memory()                   # same table again: new mappings
        new = server.call(lambda: server.handler.mem.regions)
        assert len(new) == len(old) and not set(map(id, new)) & set(map(id, old))
        assert _roundtrip(q, b"after") == _xor(b"after")


# --------------------------------------------------------------------------
# Inflight, reset, status

def test_get_inflight_fd_reply_carries_the_fd(raw: RawFrontend) -> None:
    _negotiate(raw)
    msg = raw.request(R.GET_INFLIGHT_FD, encode_inflight(InflightInfo(0, 0, 2, 64)))
    info = decode_inflight(msg.payload)
    assert info.mmap_size > 0 and info.mmap_offset == 0 and (info.num_queues, info.queue_size) == (2, 64)
    assert len(msg.fds) == 1
    assert os.fstat(msg.fds[0]).st_size >= info.mmap_size
    # bad geometry is refused
    assert raw.ack(R.SET_INFLIGHT_FD, encode_inflight(InflightInfo(info.mmap_size, 0, 3, 64)),
                   msg.fds) == 1
    assert raw.ack(R.SET_INFLIGHT_FD, encode_inflight(info), msg.fds) == 0
    msg.close_fds()
    raw.send(R.GET_INFLIGHT_FD, encode_inflight(InflightInfo(0, 0, 9, 64)))
    raw.assert_closed()


def test_inflight_requests_resubmitted_after_reconnect(lt: LoopThread, sock_path: str) -> None:
    """A back-end that dies with requests in flight: the next connection gets
    the inflight fd back (SET_INFLIGHT_FD) and finishes them."""
    s = Server(lt, sock_path, device=HoldingXorDevice(lt.ex, queues=1))
    try:
        with VhostUserFrontend.connect(sock_path) as fe:
            fe.negotiate()
            fe.setup_memory(4 << 20)
            fe.get_inflight(1, 16)
            q = fe.setup_queue(0, 16)
            bufs = []
            for i in range(3):
                src, sv = q.alloc(4)
                sv[:] = bytes([i]) * 4
                dst, dv = q.alloc(4)
                bufs.append((q.submit([(src, 4)], [(dst, 4)]), dv))
            q.kick()
            for _ in range(100):
                if len(getattr(s.device, "held", [])) == 3:
                    break
                lt.call(lambda: None)
            assert len(s.device.held) == 3
            fe.disconnect()                 # the back-end's connection ends; nothing completed
            s.serve_again(XorDevice(lt.ex, queues=1))
            fe.reconnect()
            done = dict(q.wait_used(5))
            while len(done) < 3:
                done.update(q.wait_used(5))
            for i, (head, dv) in enumerate(bufs):
                assert done[head] == 4
                assert bytes(dv) == _xor(bytes([i]) * 4)
    finally:
        s.close()


# --------------------------------------------------------------------------
# A hostile front-end harming its own device: contained to the queue (or
# the message), with a clear reason; the connection and the process go on.

def _forge_inflight_counter(fe: VhostUserFrontend, head: int, counter: int) -> None:
    """Mark ``head`` in flight with ``counter`` in queue 0's inflight region,
    through the front-end's own mapping of the fd."""
    import mmap
    import struct
    assert fe.inflight_fd is not None and fe.inflight_info is not None
    with mmap.mmap(fe.inflight_fd, fe.inflight_info.mmap_size) as mm:
        struct.pack_into("<QHHHH", mm, 0, 0, 1, fe.inflight_info.queue_size, 0, 0)   # version 1
        struct.pack_into("<B5xHQ", mm, 16 + 16 * head, 1, 0, counter)


def test_forged_inflight_counter_is_refused_by_set_inflight_fd(server: Server, caplog) -> None:
    """2^64-1 as a fetch counter, handed over with SET_INFLIGHT_FD: refused
    (failure ack naming the slot and value); the connection goes on."""
    caplog.set_level(logging.WARNING, logger="vhost.connection")
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        fe.get_inflight(1, 16)
        _forge_inflight_counter(fe, 3, 2**64 - 1)
        with pytest.raises(ProtocolError, match="acked failure"):
            fe.request(R.SET_INFLIGHT_FD, encode_inflight(fe.inflight_info), fds=[fe.inflight_fd])
        assert "inflight queue 0: slot 3 counter 0xffffffffffffffff is not below 2^63" in caplog.text
        os.pwrite(fe.inflight_fd, bytes(fe.inflight_info.mmap_size), 0)   # a fresh region again
        fe.request(R.SET_INFLIGHT_FD, encode_inflight(fe.inflight_info), fds=[fe.inflight_fd])
        q = fe.setup_queue(0, 16)                  # the connection goes on
        assert _roundtrip(q, b"still") == _xor(b"still")


def test_inflight_counter_forged_after_set_inflight_fd_breaks_only_that_queue(server: Server) -> None:
    """The region is shared memory: forged after SET_INFLIGHT_FD, the counter
    is caught when the ring starts (before any use): that queue breaks with a
    clear reason and its err fd fires; the other queue and the connection
    go on.  (It used to break later, through a bare ValueError.)"""
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        fe.get_inflight(2, 16)
        _forge_inflight_counter(fe, 3, 2**64 - 1)
        q0 = fe.setup_queue(0, 16)
        assert q0.broken()
        running = server.call(lambda: server.handler.queues[0].running)
        assert running.broken
        assert running.broken_reason == "inflight queue 0: slot 3 counter 0xffffffffffffffff is not below 2^63"
        q1 = fe.setup_queue(1, 16)
        assert _roundtrip(q1, b"other") == _xor(b"other")
        assert fe.stop_queue(0) == 0               # nothing was taken from the broken ring


def _eventfd_count_of(fd: int) -> int:
    """An eventfd's counter without reading it (a semaphore-mode read returns 1)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-count:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"fd {fd} is not an eventfd")


def test_semaphore_kick_fd_breaks_the_queue_instead_of_spinning(server: Server) -> None:
    """A kick fd that is a semaphore-mode eventfd with a huge count stays
    readable for 2^64-2 reads: the back-end read it forever at full CPU.
    Now it reads a bounded number of times, breaks that queue (err fd) and
    stops watching the fd; the connection and the other queue go on."""
    from connection.kick import KICK_CHECK_EVERY, KICK_READS_PER_WAKE
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        q1 = fe.setup_queue(1, 16)
        sem = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
        err = _eventfd()
        try:
            from frontend.vhost_user import DriverQueue
            ring = DriverQueue(fe.mem, 0, 16, event_idx=True, indirect=False)
            fe.request(R.SET_VRING_NUM, encode_vring_state(0, 16))
            fe.request(R.SET_VRING_ADDR, encode_vring_addr(ring.vring_addr()))
            fe.request(R.SET_VRING_ERR, vring_fd_payload(0), fds=[err])
            fe.request(R.SET_VRING_KICK, vring_fd_payload(0), fds=[sem])
            os.eventfd_write(sem, 2**64 - 2)
            assert select.select([err], [], [], 5)[0] == [err], "the queue was not broken (err fd)"
            assert os.eventfd_read(err) == 1
            reason = server.call(lambda: server.handler.queues[0].running.broken_reason)
            assert reason == (f"kick fd {server.call(lambda: server.handler.queues[0].kick_fd)} still readable "
                              f"after {KICK_READS_PER_WAKE} reads (a semaphore-mode eventfd, or not an eventfd)")
            left = _eventfd_count_of(sem)
            assert left == 2**64 - 2 - (KICK_CHECK_EVERY - 1) - KICK_READS_PER_WAKE
            assert _roundtrip(q1, b"alive") == _xor(b"alive")   # loop turns; fd no longer read
            assert _eventfd_count_of(sem) == left
            ring.close()
        finally:
            os.close(sem)
            os.close(err)


def test_reset_device_stops_rings_and_resets(server: Server) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        fe.setup_queue(0, 16)
        fe.request(R.RESET_DEVICE)
        ev = server.device.events
        assert ev[-2:] == [("stop", 0), ("reset",)]
        assert server.call(lambda: (server.handler.acked_features, server.handler.queues[0].started)) == (0, False)
        # the memory table stays; the rings can be set up again
        assert len(server.call(lambda: server.handler.mem.regions)) == 2


def test_reset_owner_stops_rings_and_keeps_the_connection(server: Server, raw: RawFrontend) -> None:
    _negotiate(raw)
    assert raw.ack(R.RESET_OWNER) == 0
    assert server.device.events[-1] == ("reset",)
    assert server.call(lambda: server.handler.acked_features) != 0, "connection state is kept"
    assert raw.ack(R.SET_OWNER) == 0


def test_status(raw: RawFrontend) -> None:
    _negotiate(raw)
    assert raw.u64(R.GET_STATUS) == 0
    assert raw.ack(R.SET_STATUS, encode_u64(0x0F)) == 0
    assert raw.u64(R.GET_STATUS) == 0x0F


# --------------------------------------------------------------------------
# Disconnect

def test_disconnect_stops_queues_unmaps_and_closes_everything(lt: LoopThread, sock_path: str) -> None:
    lt.call(lambda: None)
    before = open_fds()
    s = Server(lt, sock_path)
    with VhostUserFrontend.connect(sock_path) as fe:
        fe.negotiate()
        fe.setup_memory(4 << 20)
        fe.get_inflight(2, 64)
        q0 = fe.setup_queue(0, 64)
        fe.setup_queue(1, 64)
        _roundtrip(q0, b"hi")
        fe.disconnect()
        s.wait()
        assert ("stop", 0) in s.device.events and ("stop", 1) in s.device.events
        h = s.handler
        assert s.call(lambda: (h.mem.regions, h.inflight, [q.started for q in h.queues])) == ((), None, [False, False])
        # the front-end still owns its inflight fd, untouched
        assert os.fstat(fe.inflight_fd).st_size > 0
        # serve the next front-end with the same handler: it starts from scratch
        s.serve_again()
        fe.reconnect()
        assert _roundtrip(q0, b"again") == _xor(b"again")
    s.wait()
    s.close()
    lt.call(lambda: None)
    assert open_fds() == before


def test_same_region_added_and_removed_twice(server: Server) -> None:
    """QEMU's multiqueue net runs one vhost_dev per queue pair on one socket,
    each adding (and removing) the same regions: the repeat is a no-op, a
    region never added is still refused."""
    with VhostUserFrontend.connect(server.path) as fe:
        fe.negotiate(protocol_features=int(GENERIC_PROTOCOL_FEATURES))
        from frontend.vhost_user import DriverMemory
        fe.mem = DriverMemory(4 << 20)
        for _ in range(2):
            for region in fe.mem.table():
                fe.request(R.ADD_MEM_REG, encode_single_region(region), fds=[fe.mem.fd])
        assert len(server.call(lambda: server.handler.mem.regions)) == 2
        region1 = fe.mem.table()[1]
        for _ in range(2):
            fe.request(R.REM_MEM_REG, encode_single_region(region1))
        assert len(server.call(lambda: server.handler.mem.regions)) == 1
        with pytest.raises(ProtocolError, match="acked failure"):
            fe.request(R.REM_MEM_REG, encode_single_region(MemoryRegion(0x1234000, 4096, 0x99_0000_0000, 0)))
    server.wait()
