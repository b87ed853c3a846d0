"""GuestMemory: mapping, GPA/QVA translation and bounds, region changes.

Real memfds, as a VMM shares them: one file, regions at different file
offsets (mmap_offset), GPA and QVA spaces deliberately different.
"""

from __future__ import annotations

import mmap
import os

import pytest

from connection.errors import GuestMemoryError, ProtocolError
from connection.memory import GuestMemory
from connection.protocol import MemoryRegion

MiB = 1 << 20


def memfd(size: int, fill: int = 0) -> int:
    fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, bytes([fill]) * size, 0)
    return fd


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def two_regions():
    """A 4 MiB memfd; region A = file [0, 1M) at GPA 0, region B = file
    [2M, 3M) at GPA 1M (adjacent to A in GPA space, not in the file)."""
    fd = memfd(4 * MiB)
    a = MemoryRegion(0x0, MiB, 0x7F00_0000_0000, 0)
    b = MemoryRegion(MiB, MiB, 0x7F00_1000_0000, 2 * MiB)
    mem = GuestMemory()
    mem.add_region(a, os.dup(fd))
    mem.add_region(b, os.dup(fd))
    host = mmap.mmap(fd, 4 * MiB)
    yield mem, host, a, b
    mem.clear()
    host.close()
    os.close(fd)


def test_gpa_view_is_zero_copy_and_writable(two_regions):
    mem, host, a, b = two_regions
    v = mem.gpa(0x1000, 16)
    v[:] = b"0123456789abcdef"
    assert host[0x1000:0x1010] == b"0123456789abcdef"
    host[2 * MiB + 0x20:2 * MiB + 0x24] = b"WXYZ"
    assert bytes(mem.gpa(MiB + 0x20, 4)) == b"WXYZ"   # mmap_offset applied


def test_gpa_bounds(two_regions):
    mem, host, a, b = two_regions
    assert len(mem.gpa(MiB - 8, 8)) == 8                 # last bytes of A
    assert len(mem.gpa(2 * MiB - 1, 1)) == 1             # last byte of B
    assert len(mem.gpa(0, 0)) == 0
    for addr, length in [(2 * MiB, 1), (2 * MiB - 1, 2), (-1, 4), (0, -1),
                         (2**64 - 1, 2), (1 << 70, 1), (0x10, 2**64)]:
        with pytest.raises(GuestMemoryError) as exc:
            mem.gpa(addr, length)
        assert hex(addr) in str(exc.value) and str(length) in str(exc.value)


def test_gpa_straddling_regions(two_regions):
    mem, host, a, b = two_regions
    with pytest.raises(GuestMemoryError):
        mem.gpa(MiB - 4, 8)                              # one region only
    host[MiB - 4:MiB] = b"abcd"
    host[2 * MiB:2 * MiB + 4] = b"efgh"
    views = mem.gpa_views(MiB - 4, 8)
    assert [bytes(v) for v in views] == [b"abcd", b"efgh"]
    assert [len(v) for v in mem.gpa_views(0x100, 64)] == [64]
    with pytest.raises(GuestMemoryError) as exc:
        mem.gpa_views(2 * MiB - 4, 8)                    # runs off the end
    assert hex(2 * MiB) in str(exc.value)


def test_gap_between_regions_is_unmapped():
    fd = memfd(3 * MiB)
    mem = GuestMemory()
    mem.add_region(MemoryRegion(0, MiB, 0x10000000, 0), os.dup(fd))
    mem.add_region(MemoryRegion(2 * MiB, MiB, 0x20000000, 2 * MiB), os.dup(fd))
    os.close(fd)
    with pytest.raises(GuestMemoryError):
        mem.gpa(MiB, 1)
    with pytest.raises(GuestMemoryError):
        mem.gpa_views(MiB - 1, 2)
    assert len(mem.gpa_views(2 * MiB, 10)[0]) == 10
    mem.clear()


def test_qva_is_a_separate_space(two_regions):
    mem, host, a, b = two_regions
    host[2 * MiB + 8:2 * MiB + 12] = b"qvaB"
    assert bytes(mem.qva(b.userspace_addr + 8, 4)) == b"qvaB"
    with pytest.raises(GuestMemoryError) as exc:
        mem.qva(MiB + 8, 4)                             # a GPA is not a QVA
    assert "front-end virtual" in str(exc.value)
    with pytest.raises(GuestMemoryError):
        mem.gpa(b.userspace_addr, 4)                    # nor the reverse
    with pytest.raises(GuestMemoryError):
        mem.qva(a.userspace_addr + MiB - 2, 4)          # past A's end
    assert len(mem.qva(a.userspace_addr + MiB - 4, 4)) == 4


def test_add_region_consumes_fd_on_success_and_error():
    fd = memfd(MiB)
    mem = GuestMemory()
    dup = os.dup(fd)
    mem.add_region(MemoryRegion(0, MiB, 0x1000_0000, 0), dup)
    assert not fd_is_open(dup)
    dup = os.dup(fd)
    with pytest.raises(ProtocolError):
        mem.add_region(MemoryRegion(0, 0, 0x2000_0000, 0), dup)
    assert not fd_is_open(dup)
    mem.clear()
    os.close(fd)


@pytest.mark.parametrize("region, field", [
    (MemoryRegion(0x0, 0, 0x9000_0000, 0), "memory_size"),
    (MemoryRegion(0x80000, MiB, 0x9000_0000, 0), "guest_phys_addr"),     # overlaps GPA
    (MemoryRegion(8 * MiB, MiB, 0x1000_0000 + 0x1000, 0), "userspace_addr"),  # overlaps QVA
    (MemoryRegion(2**64 - 0x1000, MiB, 0x9000_0000, 0), "guest_phys_addr"),  # overflows
    (MemoryRegion(8 * MiB, MiB, 0x9000_0000, 4 * MiB), "file size"),     # beyond the file
])
def test_add_region_refusals_name_the_field(region, field):
    fd = memfd(2 * MiB)
    mem = GuestMemory()
    mem.add_region(MemoryRegion(0, MiB, 0x1000_0000, 0), os.dup(fd))
    with pytest.raises(ProtocolError) as exc:
        mem.add_region(region, os.dup(fd))
    assert field in str(exc.value)
    assert len(mem.regions) == 1
    mem.clear()
    os.close(fd)


def test_too_many_regions():
    fd = memfd(MiB)
    mem = GuestMemory(max_regions=2)
    mem.add_region(MemoryRegion(0, 4096, 0x1000_0000, 0), os.dup(fd))
    mem.add_region(MemoryRegion(0x10000, 4096, 0x2000_0000, 4096), os.dup(fd))
    with pytest.raises(ProtocolError, match="too many regions"):
        mem.add_region(MemoryRegion(0x20000, 4096, 0x3000_0000, 8192), os.dup(fd))
    mem.clear()
    os.close(fd)


def test_remove_region(two_regions):
    mem, host, a, b = two_regions
    held = mem.gpa(MiB + 16, 4)          # a device still holds a view into B
    mem.remove_region(b)
    assert [r.guest_phys_addr for r in mem.regions] == [0]
    with pytest.raises(GuestMemoryError):
        mem.gpa(MiB + 16, 4)
    held[:] = b"late"                    # still mapped until released: no fault
    assert host[2 * MiB + 16:2 * MiB + 20] == b"late"
    del held
    with pytest.raises(ProtocolError, match="REM_MEM_REG"):
        mem.remove_region(b)
    assert len(mem.gpa(0x10, 4)) == 4


def test_clear_unmaps_everything(two_regions):
    mem, host, a, b = two_regions
    v = mem.gpa(0, 8)
    mem.clear()
    assert mem.regions == () and mem.last_gpa_region is None
    for addr in (0, MiB):
        with pytest.raises(GuestMemoryError):
            mem.gpa(addr, 1)
    with pytest.raises(GuestMemoryError):
        mem.qva(a.userspace_addr, 1)
    v[0] = 1                             # the deferred mapping is still valid
    del v
    mem.add_region(MemoryRegion(0, MiB, 0x5000_0000, 0), memfd(MiB))  # usable again
    assert len(mem.gpa(0, 16)) == 16


def test_last_region_cache_does_not_leak_across_regions(two_regions):
    mem, host, a, b = two_regions
    host[0x40] = 0x11
    host[2 * MiB + 0x40] = 0x22
    for _ in range(3):
        assert mem.gpa(0x40, 1)[0] == 0x11
        assert mem.gpa(MiB + 0x40, 1)[0] == 0x22
    # a range that starts in the cached region but ends beyond it
    mem.gpa(MiB + 0x40, 1)
    with pytest.raises(GuestMemoryError):
        mem.gpa(2 * MiB - 2, 4)


def test_gpa_region_is_the_public_lookup(two_regions):
    """What the virtqueue translates inline with: the region holding a whole
    range, remembered as ``last_gpa_region``; a range in no single region
    is refused and leaves the remembered one alone."""
    mem, host, a, b = two_regions
    start, end, view, offset = mem.gpa_region(MiB + 0x40, 16)
    assert (start, end, offset) == (MiB, 2 * MiB, b.mmap_offset)
    assert mem.last_gpa_region == (start, end, view, offset)
    host[b.mmap_offset + 0x40] = 0x33
    assert view[MiB + 0x40 - start + offset] == 0x33
    assert mem.gpa_region(0x10, 4)[0] == 0 and mem.last_gpa_region[0] == 0
    for addr, length in ((MiB - 2, 4), (2 * MiB, 1), (0, -1)):
        with pytest.raises(GuestMemoryError, match=f"{addr:#x} length {length}"):
            mem.gpa_region(addr, length)
    assert mem.last_gpa_region[0] == 0
