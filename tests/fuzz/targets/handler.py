"""Target: the request handler's state machine (connection/handler.py),
driven in-process with sequences of messages that carry real fds.

One input is a device choice (the test XorDevice or a real BlockDevice on
a memfd image), a guest memory pattern and up to ``MAX_STEPS`` steps.  A
step is a front-end message (mostly well-shaped payloads of implemented
requests with fuzzed values, sometimes raw codes and bytes) with fds made
fresh for it (memfds for memory tables and inflight, eventfds for rings,
or a wrong kind: pipe, socket, directory, /dev/zero, epoll, sealed or
truncated memfd), or a guest action: a kick, a write into guest memory.
Each message goes through ``DeviceRequestHandler.handle`` on the device's
loop, as ``serve_connection`` would; a refused message ends the
"connection" (``on_disconnect``) unless REPLY_ACK turns it into a nack.
Every reply has the shape its request defines (u64 getters: 8 bytes,
GET_CONFIG: the header echoed and the size asked, or empty; GET_INFLIGHT_FD:
24 bytes and one fd; others: none).  After the input: no fd left open, no
memory mapped, no queue started, no traceback or internal error logged, no
task failure on the loop.  Memory is bounded: memfds of at most 1 MiB,
``MAX_STEPS`` steps.
"""

from __future__ import annotations

import asyncio
import os

from connection import protocol as P
from connection.errors import VhostUserError
from connection.executor import Executor
from connection.handler import REQUESTS_WITH_REPLY, DeviceRequestHandler, RequestRefused
from connection.protocol import FrontendReq as R
from devices.block import BlockDevice
from tests.connection.support import XorDevice

from ..bugs import BugLog
from ..data import Data
from ..harness import FD_KIND_NAMES, FD_KINDS, FuzzBug, check_no_leak, close_all, memfd, open_fds

MAX_STEPS = 24
QVA = 0x7F00_0000_0000
SIZES = (4096, 16384, 65536, 1 << 20)
IMPLEMENTED = (R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.RESET_OWNER, R.GET_PROTOCOL_FEATURES,
               R.SET_PROTOCOL_FEATURES, R.SET_MEM_TABLE, R.GET_MAX_MEM_SLOTS, R.ADD_MEM_REG, R.REM_MEM_REG,
               R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_KICK,
               R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE, R.GET_QUEUE_NUM, R.GET_CONFIG,
               R.SET_CONFIG, R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD, R.RESET_DEVICE, R.GET_STATUS,
               R.SET_STATUS)
ALL_PROTOCOL = 0xFFFF_FFFF
_ex: Executor | None = None
_bugs: BugLog | None = None


def _executor() -> tuple[Executor, BugLog]:
    global _ex, _bugs
    if _ex is None:
        _ex = Executor()
        _bugs = BugLog("vhost", "devices")
        _ex.loop.set_exception_handler(_bugs.loop_handler)
    assert _bugs is not None
    return _ex, _bugs


class Session:
    """One fuzzed front-end talking to one handler."""

    def __init__(self, d: Data, ex: Executor) -> None:
        self.d = d
        self.ex = ex
        self.pattern = d.blob(512)
        self.guest: list[int] = []   # our ends of memfds (guest writes), closed at the end
        self.kicks: list[int] = []   # our ends of kick eventfds
        self.image = -1
        if d.flag():
            self.image = memfd(64 << 10, self.pattern)
            self.device = BlockDevice(ex, "fuzz-blk", os.dup(self.image), 64 << 10,
                                      read_only=d.flag(), num_queues=1 + d.below(2))
        else:
            self.device = XorDevice(ex, queues=1 + d.below(2))
        self.handler = DeviceRequestHandler(self.device, ex)

    # ---------------------------------------------------------------- values

    def u64(self) -> int:
        d = self.d
        return d.pick((0, 1, 4096, 1 << 32, QVA, (1 << 64) - 1, (1 << 63), d.u64()))

    def index(self) -> int:
        d = self.d
        return d.pick((0, 0, 1, 1, 2, 255, d.u32()))

    def mem_fd(self, size: int) -> int:
        """A memfd for a region of ``size`` bytes: right-sized, short or empty."""
        d = self.d
        actual = d.pick((size, size, size, 0, size // 2, size + 4096))
        fd = memfd(min(actual, 1 << 20) if actual <= (1 << 20) else 1 << 20, self.pattern)
        self.guest.append(os.dup(fd))
        return fd

    def region(self, i: int) -> tuple[P.MemoryRegion, int]:
        d = self.d
        size = d.pick(SIZES + (0, d.u64()))
        gpa = d.pick((0, i << 32, (i + 1) << 20, self.u64()))
        uaddr = d.pick((QVA + (i << 24), QVA + (i << 24), QVA, self.u64()))
        offset = d.pick((0, 0, 4096, self.u64()))
        region = P.MemoryRegion(gpa, size, uaddr, offset)
        sz = size + offset if size + offset <= (1 << 20) else 1 << 20
        return region, self.mem_fd(sz)

    def wrong_fd(self) -> int:
        return FD_KINDS[self.d.pick(FD_KIND_NAMES)]()

    # --------------------------------------------------------------- messages

    def message(self) -> tuple[int, int, bytes, list[int]]:
        """(request, flags, payload, fds) of the next message."""
        d = self.d
        sel = d.u8()
        flags = P.VERSION | (P.FLAG_NEED_REPLY if sel & 1 else 0)
        if sel >= 240:   # raw: any code, any bytes, fds of any kind
            return d.u32() & 0x3F, flags, d.blob(300), [self.wrong_fd() for _ in range(d.below(3))]
        req = IMPLEMENTED[(sel >> 1) % len(IMPLEMENTED)]
        payload, fds = self.payload(req)
        if d.below(8) == 0:
            fds.append(self.wrong_fd())
        elif fds and d.below(8) == 0:
            os.close(fds.pop())
        return int(req), flags, payload, fds

    def payload(self, req: R) -> tuple[bytes, list[int]]:
        d = self.d
        if req in (R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_STATUS):
            if req == R.SET_FEATURES:
                value = d.pick((self.handler.offered_features(),
                                self.handler.offered_features() & ~int(P.VirtioFeature.PROTOCOL_FEATURES),
                                int(P.VirtioFeature.VERSION_1), self.u64()))
            elif req == R.SET_PROTOCOL_FEATURES:
                value = d.pick((self.handler.offered_protocol_features(), int(P.ProtocolFeature.REPLY_ACK),
                                0, self.u64()))
            else:
                value = d.pick((0, 0xF, 0x100, self.u64()))
            return P.encode_u64(value), []
        if req == R.SET_MEM_TABLE:
            regions, fds = [], []
            for i in range(d.below(4)):
                region, fd = self.region(i)
                regions.append(region)
                fds.append(fd)
            return P.encode_mem_table(regions), fds
        if req in (R.ADD_MEM_REG, R.REM_MEM_REG):
            region, fd = self.region(d.below(3))
            if req == R.REM_MEM_REG and d.flag():
                os.close(fd)
                return P.encode_single_region(region), []
            return P.encode_single_region(region), [fd]
        if req in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE):
            num = d.pick((0, 1, 2, 8, 16, 64, 256, 257, 1024, 0xFFFF, d.u32()))
            return P.encode_vring_state(self.index(), num), []
        if req == R.SET_VRING_ADDR:
            base = QVA + d.below(16) * 4096
            addr = P.VringAddr(self.index(), d.pick((0, 0, 1, 2)),
                               d.pick((base, base + 8, self.u64())),
                               d.pick((base + 8192, base + 4096 + 64, self.u64())),
                               d.pick((base + 4096, base + 4096 + 2, self.u64())), 0)
            return P.encode_vring_addr(addr), []
        if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            index = self.index() & 0xFF
            nofd = d.below(4) == 0
            value = index | (P.VRING_NOFD_MASK if nofd else 0)
            if d.below(16) == 0:
                value = self.u64()
            if nofd:
                return P.encode_u64(value), []
            fd = os.eventfd(d.below(2), os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            if req == R.SET_VRING_KICK:
                self.kicks.append(os.dup(fd))
            return P.encode_u64(value), [fd]
        if req in (R.GET_CONFIG, R.SET_CONFIG):
            size = d.pick((0, 1, 4, 8, 16, 60, 256, 257))
            data = d.bytes(size).ljust(size, b"\0")
            return P.encode_config(d.pick((0, 4, 8, 20, 255, 256, d.u32())), d.pick((0, 1, 2)),
                                   data, size if d.below(8) else d.u32()), []
        if req in (R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD):
            nq = d.pick((1, 1, 2, 0, 3, 256))
            qs = d.pick((16, 64, 256, 1, 0, 1024, 32768))
            stride = (16 * qs + 16 + 63) & ~63
            info = P.InflightInfo(d.pick((nq * stride, nq * stride, 0, self.u64())),
                                  d.pick((0, 0, 4096, 1)), nq, qs)
            if req == R.GET_INFLIGHT_FD:
                return P.encode_inflight(info), []
            size = min(d.pick((info.mmap_size + info.mmap_offset, 4096, 0)), 1 << 20)
            content = d.blob(256)
            fd = memfd(size, content)
            return P.encode_inflight(info), [fd]
        return (P.encode_u64(0) if d.below(8) == 0 else b""), []

    # ----------------------------------------------------------------- guest

    def guest_action(self) -> None:
        d = self.d
        if d.flag() and self.kicks:
            os.eventfd_write(d.pick(self.kicks), 1)
        elif self.guest:
            fd = d.pick(self.guest)
            os.pwrite(fd, d.blob(64), d.below(4096) * 16)

    def settle(self) -> None:
        loop = self.ex.loop
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))

    def run(self) -> None:
        d = self.d
        loop = self.ex.loop
        try:
            for _ in range(MAX_STEPS):
                if not d.left:
                    break
                if d.below(5) == 0:
                    self.guest_action()
                    self.settle()
                    continue
                req, flags, payload, fds = self.message()
                msg = P.Message(req, flags, payload, fds)
                try:
                    try:
                        P.check_payload_size(req, len(payload))   # what the transport enforces
                        reply = loop.run_until_complete(self.handler.handle(msg))
                        check_reply(msg.request, msg.payload, reply)
                    finally:
                        msg.close_fds()
                except RequestRefused:
                    pass
                except VhostUserError:
                    if not (msg.need_reply and self.handler.reply_ack_enabled):
                        break   # serve_connection ends the connection
                self.settle()
        finally:
            self.handler.on_disconnect()
            self.device.reset()
            self.settle()
            if self.handler.mem.regions or any(q.started for q in self.handler.queues):
                raise FuzzBug("on_disconnect left memory mapped or a queue started")
            close_all(self.guest)
            close_all(self.kicks)
            if self.image >= 0:
                os.close(self.image)
            pool = getattr(self.device, "_threads", None)
            if pool is not None:
                pool.shutdown()
            if isinstance(self.device, BlockDevice):
                os.close(self.device.fd)


_U64_REPLIES = frozenset({R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
                          R.GET_STATUS, R.GET_VRING_BASE})


def check_reply(request: int, payload: bytes, reply: tuple[bytes, list[int]] | None) -> None:
    """A request with a reply of its own gets one of the shape the front-end
    waits for; every other request gets none (the ack is the caller's)."""
    if request not in REQUESTS_WITH_REPLY:
        if reply is not None:
            raise FuzzBug(f"request {request} has no reply of its own but got {reply!r}")
        return
    if reply is None:
        raise FuzzBug(f"request {request} answered without a reply")
    data, fds = reply
    if request in _U64_REPLIES:
        ok = len(data) == 8 and not fds
    elif request == R.GET_CONFIG:
        asked = P.decode_config(request, payload)
        ok = not fds and (data == b"" or (len(data) == P.CONFIG_HEADER.size + asked.size
                                          and data[:8] == payload[:8]))
    elif request == R.GET_INFLIGHT_FD:
        ok = len(data) == P.INFLIGHT.size and len(fds) == 1
    else:
        ok = True
    if not ok:
        raise FuzzBug(f"request {request}: malformed reply {data[:32]!r} with {len(fds)} fds")


def one_input(buf: bytes) -> None:
    ex, bugs = _executor()
    before = open_fds()
    with bugs:
        Session(Data(buf), ex).run()
    bugs.raise_if_any()
    check_no_leak(before, "handler")
