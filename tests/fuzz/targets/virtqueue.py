"""Target: the split-ring walk over real guest memory (connection/virtqueue.py
on connection/memory.py).

Guest memory is two memfd regions mapped by ``GuestMemory`` exactly as a
front-end's table would be, each with ``GUARD`` bytes of the memfd before
the region (mapped, since ``mmap_offset`` skips them: a wrong offset
computation would land there) filled with a pattern.  The input becomes the
descriptor table (structured descriptors aimed at the regions, their
borders, the gap between them, indirect tables, loops, or raw bytes), the
avail ring and its index, the queue size, features and base, optional
inflight tracking, and "guest" writes between pops (the ring changing under
the device).  The device pops every chain, fills its writable buffers and
completes it.

Checked for every chain: each buffer lies inside one region (by address,
not only by length), the lengths add up to what the chain claims; on a
healthy queue the used ring holds exactly the completions in order and its
idx counts them; after the input: the guard bytes are untouched, nothing was logged as
unexpected, ``pop`` never raised.  Fine: ProtocolError/GuestMemoryError
while configuring, a queue marked broken for a malformed chain.
"""

from __future__ import annotations

import ctypes
import os
import struct

import uvloop

from connection.errors import GuestMemoryError, ProtocolError
from connection.inflight import InflightRegion
from connection.memory import GuestMemory
from connection.protocol import MemoryRegion, VirtioFeature, VringAddr
from connection.virtqueue import DescriptorChain, QueueConfig

from ..bugs import BugLog
from ..data import Data
from ..harness import FuzzBug, memfd

GUARD = 4096
SIZE = 64 << 10
GUARD_BYTE = 0xA5
QVA = 0x7F00_0000_0000
GPA2_CHOICES = (SIZE, SIZE + 4096, 1 << 32)
DESC_AT, AVAIL_AT, USED_AT, DATA_AT = 0, 8192, 12288, 16384
_DESC = struct.Struct("<QIHH")
_loop = None
_bugs: BugLog | None = None


def _setup():
    global _loop, _bugs
    if _loop is None:
        _loop = uvloop.new_event_loop()
        _bugs = BugLog("vhost")
    return _loop, _bugs


def _address(view: memoryview) -> int:
    c = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(c)
    finally:
        del c


class Guest:
    """Two guarded regions and their bounds as host addresses."""

    def __init__(self, d: Data) -> None:
        self.gpa2 = d.pick(GPA2_CHOICES)
        self.fds = [memfd(GUARD + SIZE, bytes([GUARD_BYTE]) * GUARD) for _ in range(2)]
        self.mem = GuestMemory()
        self.regions = [MemoryRegion(0, SIZE, QVA, GUARD), MemoryRegion(self.gpa2, SIZE, QVA + (1 << 24), GUARD)]
        for region, fd in zip(self.regions, self.fds):
            self.mem.add_region(region, os.dup(fd))
        self.bounds = []
        for r in self.mem.regions:
            base = _address(r.view)
            self.bounds.append((base + GUARD, base + GUARD + SIZE))

    def write(self, gpa_offset: int, data: bytes, region: int = 0) -> None:
        os.pwrite(self.fds[region], data, GUARD + gpa_offset)

    def check_view(self, v: memoryview, what: str) -> None:
        if not len(v):
            raise FuzzBug(f"{what}: empty buffer view")
        start = _address(v)
        end = start + len(v)
        if not any(lo <= start and end <= hi for lo, hi in self.bounds):
            raise FuzzBug(f"{what}: view [{start:#x}, {end:#x}) outside every region {self.bounds}")

    def check_guards(self) -> None:
        for i, fd in enumerate(self.fds):
            if os.pread(fd, GUARD, 0) != bytes([GUARD_BYTE]) * GUARD:
                raise FuzzBug(f"guard bytes before region {i} were written")

    def close(self) -> None:
        self.mem.clear()
        for fd in self.fds:
            os.close(fd)


def _check_used(g: Guest, q: int, used_start: int, completed: list[tuple[int, int]]) -> None:
    """The used ring holds exactly the completions, in order, and its idx
    counts them (u16, from where the driver left it)."""
    ring = os.pread(g.fds[0], 4 + 8 * q, GUARD + USED_AT)
    idx = struct.unpack_from("<H", ring, 2)[0]
    if idx != (used_start + len(completed)) & 0xFFFF:
        raise FuzzBug(f"used idx {idx} after {len(completed)} completions from {used_start}")
    for k in range(max(0, len(completed) - q), len(completed)):
        slot = (used_start + k) & (q - 1)
        got = struct.unpack_from("<II", ring, 4 + 8 * slot)
        if got != completed[k]:
            raise FuzzBug(f"used ring slot {slot}: {got}, completion {k} was {completed[k]}")


def _descriptor(d: Data, g: Guest, q: int) -> bytes:
    if d.below(16) == 0:
        return d.bytes(16).ljust(16, b"\0")
    addr = d.pick((DATA_AT + 64 * d.below(256), DATA_AT + 64 * d.below(256), g.gpa2 + 64 * d.below(256),
                   SIZE - 8, g.gpa2 + SIZE - 8, SIZE + 8, 2 * SIZE + 8, (1 << 64) - 8, d.u64(),
                   DESC_AT + 16 * d.below(q)))
    length = d.pick((1, 16, 64, 512, 4096, 16 * d.below(8), 0, SIZE, 0xFFFF_FFFF, d.u32()))
    flags = d.pick((0, 1, 2, 3, 4, 4, 5, 6, d.u16()))
    nxt = d.pick((d.below(q + 2), d.below(q + 2), d.u16()))
    return _DESC.pack(addr, length, flags, nxt)


def one_input(buf: bytes) -> None:
    loop, bugs = _setup()
    with bugs:
        _one(loop, Data(buf))
    bugs.raise_if_any()


def _one(loop, d: Data) -> None:
    g = Guest(d)
    chains: list[DescriptorChain] = []
    inflight = None
    config = QueueConfig(0, 1024, loop)
    queue = None
    try:
        q = 1 << d.below(9)
        features = 0
        if d.flag():
            features |= VirtioFeature.RING_EVENT_IDX
        if d.flag():
            features |= VirtioFeature.RING_INDIRECT_DESC
        if d.flag():
            features |= VirtioFeature.NOTIFY_ON_EMPTY
        table = b"".join(_descriptor(d, g, q) for _ in range(min(q, 1 + d.below(32))))
        g.write(DESC_AT, table)
        # indirect tables: a few more descriptors after the ring's table
        g.write(DATA_AT, b"".join(_descriptor(d, g, q) for _ in range(d.below(8))))
        heads = [d.pick((d.below(q), d.below(q), d.u16())) for _ in range(d.below(q + 1) if q < 64 else d.below(64))]
        base = d.pick((0, 0, 0xFFFF, d.u16()))
        idx = d.pick(((base + len(heads)) & 0xFFFF, (base + len(heads)) & 0xFFFF, base, d.u16()))
        avail = struct.pack(f"<HH{len(heads)}H", d.u16() & 1, idx, *heads)
        g.write(AVAIL_AT, avail)
        g.write(AVAIL_AT + 4 + 2 * q, struct.pack("<H", d.u16()))   # used_event
        g.write(USED_AT, struct.pack("<HH", 0, d.pick((base, base, d.u16()))))
        addr = VringAddr(0, 0, QVA + d.pick((DESC_AT, DESC_AT, 8, SIZE - 16, SIZE)),
                         QVA + d.pick((USED_AT, USED_AT, 2, SIZE - 4)),
                         QVA + d.pick((AVAIL_AT, AVAIL_AT, 1, SIZE - 2)), 0)
        used_start = struct.unpack_from("<H", os.pread(g.fds[0], 2, GUARD + USED_AT + 2))[0]
        used_lo = g.bounds[0][0] + USED_AT
        used_hi = used_lo + 8 * q + 8
        completed: list[tuple[int, int]] = []
        clobbered = False   # a writable buffer overlapping the used ring voids the used-ring check
        config.set_size(q)
        config.set_addresses(addr)
        config.set_base(base)
        if d.below(4) == 0:
            inflight = InflightRegion.create(1, q * d.pick((1, 1, 2)))
            config.set_inflight(inflight.queue(0))
        try:
            queue = config.activate(g.mem, int(features))
        except ProtocolError:
            return
        for step in range(2 * q + 8):
            if d.below(4) == 0:   # the guest changes the ring meanwhile
                what = d.below(3)
                if what == 0:
                    g.write(AVAIL_AT + 2, struct.pack("<H", d.u16()))
                elif what == 1:
                    g.write(AVAIL_AT + 4 + 2 * d.below(q), struct.pack("<H", d.u16()))
                else:
                    g.write(DESC_AT + 16 * d.below(q), _descriptor(d, g, q))
            chain = queue.pop()
            if chain is None:
                if queue.broken or not d.left:
                    break
                continue
            for kind, views, total in (("readable", chain.readable, chain.readable_len),
                                       ("writable", chain.writable, chain.writable_len)):
                for v in views:
                    g.check_view(v, f"head {chain.head} {kind}")
                if sum(len(v) for v in views) != total:
                    raise FuzzBug(f"head {chain.head}: {kind} views add up to "
                                  f"{sum(len(v) for v in views)}, chain says {total}")
            fill = bytes([d.u8()])
            written = 0
            for v in chain.writable:
                start = _address(v)
                clobbered |= start < used_hi and used_lo < start + len(v)
                v[:] = fill * len(v)
                written += len(v)
            for v in chain.readable:
                bytes(v[:16])
            if d.below(4):
                queue.add_used(chain.head, written)
                completed.append((chain.head, written))
                if d.flag():
                    queue.flush()
            else:
                chains.append(chain)   # completed later (out of order)
        for chain in chains:
            queue.add_used(chain.head, 0)
            completed.append((chain.head, 0))
        queue.flush()
        if not queue.stopped and not queue.broken and not clobbered:
            _check_used(g, q, used_start, completed)
        reason = queue.broken_reason or ""
        if reason.startswith("unexpected"):
            raise FuzzBug(f"queue broken by an exception: {reason}")
    except GuestMemoryError:
        pass
    finally:
        chains.clear()
        chain = None  # noqa: F841 - drop the last views before unmapping
        config.close()
        queue = None
        g.check_guards()
        g.close()
        if inflight is not None:
            inflight.close()
