"""The block device's request logic, driven the way a VMM drives it.

Every request here is a descriptor chain that ``VhostUserFrontend``'s
``DriverQueue`` lays out in guest memory (a memfd shared over a real Unix
socket with SET_MEM_TABLE), exactly as the test wants it: headers split
across descriptors, data spread over buffers in both memory regions, the
status byte alone or at the end of a data buffer, or missing.  The device
thread (``run_device`` in conftest) serves it through the real request
handler, ``connection.virtqueue.Virtqueue`` and ``devices.block``, and the
test reads the answer back from the used ring, guest memory and the image
file (SEEK_HOLE/SEEK_DATA for discards).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from connection.errors import ProtocolError
from frontend.vhost_user import DEVICE_FEATURE_MASK, DRIVER_FEATURES, DriverQueue, VhostUserFrontend
from frontend.virtio_blk import BlockDriver
from devices import ConfigError
from devices.block import BlockBuilder
from devices.virtio_blk import (CONFIG, F_DISCARD, F_FLUSH, F_RO, F_WRITE_ZEROES, HEADER, S_IOERR, S_OK,
                                S_UNSUPP, SEGMENT, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES)

from tests.conftest import wait_broken

from .conftest import DeviceThread

HDR = HEADER
SEG = SEGMENT
SIZE = 1 << 20          # image size
MiB = 1 << 20
QSIZE = 64              # ring size of every queue here
TIMEOUT = 5.0
#: Written into every device-writable buffer before a request: a status or
#: data byte the device did not store is seen as 0xFF.
POISON = 0xFF


def hdr(rtype: int, sector: int = 0) -> bytes:
    return HDR.pack(rtype, 0, sector)


# --------------------------------------------------------------------------
# Guest buffers and chains

class Buf:
    """A buffer in guest memory: its GPA and the driver's view of it.

    ``content`` bytes are copied in; an int makes a buffer of that size
    filled with ``POISON``.  ``skew`` offsets the GPA from an ``align``
    boundary (O_DIRECT bounce path); ``region`` picks the memory region."""

    __slots__ = ("gpa", "view")

    def __init__(self, alloc, content: bytes | int, *, align: int = 64, skew: int = 0,
                 region: int | None = None) -> None:
        n = content if isinstance(content, int) else len(content)
        if region is None:
            gpa, view = alloc(n + skew, align)
        else:
            gpa, view = alloc(n + skew, align, region)
        self.gpa = gpa + skew
        self.view = view[skew:]
        self.view[:] = bytes([POISON]) * n if isinstance(content, int) else content

    @property
    def desc(self) -> tuple[int, int]:
        return self.gpa, len(self.view)

    def __bytes__(self) -> bytes:
        return bytes(self.view)


class Chain:
    """One request: device-readable then device-writable buffers."""

    def __init__(self, q: DriverQueue, readable: list, writable: list, *, indirect: bool = False,
                 alloc=None) -> None:
        alloc = alloc or q.alloc
        self.r = [b if isinstance(b, Buf) else Buf(alloc, b) for b in readable]
        self.w = [b if isinstance(b, Buf) else Buf(alloc, b) for b in writable]
        self.indirect = indirect
        self.head: int | None = None
        self.used: int | None = None

    def submit(self, q: DriverQueue) -> int:
        self.head = q.submit([b.desc for b in self.r], [b.desc for b in self.w], indirect=self.indirect)
        return self.head

    @property
    def status(self) -> int:
        """The status byte: the last byte of the last writable buffer."""
        return self.w[-1].view[-1]


def run(q: DriverQueue, *chains: Chain, timeout: float = TIMEOUT) -> list[list[tuple[int, int]]]:
    """Publish ``chains``, kick once, wait for all of them; returns the
    completions as the driver took them in (one list per used-idx update
    seen), and sets each chain's ``used`` length."""
    by_head = {c.submit(q): c for c in chains}
    q.kick()
    batches = []
    deadline = time.monotonic() + timeout
    while any(c.used is None for c in chains):
        done = q.wait_used(max(0.0, deadline - time.monotonic()))
        batches.append(done)
        for head, length in done:
            c = by_head[head]
            assert c.used is None, f"head {head} completed twice"
            c.used = length
    assert not q.broken(), f"queue {q.index} was marked broken"
    return batches


class Arena:
    """A reusable stretch of guest memory, carved front to back and reset
    per request (for the fuzz test, which would exhaust a bump allocator)."""

    def __init__(self, q: DriverQueue, size: int) -> None:
        self.gpa, self.view = q.alloc(size, 4096)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def alloc(self, size: int, align: int = 64) -> tuple[int, memoryview]:
        start = (self.pos + align - 1) & ~(align - 1)
        if start + size > len(self.view):
            raise MemoryError(f"arena of {len(self.view)} bytes exhausted")
        self.pos = start + size
        return self.gpa + start, self.view[start:start + size]


# --------------------------------------------------------------------------
# A device on a socket, a front-end connected to it

class KeepingBuilder(BlockBuilder):
    """The real builder; remembers the device it built (in the device
    thread) so a test can look at state no request reveals."""

    device = None

    def build(self, ex):
        self.device = super().build(ex)
        return self.device


class Rig:
    def __init__(self, thread: DeviceThread, fe: VhostUserFrontend, builder: KeepingBuilder) -> None:
        self.thread = thread
        self.fe = fe
        self.builder = builder
        self.queues: list[DriverQueue] = []
        self.closed = False

    @property
    def device(self):
        return self.builder.device

    def close(self) -> None:
        """Disconnect, wait for the device to return (raising its error, if
        any), free the guest memory."""
        if self.closed:
            return
        self.closed = True
        self.fe.disconnect()
        try:
            self.thread.join()
        finally:
            self.fe.close()


@pytest.fixture
def blk(run_device):
    """blk(image, queues=1, features=None, **options) -> Rig: a block device
    in a thread behind a real socket, negotiated, memory and queues set up."""
    rigs: list[Rig] = []

    def start(image: str, *, queues: int = 1, features: int | None = None, **opts: str) -> Rig:
        builder = KeepingBuilder.from_options("blk", {"path": image, **opts})
        thread = run_device(builder, f"blk{len(rigs)}.sock")
        rig = Rig(thread, VhostUserFrontend.connect(thread.path), builder)
        rigs.append(rig)
        rig.fe.negotiate(features=features)
        rig.fe.setup_memory(16 * MiB)
        rig.queues = [rig.fe.setup_queue(i, QSIZE) for i in range(queues)]
        return rig

    yield start
    for rig in rigs:
        rig.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    return str(path)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------
# Data placement

@pytest.mark.parametrize("indirect", [False, True])
def test_read_write_split_views(blk, image, indirect):
    rig = blk(image)
    q = rig.queues[0]
    data = os.urandom(8192)
    # header in its own descriptor, data split oddly over three buffers (the
    # middle one in the low memory region), status byte alone
    w = Chain(q, [hdr(T_OUT, 8), data[:1000], Buf(q.mem.alloc, data[1000:5000], region=0), data[5000:]],
              [1], indirect=indirect)
    # read: two data buffers, the status byte at the end of the second one
    r = Chain(q, [hdr(T_IN, 8)], [4096, Buf(q.mem.alloc, 4097, region=0)], indirect=indirect)
    batches = run(q, w, r)
    # served and completed in order, with the used lengths a driver expects
    assert [done for batch in batches for done in batch] == [(w.head, 1), (r.head, 8193)]
    assert w.status == S_OK and r.status == S_OK
    assert bytes(r.w[0]) + bytes(r.w[1].view[:4096]) == data
    assert read_file(image)[8 * 512:8 * 512 + 8192] == data


def test_header_with_data_in_one_view_and_split_header(blk, image):
    rig = blk(image)
    q = rig.queues[0]
    data = os.urandom(1024)
    data2 = os.urandom(1536)
    w = Chain(q, [hdr(T_OUT, 3) + data], [1])                   # header and data in one buffer
    full = hdr(T_IN, 3)
    r = Chain(q, [full[:5], full[5:]], [1025])                  # split IN header, status after the data
    out = hdr(T_OUT, 40) + data2
    w2 = Chain(q, [out[:7], out[7:300], out[300:]], [1])         # split OUT header, data follows in its tail
    out3 = hdr(T_OUT, 60)
    w3 = Chain(q, [out3[:1], out3[1:15], out3[15:] + data[:512], data[512:]], [1])  # header over three
    run(q, w, r, w2, w3)
    assert [c.used for c in (w, r, w2, w3)] == [1, 1025, 1, 1]
    assert [c.status for c in (w, r, w2, w3)] == [S_OK] * 4
    assert bytes(r.w[0].view[:1024]) == data
    content = read_file(image)
    assert content[3 * 512:3 * 512 + 1024] == data
    assert content[40 * 512:40 * 512 + 1536] == data2
    assert content[60 * 512:60 * 512 + 1024] == data


# --------------------------------------------------------------------------
# Malformed requests

@pytest.mark.parametrize("rtype,sector,length,status", [
    (T_IN, SIZE // 512, 512, S_IOERR),          # one past the end
    (T_IN, SIZE // 512 - 1, 1024, S_IOERR),     # straddles the end
    (T_IN, 0, 100, S_IOERR),                    # not a sector multiple
    (T_OUT, SIZE // 512, 512, S_IOERR),
    (T_OUT, (1 << 64) - 1, 512, S_IOERR),       # huge sector
    (T_OUT, 0, 700, S_IOERR),
    (99, 0, 0, S_UNSUPP),                       # unknown type
    (10, 0, 0, S_UNSUPP),                       # GET_LIFETIME: not offered
])
def test_bad_requests_get_status(blk, image, rtype, sector, length, status):
    rig = blk(image)
    q = rig.queues[0]
    before = read_file(image)
    if rtype == T_OUT:
        chain = Chain(q, [hdr(rtype, sector), os.urandom(length)], [1])
    else:
        chain = Chain(q, [hdr(rtype, sector)], [length + 1])
    run(q, chain)
    assert chain.used == 1
    assert chain.status == status
    if rtype == T_IN and length:
        assert bytes(chain.w[0].view[:-1]) == bytes([POISON]) * length   # nothing read into the guest
    assert read_file(image) == before
    # the queue is not broken: the next request is served
    ok = Chain(q, [hdr(T_IN, 0)], [512, 1])
    run(q, ok)
    assert ok.status == S_OK and bytes(ok.w[0]) == before[:512]


def test_no_status_byte_breaks_only_that_queue(blk, image, caplog):
    caplog.set_level(logging.ERROR, logger="vhost.virtqueue")
    rig = blk(image, queues=2, **{"num-queues": "2"})
    q0, q1 = rig.queues
    before = read_file(image)
    bad = Chain(q1, [hdr(T_OUT, 0), os.urandom(512)], [])
    good = Chain(q1, [hdr(T_IN, 0)], [513])
    bad.submit(q1)
    good.submit(q1)
    q1.kick()
    wait_broken(q1)
    broken = [r.getMessage() for r in caplog.records if r.name == "vhost.virtqueue"]
    assert any("queue 1 broken" in m and "status" in m for m in broken), broken
    # queue 0 and the connection keep working; the round trip on the device's loop
    # also means queue 1 had every chance to complete something by now
    r = Chain(q0, [hdr(T_IN, 0)], [4096, 1])
    run(q0, r)
    assert r.status == S_OK and bytes(r.w[0]) == before[:4096]
    # nothing was completed on queue 1, not even the good request behind it
    assert q1.poll_used() == [] and q1.used_idx == 0
    assert good.status == POISON
    assert read_file(image) == before
    assert CONFIG.unpack(rig.fe.get_config(0, 60))[0] == SIZE // 512


def test_short_header_is_ioerr(blk, image):
    rig = blk(image)
    q = rig.queues[0]
    c1 = Chain(q, [bytes(10)], [1])                   # 10 of the header's 16 bytes
    c2 = Chain(q, [], [1])                            # no readable descriptor at all
    c3 = Chain(q, [hdr(T_IN)[:8], hdr(T_IN)[8:12]], [513])   # 12 bytes over two buffers
    run(q, c1, c2, c3)
    assert [c.used for c in (c1, c2, c3)] == [1, 1, 1]
    assert [c.status for c in (c1, c2, c3)] == [S_IOERR] * 3


def test_read_only(blk, image):
    rig = blk(image, ro="true")
    q = rig.queues[0]
    assert rig.fe.features & F_RO and rig.fe.acked_features & F_RO
    assert not rig.fe.features & (F_DISCARD | F_WRITE_ZEROES)
    before = read_file(image)
    w = Chain(q, [hdr(T_OUT, 0), os.urandom(512)], [1])
    d = Chain(q, [hdr(T_DISCARD), SEG.pack(0, 8, 0)], [1])
    z = Chain(q, [hdr(T_WRITE_ZEROES), SEG.pack(0, 8, 0)], [1])
    r = Chain(q, [hdr(T_IN, 0)], [512, 1])
    f = Chain(q, [hdr(T_FLUSH)], [1])
    run(q, w, d, z, r, f)
    assert [c.status for c in (w, d, z, r, f)] == [S_IOERR, S_IOERR, S_IOERR, S_OK, S_OK]
    assert [c.used for c in (w, d, z, r, f)] == [1, 1, 1, 513, 1]
    assert bytes(r.w[0]) == before[:512]
    assert read_file(image) == before


# --------------------------------------------------------------------------
# Discard and write-zeroes, checked on the file

def _extents(path: str) -> list[tuple[int, int]]:
    """(offset, end) data extents via SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out, pos, size = [], 0, os.fstat(fd).st_size
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h))
            pos = h
        return out
    finally:
        os.close(fd)


def test_discard_and_write_zeroes_on_file(blk, image):
    rig = blk(image, **{"max-discard-segments": "2"})   # z2 has two segments
    q = rig.queues[0]
    assert rig.fe.acked_features & F_DISCARD and rig.fe.acked_features & F_WRITE_ZEROES
    # discard 64 KiB at 128 KiB, write-zeroes (unmap) 64 KiB at 512 KiB,
    # write-zeroes 8 KiB at 4 KiB and 512 bytes at sector 40 (that segment
    # split over two buffers)
    d = Chain(q, [hdr(T_DISCARD), SEG.pack(256, 128, 0)], [1])
    z1 = Chain(q, [hdr(T_WRITE_ZEROES), SEG.pack(1024, 128, 1)], [1])
    segs = SEG.pack(8, 16, 0) + SEG.pack(40, 1, 0)
    z2 = Chain(q, [hdr(T_WRITE_ZEROES) + segs[:5], segs[5:21], segs[21:]], [1])
    before = read_file(image)
    run(q, d, z1, z2)
    assert [c.status for c in (d, z1, z2)] == [S_OK] * 3
    assert [c.used for c in (d, z1, z2)] == [1] * 3
    content = read_file(image)
    assert content[128 << 10:192 << 10] == bytes(64 << 10)
    assert content[512 << 10:576 << 10] == bytes(64 << 10)
    assert content[4096:12288] == bytes(8192)
    assert content[40 * 512:41 * 512] == bytes(512)
    # everything else is untouched
    assert content[:4096] == before[:4096]
    assert content[12288:40 * 512] == before[12288:40 * 512]
    assert content[41 * 512:128 << 10] == before[41 * 512:128 << 10]
    assert content[192 << 10:512 << 10] == before[192 << 10:512 << 10]
    assert content[576 << 10:] == before[576 << 10:]
    extents = _extents(image)
    # the punched ranges are holes: no data extent covers them
    for lo, hi in ((128 << 10, 192 << 10), (512 << 10, 576 << 10)):
        assert not any(s < hi and e > lo for s, e in extents), extents
    assert os.path.getsize(image) == SIZE
    # and the guest reads zeros there
    r = Chain(q, [hdr(T_IN, 256)], [64 << 10, 1])
    run(q, r)
    assert r.status == S_OK and bytes(r.w[0]) == bytes(64 << 10)


@pytest.mark.parametrize("rtype,seg,status", [
    (T_DISCARD, SEG.pack(0, 8, 1), S_UNSUPP),             # unmap on discard
    (T_DISCARD, SEG.pack(0, 8, 4), S_UNSUPP),             # unknown flag
    (T_WRITE_ZEROES, SEG.pack(0, 8, 2), S_UNSUPP),
    (T_DISCARD, SEG.pack(SIZE // 512 - 1, 8, 0), S_IOERR),  # out of range
    (T_WRITE_ZEROES, SEG.pack(0, 8, 0)[:10], S_IOERR),    # not a whole segment
    (T_DISCARD, SEG.pack(0, 1, 0) * 2, S_UNSUPP),         # more than the default 1 segment
    (T_WRITE_ZEROES, SEG.pack(0, 1, 0) * 2, S_UNSUPP),    # (as QEMU: a command not supported)
    (T_DISCARD, SEG.pack(0, 1, 0) * 300, S_UNSUPP),
])
def test_bad_discard(blk, image, rtype, seg, status):
    rig = blk(image)
    q = rig.queues[0]
    before = read_file(image)
    c = Chain(q, [hdr(rtype), seg], [1])
    run(q, c)
    assert c.used == 1 and c.status == status
    assert read_file(image) == before
    assert _extents(image) == [(0, SIZE)]


def test_not_sparse_refuses_discard(blk, image):
    rig = blk(image, sparse="false")
    q = rig.queues[0]
    assert not rig.fe.features & (F_DISCARD | F_WRITE_ZEROES)
    before = read_file(image)
    d = Chain(q, [hdr(T_DISCARD), SEG.pack(0, 8, 0)], [1])
    z = Chain(q, [hdr(T_WRITE_ZEROES), SEG.pack(0, 8, 1)], [1])
    run(q, d, z)
    assert d.status == S_UNSUPP and z.status == S_UNSUPP
    assert read_file(image) == before


# --------------------------------------------------------------------------
# GET_ID, flush, config space, write-through

def test_get_id_and_flush(blk, image):
    rig = blk(image, id="serial-123")
    q = rig.queues[0]
    c = Chain(q, [hdr(T_GET_ID)], [20, 1])
    f = Chain(q, [hdr(T_FLUSH)], [1])
    c2 = Chain(q, [hdr(T_GET_ID)], [7, 13, 1])       # the id over two buffers
    run(q, c, f, c2)
    assert bytes(c.w[0]) == b"serial-123".ljust(20, b"\0")
    assert (c.used, f.used, c2.used) == (21, 1, 21)
    assert (c.status, f.status, c2.status) == (S_OK, S_OK, S_OK)
    assert bytes(c2.w[0]) + bytes(c2.w[1]) == b"serial-123".ljust(20, b"\0")
    # without an id: UNSUPP, and the buffer is left alone
    rig2 = blk(image, lock="false")
    q2 = rig2.queues[0]
    c = Chain(q2, [hdr(T_GET_ID)], [21])
    run(q2, c)
    assert c.used == 1 and c.status == S_UNSUPP
    assert bytes(c.w[0].view[:20]) == bytes([POISON]) * 20


def test_config_space(blk, image):
    rig = blk(image, queues=4, **{"block-size": "4096", "num-queues": "4"})
    fe = rig.fe
    cfg = fe.get_config(0, 60)
    fields = CONFIG.unpack(cfg)
    assert fields[0] == SIZE // 512       # capacity
    assert fields[6] == 4096              # blk_size
    assert fields[13] == 4                # num_queues
    assert (fields[15], fields[18]) == (1, 1)   # max_discard_seg, max_write_zeroes_seg: as QEMU
    assert fe.get_config(0, 8) == cfg[:8]
    assert fe.get_config(60, 36) == bytes(36)
    with pytest.raises(ProtocolError, match="refused"):
        fe.get_config(250, 10)
    assert fe.queue_num == 4 and fe.get_queue_num() == 4
    # the refusal did not cost the connection: config and all four queues work
    assert fe.get_config(0, 60) == cfg
    for q in rig.queues:
        r = Chain(q, [hdr(T_IN, 8)], [4096, 1])
        run(q, r)
        assert r.status == S_OK


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_CACHESTAT = 451   # x86_64 (the front-end asserts a little-endian x86 host)


def dirty_pages(path: str, offset: int, length: int) -> int | None:
    """Dirty + under-writeback page-cache pages of ``path`` in the range
    (cachestat(2)), or None where the kernel does not have it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        rng = ctypes.create_string_buffer(struct.pack("<QQ", offset, length), 16)
        out = ctypes.create_string_buffer(40)
        if _libc.syscall(_SYS_CACHESTAT, fd, rng, out, 0) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                return None
            raise OSError(err, os.strerror(err))
        _cache, dirty, writeback, _evicted, _recent = struct.unpack("<5Q", out.raw)
        return dirty + writeback
    finally:
        os.close(fd)


def dirty_probe_works(directory) -> bool:
    """Whether a plain write shows up as dirty pages and fdatasync cleans
    them on this file system (not so on tmpfs, or without cachestat)."""
    path = os.path.join(directory, "probe.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, os.urandom(8192), 0)
        dirty = dirty_pages(path, 0, 8192)
        os.fdatasync(fd)
        return bool(dirty) and dirty_pages(path, 0, 8192) == 0
    finally:
        os.close(fd)
        os.unlink(path)


def test_writethrough_without_flush_feature(blk, image, tmp_path):
    """No FLUSH negotiated means no write cache: a completed write is stable.
    With FLUSH the device writes back, and FLUSH makes it stable."""
    probe = dirty_probe_works(tmp_path)
    without_flush = (DRIVER_FEATURES | DEVICE_FEATURE_MASK) & ~F_FLUSH
    rig = blk(image, features=without_flush, lock="false")
    q = rig.queues[0]
    assert rig.fe.features & F_FLUSH and not rig.fe.acked_features & F_FLUSH
    assert rig.device.writethrough
    data = os.urandom(64 << 10)
    w = Chain(q, [hdr(T_OUT, 512), data], [1])
    run(q, w)
    assert w.status == S_OK
    if probe:
        assert dirty_pages(image, 256 << 10, 64 << 10) == 0

    rig2 = blk(image, lock="false")
    q2 = rig2.queues[0]
    assert rig2.fe.acked_features & F_FLUSH
    assert not rig2.device.writethrough
    w = Chain(q2, [hdr(T_OUT, 1024), data], [1])
    run(q2, w)
    assert w.status == S_OK
    if probe:
        assert dirty_pages(image, 512 << 10, 64 << 10) > 0
    f = Chain(q2, [hdr(T_FLUSH)], [1])
    run(q2, f)
    assert f.status == S_OK
    if probe:
        assert dirty_pages(image, 0, SIZE) == 0
    content = read_file(image)
    assert content[256 << 10:320 << 10] == data and content[512 << 10:576 << 10] == data


def test_direct_io(blk, tmp_path):
    path = tmp_path / "direct.img"
    path.write_bytes(bytes(SIZE))
    rig = blk(str(path), direct="true")
    q = rig.queues[0]
    data = os.urandom(4096)
    # guest buffers one byte off a page boundary force the bounce path
    w = Chain(q, [hdr(T_OUT, 16), Buf(q.alloc, data, align=4096, skew=1)], [1])
    run(q, w)
    assert w.used == 1 and w.status == S_OK
    r = Chain(q, [hdr(T_IN, 16)], [Buf(q.alloc, 4097, align=4096, skew=1)])
    run(q, r)
    assert r.used == 4097 and r.status == S_OK
    assert bytes(r.w[0].view[:4096]) == data
    # aligned buffers go straight to the file
    r2 = Chain(q, [hdr(T_IN, 16)], [Buf(q.alloc, 4096, align=4096), 1])
    run(q, r2)
    assert r2.status == S_OK and bytes(r2.w[0]) == data
    rig.close()
    assert path.read_bytes()[16 * 512:16 * 512 + 4096] == data


# --------------------------------------------------------------------------
# Fuzz: whatever the guest puts in a chain, the device answers it with a
# status, or (no status byte) breaks that queue only.  A device exception
# would also break the queue (QueueTaskDevice._guard), so a break of a
# chain that has a writable byte is a failure, as is any log of one.

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class FuzzRig:
    FUZZ_QUEUE = 1

    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.path = tmp / "disk.img"
        self.path.write_bytes(bytes(SIZE))
        self.builder = BlockBuilder.from_options(
            "fuzz", {"path": str(self.path), "lock": "false", "num-queues": "2", "id": "fuzz-disk"})
        self.log = _Records()
        self.thread: DeviceThread | None = None
        self.fe: VhostUserFrontend | None = None
        self.restarts = 0
        self.completed = 0

    def setup(self) -> None:
        logging.getLogger().addHandler(self.log)
        self.thread = DeviceThread(self.builder, str(self.tmp / "dev.sock"))
        self.fe = VhostUserFrontend.connect(self.thread.path)
        self.fe.negotiate()
        self.fe.setup_memory(16 * MiB)
        self.control = self.fe.setup_queue(0, QSIZE)
        self.driver = BlockDriver(self.control, depth=1, max_io=4096)
        self.queue = self.fe.setup_queue(self.FUZZ_QUEUE, QSIZE)
        self.arena = Arena(self.queue, 64 << 10)

    def restart_fuzz_queue(self) -> None:
        """GET_VRING_BASE on the broken ring, then fresh rings: the device
        serves the queue again (the guest driver resetting its queue)."""
        self.fe.stop_queue(self.FUZZ_QUEUE)
        old = self.fe.queues.pop(self.FUZZ_QUEUE)
        old.close()
        self.queue = self.fe.setup_queue(self.FUZZ_QUEUE, QSIZE)
        self.restarts += 1

    def close(self) -> None:
        try:
            if self.fe is not None:
                self.fe.disconnect()
            if self.thread is not None:
                self.thread.join()
        finally:
            if self.fe is not None:
                self.fe.close()
            self.builder.close()
            logging.getLogger().removeHandler(self.log)


@pytest.fixture(scope="module")
def fuzz_rig(tmp_path_factory):
    rig = FuzzRig(tmp_path_factory.mktemp("fuzz"))
    try:
        rig.setup()
        yield rig
    finally:
        rig.close()
    # both outcomes were exercised
    assert rig.restarts and rig.completed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rtype=st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 3, 10, 0xFFFFFFFF]),
       sector=st.one_of(st.integers(0, SIZE // 512 + 4), st.integers(0, (1 << 64) - 1)),
       split=st.integers(0, 16),
       readable=st.lists(st.integers(1, 3000), max_size=4),
       writable=st.lists(st.integers(1, 3000), max_size=4),
       payload=st.binary(max_size=64),
       indirect=st.booleans())
def test_fuzz_device_answers_or_breaks_only_its_queue(fuzz_rig, rtype, sector, split, readable, writable,
                                                      payload, indirect):
    rig = fuzz_rig
    q = rig.queue
    head = hdr(rtype, sector) + payload
    parts = [head[:split], head[split:]] if 0 < split < len(head) else [head]
    rig.arena.reset()
    chain = Chain(q, parts + [os.urandom(n) for n in readable], writable, indirect=indirect,
                  alloc=rig.arena.alloc)
    seen = len(rig.log.records)
    chain.submit(q)
    q.kick()
    # the outcome: a completion, or the queue broken
    done = None
    deadline = time.monotonic() + TIMEOUT
    while not (broken := q.broken()):
        try:
            done = q.wait_used(0.005)
            broken = q.broken()
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                rig.restart_fuzz_queue()   # leave a working queue to the next example
                raise AssertionError("the request neither completed nor broke its queue") from None
    if broken:
        rig.restart_fuzz_queue()
    logged = [(r.levelno, r.getMessage()) for r in rig.log.records[seen:]]
    errors = [m for level, m in logged if level >= logging.ERROR]
    if not writable:
        assert broken and not done, (done, logged)
        assert len(errors) == 1 and "queue 1 broken: block request without a status byte" in errors[0], logged
    else:
        assert not broken and not errors, logged
        assert done is not None and len(done) == 1 and done[0][0] == chain.head, done
        written = done[0][1]
        assert 1 <= written <= sum(writable)
        assert chain.status in (S_OK, S_IOERR, S_UNSUPP)
        rig.completed += 1
    # the other queue and the connection keep working
    assert rig.driver.read(0, 512) == read_file(str(rig.path))[:512]
    if (rig.completed + rig.restarts) % 25 == 0:
        assert rig.fe.get_config(0, 8) == struct.pack("<Q", SIZE // 512)


def test_max_discard_segments_option(blk, image):
    """max-discard-segments raises both config limits and what is served;
    one more segment than offered is still refused, out-of-bound values are
    a configuration error."""
    rig = blk(image, **{"max-discard-segments": "4"})
    fields = CONFIG.unpack(rig.fe.get_config(0, 60))
    assert (fields[15], fields[18]) == (4, 4)
    q = rig.queues[0]
    ok = Chain(q, [hdr(T_WRITE_ZEROES), SEG.pack(0, 1, 0) * 4], [1])
    over = Chain(q, [hdr(T_DISCARD), SEG.pack(8, 1, 0) * 5], [1])
    run(q, ok, over)
    assert (ok.status, over.status) == (S_OK, S_UNSUPP)
    assert read_file(image)[:512] == bytes(512)
    for bad in ("0", "257", "x"):
        with pytest.raises(ConfigError, match=f"key 'max-discard-segments', value {bad!r}"):
            BlockBuilder.from_options("blk", {"path": image, "max-discard-segments": bad})
    # the standalone program's flag is the same option
    from devices import standalone
    args = standalone._parser().parse_args(["block", "--fd", "3", "--file", image, "--max-discard-segments", "4"])
    assert standalone.options_from_args(args)["max-discard-segments"] == "4"
