"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split rings.

A device that completes requests out of order cannot tell, after a crash,
which requests were in flight from the avail and used rings alone.  So the
back-end keeps a shared buffer (``GET_INFLIGHT_FD`` creates it, the front-end
keeps it across back-end restarts and hands it back with ``SET_INFLIGHT_FD``)
that says, per head descriptor, whether it is in flight and in which order it
was fetched.

Layout (the back-end allocates the buffer, so the back-end defines it)::

    buffer      = queue 0 region | queue 1 region | ...
    stride      = ALIGN_UP(16 * queue_size + 16, 64)      # bytes per queue
    queue region:
      header (16 bytes): u64 features (0); u16 version (1, 0 = fresh);
                         u16 desc_num; u16 last_batch_head; u16 used_idx
      desc[desc_num] (16 bytes each, indexed by head):
                         u8 inflight; u8 pad[5]; u16 next; u64 counter

(libvhost-user writes ``16 * queue_size + 2``; no multiple of 64 lies
between the two sums, so both give the same stride for every queue size.)

Maintenance follows the spec: fetch sets ``counter`` then ``inflight = 1``;
a completed batch first links its heads through ``next`` from
``last_batch_head`` (``link_batch``), then the used index is published in
the ring, then ``inflight = 0`` for each head and ``used_idx`` is updated
(``commit_batch``).  A crash between publishing and committing is repaired by
``recover``: it clears the ``ring used idx - used_idx`` entries of the last
batch.  Numbers are native (little-endian) like the rest of vhost-user.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os

from .errors import ProtocolError
from .protocol import InflightInfo

log = logging.getLogger("vhost.inflight")

INFLIGHT_ALIGNMENT = 64
HEADER_SIZE = 16
DESC_SIZE = 16
VERSION = 1
MAX_QUEUE_SIZE = 32768
MAX_QUEUES = 256  # the u8 vring index of vhost-user
#: A region handed back (SET_INFLIGHT_FD) is the front-end's data: the fetch
#: counter of an in-flight slot must leave room to count on (we continue
#: from the highest one), so anything at or above this is refused.
MAX_COUNTER = 1 << 63


def queue_stride(queue_size: int) -> int:
    """Bytes per queue region: ``ALIGN_UP(16 * queue_size + 16, 64)``."""
    return (DESC_SIZE * queue_size + HEADER_SIZE + INFLIGHT_ALIGNMENT - 1) & ~(INFLIGHT_ALIGNMENT - 1)


def _check_geometry(num_queues: int, queue_size: int) -> None:
    if not 1 <= num_queues <= MAX_QUEUES:
        raise ProtocolError(f"inflight: num_queues {num_queues} outside [1, {MAX_QUEUES}]")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise ProtocolError(f"inflight: queue_size {queue_size} outside [1, {MAX_QUEUE_SIZE}]")


class InflightQueue:
    """One queue's region of the inflight buffer.

    Field access goes through casts of one view: ``_b`` (bytes), ``_h``
    (u16) and ``_q`` (u64), so each update is one index store.
    """

    __slots__ = ("index", "capacity", "counter", "_b", "_h", "_q")

    def __init__(self, index: int, view: memoryview, capacity: int) -> None:
        self.index = index
        #: Descriptor slots in this region (the region's queue_size).
        self.capacity = capacity
        #: Next fetch counter.
        self.counter = 0
        self._b = view
        self._h = view.cast("H")
        self._q = view.cast("Q")

    def release(self) -> None:
        """Drop the views into the region (it is being unmapped and nobody serves this queue)."""
        for v in (self._q, self._h, self._b):
            v.release()

    # header fields the queue and tests read
    @property
    def version(self) -> int:
        return self._h[4]

    @property
    def used_idx(self) -> int:
        return self._h[7]

    def initialise(self, used_idx: int = 0) -> None:
        """Make the region fresh: zeroed slots, version 1, ``used_idx``."""
        self._b[:] = bytes(len(self._b))
        self._h[5] = self.capacity
        self._h[7] = used_idx & 0xFFFF
        self._h[4] = VERSION
        self.counter = 0

    # -- the hot path

    def fetched(self, head: int) -> None:
        """``head`` was taken from the avail ring: counter, then inflight = 1."""
        self._q[3 + 2 * head] = self.counter
        self.counter += 1
        self._b[HEADER_SIZE + DESC_SIZE * head] = 1

    def link_batch(self, heads: list[int]) -> None:
        """Step 1 of a completion, before the ring's used idx is published:
        ``desc[i].next = last_batch_head; last_batch_head = i``."""
        h = self._h
        last = h[6]
        for head in heads:
            h[11 + 8 * head] = last
            last = head
        h[6] = last

    def commit_batch(self, heads: list[int], used_idx: int) -> None:
        """Steps 3 and 4, after the used idx was published: inflight = 0 for
        each head, then ``used_idx``."""
        b = self._b
        for head in heads:
            b[HEADER_SIZE + DESC_SIZE * head] = 0
        self._h[7] = used_idx & 0xFFFF

    # -- reconnection

    def check(self) -> None:
        """Validate what the front-end handed back before anything in it is
        used: version, desc_num and the counters of in-flight slots.  A fresh
        region (version 0) passes: it is initialised on first use.
        ProtocolError naming the queue, the field and the value."""
        if self._h[4] != 0:
            self._check_header()
            self._inflight_heads()

    def _check_header(self) -> None:
        h = self._h
        if h[4] != VERSION:
            raise ProtocolError(f"inflight queue {self.index}: version {h[4]}, expected {VERSION}")
        if h[5] != self.capacity:
            raise ProtocolError(f"inflight queue {self.index}: desc_num {h[5]}, expected {self.capacity}")

    def _inflight_heads(self) -> list[int]:
        """Slots marked in flight, in fetch (counter) order; ProtocolError if
        a counter is out of range."""
        n = self.capacity
        flags = self._b[HEADER_SIZE:HEADER_SIZE + DESC_SIZE * n:DESC_SIZE].tolist()
        q = self._q
        heads = [i for i, f in enumerate(flags) if f == 1]
        for i in heads:
            if q[3 + 2 * i] >= MAX_COUNTER:
                raise ProtocolError(f"inflight queue {self.index}: slot {i} counter {q[3 + 2 * i]:#x} "
                                    f"is not below 2^63")
        heads.sort(key=lambda i: q[3 + 2 * i])
        return heads

    def recover(self, ring_used_idx: int) -> list[int]:
        """Repair a half-committed batch and return the heads still in
        flight, in fetch (counter) order.  A fresh region (version 0) is
        initialised and yields nothing.  ProtocolError if the region is
        inconsistent (the front-end handed back something we did not
        write); nothing in it is used then."""
        h = self._h
        if h[4] == 0:
            self.initialise(ring_used_idx)
            return []
        self._check_header()
        heads = self._inflight_heads()
        n = self.capacity
        used = h[7]
        if used != ring_used_idx & 0xFFFF:
            missing = (ring_used_idx - used) & 0xFFFF
            if missing > n:
                raise ProtocolError(f"inflight queue {self.index}: used_idx {used} is {missing} behind "
                                    f"the ring's used idx {ring_used_idx}, more than desc_num {n}")
            batch = []
            i = h[6]
            for _ in range(missing):
                if i >= n:
                    raise ProtocolError(f"inflight queue {self.index}: batch link {i} out of range {n}")
                batch.append(i)
                i = h[11 + 8 * i]
            # Validated whole before the first write: the last batch was published.
            b = self._b
            for i in batch:
                b[HEADER_SIZE + DESC_SIZE * i] = 0
            h[7] = ring_used_idx & 0xFFFF
            done = set(batch)
            heads = [i for i in heads if i not in done]
        q = self._q
        self.counter = q[3 + 2 * heads[-1]] + 1 if heads else 0
        return heads


class InflightRegion:
    """The shared buffer of GET/SET_INFLIGHT_FD: ``num_queues`` regions of
    ``queue_stride(queue_size)`` bytes each, mapped read-write and shared."""

    def __init__(self, fd: int, mm: mmap.mmap, info: InflightInfo) -> None:
        self.fd = fd
        self.mmap_size = info.mmap_size
        self.mmap_offset = info.mmap_offset
        self.num_queues = info.num_queues
        self.queue_size = info.queue_size
        self.stride = queue_stride(info.queue_size)
        self._mmap = mm
        self._view = memoryview(mm)
        self._queues: dict[int, InflightQueue] = {}

    @property
    def info(self) -> InflightInfo:
        """What GET_INFLIGHT_FD replies (the fd travels alongside)."""
        return InflightInfo(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> "InflightRegion":
        """A new zeroed buffer in a sealed memfd (it cannot grow or shrink
        under us, so the mapping never faults) for GET_INFLIGHT_FD."""
        _check_geometry(num_queues, queue_size)
        size = num_queues * queue_stride(queue_size)
        fd = os.memfd_create("vhost-inflight", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mm, InflightInfo(size, 0, num_queues, queue_size))

    @classmethod
    def from_fd(cls, fd: int, info: InflightInfo) -> "InflightRegion":
        """Map the buffer of SET_INFLIGHT_FD.  ``fd`` is consumed (kept by the
        region, closed on error).  ProtocolError naming the field when the
        geometry does not fit our layout or the file."""
        try:
            _check_geometry(info.num_queues, info.queue_size)
            need = info.num_queues * queue_stride(info.queue_size)
            if info.mmap_size < need:
                raise ProtocolError(f"SET_INFLIGHT_FD: mmap_size {info.mmap_size} < {need} "
                                    f"(num_queues {info.num_queues} x stride {queue_stride(info.queue_size)})")
            if info.mmap_offset % mmap.ALLOCATIONGRANULARITY:
                raise ProtocolError(f"SET_INFLIGHT_FD: mmap_offset {info.mmap_offset:#x} is not page aligned")
            try:
                st = os.fstat(fd)
            except OSError as exc:
                raise ProtocolError(f"SET_INFLIGHT_FD: fd {fd}: {exc}") from None
            if st.st_size < info.mmap_offset + info.mmap_size:
                raise ProtocolError(f"SET_INFLIGHT_FD: mmap_offset {info.mmap_offset:#x} + mmap_size "
                                    f"{info.mmap_size:#x} exceeds the file size {st.st_size:#x}")
            try:
                mm = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=info.mmap_offset)
            except (OSError, ValueError, OverflowError) as exc:
                raise ProtocolError(f"SET_INFLIGHT_FD: mmap_size {info.mmap_size:#x}: mmap failed: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        region = cls(fd, mm, info)
        problem = None
        try:
            for index in range(region.num_queues):
                region.queue(index).check()
        except ProtocolError as exc:
            problem = str(exc)
        if problem is not None:
            # Nobody holds these queues yet: drop their views so the mapping
            # (and the fd mmap keeps) really closes now, not at some later GC.
            for q in region._queues.values():
                q.release()
            region.close()
            raise ProtocolError(f"SET_INFLIGHT_FD: {problem}")
        return region

    def queue(self, index: int) -> InflightQueue:
        """The region of queue ``index`` (one object per index)."""
        q = self._queues.get(index)
        if q is None:
            if not 0 <= index < self.num_queues:
                raise ProtocolError(f"inflight: queue index {index} outside [0, {self.num_queues})")
            if self._view is None:
                raise ProtocolError("inflight: region is closed")
            start = index * self.stride
            q = self._queues[index] = InflightQueue(index, self._view[start:start + self.stride],
                                                    self.queue_size)
        return q

    def close(self) -> None:
        """Close the fd and unmap (idempotent).  A queue still holding its
        ``InflightQueue`` keeps the mapping alive and valid until it drops
        it: closing never leaves a device writing through a released view."""
        self._queues.clear()
        if self._view is not None:
            self._view.release()
            self._view = None  # type: ignore[assignment]
            try:
                self._mmap.close()
            except BufferError:
                log.debug("inflight region still referenced; unmapped when released")
            self._mmap = None  # type: ignore[assignment]
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
