"""Target: the virtio-blk request path (devices/block.py ``parse_request`` and
``BlockDevice._handle``) on a memfd image.

The input shapes one descriptor chain: a header (type, sector: mostly
plausible, sometimes anything) split over readable buffers of fuzzed sizes,
data or DISCARD/WRITE_ZEROES segments, writable buffers of fuzzed sizes
ending with the status byte; and the device: read-only, sparse, writeback
or writethrough, a GET_ID serial.  Buffers are slices of one anonymous
mapping with guard bytes between and around them.  Checked: the used
length is -1 exactly when there is no writable byte, else within
``[1, writable bytes]``; the status byte is a virtio status; guard bytes
are untouched; the image never grows (no write past the disk); a
read-only image is never changed.  A bug: any exception.
"""

from __future__ import annotations

import mmap
import os

from connection.executor import Executor
from connection.virtqueue import DescriptorChain
from devices.block import BlockDevice
from devices.virtio_blk import (F_FLUSH, HEADER, S_IOERR, S_OK, S_UNSUPP, SEGMENT, T_DISCARD, T_FLUSH,
                                T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES)

from ..bugs import BugLog
from ..data import Data
from ..harness import FuzzBug, memfd

IMAGE = 64 << 10
SECTORS = IMAGE >> 9
ARENA = 256 << 10
GUARD = 16
GUARD_BYTE = 0x5A
TYPES = (T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 2, 0xFFFF_FFFF)
_ex: Executor | None = None
_bugs: BugLog | None = None
_arena: mmap.mmap | None = None


def _setup() -> tuple[Executor, BugLog, mmap.mmap]:
    global _ex, _bugs, _arena
    if _ex is None:
        _ex = Executor()
        _bugs = BugLog("devices")
        _arena = mmap.mmap(-1, ARENA)
    assert _bugs is not None and _arena is not None
    return _ex, _bugs, _arena


class Arena:
    """Hands out buffers from the mapping with guard bytes between them."""

    def __init__(self, mm: mmap.mmap) -> None:
        mm[:] = bytes([GUARD_BYTE]) * ARENA
        self.view = memoryview(mm)
        self.pos = GUARD
        self.spans: list[tuple[int, int]] = []

    def take(self, content: bytes) -> memoryview:
        n = len(content)
        if self.pos + n + GUARD > ARENA:
            n = max(0, ARENA - GUARD - self.pos)
        start = self.pos
        self.view[start:start + n] = content[:n]
        self.spans.append((start, start + n))
        self.pos = start + n + GUARD
        return self.view[start:start + n]

    def check(self) -> None:
        edges = [0] + [x for s in self.spans for x in s] + [self.pos]
        for lo, hi in zip(edges[::2], edges[1::2]):
            if any(b != GUARD_BYTE for b in self.view[lo:hi]):
                raise FuzzBug(f"guard bytes at [{lo}, {hi}) of the buffer arena were written")

    def release(self) -> None:
        self.view.release()


def _split(d: Data, data: bytes) -> list[bytes]:
    """``data`` cut into up to 4 pieces at fuzzed points (never an empty
    piece: the ring walk refuses a zero-length descriptor)."""
    cuts = sorted(d.below(len(data) + 1) for _ in range(d.below(4)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def one_input(buf: bytes) -> None:
    ex, bugs, mm = _setup()
    with bugs:
        _one(ex, mm, Data(buf))
    bugs.raise_if_any()


def _one(ex: Executor, mm: mmap.mmap, d: Data) -> None:
    read_only = d.below(4) == 0
    image = memfd(IMAGE, d.blob(64) * 8)
    dev = BlockDevice(ex, "fuzz-blk", image, IMAGE, read_only=read_only, sparse=d.flag(),
                      disk_id=d.pick((None, b"fuzz-serial", b"x" * 20)))
    dev.ack_features(d.pick((0, F_FLUSH)))
    arena = Arena(mm)
    try:
        rtype = d.pick(TYPES)
        sector = d.pick((0, 1, SECTORS - 1, SECTORS, SECTORS - 8, 1 << 55, d.u64()))
        header = HEADER.pack(rtype if d.below(16) else d.u32(), d.u32() if d.below(16) == 0 else 0, sector)
        if rtype in (T_DISCARD, T_WRITE_ZEROES) and d.below(4):
            payload = b"".join(SEGMENT.pack(d.pick((0, 1, SECTORS - 1, SECTORS, d.u64())),
                                            d.pick((0, 1, 8, SECTORS, d.u32())), d.pick((0, 0, 1, d.u32())))
                               for _ in range(d.pick((1, 1, 2, 33))))
        else:
            payload = bytes([d.u8()]) * d.pick((0, 0, 512, 1024, 511, 4096, d.u16()))
        readable_data = header[:d.pick((16, 16, 16, 8, 0))] + (payload if rtype != T_IN else b"")
        readable = [arena.take(p) for p in _split(d, readable_data)]
        wsize = d.pick((1, 1, 513, 512, 21, 4097, 0, d.u16() & 0x3FFF)) if rtype in (T_IN, T_GET_ID) \
            else d.pick((1, 1, 0, 2, d.u8()))
        writable = [arena.take(bytes([0xEE]) * len(p)) for p in _split(d, bytes(wsize))]
        chain = DescriptorChain(0, readable, writable, sum(map(len, readable)), sum(map(len, writable)))
        before = os.pread(image, IMAGE, 0) if read_only else b""
        written = dev._handle(chain, 0)
        wlen = chain.writable_len
        if written == -1:
            if wlen:
                raise FuzzBug(f"used -1 with {wlen} writable bytes")
        elif not 1 <= written <= wlen:
            raise FuzzBug(f"used length {written} outside [1, {wlen}]")
        else:
            status = writable[-1][-1]
            if status not in (S_OK, S_IOERR, S_UNSUPP):
                raise FuzzBug(f"status byte {status:#x} is not a virtio status")
        if os.fstat(image).st_size != IMAGE:
            raise FuzzBug(f"the image grew to {os.fstat(image).st_size} bytes")
        if read_only and os.pread(image, IMAGE, 0) != before:
            raise FuzzBug("a read-only image was changed")
        arena.check()
        del chain, readable, writable
    finally:
        arena.release()
        os.close(image)
