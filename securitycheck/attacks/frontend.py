"""Class 2, hostile front-end: a VMM (or whoever holds the socket) sends
malformed, out-of-order and oversized vhost-user messages and fds of every
wrong kind.

Expected every time: that connection ends (or the request is refused with a
failure ack or an empty reply), the device child ends cleanly rather than
crashing, the supervisor and every other device keep serving untouched, and
the device serves a fresh connection with real I/O.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from connection.errors import ConnectionClosed, ProtocolError
from connection.protocol import (FLAG_NEED_REPLY, FLAG_REPLY, HEADER, VERSION, FrontendReq, InflightInfo,
                                 MemoryRegion, ProtocolFeature, VringAddr, encode_config, encode_inflight,
                                 encode_mem_table, encode_single_region, encode_u64, encode_vring_addr,
                                 encode_vring_state, vring_fd_payload)
from frontend.vhost_user import DRIVER_PROTOCOL_FEATURES, VhostUserFrontend

from ..catalog import CaseFailed, check, register, Case
from ..devtypes import TYPES

R = FrontendReq
CLOSED = "connection ended"
REFUSED = "request refused"
PROTOCOL_ALL = DRIVER_PROTOCOL_FEATURES | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.STATUS
WAIT = 3.0


# ---------------------------------------------------------------------------
# Talking to the back-end without the driver's manners

def send_raw(fe: VhostUserFrontend, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    fe.sock.sock.sendmsg([data], anc)


def message(req: int, payload: bytes = b"", flags: int = VERSION, size: int | None = None) -> bytes:
    return HEADER.pack(req, flags, len(payload) if size is None else size) + payload


def after(fe: VhostUserFrontend, timeout: float = WAIT) -> str:
    """What the back-end does next: ends the connection, refuses (failure ack
    or empty reply), answers, or nothing."""
    sock = fe.sock.sock
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "connection still open, no answer"
        r, _, _ = select.select([sock], [], [], remaining)
        if not r:
            continue
        try:
            msg = fe.sock.recv(expect_reply=True)
        except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
            return CLOSED
        except ProtocolError as e:
            return f"malformed reply: {e}"
        msg.close_fds()
        if msg.flags & FLAG_REPLY and len(msg.payload) == 8 and struct.unpack("=Q", msg.payload)[0] != 0 \
                and msg.request not in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
                                        R.GET_MAX_MEM_SLOTS, R.GET_STATUS):
            return REFUSED
        if msg.request in (R.GET_CONFIG, R.GET_INFLIGHT_FD) and len(msg.payload) in (0, 12):
            return REFUSED
        if msg.request == R.GET_INFLIGHT_FD and struct.unpack_from("=Q", msg.payload)[0] == 0:
            return REFUSED
        return f"answered {msg.name}"


def ended(fe: VhostUserFrontend, req: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
          *, need_reply: bool = True, flags: int | None = None, size: int | None = None) -> str:
    """Send one request (asking for an ack unless told otherwise); the outcome."""
    f = flags if flags is not None else VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    send_raw(fe, message(req, payload, f, size), fds)
    return after(fe)


def session(fe: VhostUserFrontend, *, memory: bool = True, protocol: int = PROTOCOL_ALL) -> None:
    """A well-behaved start: negotiate (with REPLY_ACK) and share memory."""
    fe.negotiate(protocol_features=protocol)
    if memory:
        fe.setup_memory(16 << 20)


# ---------------------------------------------------------------------------
# The case shape

ACCEPT_END = (CLOSED, REFUSED)


def hostile_case(id: str, type_name: str, tries: str, script: Callable[[VhostUserFrontend], str], *,
                 accept: tuple[str, ...] | None = ACCEPT_END, expected: str | None = None,
                 allow_crash: bool = False,
                 exit_check: Callable[[dict[str, Any]], str | None] | None = None) -> Case:
    """``script`` drives one hostile connection and returns what happened
    (``after``'s words); ``accept`` None takes any answer (the check is then
    that nothing broke)."""

    def run(env: Any) -> str:
        env.settle()
        inst = env.instance(type_name)
        pid = env.wait_ready(inst.name)["pid"]
        others = env.other_pids(inst)
        fe = VhostUserFrontend.connect(inst.socket, timeout=5.0)
        try:
            outcome = script(fe)
        finally:
            fe.disconnect()
            fe.acked_protocol_features = 0
            fe.close()
        if accept is not None:
            check(any(outcome.startswith(a) or outcome.endswith(a) for a in accept),
                  f"{outcome} (the back-end went on as if the request were fine)")
        how = env.recovered(inst, pid, others=others, allow_crash=allow_crash or exit_check is not None)
        if exit_check is not None:
            problem = exit_check(env.last_exit)
            if problem:
                raise CaseFailed(problem)
        return f"{outcome}; child: {how}; supervisor and other devices untouched; fresh connection served"

    return Case(f"frontend.{id}.{type_name}", "frontend", type_name, tries,
                expected or "connection ends or request refused; child exits cleanly; device serves again", run)


# ---------------------------------------------------------------------------
# Malformed messages (header, sizes, codes)

def _header_only(req: int, flags: int, size: int) -> Callable[[VhostUserFrontend], str]:
    def script(fe: VhostUserFrontend) -> str:
        send_raw(fe, HEADER.pack(req, flags, size))
        return after(fe)
    return script


def _truncated(data: bytes) -> Callable[[VhostUserFrontend], str]:
    def script(fe: VhostUserFrontend) -> str:
        send_raw(fe, data)
        fe.sock.sock.shutdown(socket.SHUT_WR)
        return after(fe)
    return script


MALFORMED: dict[str, tuple[str, Callable[[VhostUserFrontend], str]]] = {
    "bad-version": ("a header with version 2", _header_only(R.GET_FEATURES, 0x2, 0)),
    "reply-flag": ("a request with the REPLY flag set", _header_only(R.GET_FEATURES, VERSION | FLAG_REPLY, 0)),
    "size-4g": ("a header announcing a 4 GiB payload", _header_only(R.SET_MEM_TABLE, VERSION, 0xFFFFFFFF)),
    "size-over-cap": ("a 4097-byte payload (cap 4096)",
                      lambda fe: ended(fe, R.SET_CONFIG, bytes(4097), need_reply=False)),
    "unknown-code": ("request code 9999", lambda fe: ended(fe, 9999)),
    "code-zero": ("request code 0 (NONE)", lambda fe: ended(fe, R.NONE)),
    "code-max": ("request code 0xFFFFFFFF", lambda fe: ended(fe, 0xFFFFFFFF)),
    "fixed-size-short": ("SET_FEATURES with a 4-byte payload", lambda fe: ended(fe, R.SET_FEATURES, bytes(4))),
    "empty-with-payload": ("GET_FEATURES with 16 payload bytes", lambda fe: ended(fe, R.GET_FEATURES, bytes(16))),
    "truncated-header": ("6 bytes of a header, then end of stream", _truncated(HEADER.pack(R.GET_FEATURES, VERSION, 0)[:6])),
    "truncated-payload": ("a header for 40 bytes, 8 sent, then end of stream",
                          _truncated(HEADER.pack(R.SET_VRING_ADDR, VERSION, 40) + bytes(8))),
    "nine-fds": ("nine fds on one message (cap 8)", lambda fe: _with_fds(fe, R.SET_OWNER, 9)),
    "fd-on-getter": ("an fd attached to GET_FEATURES", lambda fe: _with_fds(fe, R.GET_FEATURES, 1)),
    "mem-table-count-lies": ("SET_MEM_TABLE saying 8 regions, carrying 1",
                             lambda fe: _mem_table_raw(fe, struct.pack("=II", 8, 0) + bytes(32), 1)),
    "mem-table-fewer-fds": ("SET_MEM_TABLE with 2 regions and 1 fd", lambda fe: _regions(fe, [
        MemoryRegion(0, 1 << 20, 1 << 40, 0), MemoryRegion(1 << 30, 1 << 20, 2 << 40, 1 << 20)], nfds=1)),
    "config-size-lies": ("SET_CONFIG whose size field says 256, carrying 4",
                         lambda fe: _negotiated(fe, R.SET_CONFIG, struct.pack("=III", 0, 256, 0) + bytes(4))),
}


def _with_fds(fe: VhostUserFrontend, req: int, n: int) -> str:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
    try:
        send_raw(fe, message(req), fds)
    finally:
        for fd in fds:
            os.close(fd)
    return after(fe)


def _negotiated(fe: VhostUserFrontend, req: int, payload: bytes = b"", fds: tuple[int, ...] = (),
                memory: bool = False) -> str:
    session(fe, memory=memory)
    return ended(fe, req, payload, fds)


# ---------------------------------------------------------------------------
# Out of order and out of range

def _ring_after_session(setup: Callable[[VhostUserFrontend], str]) -> Callable[[VhostUserFrontend], str]:
    def script(fe: VhostUserFrontend) -> str:
        session(fe)
        return setup(fe)
    return script


def _start_without_memory(fe: VhostUserFrontend) -> str:
    fe.negotiate(protocol_features=PROTOCOL_ALL)
    fe.request(R.SET_VRING_NUM, encode_vring_state(0, 64))
    fe.request(R.SET_VRING_ADDR, encode_vring_addr(VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        return ended(fe, R.SET_VRING_KICK, vring_fd_payload(0), (kick,))
    finally:
        os.close(kick)


def _start_outside_memory(fe: VhostUserFrontend) -> str:
    session(fe)
    fe.request(R.SET_VRING_NUM, encode_vring_state(0, 64))
    fe.request(R.SET_VRING_ADDR, encode_vring_addr(VringAddr(0, 0, 1 << 50, (1 << 50) + 0x4000, (1 << 50) + 0x2000, 0)))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        return ended(fe, R.SET_VRING_KICK, vring_fd_payload(0), (kick,))
    finally:
        os.close(kick)


def _double_owner(fe: VhostUserFrontend) -> str:
    fe.negotiate(protocol_features=PROTOCOL_ALL)
    return ended(fe, R.SET_OWNER)


def _features_not_offered(fe: VhostUserFrontend) -> str:
    fe.negotiate(protocol_features=PROTOCOL_ALL, set_features=False)
    return ended(fe, R.SET_FEATURES, encode_u64(1 << 63 | 1 << 40))


def _protocol_not_offered(fe: VhostUserFrontend) -> str:
    fe.request(R.GET_FEATURES, reply=True)
    return ended(fe, R.SET_PROTOCOL_FEATURES, encode_u64(1 << 62), need_reply=False)


def _inflight_after_start(fe: VhostUserFrontend) -> str:
    session(fe)
    fe.setup_queue(0, 64)
    return ended(fe, R.GET_INFLIGHT_FD, encode_inflight(InflightInfo(0, 0, 1, 64)), need_reply=False)


def _vring_base_started(fe: VhostUserFrontend) -> str:
    session(fe)
    fe.setup_queue(0, 64)
    return ended(fe, R.SET_VRING_BASE, encode_vring_state(0, 5))


def _add_region_unnegotiated(fe: VhostUserFrontend) -> str:
    fe.negotiate(protocol_features=DRIVER_PROTOCOL_FEATURES)
    memfd = _memfd(1 << 20)
    try:
        return ended(fe, R.ADD_MEM_REG, encode_single_region(MemoryRegion(0, 1 << 20, 1 << 40, 0)), (memfd,))
    finally:
        os.close(memfd)


ORDER: dict[str, tuple[str, Callable[[VhostUserFrontend], str]]] = {
    "start-without-memory": ("start a ring (kick fd) before any SET_MEM_TABLE", _start_without_memory),
    "ring-outside-memory": ("start a ring whose addresses are outside guest memory", _start_outside_memory),
    "owner-twice": ("SET_OWNER twice", _double_owner),
    "features-not-offered": ("SET_FEATURES with bits never offered", _features_not_offered),
    "protocol-not-offered": ("SET_PROTOCOL_FEATURES with bits never offered", _protocol_not_offered),
    "inflight-after-start": ("GET_INFLIGHT_FD while a ring runs", _inflight_after_start),
    "base-while-started": ("SET_VRING_BASE on a running ring", _vring_base_started),
    "add-region-unnegotiated": ("ADD_MEM_REG without CONFIGURE_MEM_SLOTS", _add_region_unnegotiated),
    "vring-num-zero": ("SET_VRING_NUM 0", _ring_after_session(
        lambda fe: ended(fe, R.SET_VRING_NUM, encode_vring_state(0, 0)))),
    "vring-num-odd": ("SET_VRING_NUM 3 (not a power of two)", _ring_after_session(
        lambda fe: ended(fe, R.SET_VRING_NUM, encode_vring_state(0, 3)))),
    "vring-num-huge": ("SET_VRING_NUM 65536", _ring_after_session(
        lambda fe: ended(fe, R.SET_VRING_NUM, encode_vring_state(0, 65536)))),
    "vring-index-range": ("SET_VRING_NUM on ring 200", _ring_after_session(
        lambda fe: ended(fe, R.SET_VRING_NUM, encode_vring_state(200, 64)))),
    "vring-base-huge": ("SET_VRING_BASE 0xFFFFFFFF", _ring_after_session(
        lambda fe: ended(fe, R.SET_VRING_BASE, encode_vring_state(0, 0xFFFFFFFF)))),
    "vring-addr-flags": ("SET_VRING_ADDR with unknown flags", _ring_after_session(
        lambda fe: ended(fe, R.SET_VRING_ADDR, encode_vring_addr(VringAddr(0, 0xFFFF, 0, 0, 0, 0))))),
    "vring-enable-2": ("SET_VRING_ENABLE with value 2", _ring_after_session(
        lambda fe: ended(fe, R.SET_VRING_ENABLE, encode_vring_state(0, 2)))),
    "kick-fd-nofd-and-fd": ("SET_VRING_KICK with NOFD set and an fd attached", _ring_after_session(
        lambda fe: _with_eventfd(fe, R.SET_VRING_KICK, vring_fd_payload(0, nofd=True)))),
    "kick-no-fd": ("SET_VRING_KICK without an fd and without NOFD", _ring_after_session(
        lambda fe: ended(fe, R.SET_VRING_KICK, vring_fd_payload(0)))),
    "kick-unknown-bits": ("SET_VRING_KICK with unknown payload bits", _ring_after_session(
        lambda fe: _with_eventfd(fe, R.SET_VRING_KICK, encode_u64(1 << 40)))),
    "config-past-end": ("GET_CONFIG at offset 0xFFFFFF00, 256 bytes", _ring_after_session(
        lambda fe: ended(fe, R.GET_CONFIG, encode_config(0xFFFFFF00, 0, bytes(256)), need_reply=False))),
    "config-bad-flags": ("SET_CONFIG with flags 7", _ring_after_session(
        lambda fe: ended(fe, R.SET_CONFIG, encode_config(0, 7, bytes(4))))),
    "inflight-zero-queues": ("GET_INFLIGHT_FD for 0 queues", _ring_after_session(
        lambda fe: ended(fe, R.GET_INFLIGHT_FD, encode_inflight(InflightInfo(0, 0, 0, 64)), need_reply=False))),
    "inflight-huge-queue": ("GET_INFLIGHT_FD for queues of 65535 entries", _ring_after_session(
        lambda fe: ended(fe, R.GET_INFLIGHT_FD, encode_inflight(InflightInfo(0, 0, 1, 65535)), need_reply=False))),
    "status-over-8-bits": ("SET_STATUS 0x1FF", _ring_after_session(
        lambda fe: ended(fe, R.SET_STATUS, encode_u64(0x1FF)))),
    "log-base": ("SET_LOG_BASE (dirty logging never offered)", _ring_after_session(
        lambda fe: ended(fe, R.SET_LOG_BASE, bytes(16)))),
    "iotlb": ("IOTLB_MSG (never offered)", _ring_after_session(lambda fe: ended(fe, R.IOTLB_MSG, bytes(64)))),
    "backend-req-fd": ("SET_BACKEND_REQ_FD (never offered)", _ring_after_session(
        lambda fe: _with_eventfd(fe, R.SET_BACKEND_REQ_FD, b""))),
}


def _with_eventfd(fe: VhostUserFrontend, req: int, payload: bytes) -> str:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        return ended(fe, req, payload, (fd,))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Memory tables

def _memfd(size: int) -> int:
    fd = os.memfd_create("seccheck-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _mem_table_raw(fe: VhostUserFrontend, payload: bytes, nfds: int) -> str:
    session(fe, memory=False)
    fd = _memfd(2 << 20)
    try:
        return ended(fe, R.SET_MEM_TABLE, payload, [fd] * nfds)
    finally:
        os.close(fd)


def _regions(fe: VhostUserFrontend, regions: list[MemoryRegion], nfds: int | None = None,
             file_size: int = 2 << 20) -> str:
    session(fe, memory=False)
    fd = _memfd(file_size)
    try:
        return ended(fe, R.SET_MEM_TABLE, encode_mem_table(regions), [fd] * (len(regions) if nfds is None else nfds))
    finally:
        os.close(fd)


M = 1 << 20
MEMORY: dict[str, tuple[str, Callable[[VhostUserFrontend], str]]] = {
    "mem-overlap-gpa": ("two regions overlapping in guest-physical space", lambda fe: _regions(fe, [
        MemoryRegion(0, M, 1 << 40, 0), MemoryRegion(M // 2, M, 2 << 40, M)])),
    "mem-overlap-qva": ("two regions overlapping in front-end virtual space", lambda fe: _regions(fe, [
        MemoryRegion(0, M, 1 << 40, 0), MemoryRegion(1 << 32, M, (1 << 40) + M // 2, M)])),
    "mem-gpa-wrap": ("a region whose guest-physical range wraps past 2^64", lambda fe: _regions(fe, [
        MemoryRegion((1 << 64) - M // 2, M, 1 << 40, 0)])),
    "mem-qva-wrap": ("a region whose virtual range wraps past 2^64", lambda fe: _regions(fe, [
        MemoryRegion(0, M, (1 << 64) - M // 2, 0)])),
    "mem-offset-past-file": ("mmap_offset beyond the end of the memfd", lambda fe: _regions(fe, [
        MemoryRegion(0, M, 1 << 40, 64 * M)])),
    "mem-size-past-file": ("a 1 TiB region over a 2 MiB memfd", lambda fe: _regions(fe, [
        MemoryRegion(0, 1 << 40, 1 << 40, 0)])),
    "mem-offset-wrap": ("mmap_offset + size wrapping past 2^64", lambda fe: _regions(fe, [
        MemoryRegion(0, M, 1 << 40, (1 << 64) - M // 2)])),
    "mem-size-zero": ("a region of size 0", lambda fe: _regions(fe, [MemoryRegion(0, 0, 1 << 40, 0)])),
    "mem-nine-regions": ("SET_MEM_TABLE with 9 regions (cap 8)", lambda fe: _mem_table_raw(
        fe, struct.pack("=II", 9, 0) + b"".join(struct.pack("=QQQQ", i * M, M, (1 << 40) + i * M, 0)
                                                 for i in range(9)), 8)),
    "mem-add-overlap": ("ADD_MEM_REG overlapping an existing region", lambda fe: _add_overlap(fe)),
    "mem-remove-unknown": ("REM_MEM_REG of a region never added", lambda fe: _remove_unknown(fe)),
}


def _add_overlap(fe: VhostUserFrontend) -> str:
    session(fe, memory=False)
    fd = _memfd(2 * M)
    try:
        fe.request(R.ADD_MEM_REG, encode_single_region(MemoryRegion(0, M, 1 << 40, 0)), fds=[fd])
        return ended(fe, R.ADD_MEM_REG, encode_single_region(MemoryRegion(M // 2, M, 2 << 40, M)), (fd,))
    finally:
        os.close(fd)


def _remove_unknown(fe: VhostUserFrontend) -> str:
    session(fe)
    fd = _memfd(M)
    try:
        return ended(fe, R.REM_MEM_REG, encode_single_region(MemoryRegion(7 << 40, M, 7 << 40, 0)), (fd,))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# fds of every wrong kind: as a ring's kick/call fd, and as guest memory

def _fd_kinds() -> dict[str, Callable[[], list[int]]]:
    """kind -> a function opening it (returns the fds to close; the first is sent)."""
    import select as _select

    def pipe() -> list[int]:
        r, w = os.pipe()
        return [r, w]

    def sock() -> list[int]:
        a, b = socket.socketpair()
        return [a.detach(), b.detach()]

    def epoll() -> list[int]:
        ep = _select.epoll()
        try:
            return [os.dup(ep.fileno())]
        finally:
            ep.close()

    def sem() -> list[int]:
        fd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
        os.eventfd_write(fd, 0xFFFFFFFFFFFFFFFE)   # the largest count an eventfd holds
        return [fd]

    def signalfd() -> list[int]:
        return [_signal_fd()]

    def timerfd() -> list[int]:
        return [_timer_fd()]

    return {
        "directory": lambda: [os.open("/", os.O_RDONLY | os.O_DIRECTORY)],
        "pipe": pipe,
        "socket": sock,
        "dev-zero": lambda: [os.open("/dev/zero", os.O_RDWR)],
        "regular-file": lambda: [_memfd(4096)],
        "epoll": epoll,
        "signalfd": signalfd,
        "timerfd": timerfd,
        "semaphore-eventfd": sem,
    }


def _signal_fd() -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    mask = (ctypes.c_uint64 * 16)(1 << (10 - 1))   # a glibc sigset_t holding SIGUSR1, never sent
    fd = libc.signalfd(-1, ctypes.byref(mask), os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "signalfd")
    return fd


def _timer_fd() -> int:
    """A timerfd firing every millisecond (Python 3.11 has no os.timerfd_create)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create")
    spec = (ctypes.c_long * 4)(0, 1_000_000, 0, 1_000_000)   # interval, value: 1 ms
    if libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
        os.close(fd)
        raise OSError(ctypes.get_errno(), "timerfd_settime")
    return fd


def _provoke(fe: VhostUserFrontend, q: Any) -> None:
    """One small request that completes on any device type (a block request
    with a bad type still gets a status), so the back-end touches the ring's
    kick and call fds."""
    hdr, hv = q.alloc(16)
    struct.pack_into("<IIQ", hv, 0, 99, 0, 0)
    st, _ = q.alloc(64)
    q.submit([(hdr, 16)], [(st, 64)])
    q.kick(force=True)


def _kick_with(kind: str, role: R, type_name: str) -> Callable[[VhostUserFrontend], str]:
    """A ring whose kick (or call) fd is ``kind``.  A kick fd is only taken
    by a stopped ring, so the ring is stopped first (GET_VRING_BASE), as a
    VMM does before it hands over a new kick fd."""
    index = 1 if type_name == "console" else 0

    def script(fe: VhostUserFrontend) -> str:
        session(fe)
        q = fe.setup_queue(index, 64)
        if role == R.SET_VRING_KICK:
            fe.stop_queue(index)
        fds = _fd_kinds()[kind]()
        try:
            outcome = ended(fe, role, vring_fd_payload(index), (fds[0],))
            if outcome == "connection still open, no answer" or outcome.startswith("answered"):
                # taken: the ring runs with it; one request must neither kill nor spin the child
                outcome = "accepted"
                _provoke(fe, q)
                outcome += "; then " + after(fe, 0.3)
        finally:
            for fd in fds:
                os.close(fd)
        return outcome
    return script


def _mem_fd_of(kind: str) -> Callable[[VhostUserFrontend], str]:
    def script(fe: VhostUserFrontend) -> str:
        session(fe, memory=False)
        fds = _fd_kinds()[kind]()
        try:
            return ended(fe, R.SET_MEM_TABLE, encode_mem_table([MemoryRegion(0, M, 1 << 40, 0)]), (fds[0],))
        finally:
            for fd in fds:
                os.close(fd)
    return script


def _truncate_after(what: str) -> Callable[[VhostUserFrontend], str]:
    """Share memory (or the inflight region), then shrink the memfd under the
    back-end and make it touch the memory."""
    def script(fe: VhostUserFrontend) -> str:
        session(fe)
        if what == "inflight":
            fe.get_inflight(1, 64)
        q = fe.setup_queue(0, 64)
        gpa, _ = q.alloc(64)
        q.submit([], [(gpa, 64)])        # on the ring, not kicked yet
        # the very memfd the back-end mapped, shrunk: from here on this process
        # must not touch that memory either (it would get SIGBUS too)
        fd = fe.inflight_fd if what == "inflight" else fe.mem.fd
        try:
            os.ftruncate(fd, 0)
        except PermissionError:
            return f"{REFUSED}: the kernel refused the shrink (the back-end sealed the memfd)"
        os.eventfd_write(q.kick_fd, 1)
        return after(fe, 2.0)   # (the caller disconnects before close: no drain through dead memory)
    return script


for _t in TYPES:
    for _k, (_tries, _fn) in MALFORMED.items():
        if _t == "block":
            register(hostile_case(_k, _t, _tries, _fn))
    for _k, (_tries, _fn) in ORDER.items():
        if _t == "block" or _k in ("start-without-memory", "ring-outside-memory", "vring-num-odd"):
            register(hostile_case(_k, _t, _tries, _fn))
    for _k, (_tries, _fn) in MEMORY.items():
        if _t == "block" or _k in ("mem-overlap-gpa", "mem-offset-past-file"):
            register(hostile_case(_k, _t, _tries, _fn))
    for _kind in ("directory", "pipe", "socket", "dev-zero", "regular-file", "epoll", "signalfd", "timerfd",
                  "semaphore-eventfd"):
        if _kind == "semaphore-eventfd" and _t == "block":
            continue   # its own case below measures the child's CPU
        register(hostile_case(f"kick-fd-{_kind}", _t, f"a {_kind} fd as a ring's kick fd",
                              _kick_with(_kind, R.SET_VRING_KICK, _t), accept=None,
                              expected="refused, or the ring breaks; the child neither crashes nor spins; "
                                       "device serves again"))
    if _t == "block":
        for _kind in ("directory", "pipe", "socket", "dev-zero", "epoll", "signalfd", "timerfd"):
            register(hostile_case(f"call-fd-{_kind}", _t, f"a {_kind} fd as a ring's call fd",
                                  _kick_with(_kind, R.SET_VRING_CALL, _t), accept=None,
                                  expected="refused, or the ring breaks; the child does not crash"))
        for _kind in ("directory", "pipe", "socket", "epoll", "semaphore-eventfd"):
            register(hostile_case(f"mem-fd-{_kind}", _t, f"a {_kind} fd as guest memory in SET_MEM_TABLE",
                                  _mem_fd_of(_kind)))
        register(hostile_case("mem-fd-dev-zero", _t, "/dev/zero as guest memory in SET_MEM_TABLE",
                              _mem_fd_of("dev-zero"), accept=None,
                              expected="refused, or mapped as private zero pages (harmless); child clean"))



def _truncated_reason(last: dict[str, Any]) -> str | None:
    text = last.get("text", "")
    if last.get("kind") == "disconnected" or "truncat" in text:
        return None
    return f"the child died with '{text}' instead of naming the truncated memory"


register(hostile_case("truncated-guest-memfd", "block",
                      "shrink the guest-RAM memfd to 0 after SET_MEM_TABLE, then submit a request",
                      _truncate_after("memory"), accept=None, exit_check=_truncated_reason,
                      expected="the connection ends with the reason 'front-end truncated shared memory'"))
register(hostile_case("truncated-inflight-memfd", "block",
                      "shrink the inflight memfd to 0 after SET_INFLIGHT_FD, then submit a request",
                      _truncate_after("inflight"), accept=None, exit_check=_truncated_reason,
                      expected="the connection ends with the reason 'front-end truncated shared memory'"))


def _semaphore_kick(env: Any) -> str:
    """A semaphore-mode eventfd with a huge count as the kick fd: each read
    takes one, so a back-end that reads until empty spins for ever."""
    import psutil
    inst = env.instance("block")
    pid = env.wait_ready(inst.name)["pid"]
    others = env.other_pids(inst)
    fe = VhostUserFrontend.connect(inst.socket, timeout=5.0)
    fds: list[int] = []
    try:
        session(fe)
        fe.setup_queue(0, 64)
        fe.stop_queue(0)                  # a kick fd is taken by a stopped ring
        fds = _fd_kinds()["semaphore-eventfd"]()
        outcome = ended(fe, R.SET_VRING_KICK, vring_fd_payload(0), (fds[0],))
        proc = psutil.Process(pid)
        before = proc.cpu_times()
        time.sleep(0.5)
        after_t = proc.cpu_times()
        cpu = (after_t.user + after_t.system - before.user - before.system) / 0.5
    finally:
        fe.disconnect()
        fe.close()
        for fd in fds:
            os.close(fd)
    how = env.recovered(inst, pid, others=others, allow_crash=True)
    check(cpu < 0.2, f"{outcome}; the child burnt {cpu:.0%} of a core for 0.5 s (budget 20%)")
    return f"{outcome}; child CPU {cpu:.0%} of a core (budget 20%); child: {how}"


register(Case("frontend.kick-fd-semaphore-eventfd.block", "frontend", "block",
              "a semaphore-mode eventfd holding 2^64-2 as a ring's kick fd",
              "refused, or bounded reads per wake-up (< 20% of a core); device serves again", _semaphore_kick))
