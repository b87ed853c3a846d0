"""Guest memory: the regions a front-end shares, and address translation.

Each region arrives as an fd (SET_MEM_TABLE / ADD_MEM_REG).  It is mapped once,
``mmap(size + mmap_offset, MAP_SHARED, fd, 0)`` as libvhost-user does (the
offset is applied in our address arithmetic, not by mmap, because of page and
hugepage alignment), and the fd is closed.  Every buffer the device touches is
a slice of the one ``memoryview`` made for its region at mapping time, so a
translated buffer can never reach outside the mapping: the bounds check is the
slice itself, plus the explicit checks here that turn a bad address into a
``GuestMemoryError`` naming it instead of a silently short view.

Two address spaces are translated (vhost-user spec, "Memory access"):
descriptor ``addr`` fields are guest-physical (``gpa``), ring addresses from
SET_VRING_ADDR are front-end virtual addresses (``qva``).

Unmapping is safe by construction: Python's ``mmap.close()`` refuses while
any view into the mapping exists.  When a region goes away while a device
still holds a view (a request in flight across SET_MEM_TABLE), we drop our
references instead of closing; the mapping is then unmapped by the mmap
object's destructor when the last view is released.  Nothing ever touches
unmapped memory.

Note: on Python < 3.13, ``mmap.mmap`` keeps an internal dup of the fd for
the lifetime of the mapping; ours is closed here as the protocol requires.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat

from .errors import GuestMemoryError, ProtocolError
from .protocol import MAX_MEM_SLOTS, MemoryRegion

log = logging.getLogger("vhost.memory")

#: Linux MAP_NORESERVE; the mmap module does not export it.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_U64_END = 1 << 64


#: One region as the translation tables see it, ``(start, end, view,
#: offset)``: guest byte ``a`` with ``start <= a < end`` lives at
#: ``view[a - start + offset]`` (GPAs in the GPA table, QVAs in the QVA
#: table).  A plain tuple, not a NamedTuple: unpacking and indexing an exact
#: tuple are the interpreter's fast paths, and this is the hot path.
RegionSpan = tuple[int, int, memoryview, int]


class MappedRegion:
    """One mapped region.  ``view`` covers the whole mapping
    (``mmap_offset + memory_size`` bytes); guest byte ``gpa`` lives at
    ``view[mmap_offset + gpa - guest_phys_addr]``."""

    __slots__ = ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset",
                 "gpa_end", "qva_end", "view", "_mmap")

    def __init__(self, region: MemoryRegion, mm: mmap.mmap) -> None:
        self.guest_phys_addr = region.guest_phys_addr
        self.memory_size = region.memory_size
        self.userspace_addr = region.userspace_addr
        self.mmap_offset = region.mmap_offset
        self.gpa_end = region.guest_phys_addr + region.memory_size
        self.qva_end = region.userspace_addr + region.memory_size
        self._mmap = mm
        self.view = memoryview(mm)

    def matches(self, region: MemoryRegion) -> bool:
        return (self.guest_phys_addr == region.guest_phys_addr
                and self.userspace_addr == region.userspace_addr
                and self.memory_size == region.memory_size)

    def unmap(self) -> None:
        """Unmap now if no view is left, else when the last view goes."""
        view, mm = self.view, self._mmap
        self.view = None  # type: ignore[assignment]
        self._mmap = None  # type: ignore[assignment]
        if view is None:
            return
        view.release()
        try:
            mm.close()
        except BufferError:
            log.debug("region gpa=%#x still has views; unmapped when they are released",
                      self.guest_phys_addr)

    def __repr__(self) -> str:
        return (f"MappedRegion(gpa={self.guest_phys_addr:#x}, size={self.memory_size:#x}, "
                f"uaddr={self.userspace_addr:#x}, mmap_offset={self.mmap_offset:#x})")


class GuestMemory:
    """The guest's memory as the front-end shared it.

    ``gpa``/``qva`` are the hot path: a scan of ``RegionSpan`` tuples
    with a one-entry cache of the last region hit (a block request's
    buffers nearly always live in the same region).  The virtqueue
    translates inline: it starts from ``last_gpa_region`` (a plain
    attribute, read once per chain) and asks ``gpa_region`` when a buffer
    lies elsewhere.
    """

    def __init__(self, max_regions: int = MAX_MEM_SLOTS) -> None:
        self.max_regions = max_regions
        self.regions: tuple[MappedRegion, ...] = ()
        self._gpa_table: tuple[RegionSpan, ...] = ()
        self._qva_table: tuple[RegionSpan, ...] = ()
        #: The GPA region of the last ``gpa``/``gpa_region`` hit (None while
        #: nothing is mapped); read-only for callers.
        self.last_gpa_region: RegionSpan | None = None
        self._qva_last: RegionSpan | None = None

    # ------------------------------------------------------------------ changes

    def add_region(self, region: MemoryRegion, fd: int) -> None:
        """Map ``region`` from ``fd`` (consumed: closed here, also on error).
        Raises ProtocolError naming the field for a region we refuse."""
        try:
            self._check_new(region)
            length = region.memory_size + region.mmap_offset
            try:
                st = os.fstat(fd)
            except OSError as exc:
                raise ProtocolError(f"memory region gpa={region.guest_phys_addr:#x}: fd {fd}: {exc}") from None
            if stat.S_ISREG(st.st_mode) and st.st_size < length:
                raise ProtocolError(f"memory region gpa={region.guest_phys_addr:#x}: mmap_offset "
                                    f"{region.mmap_offset:#x} + memory_size {region.memory_size:#x} "
                                    f"exceeds the file size {st.st_size:#x}")
            try:
                mm = mmap.mmap(fd, length, mmap.MAP_SHARED | MAP_NORESERVE,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            except (OSError, ValueError, OverflowError) as exc:
                raise ProtocolError(f"memory region gpa={region.guest_phys_addr:#x} "
                                    f"memory_size={region.memory_size:#x}: mmap failed: {exc}") from None
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        mapped = MappedRegion(region, mm)
        self.regions = tuple(sorted(self.regions + (mapped,), key=lambda r: r.guest_phys_addr))
        self._rebuild()

    def _check_new(self, region: MemoryRegion) -> None:
        gpa, size, uaddr, offset = region
        if size <= 0:
            raise ProtocolError(f"memory region gpa={gpa:#x}: memory_size {size} must be > 0")
        if len(self.regions) >= self.max_regions:
            raise ProtocolError(f"memory region gpa={gpa:#x}: too many regions (max {self.max_regions})")
        for name, value in (("guest_phys_addr", gpa), ("userspace_addr", uaddr), ("mmap_offset", offset)):
            if not 0 <= value < _U64_END or value + size > _U64_END:
                raise ProtocolError(f"memory region: {name} {value:#x} + memory_size {size:#x} overflows u64")
        for r in self.regions:
            if gpa < r.gpa_end and r.guest_phys_addr < gpa + size:
                raise ProtocolError(f"memory region: guest_phys_addr {gpa:#x} size {size:#x} overlaps "
                                    f"region at {r.guest_phys_addr:#x} size {r.memory_size:#x}")
            if uaddr < r.qva_end and r.userspace_addr < uaddr + size:
                raise ProtocolError(f"memory region: userspace_addr {uaddr:#x} size {size:#x} overlaps "
                                    f"region at {r.userspace_addr:#x} size {r.memory_size:#x}")

    def remove_region(self, region: MemoryRegion) -> None:
        """Unmap the region matching (gpa, uaddr, size); ProtocolError if none does."""
        for r in self.regions:
            if r.matches(region):
                self.regions = tuple(x for x in self.regions if x is not r)
                self._rebuild()
                r.unmap()
                return
        raise ProtocolError(f"REM_MEM_REG: no region with guest_phys_addr {region.guest_phys_addr:#x} "
                            f"userspace_addr {region.userspace_addr:#x} memory_size {region.memory_size:#x}")

    def clear(self) -> None:
        """Unmap every region (each one as soon as no view into it is left)."""
        old = self.regions
        self.regions = ()
        self._rebuild()
        for r in old:
            r.unmap()

    def _rebuild(self) -> None:
        self._gpa_table = tuple((r.guest_phys_addr, r.gpa_end, r.view, r.mmap_offset) for r in self.regions)
        self._qva_table = tuple(sorted(((r.userspace_addr, r.qva_end, r.view, r.mmap_offset)
                                        for r in self.regions), key=lambda e: e[0]))
        self.last_gpa_region = self._gpa_table[0] if self._gpa_table else None
        self._qva_last = self._qva_table[0] if self._qva_table else None

    # -------------------------------------------------------------- translation

    def gpa(self, addr: int, length: int) -> memoryview:
        """A writable zero-copy view of guest-physical ``[addr, addr+length)``,
        which must lie inside one region; GuestMemoryError otherwise."""
        e = self.last_gpa_region
        if e is not None and e[0] <= addr and addr + length <= e[1] and length >= 0:
            o = addr - e[0] + e[3]
            return e[2][o:o + length]
        e = self.gpa_region(addr, length)
        o = addr - e[0] + e[3]
        return e[2][o:o + length]

    def gpa_region(self, addr: int, length: int) -> RegionSpan:
        """The region holding guest-physical ``[addr, addr+length)`` whole,
        which becomes ``last_gpa_region``; GuestMemoryError if none does."""
        if length >= 0:
            end = addr + length
            for e in self._gpa_table:
                if e[0] <= addr and end <= e[1]:
                    self.last_gpa_region = e
                    return e
        raise GuestMemoryError(f"guest physical address {addr:#x} length {length} "
                               f"is not inside one guest memory region")

    def gpa_views(self, addr: int, length: int) -> list[memoryview]:
        """Like ``gpa`` but the range may straddle adjacent regions: one view
        per region crossed, in address order."""
        if length < 0 or addr < 0:
            raise GuestMemoryError(f"guest physical address {addr:#x} length {length} is invalid")
        views: list[memoryview] = []
        cur, left = addr, length
        while True:
            for start, end, view, off in self._gpa_table:
                if start <= cur < end or (left == 0 and start <= cur <= end):
                    n = min(left, end - cur)
                    o = cur - start + off
                    views.append(view[o:o + n])
                    cur += n
                    left -= n
                    break
            else:
                raise GuestMemoryError(f"guest physical address {addr:#x} length {length}: "
                                       f"{cur:#x} is outside guest memory")
            if left == 0:
                return views

    def qva(self, addr: int, length: int) -> memoryview:
        """A writable view of front-end virtual ``[addr, addr+length)`` (ring
        addresses of SET_VRING_ADDR), inside one region; GuestMemoryError otherwise."""
        if length >= 0:
            end = addr + length
            e = self._qva_last
            if e is not None and e[0] <= addr and end <= e[1]:
                o = addr - e[0] + e[3]
                return e[2][o:o + length]
            for e in self._qva_table:
                if e[0] <= addr and end <= e[1]:
                    self._qva_last = e
                    o = addr - e[0] + e[3]
                    return e[2][o:o + length]
        raise GuestMemoryError(f"front-end virtual address {addr:#x} length {length} "
                               f"is not inside one guest memory region")
