"""The device side of a split virtqueue (virtio 1.x, section 2.7).

This is the hot path, so ring accesses are single C-level operations on
views into guest memory, made once per ring mapping:

* descriptors are read with one precompiled ``struct.unpack_from``
  (``<QIHH``: addr, len, flags, next) straight from the ring's table or, for
  an indirect table, from the region's view at the table's offset (no
  per-request slice or cast);
* avail ring, cast ``'H'``: ``[0]`` flags, ``[1]`` idx, ``[2+k]`` ring[k],
  ``[2+Q]`` used_event;
* used ring, cast ``'H'`` for ``[0]`` flags, ``[1]`` idx, ``[2+4Q]``
  avail_event, and the elements cast ``'Q'``: ``u[k] = id | len << 32``,
  so a completion is one store.

Memory ordering.  CPython has no barriers of its own; we rely on x86 being
TSO (loads are not reordered with loads, stores not with stores) and on each
memoryview element store being a single store.  We read ``avail.idx``
before the ring entries and descriptors it covers, and write used elements
before the ``used.idx`` store that publishes them.  The one reordering TSO
allows, a later load passing an earlier store, matters in two places: after
publishing ``used.idx`` we load ``used_event``/``avail.flags`` to decide on
a notification, and after re-enabling kicks (``avail_event`` or clearing
``NO_NOTIFY``) we re-read ``avail.idx``.  There ``fence()`` executes a locked
instruction (an uncontended lock acquire/release), which is a full barrier.

A malformed chain (see ``_walk``) marks only this queue broken: it is logged
once on ``vhost.virtqueue``, the err eventfd is signalled, ``pop`` returns
None and ``wait_kick`` False until the queue is started again.  ``pop``
never raises, and every buffer it hands out is a slice of a region's mapping,
so a malicious guest cannot make the device touch memory outside what the
front-end shared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable

from .errors import GuestMemoryError, ProtocolError
from .inflight import InflightQueue
from .memory import GuestMemory
from .protocol import VirtioFeature, VringAddr

if sys.byteorder != "little":  # pragma: no cover - the ring casts assume it
    raise ImportError("connection.virtqueue assumes a little-endian host")

log = logging.getLogger("vhost.virtqueue")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
#: Largest indirect table we walk (QEMU caps a chain at 1024 buffers); a
#: larger queue size raises it to the queue size.
MAX_INDIRECT = 1024
#: Adaptive polling of the avail ring before sleeping (QEMU's poll-max-ns idea).
#: The bound must exceed one driver round trip (notify, wake-up of the
#: driver's vCPU, its work, the next avail entry): ~70-110 us in the 2-vCPU
#: VM of benchmarks/README.md.  At 50 us the window collapsed to 0 whenever a
#: round trip took longer, and the device slept (and needed a kick) on every
#: request; 200 us keeps it polling through a round trip and still turns
#: polling off after any longer idle gap.
POLL_MAX_NS = 200_000
POLL_START_NS = 4_000
#: An idle gap (poll plus sleep) of up to this many times the bound still
#: counts as a busy driver, so the window grows (to at most the bound); a
#: longer one turns polling off.  A driver whose round trip without polling
#: is a little longer than the bound (a QEMU TCG guest: ~250 us, but ~130 us
#: once the device polls and needs no kick) would otherwise never get into
#: the polling regime: see benchmarks/README.md, guest fio.
POLL_BUSY_GAP_FACTOR = 4
#: Without a kick fd (NOFD flag) the ring is polled at this period.
NOFD_POLL_PERIOD = 0.001

_EVENTFD_ONE = (1).to_bytes(8, "little")
#: One descriptor: le64 addr, le32 len, le16 flags, le16 next.  One
#: unpack_from reads each field once (no double fetch) and is cheaper than
#: indexing a cast view four times.
DESC = struct.Struct("<QIHH")
_unpack_desc = DESC.unpack_from
_fence_lock = threading.Lock()
_perf_ns = time.perf_counter_ns
#: Stands in for GuestMemory's last-region entry when no region is mapped.
_NO_REGION = (1, 0, memoryview(b""), 0)


def fence() -> None:
    """A full memory barrier: an uncontended lock acquire/release runs a
    locked read-modify-write instruction."""
    _fence_lock.acquire()
    _fence_lock.release()


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio's ``vring_need_event``: does moving an index from ``old_idx``
    to ``new_idx`` cross the other side's ``event_idx``?  (u16 arithmetic)"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class DescriptorChain:
    """One request: zero-copy views into guest memory, in chain order.
    ``head`` is the id to give back to ``Virtqueue.add_used``."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 readable_len: int, writable_len: int) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={len(self.readable)}/{self.readable_len}B, "
                f"writable={len(self.writable)}/{self.writable_len}B)")


class Virtqueue:
    """Device side of one split ring.  Configured by the request handler
    (``set_*``, ``start``, ``remap``, ``stop``), used by the device
    (``wait_kick``, ``pop``, ``add_used``, ``flush``)."""

    def __init__(self, index: int, max_size: int, loop: asyncio.AbstractEventLoop, *,
                 name: str = "") -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"max_size {max_size} outside [1, {MAX_QUEUE_SIZE}]")
        self.index = index
        self.max_size = max_size
        self.loop = loop
        #: Device name for log lines (``device=NAME`` first).
        self.name = name
        self.size = 0
        self.broken = False
        self.enabled = False
        self.started = False
        #: Reason of the last ``mark_broken`` (None while healthy).
        self.broken_reason: str | None = None
        #: Called instead of the call eventfd when none is set (e.g. in-band
        #: notifications over the back-end channel).
        self.call_hook: Callable[[], None] | None = None
        #: Current and maximum adaptive poll window (0 disables polling).
        self.poll_ns = 0
        self.poll_max_ns = POLL_MAX_NS

        self._addr: VringAddr | None = None
        self._kick_fd: int | None = None
        self._call_fd: int | None = None
        self._err_fd: int | None = None
        self._inflight: InflightQueue | None = None
        self._mem: GuestMemory | None = None
        self._ready = False          # started and not broken
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used_h: memoryview | None = None
        self._used_ring: memoryview | None = None
        self._mask = 0
        self._used_event_i = 0
        self._avail_event_i = 0
        self._max_indirect = MAX_INDIRECT
        self._event_idx = False
        self._indirect_ok = False
        self._notify_on_empty = False
        self._last_avail = 0         # next avail slot to take
        self._shadow_avail = 0       # last avail.idx read
        self._used_idx = 0           # used.idx as published
        self._signalled = 0          # used.idx at the last notification decision
        self._used_shadow = 0        # used.idx including unpublished elements
        self._inuse = 0              # popped, not yet add_used
        self._resubmit: list[int] = []   # inflight heads, highest counter first
        self._batch: list[int] = []      # heads of the unpublished batch (inflight only)
        self._kicked = False
        self._waiter: asyncio.Future[None] | None = None
        self._reader_fd: int | None = None
        #: Start of the current idle gap (perf_counter_ns, before the poll), for
        #: the adaptive window.
        self._sleep_t0 = 0
        #: Set by the device's serving task while it sleeps in ``wait_kick``:
        #: a kick then drains the ring synchronously in the kick fd's reader
        #: callback (``_serve_inline``) instead of waking the task, which saves
        #: the future/task-resumption layers on every wake-up.  The device
        #: clears it (synchronously) in ``stop_queue``; the task is still what
        #: stop and broken-queue semantics are built on.
        self.serve_hook: Callable[[], None] | None = None

    # ------------------------------------------------------------ configuration

    def set_size(self, num: int) -> None:
        """SET_VRING_NUM: a power of two in ``[1, max_size]``."""
        if self.started:
            raise ProtocolError(f"SET_VRING_NUM: queue {self.index} is started")
        if not 1 <= num <= self.max_size or num & (num - 1):
            raise ProtocolError(f"SET_VRING_NUM: queue {self.index} num {num} is not a power of two "
                                f"in [1, {self.max_size}]")
        self.size = num

    def set_addresses(self, addr: VringAddr) -> None:
        """SET_VRING_ADDR: ring QVAs, translated at ``start`` (or now, if the
        queue is running: the front-end may move rings, e.g. for logging)."""
        self._addr = addr
        if self.started and self._mem is not None:
            self._map_rings(self._mem)

    def set_base(self, num: int) -> None:
        """SET_VRING_BASE: the next avail index to process."""
        if self.started:
            raise ProtocolError(f"SET_VRING_BASE: queue {self.index} is started")
        if not 0 <= num <= 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: queue {self.index} num {num} is not a u16")
        self._last_avail = self._shadow_avail = num

    def set_kick_fd(self, fd: int | None) -> None:
        """Take ownership of the kick eventfd (closing the old one).  The fd
        is made non-blocking; a new fd counts as a kick, so a request the
        driver queued while we had no fd is not left waiting."""
        self._unregister_reader()
        _close(self._kick_fd)
        self._kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        self._register_reader()
        self._wake(kicked=True)

    def set_call_fd(self, fd: int | None) -> None:
        _close(self._call_fd)
        self._call_fd = fd

    def set_err_fd(self, fd: int | None) -> None:
        _close(self._err_fd)
        self._err_fd = fd

    def set_inflight(self, region: InflightQueue | None) -> None:
        """The queue's inflight region (SET_INFLIGHT_FD); used from ``start``."""
        self._inflight = region

    def start(self, mem: GuestMemory, features: int) -> None:
        """Map the rings and begin serving.  With an inflight region, repair
        a half-published batch and queue the in-flight heads for
        resubmission (counter order), with ``last_avail = used_idx +
        in-flight`` as the spec says.  ProtocolError if the rings cannot be
        mapped or the inflight region does not fit the queue."""
        if self.started:
            raise ProtocolError(f"queue {self.index}: already started")
        if not self.size:
            raise ProtocolError(f"queue {self.index}: started without SET_VRING_NUM")
        if self._addr is None:
            raise ProtocolError(f"queue {self.index}: started without SET_VRING_ADDR")
        inflight = self._inflight
        if inflight is not None and inflight.capacity < self.size:
            raise ProtocolError(f"queue {self.index}: inflight queue_size {inflight.capacity} "
                                f"< vring num {self.size}")
        self._mem = mem
        self._map_rings(mem)
        self._event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self._indirect_ok = bool(features & VirtioFeature.RING_INDIRECT_DESC)
        self._notify_on_empty = bool(features & VirtioFeature.NOTIFY_ON_EMPTY)
        self._max_indirect = max(MAX_INDIRECT, self.size)
        self._used_idx = self._used_shadow = self._signalled = self._used_h[1]  # type: ignore[index]
        self._inuse = 0
        self._resubmit = []
        self._batch = []
        if inflight is not None:
            fresh = inflight.version == 0
            heads = inflight.recover(self._used_idx)
            bad = [h for h in heads if h >= self.size]
            if bad:
                raise ProtocolError(f"queue {self.index}: inflight head {bad[0]} >= vring num {self.size}")
            if not fresh:
                self._resubmit = heads[::-1]
                self._inuse = len(heads)
                self._last_avail = self._shadow_avail = (self._used_idx + len(heads)) & 0xFFFF
        self.broken = False
        self.broken_reason = None
        self.started = True
        self._ready = True
        self._kicked = True  # look at the ring once, whatever happened before
        self._suppress_notify()  # busy until the first wait_kick sleeps
        self._register_reader()

    def remap(self, mem: GuestMemory) -> None:
        """Re-translate the ring pointers after a memory-table change; a ring
        that is no longer mapped breaks the queue."""
        self._mem = mem
        if self.started:
            try:
                self._map_rings(mem)
            except ProtocolError as exc:
                self.mark_broken(str(exc))

    def stop(self) -> int:
        """Stop (GET_VRING_BASE): publish what was completed, drop the ring
        views, wake a waiter (it returns False); returns the next avail index."""
        if self.started:
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - stopping must not fail on a bad ring
                log.exception("%squeue %d: flush on stop failed", self._prefix(), self.index)
            self.started = False
            self._ready = False
            self._unregister_reader()
            self._desc = self._avail = self._used_h = self._used_ring = None
            self._resubmit = []
            self._batch = []
            self._inuse = 0
            self._wake(kicked=False)
        return self._last_avail

    def close(self) -> None:
        """Stop and close the kick, call and err fds (idempotent)."""
        self.stop()
        self.set_kick_fd(None)
        self.set_call_fd(None)
        self.set_err_fd(None)
        self._inflight = None
        self._mem = None

    # ---------------------------------------------------------------- device

    def pop(self) -> DescriptorChain | None:
        """The next request (resubmissions first), or None when there is
        none, the queue is stopped, or broken.  Never raises."""
        if not self._ready:
            return None
        try:
            if self._resubmit:
                return self._walk(self._resubmit.pop())
            last = self._last_avail
            avail = self._avail
            if last == self._shadow_avail:
                idx = avail[1]  # type: ignore[index]
                if idx == last:
                    return None
                if (idx - last) & 0xFFFF > self.size:
                    self.mark_broken(f"avail idx {idx} is more than the queue size {self.size} "
                                     f"ahead of {last}")
                    return None
                self._shadow_avail = idx
            head = avail[2 + (last & self._mask)]  # type: ignore[index]
            chain = self._walk(head)
            if chain is None:
                return None
            self._last_avail = (last + 1) & 0xFFFF
            self._inuse += 1
            if self._inflight is not None:
                self._inflight.fetched(head)
            return chain
        except Exception as exc:  # noqa: BLE001 - a guest must never crash the device
            self.mark_broken(f"unexpected {exc.__class__.__name__}: {exc}")
            return None

    def _walk(self, head: int) -> DescriptorChain | None:
        """Follow one chain, checking everything the guest controls: head and
        ``next`` in range, at most ``size`` descriptors (catches loops), at
        most one INDIRECT (negotiated, without NEXT, len a non-zero multiple
        of 16, not nested), no zero length, readable before writable, every
        buffer inside guest memory, total length within u32.  Each
        descriptor word is read once, so the guest cannot change a value
        between its check and its use.

        The common case, a buffer inside the region of the previous hit, is
        translated inline from ``GuestMemory``'s last-region entry; anything
        else goes through ``gpa``/``gpa_views``."""
        size = self.size
        if head >= size:
            return self._fail(f"head {head} out of range (size {size})")
        mem = self._mem
        table = self._desc  # bytes; descriptor i at table[tbase + 16i : +16]
        tbase = 0
        limit = size
        i = head
        in_table = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        unpack = _unpack_desc
        r_start, r_end, r_view, r_off = mem._gpa_last or _NO_REGION  # type: ignore[union-attr]
        while True:  # once for the ring's table, once more for an indirect table
            for _ in range(limit):  # bounded: a longer chain is a loop
                addr, length, flags, nxt = unpack(table, tbase + 16 * i)
                if flags & 4 or not length:  # DESC_F_INDIRECT, or a zero length
                    if not length or in_table or not self._indirect_ok or flags & 1 or length & 15 \
                            or length >> 4 > self._max_indirect:
                        return self._fail(self._bad_descriptor(head, i, length, flags, in_table))
                    if r_start <= addr and addr + length <= r_end:
                        table = r_view  # read the table in place
                        tbase = addr - r_start + r_off
                    else:
                        table = self._indirect_table(head, addr, length)
                        if table is None:
                            return None
                        tbase = 0
                    limit = length >> 4
                    in_table = True
                    i = 0
                    break
                if r_start <= addr and addr + length <= r_end:
                    o = addr - r_start + r_off
                    if flags & 2:  # DESC_F_WRITE
                        writable.append(r_view[o:o + length])
                        wlen += length
                    elif writable:
                        return self._fail(f"head {head}: readable descriptor {i} after a writable one")
                    else:
                        readable.append(r_view[o:o + length])
                        rlen += length
                else:  # another region, or straddling regions, or outside memory
                    try:
                        views = mem.gpa_views(addr, length)  # type: ignore[union-attr]
                    except GuestMemoryError as exc:
                        return self._fail(f"head {head}: descriptor {i}: {exc}")
                    if len(views) == 1:
                        mem.gpa(addr, length)  # type: ignore[union-attr]  # moves the last-region cache
                        r_start, r_end, r_view, r_off = mem._gpa_last  # type: ignore[union-attr, misc]
                    if flags & 2:
                        writable.extend(views)
                        wlen += length
                    elif writable:
                        return self._fail(f"head {head}: readable descriptor {i} after a writable one")
                    else:
                        readable.extend(views)
                        rlen += length
                if not flags & 1:  # DESC_F_NEXT: the chain ends here
                    break
                i = nxt
                if i >= limit:
                    return self._fail(f"head {head}: next {i} out of range ({limit})")
            else:
                return self._fail(f"chain from head {head} is longer than {limit} descriptors (loop?)")
            if not flags & 4:
                break
        if rlen + wlen > 0xFFFFFFFF:
            return self._fail(f"head {head}: total length {rlen + wlen} overflows u32")
        return DescriptorChain(head, readable, writable, rlen, wlen)

    def _bad_descriptor(self, head: int, i: int, length: int, flags: int, in_table: bool) -> str:
        """Why a zero-length or INDIRECT descriptor is refused."""
        if not flags & DESC_F_INDIRECT:
            return f"head {head}: descriptor {i} has length 0"
        if in_table:
            return f"head {head}: nested INDIRECT descriptor in an indirect table"
        if not self._indirect_ok:
            return f"head {head}: INDIRECT descriptor without VIRTIO_F_RING_INDIRECT_DESC"
        if flags & DESC_F_NEXT:
            return f"head {head}: descriptor {i} has both INDIRECT and NEXT"
        if not length or length & 15:
            return f"head {head}: indirect table length {length} is not a non-zero multiple of 16"
        return f"head {head}: indirect table of {length >> 4} descriptors exceeds {self._max_indirect}"

    def _indirect_table(self, head: int, addr: int, length: int) -> memoryview | None:
        """An indirect table outside the cached region: its view, or a copy
        when it straddles regions (as QEMU does)."""
        mem = self._mem
        try:
            return mem.gpa(addr, length)  # type: ignore[union-attr]
        except GuestMemoryError:
            pass
        try:
            return memoryview(b"".join(mem.gpa_views(addr, length)))  # type: ignore[union-attr]
        except GuestMemoryError as exc:
            return self._fail(f"head {head}: indirect table: {exc}")

    def _fail(self, reason: str) -> None:
        self.mark_broken(reason)
        return None

    def add_used(self, head: int, written: int) -> None:
        """Write the used element ``{head, written}``; published by ``flush``.
        Ignored when the queue is stopped (the rings are not ours then) or
        broken (as QEMU does: a broken queue gets no more ring updates)."""
        if not self._ready:
            return
        i = self._used_shadow
        self._used_ring[i & self._mask] = head | (written << 32)  # type: ignore[index]
        self._used_shadow = (i + 1) & 0xFFFF
        self._inuse -= 1
        if self._inflight is not None:
            self._batch.append(head)

    def flush(self, notify: bool = True) -> None:
        """Publish the batch: one ``used.idx`` store, inflight bookkeeping
        around it, then (``notify``) at most one call-eventfd write, if the
        driver wants one (EVENT_IDX ``used_event``, else ``NO_INTERRUPT``).

        ``notify=False`` only publishes: a driver that is awake sees the
        completions at once, and the next ``flush()`` decides on one
        notification for everything published since the last decision
        (``vring_need_event`` over that whole range, as vhost's
        ``signalled_used`` does), so a batch costs at most one eventfd write."""
        new = self._used_shadow
        if not self._ready:
            return
        if new != self._used_idx:
            inflight = self._inflight
            if inflight is not None:
                inflight.link_batch(self._batch)
            self._used_h[1] = new  # type: ignore[index]
            self._used_idx = new
            if inflight is not None:
                inflight.commit_batch(self._batch, new)
                self._batch.clear()
        old = self._signalled
        if not notify or new == old:
            return
        self._signalled = new
        fence()
        avail = self._avail
        if self._event_idx:
            need = ((new - avail[self._used_event_i] - 1) & 0xFFFF) < ((new - old) & 0xFFFF)  # type: ignore[index]
        else:
            need = not avail[0] & AVAIL_F_NO_INTERRUPT  # type: ignore[index]
        if not need and self._notify_on_empty and not self._inuse and avail[1] == self._last_avail:  # type: ignore[index]
            need = True
        if need:
            self.notify()

    def publish(self) -> None:
        """``flush(notify=False)``: make the completions visible, no notification yet."""
        self.flush(False)

    def notify(self) -> None:
        """Signal the driver (call eventfd, else ``call_hook``) unconditionally."""
        fd = self._call_fd
        if fd is not None:
            try:
                os.write(fd, _EVENTFD_ONE)
            except OSError:
                pass
        elif self.call_hook is not None:
            self.call_hook()

    def kick(self) -> None:
        """The driver kicked in-band (VRING_KICK): wake ``wait_kick``."""
        self._wake(kicked=True)

    async def wait_kick(self) -> bool:
        """Wait until the avail ring may hold work; False once the queue is
        stopped or broken.

        Before sleeping, poll ``avail.idx`` for up to ``poll_ns``: the window
        grows (to ``poll_max_ns``) while the idle gaps (poll plus sleep) stay
        within ``POLL_BUSY_GAP_FACTOR`` times that bound, and drops to zero
        after a longer gap (idle); see ``_slept``.  While the device is busy,
        kicks stay suppressed (stale ``avail_event`` with EVENT_IDX,
        ``used.flags = NO_NOTIFY`` without); they are re-armed just before
        sleeping, followed by a fence and a re-check of ``avail.idx`` so a
        request published in between is not missed.  One waiter per queue (the device's task)."""
        if not self._ready:
            return False
        if self._kicked or self._resubmit:
            self._kicked = False
            return True
        if self._work_before_sleep():
            return True
        last = self._last_avail
        fut = self.loop.create_future()
        self._waiter = fut
        try:
            if self._kick_fd is None:
                # NOFD: the front-end asked us to poll the ring.
                while not fut.done() and self._ready and self._avail[1] == last:  # type: ignore[index]
                    await asyncio.sleep(NOFD_POLL_PERIOD)
            else:
                await fut
        finally:
            self._waiter = None
        self._slept()
        if not self._ready:
            return False
        self._kicked = False
        self._suppress_notify()
        return True

    def _work_before_sleep(self) -> bool:
        """The checks before sleeping: True if the avail ring has work (found
        at once or by polling up to ``poll_ns``; kicks stay suppressed);
        False once kicks are re-armed, fenced and the ring re-checked empty."""
        avail = self._avail
        last = self._last_avail
        if avail[1] != last:  # type: ignore[index]
            return True
        window = self.poll_ns
        t0 = _perf_ns()
        if window:
            deadline = t0 + window
            while avail[1] == last:  # type: ignore[index]
                if _perf_ns() >= deadline:
                    break
            else:
                return True
        self._arm_notify()
        fence()
        if avail[1] != last:  # type: ignore[index]
            self._suppress_notify()
            return True
        self._sleep_t0 = t0  # idle since t0: the poll counts (as QEMU's block_ns)
        return False

    def _slept(self) -> None:
        """Adapt the poll window to the idle time that just ended (poll plus
        sleep, as QEMU's ``block_ns``): grow it (doubling, at most to
        ``poll_max_ns``) when it was at most ``POLL_BUSY_GAP_FACTOR`` times
        the bound, i.e. the driver is busy and a full window would have
        caught its next request or come close; drop it to 0 after a longer
        gap (idle)."""
        blocked = _perf_ns() - self._sleep_t0
        if blocked > self.poll_max_ns * POLL_BUSY_GAP_FACTOR:
            self.poll_ns = 0
        elif self.poll_max_ns:
            self.poll_ns = min(self.poll_max_ns, max(POLL_START_NS, self.poll_ns * 2))

    def _serve_inline(self, hook: Callable[[], None]) -> None:
        """A kick while the serving task sleeps: drain the ring here (the
        task's ``serve_hook``), then poll / re-arm as ``wait_kick`` would,
        and return to the loop with the task still asleep.  An exception
        breaks this queue only (as the device's task guard does); breaking
        or stopping wakes the task, which then ends."""
        self._slept()
        self._kicked = False
        self._suppress_notify()
        try:
            while True:
                hook()
                if not self._ready or self.serve_hook is not hook:
                    self._wake(kicked=True)  # broken (already woken) or hook withdrawn
                    return
                if not self._work_before_sleep():
                    break
        except Exception as exc:  # noqa: BLE001 - nothing the guest does may escape
            log.error("%squeue %d serving failed: %r; queue marked broken", self._prefix(), self.index, exc)
            self.mark_broken(f"device error: {exc!r}")

    def mark_broken(self, reason: str) -> None:
        """Stop serving this queue because of the guest: logged once, err fd
        signalled, waiters woken.  Other queues are unaffected."""
        if self.broken:
            return
        self.broken = True
        self.broken_reason = reason
        self._ready = False
        log.error("%squeue %d broken: %s", self._prefix(), self.index, reason)
        if self._err_fd is not None:
            try:
                os.write(self._err_fd, _EVENTFD_ONE)
            except OSError:
                pass
        self._wake(kicked=False)

    # ---------------------------------------------------------------- helpers

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @property
    def used_idx(self) -> int:
        """``used.idx`` as last published by ``flush``."""
        return self._used_idx

    @property
    def pending(self) -> int:
        """Chains seen on the avail ring (as of the last ``avail.idx`` read)
        and not yet popped: what is left of the batch being served."""
        return (self._shadow_avail - self._last_avail) & 0xFFFF

    @property
    def inuse(self) -> int:
        """Chains popped and not yet given back with ``add_used``."""
        return self._inuse

    def _prefix(self) -> str:
        return f"device={self.name} " if self.name else ""

    def _map_rings(self, mem: GuestMemory) -> None:
        addr = self._addr
        q = self.size
        if addr is None or not q:
            raise ProtocolError(f"queue {self.index}: rings not configured")
        for field, value, align in (("desc", addr.desc, 16), ("avail", addr.avail, 2), ("used", addr.used, 4)):
            if value % align:
                raise ProtocolError(f"SET_VRING_ADDR: queue {self.index} {field} address {value:#x} "
                                    f"is not {align}-byte aligned")
        try:
            desc = mem.qva(addr.desc, 16 * q)
        except GuestMemoryError as exc:
            raise ProtocolError(f"SET_VRING_ADDR: queue {self.index} desc: {exc}") from None
        try:
            avail = mem.qva(addr.avail, 6 + 2 * q).cast("H")
        except GuestMemoryError as exc:
            raise ProtocolError(f"SET_VRING_ADDR: queue {self.index} avail: {exc}") from None
        try:
            used = mem.qva(addr.used, 6 + 8 * q)
        except GuestMemoryError as exc:
            raise ProtocolError(f"SET_VRING_ADDR: queue {self.index} used: {exc}") from None
        self._desc = desc
        self._avail = avail
        self._used_h = used.cast("H")
        self._used_ring = used[4:4 + 8 * q].cast("Q")
        self._mask = q - 1
        self._used_event_i = 2 + q
        self._avail_event_i = 2 + 4 * q

    def _arm_notify(self) -> None:
        if self._event_idx:
            self._used_h[self._avail_event_i] = self._last_avail  # type: ignore[index]
        else:
            self._used_h[0] = 0  # type: ignore[index]

    def _suppress_notify(self) -> None:
        if not self._event_idx and self._ready:
            self._used_h[0] = USED_F_NO_NOTIFY  # type: ignore[index]

    def _wake(self, kicked: bool) -> None:
        if kicked:
            self._kicked = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_kick(self) -> None:
        fd = self._kick_fd
        if fd is None:
            return
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass
        except OSError as exc:
            log.error("%squeue %d: reading kick fd %d: %s", self._prefix(), self.index, fd, exc)
            self._unregister_reader()
        hook = self.serve_hook
        w = self._waiter
        if hook is not None and w is not None and not w.done() and self._ready and not self._resubmit:
            self._serve_inline(hook)
        else:
            self._wake(kicked=True)

    def _register_reader(self) -> None:
        if self.started and self._kick_fd is not None and self._reader_fd is None:
            self.loop.add_reader(self._kick_fd, self._on_kick)
            self._reader_fd = self._kick_fd

    def _unregister_reader(self) -> None:
        fd = self._reader_fd
        if fd is not None:
            self._reader_fd = None
            if not self.loop.is_closed():
                self.loop.remove_reader(fd)


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
