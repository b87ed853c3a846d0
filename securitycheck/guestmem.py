"""Guest memory with guard bytes around every region, and raw ring access.

``GuardedMemory`` is a drop-in ``DriverMemory`` for ``frontend.vhost_user``:
one memfd holding two regions, each with a guard zone before and after it
that is filled with a pattern and never announced to the back-end.  Region
0's leading guard is inside what the back-end maps (``mmap_offset``), so a
translation error there lands in a guard; ``intact()`` names the first guard
byte that changed.

``RawRing`` writes descriptors and the avail ring of a ``DriverQueue``
directly (the hostile guest), and reads what the back-end did.
"""

from __future__ import annotations

import mmap
import os
import select
import time

from frontend.vhost_user import DESC, DESC_SIZE, QVA_BASE, DriverMemory, DriverQueue, DriverRegion

GUARD = 64 << 10
PATTERN = 0xA5
GPA_HIGH = 4 << 30


class GuardedMemory(DriverMemory):
    def __init__(self, region_size: int = 4 << 20) -> None:   # noqa: D107 - layout in the class doc
        self.size = 2 * region_size
        self.region_size = region_size
        total = 4 * GUARD + 2 * region_size
        self.fd = os.memfd_create("seccheck-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, total)
            self._mmap = mmap.mmap(self.fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._view = memoryview(self._mmap)
        off0 = GUARD
        off1 = 3 * GUARD + region_size
        self.guards = [(0, GUARD), (off0 + region_size, 2 * GUARD), (off1 + region_size, GUARD)]
        for start, length in self.guards:
            self._view[start:start + length] = bytes([PATTERN]) * length
        self.regions = (
            DriverRegion(0, region_size, QVA_BASE[0], off0, self._view[off0:off0 + region_size]),
            DriverRegion(GPA_HIGH, region_size, QVA_BASE[1], off1, self._view[off1:off1 + region_size]),
        )

    def intact(self) -> str | None:
        """None if every guard byte still holds the pattern, else where it changed."""
        want = bytes([PATTERN])
        for start, length in self.guards:
            chunk = bytes(self._view[start:start + length])
            if chunk != want * length:
                bad = next(i for i, b in enumerate(chunk) if b != PATTERN)
                return f"guard byte at memfd offset {start + bad:#x} changed to {chunk[bad]:#04x}"
        return None


class RawRing:
    """Hostile access to one driver queue (its descriptors are ours to forge)."""

    def __init__(self, q: DriverQueue) -> None:
        self.q = q

    def desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: memoryview | None = None) -> None:
        DESC.pack_into(self.q._desc if table is None else table, index * DESC_SIZE, addr & (2**64 - 1),
                       length & 0xFFFFFFFF, flags, nxt & 0xFFFF)

    def publish(self, head: int, kick: bool = True) -> None:
        q = self.q
        q._avail_h[2 + (q.avail_idx & q.mask)] = head & 0xFFFF
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        q._avail_h[1] = q.avail_idx          # one aligned 16-bit store
        if kick:
            self.kick()

    def set_avail_idx(self, value: int) -> None:
        self.q.avail_idx = value & 0xFFFF
        self.q._avail_h[1] = self.q.avail_idx

    def kick(self) -> None:
        os.eventfd_write(self.q.kick_fd, 1)

    def wait(self, timeout: float = 2.0) -> tuple[str, int, int]:
        """("broken", 0, 0), ("used", head, len) or ("nothing", 0, 0)."""
        q = self.q
        deadline = time.monotonic() + timeout
        while True:
            if q.broken():
                return ("broken", 0, 0)
            used = q._used_h[1]
            if used != q.last_used_idx:
                slot = q.last_used_idx & q.mask
                head, length = q._used_i[1 + 2 * slot], q._used_i[2 + 2 * slot]
                q.last_used_idx = (q.last_used_idx + 1) & 0xFFFF
                return ("used", head, length)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ("nothing", 0, 0)
            select.select([q.err_fd, q.call_fd], [], [], min(remaining, 0.05))
            try:
                os.eventfd_read(q.call_fd)
            except BlockingIOError:
                pass
