"""A device's own I/O counters, in one shared page the supervisor reads.

Why a page: the supervisor must not ask a (jailed, possibly hostile) child
for its numbers over a channel it has to parse and wait on, and the hot path
must not pay a system call per request.  The parent allocates a memfd page
per device before the first fork and maps it ``MAP_SHARED``; every child of
the device inherits the mapping across ``fork`` (no fd is passed; the memfd
is sealed against resizing, so nothing can make the parent's reads fault).
The child's hot path adds to plain per-queue lists and publishes them to the
page from a cold path (queue stop, heartbeat) with aligned 64-bit stores;
the parent copies the page and decodes it.

What the parent reads is what the *device says*: exported as such
(``vhost_supervisor_device_reported_*``), bounds-checked, never used for a
decision (restart, state, health).

Layout (little-endian u64 words)::

    word 0       MAGIC
    word 1       VERSION
    word 2       queues the device declared (the parent reads at most MAX_QUEUES)
    word 3..7    reserved
    per queue q, from HEADER_WORDS + q * QUEUE_WORDS:
      +0 requests completed     +1 bytes moved (data + header + status)
      +2 requests failed (IOERR/UNSUPP, malformed)
      +3 latency sum (ns)       +4.. latency histogram, one count per bucket
                                      (``LATENCY_BOUNDS_NS`` then +Inf)
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from dataclasses import dataclass, field

PAGE = 4096
MAGIC = 0x31544E43_56484F53   # "SOHVCNT1" read as little-endian bytes
VERSION = 1
HEADER_WORDS = 8
#: Upper bounds of the latency buckets (ns): few, so a scrape stays small.
LATENCY_BOUNDS_NS = (50_000, 200_000, 1_000_000, 5_000_000, 25_000_000)
REQUESTS, BYTES, ERRORS, LATENCY_SUM, HIST = 0, 1, 2, 3, 4
QUEUE_WORDS = HIST + len(LATENCY_BOUNDS_NS) + 1
MAX_QUEUES = (PAGE // 8 - HEADER_WORDS) // QUEUE_WORDS
_WORDS = PAGE // 8
_PAGE_FMT = struct.Struct(f"<{_WORDS}Q")
_U64 = (1 << 64) - 1


class DeviceCounters:
    """The child's side: per-queue tallies the hot path adds to, published
    to the page off the hot path.

    A device adds to ``tally(qi)`` (a plain list, in the page's layout: a
    list item add costs a third of a shared-memory word's), or keeps running
    totals of its own and stores them there, and calls ``publish()`` from a
    cold path (its queue stopping, the supervisor's heartbeat, about once a
    second).  Every device has counters: a private page outside the
    supervisor (standalone, benchmarks), the shared page under it, so the
    hot path is the same code.
    """

    def __init__(self, buf: "mmap.mmap | bytearray", queues: int) -> None:
        if len(buf) < PAGE:
            raise ValueError(f"counters page of {len(buf)} bytes, need {PAGE}")
        self.words = memoryview(buf).cast("B")[:PAGE].cast("Q")
        self.queues = max(0, min(int(queues), MAX_QUEUES))
        self._tallies: dict[int, list[int]] = {}
        if self.words[0] != MAGIC or self.words[1] != VERSION:
            self.words[3:HEADER_WORDS + self.queues * QUEUE_WORDS] = array("Q", bytes(
                8 * (HEADER_WORDS - 3 + self.queues * QUEUE_WORDS)))
        self.words[2] = self.queues
        self.words[1] = VERSION
        self.words[0] = MAGIC

    @classmethod
    def private(cls, queues: int) -> "DeviceCounters":
        """Counters nobody reads (no supervisor): same code path, own memory."""
        return cls(bytearray(PAGE), queues)

    def tally(self, qi: int) -> list[int]:
        """Queue ``qi``'s tally, continuing from what the page holds (a previous
        child of the same device counted there); a queue past MAX_QUEUES
        counts into a tally that is never published."""
        t = self._tallies.get(qi)
        if t is None:
            if 0 <= qi < self.queues:
                base = HEADER_WORDS + qi * QUEUE_WORDS
                t = self.words[base:base + QUEUE_WORDS].tolist()
            else:
                t = [0] * QUEUE_WORDS
            self._tallies[qi] = t
        return t

    def publish(self) -> None:
        """Copy every tally to the page (word by word: aligned 8-byte stores)."""
        words = self.words
        for qi, t in self._tallies.items():
            if not 0 <= qi < self.queues:
                continue
            base = HEADER_WORDS + qi * QUEUE_WORDS
            words[base:base + QUEUE_WORDS] = array("Q", [v & _U64 for v in t])


def latency_bucket(ns: int, bounds: tuple[int, ...] = LATENCY_BOUNDS_NS) -> int:
    """Index of the histogram word for a latency (a plain comparison chain)."""
    i = 0
    for b in bounds:
        if ns <= b:
            return i
        i += 1
    return i


class CountersPage:
    """The parent's side: the memfd page, allocated before any fork."""

    def __init__(self, name: str) -> None:
        fd = os.memfd_create(f"vhost-counters-{name}"[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, PAGE)
            import fcntl
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)   # the mapping keeps the page; children inherit the mapping, not an fd

    def for_device(self, queues: int) -> DeviceCounters:
        """Called in the child: write the header, hand out the words."""
        return DeviceCounters(self.map, queues)

    def read(self) -> "Reported | None":
        """A snapshot, decoded; None if the page does not carry our header
        (a child that has not started, or scribbled over it)."""
        words = _PAGE_FMT.unpack(bytes(self.map[:PAGE]))
        if words[0] != MAGIC or words[1] != VERSION:
            return None
        queues = min(words[2], MAX_QUEUES)
        out = Reported(queues=int(queues))
        for q in range(queues):
            base = HEADER_WORDS + q * QUEUE_WORDS
            w = words[base:base + QUEUE_WORDS]
            out.per_queue.append(QueueReport(requests=w[REQUESTS], bytes=w[BYTES], errors=w[ERRORS],
                                             latency_sum_ns=w[LATENCY_SUM],
                                             buckets=tuple(w[HIST:QUEUE_WORDS])))
        return out

    def close(self) -> None:
        try:
            self.map.close()
        except (BufferError, ValueError):
            pass   # a view is still exported (a test holds one): the GC unmaps it


@dataclass(frozen=True)
class QueueReport:
    requests: int
    bytes: int
    errors: int
    latency_sum_ns: int
    buckets: tuple[int, ...]     # per bucket (not cumulative), LATENCY_BOUNDS_NS then +Inf


@dataclass
class Reported:
    """What one device says about its queues (untrusted, bounded: at most MAX_QUEUES)."""

    queues: int
    per_queue: list[QueueReport] = field(default_factory=list)
