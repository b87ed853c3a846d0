"""Property test: random front-end messages against the real handler.

Each example opens a fresh connection (a socketpair served by
``VhostUserStream.run_backend`` with an ``XorDevice``), sends a random
sequence of messages (random request codes, flags, sizes and payloads,
often well-formed enough to reach deep states: memory tables backed by real
memfds with random contents, rings, kicks), then closes its end.

Properties: the serve loop finishes with None (only typed errors happen
inside; nothing escapes), no internal error is logged, the process survives,
and no fd is left open once both ends are gone.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from connection.connection import VhostUserStream
from connection.protocol import (FLAG_NEED_REPLY, HEADER, VERSION, FrontendReq,
                                 InflightInfo, MemoryRegion, VirtioFeature, VringAddr,
                                 encode_config, encode_inflight, encode_mem_table, encode_single_region,
                                 encode_u64, encode_vring_addr, encode_vring_state)
from tests.conftest import open_fds
from tests.connection.support import LoopThread, XorDevice

R = FrontendReq
MEM_SIZE = 256 << 10
QVA = 0x7F00_0000_0000
GPA = 0x1_0000_0000


class Collect(logging.Handler):
    """Keeps the records that mean a bug rather than a bad message."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "internal error" in msg or "unexpected" in msg or record.exc_info:
            self.bad.append(f"{record.name}: {msg}")


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt


@pytest.fixture(scope="module")
def bad_logs() -> Iterator[Collect]:
    h = Collect()
    log = logging.getLogger("vhost")
    log.addHandler(h)
    yield h
    log.removeHandler(h)


# --------------------------------------------------------------------------
# Strategies

small_index = st.one_of(st.integers(0, 3), st.sampled_from([255, 256, 1 << 31]))
ring_size = st.sampled_from([0, 1, 2, 3, 4, 16, 64, 256, 257, 1024, 1 << 16])
ring_addr = st.one_of(st.integers(0, MEM_SIZE // 4096 - 1).map(lambda p: QVA + p * 4096),
                      st.integers(0, (1 << 64) - 1))
u64 = st.integers(0, (1 << 64) - 1)


@st.composite
def valid_payload(draw: st.DrawFn, req: int) -> tuple[bytes, list[str]]:
    """A payload of the right shape for ``req``, random values, and the kinds
    of fds to attach."""
    if req == R.SET_FEATURES:
        bits = draw(st.sampled_from([
            int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.RING_EVENT_IDX
                | VirtioFeature.RING_INDIRECT_DESC),
            int(VirtioFeature.VERSION_1), 0]))
        return encode_u64(bits if draw(st.booleans()) else draw(u64)), []
    if req == R.SET_PROTOCOL_FEATURES:
        return encode_u64(draw(st.sampled_from([0x3209 | 0x11000, 0x8, 0x3209, 1 << 5]))), []
    if req == R.SET_MEM_TABLE:
        n = draw(st.integers(0, 3))
        regions = [MemoryRegion(GPA * i, draw(st.sampled_from([MEM_SIZE, 4096, 0, MEM_SIZE * 2])),
                                QVA + MEM_SIZE * 2 * i, draw(st.sampled_from([0, 4096]))) for i in range(n)]
        kinds = ["mem"] * draw(st.sampled_from([n, n, max(0, n - 1), n + 1]))
        return encode_mem_table(regions), kinds
    if req in (R.ADD_MEM_REG, R.REM_MEM_REG):
        i = draw(st.integers(0, 2))
        region = MemoryRegion(GPA * i, draw(st.sampled_from([MEM_SIZE, 4096])), QVA + MEM_SIZE * 2 * i, 0)
        return encode_single_region(region), (["mem"] if req == R.ADD_MEM_REG or draw(st.booleans()) else [])
    if req in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE, R.VRING_KICK):
        return encode_vring_state(draw(small_index) & 0xFFFF_FFFF, draw(ring_size)), []
    if req == R.SET_VRING_ADDR:
        return encode_vring_addr(VringAddr(draw(small_index) & 0xFFFF_FFFF, draw(st.sampled_from([0, 1, 2])),
                                           draw(ring_addr), draw(ring_addr), draw(ring_addr), 0)), []
    if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        nofd = draw(st.booleans())
        value = draw(st.integers(0, 3)) | (0x100 if nofd else 0)
        if draw(st.integers(0, 9)) == 0:
            value = draw(u64)
        kinds = [] if nofd else [draw(st.sampled_from(["event", "event", "event", "mem", "pipe"]))]
        return encode_u64(value), kinds
    if req in (R.GET_CONFIG, R.SET_CONFIG):
        size = draw(st.integers(0, 20))
        return encode_config(draw(st.integers(0, 20)), draw(st.sampled_from([0, 1, 2])),
                             draw(st.binary(min_size=size, max_size=size))), []
    if req in (R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD):
        info = InflightInfo(draw(st.sampled_from([0, 4096, 8192, 1 << 20])), draw(st.sampled_from([0, 4096, 1])),
                            draw(st.integers(0, 3)), draw(st.sampled_from([0, 16, 64, 1024])))
        return encode_inflight(info), (["mem"] if req == R.SET_INFLIGHT_FD else [])
    if req == R.SET_STATUS:
        return encode_u64(draw(st.sampled_from([0, 0xF, 0x100]))), []
    return b"", []


#: Requests weighted toward what the handler implements.
IMPLEMENTED = [R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.RESET_OWNER, R.GET_PROTOCOL_FEATURES,
               R.SET_PROTOCOL_FEATURES, R.SET_MEM_TABLE, R.GET_MAX_MEM_SLOTS, R.ADD_MEM_REG, R.REM_MEM_REG,
               R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_KICK,
               R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE, R.GET_QUEUE_NUM, R.GET_CONFIG,
               R.SET_CONFIG, R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD, R.RESET_DEVICE, R.GET_STATUS,
               R.SET_STATUS]


@st.composite
def message(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """Raw bytes of one message (header + payload) and the fd kinds to attach."""
    shape = draw(st.integers(0, 9))
    if shape < 7:
        req = draw(st.sampled_from(IMPLEMENTED))
        payload, kinds = draw(valid_payload(req))
    else:
        req = draw(st.one_of(st.integers(0, 46), st.integers(0, 0xFFFF_FFFF)))
        payload = draw(st.binary(max_size=64))
        kinds = draw(st.lists(st.sampled_from(["event", "mem", "pipe"]), max_size=3))
    flags = VERSION | (FLAG_NEED_REPLY if draw(st.booleans()) else 0)
    if draw(st.integers(0, 19)) == 0:
        flags = draw(st.integers(0, 0xFFFF_FFFF))
    size = len(payload)
    if draw(st.integers(0, 19)) == 0:
        size = draw(st.sampled_from([0, 1, 7, 9, 4096, 4097, 0xFFFF_FFFF]))
        payload = payload[:size]
    return HEADER.pack(req & 0xFFFF_FFFF, flags, size) + payload, kinds


def negotiation() -> list[tuple[bytes, list[str]]]:
    """A prefix that gets the handler into its served state (acks, memory, a ring)."""
    def m(req: int, payload: bytes = b"", kinds: list[str] | None = None) -> tuple[bytes, list[str]]:
        return HEADER.pack(req, VERSION | FLAG_NEED_REPLY, len(payload)) + payload, kinds or []
    return [
        m(R.SET_PROTOCOL_FEATURES, encode_u64(0x3209 | 0x11000)),
        m(R.SET_OWNER),
        m(R.SET_FEATURES, encode_u64(int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
                                         | VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_INDIRECT_DESC))),
        m(R.SET_MEM_TABLE, encode_mem_table([MemoryRegion(0, MEM_SIZE, QVA, 0)]), ["mem"]),
        m(R.SET_VRING_NUM, encode_vring_state(0, 16)),
        m(R.SET_VRING_ADDR, encode_vring_addr(VringAddr(0, 0, QVA, QVA + 8192, QVA + 4096, 0))),
        m(R.SET_VRING_CALL, encode_u64(0), ["event"]),
        m(R.SET_VRING_ERR, encode_u64(0), ["event"]),
        m(R.SET_VRING_KICK, encode_u64(0), ["kick"]),
    ]


@st.composite
def guest_memory(draw: st.DrawFn) -> bytes:
    """Guest RAM for the memfds: random bytes, or a split ring at the
    prefix's addresses (desc 0, avail 4096, used 8192) with random, mostly
    plausible descriptors, so chains reach the device and malformed ones
    break the queue."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=64))
    mem = bytearray(MEM_SIZE)
    descs = draw(st.lists(st.tuples(
        st.one_of(st.integers(0, 63).map(lambda i: 12288 + 64 * i), u64),
        st.sampled_from([0, 1, 16, 64, 4096, 0xFFFF_FFFF]),
        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 0xFFFF]),
        st.integers(0, 17)), max_size=16))
    for i, (addr, length, flags, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", mem, 16 * i, addr, length, flags, nxt)
    heads = draw(st.lists(st.integers(0, 17), max_size=8))
    idx = draw(st.sampled_from([len(heads), len(heads), 0, 40, 0xFFFF]))
    struct.pack_into("<HH", mem, 4096, 0, idx)
    for k, h in enumerate(heads):
        struct.pack_into("<H", mem, 4096 + 4 + 2 * k, h)
    return bytes(mem)


# --------------------------------------------------------------------------
# The property

def _make_fd(kind: str, memory: bytes) -> int:
    if kind in ("event", "kick"):
        fd = os.eventfd(1 if kind == "kick" else 0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return fd
    if kind == "mem":
        fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, MEM_SIZE)
        if len(memory) == MEM_SIZE:
            os.pwrite(fd, memory, 0)
        elif memory:
            os.pwrite(fd, (memory * (MEM_SIZE // len(memory) + 1))[:MEM_SIZE], 0)
        return fd
    r, w = os.pipe()
    os.close(r)
    return w


def _drain(sock: socket.socket) -> None:
    """Read replies until EOF, closing any fd they carry."""
    space = socket.CMSG_SPACE(16 * 4)
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(4096, space)
        except (ConnectionResetError, TimeoutError):
            return
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if not data:
            return


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prefix=st.booleans(), messages=st.lists(message(), min_size=1, max_size=12),
       memory=guest_memory(), kick_after=st.booleans())
def test_random_messages_never_escape_or_leak(loop_thread: LoopThread, bad_logs: Collect, prefix: bool,
                                             messages: list[tuple[bytes, list[str]]], memory: bytes,
                                             kick_after: bool) -> None:
    lt = loop_thread
    lt.call(lambda: None)
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    device = XorDevice(lt.ex)
    fut = lt.submit(VhostUserStream(b).run_backend(device, lt.ex))
    kicks: list[int] = []
    try:
        for raw, kinds in (negotiation() if prefix else []) + messages:
            fds = [_make_fd(k, memory) for k in kinds]
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
                a.sendmsg([raw], anc)
            except (BrokenPipeError, ConnectionResetError):
                break
            finally:
                for fd, k in zip(fds, kinds):
                    if k == "kick" and kick_after:
                        kicks.append(fd)     # kept to kick the ring again later
                    else:
                        os.close(fd)
        for fd in kicks:
            os.eventfd_write(fd, 1)
        a.shutdown(socket.SHUT_WR)
        _drain(a)
        assert fut.result(10) is None
        event(f"rings started: {sum(1 for e in device.events if e[0] == 'start') > 0}")
        event(f"chains served: {device.served > 0}")
    finally:
        a.close()
        for fd in kicks:
            os.close(fd)
    lt.call(lambda: None)
    assert bad_logs.bad == [], bad_logs.bad
    assert open_fds() == before, f"leaked: {[(fd, os.readlink(f'/proc/self/fd/{fd}')) for fd in open_fds() - before]}"
