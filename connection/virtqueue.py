"""The device side of a split virtqueue (virtio 1.x, section 2.7).

Two objects per queue, as crosvm's ``QueueConfig::activate()`` returning
the running ``Queue``:

* ``QueueConfig``: what the request handler sets (size, ring addresses,
  base, kick/call/err eventfds, inflight region, enabled).  It owns the
  fds.  ``activate(mem, features)`` maps the rings and returns
* ``Virtqueue``: the running ring the device serves.  Its views into
  guest memory exist from construction on; ``stop`` (through the config)
  ends it for good, and a restart makes a new one.  Waiting for kicks and
  adaptive polling live in ``connection.kick.KickWaiter``; the ring's wire
  layout in ``connection.split_ring``.

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

A malformed chain (see ``_walk``), an inconsistent inflight region or a kick
fd that cannot be drained marks only this queue broken: it is logged once on
``vhost.virtqueue``, the err eventfd is signalled, ``pop`` returns None and
``wait_kick`` False until the queue is started again.  ``pop`` never raises,
and every buffer it hands out is a slice of a region's mapping, so a
malicious guest cannot make the device touch memory outside what the
front-end shared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

from . import split_ring as ring
from .errors import GuestMemoryError, ProtocolError
from .inflight import InflightQueue
from .kick import COALESCE_AHEAD_MAX, POLL_MAX_NS, KickWaiter
from .memory import GuestMemory
from .protocol import VirtioFeature, VringAddr
from .split_ring import (AVAIL_F_NO_INTERRUPT, DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
                         MAX_QUEUE_SIZE, USED_F_NO_NOTIFY, vring_need_event)

if sys.byteorder != "little":  # pragma: no cover - the ring casts assume it
    raise ImportError("connection.virtqueue assumes a little-endian host")

__all__ = ["DESC_F_INDIRECT", "DESC_F_NEXT", "DESC_F_WRITE", "MAX_INDIRECT", "MAX_QUEUE_SIZE", "POLL_MAX_NS",
           "DescriptorChain", "QueueConfig", "Virtqueue", "fence", "vring_need_event"]

log = logging.getLogger("vhost.virtqueue")

#: Largest indirect table we walk (QEMU caps a chain at 1024 buffers); a
#: larger queue size raises it to the queue size.
MAX_INDIRECT = 1024

_EVENTFD_ONE = (1).to_bytes(8, "little")
#: One unpack_from reads each descriptor field once (no double fetch) and is
#: cheaper than indexing a cast view four times.
_unpack_desc = DESC.unpack_from
_fence_lock = threading.Lock()
#: ``fence()``'s two halves, for the per-request paths to call inline: a
#: Python-level call costs a frame, and a queue-depth-1 wake-up runs about
#: twenty of them on cold caches (benchmarks/README.md, "The cold wake-up
#: path").
_fence_enter = _fence_lock.acquire
_fence_exit = _fence_lock.release
_write = os.write
#: Stands in for GuestMemory's last region when no region is mapped.
_NO_REGION = (1, 0, memoryview(b""), 0)
#: What a stopped queue's views become: empty, so the guest's mappings are
#: not kept alive by a queue that will never touch them again.
_NO_BYTES = memoryview(b"")
_NO_U16 = memoryview(b"").cast("H")
_NO_U64 = memoryview(b"").cast("Q")


def fence() -> None:
    """A full memory barrier: an uncontended lock acquire/release runs a
    locked read-modify-write instruction."""
    _fence_enter()
    _fence_exit()


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class DescriptorChain(NamedTuple):
    """One request: zero-copy views into guest memory, in chain order.
    ``head`` is the id to give back to ``Virtqueue.add_used``.

    A named tuple, built in ``Virtqueue._walk`` with ``tuple.__new__``: one
    per request, and a class with ``__init__`` costs a Python frame more
    (benchmarks/README.md, "The cold wake-up path")."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    readable_len: int
    writable_len: int

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={len(self.readable)}/{self.readable_len}B, "
                f"writable={len(self.writable)}/{self.writable_len}B)")


_new_chain = tuple.__new__


# ----------------------------------------------------------------------------
# Configuration


class QueueConfig:
    """One queue as the request handler configures it (SET_VRING_*,
    SET_INFLIGHT_FD); owns the kick, call and err fds.  ``activate`` starts
    the ring and returns it; ``stop`` ends it and remembers where it was."""

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
        self.addr: VringAddr | None = None
        #: Next avail index: SET_VRING_BASE, or where the last run stopped.
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.inflight: InflightQueue | None = None
        #: The running ring (``activate`` .. ``stop``), broken or not.
        self.running: Virtqueue | None = None
        self._enabled = False

    @property
    def started(self) -> bool:
        return self.running is not None

    @property
    def enabled(self) -> bool:
        """SET_VRING_ENABLE (or SET_FEATURES without PROTOCOL_FEATURES);
        mirrored on the running ring for the device."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        if self.running is not None:
            self.running.enabled = value

    def set_size(self, num: int) -> None:
        """SET_VRING_NUM: a power of two in ``[1, max_size]``."""
        if self.running is not None:
            raise ProtocolError(f"SET_VRING_NUM: queue {self.index} is started")
        if not 1 <= num <= self.max_size or num & (num - 1):
            raise ProtocolError(f"SET_VRING_NUM: queue {self.index} num {num} is not a power of two "
                                f"in [1, {self.max_size}]")
        self.size = num

    def set_addresses(self, addr: VringAddr) -> None:
        """SET_VRING_ADDR: ring QVAs, translated at ``activate`` (or now, if
        the queue is running: the front-end may move rings, e.g. for logging)."""
        if self.running is not None:
            self.running.map_rings(addr)
        self.addr = addr

    def set_base(self, num: int) -> None:
        """SET_VRING_BASE: the next avail index to process."""
        if self.running is not None:
            raise ProtocolError(f"SET_VRING_BASE: queue {self.index} is started")
        if not 0 <= num <= 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: queue {self.index} num {num} is not a u16")
        self.base = num

    def set_kick_fd(self, fd: int | None) -> None:
        """Take ownership of the kick eventfd (closing the old one), made
        non-blocking.  None: no fd (NOFD), the running ring polls."""
        if fd is not None:
            os.set_blocking(fd, False)
        old, self.kick_fd = self.kick_fd, fd
        if self.running is not None:
            self.running._kick.set_fd(fd, watch=not self.running.broken)
        _close(old)

    def set_call_fd(self, fd: int | None) -> None:
        old, self.call_fd = self.call_fd, fd
        if self.running is not None:
            self.running._call_fd = fd
        _close(old)

    def set_err_fd(self, fd: int | None) -> None:
        """SET_VRING_ERR.  A ring that is already broken (e.g. by its
        inflight region at start, before the front-end sent this) signals
        the new fd at once: broken is a state, not an event to miss."""
        old, self.err_fd = self.err_fd, fd
        running = self.running
        if running is not None:
            running._err_fd = fd
            if running.broken:
                running._signal_err()
        _close(old)

    def set_inflight(self, region: InflightQueue | None) -> None:
        """The queue's inflight region (SET_INFLIGHT_FD); used by ``activate``."""
        self.inflight = region

    def activate(self, mem: GuestMemory, features: int) -> Virtqueue:
        """Map the rings and return the running ring.  ProtocolError if the
        queue is not configured, the rings cannot be mapped or the inflight
        region is smaller than the ring; OSError if the kick fd cannot be
        polled.  An inflight region whose contents are inconsistent gives
        a ring that is broken from the start (the front-end's data, like the
        ring itself)."""
        if self.running is not None:
            raise ProtocolError(f"queue {self.index}: already started")
        if not self.size:
            raise ProtocolError(f"queue {self.index}: started without SET_VRING_NUM")
        if self.addr is None:
            raise ProtocolError(f"queue {self.index}: started without SET_VRING_ADDR")
        inflight = self.inflight
        if inflight is not None and inflight.capacity < self.size:
            raise ProtocolError(f"queue {self.index}: inflight queue_size {inflight.capacity} "
                                f"< vring num {self.size}")
        queue = Virtqueue(self, mem, features)
        if not queue.broken:
            queue._kick.watch()
        self.running = queue
        return queue

    def remap(self, mem: GuestMemory) -> None:
        """Re-translate the running ring after a memory-table change; a ring
        that is no longer mapped breaks the queue."""
        if self.running is not None:
            self.running.remap(mem)

    def stop(self) -> int:
        """Stop the running ring (GET_VRING_BASE): it publishes what was
        completed and wakes its waiter; returns the next avail index."""
        queue, self.running = self.running, None
        if queue is not None:
            self.base = queue.stop()
        return self.base

    def close(self) -> None:
        """Stop and close the kick, call and err fds (idempotent)."""
        self.stop()
        self.set_kick_fd(None)
        self.set_call_fd(None)
        self.set_err_fd(None)
        self.inflight = None


# ----------------------------------------------------------------------------
# The running ring


class Virtqueue:
    """A running split ring, made by ``QueueConfig.activate`` and used by
    the device (``wait_kick``, ``pop``, ``add_used``, ``flush``).  Once
    stopped or broken it hands out nothing and writes nothing."""

    # Slots: the hot path reads a dozen of these per request, and a slot is
    # the interpreter's fastest attribute (a dict of this many keys is not).
    __slots__ = ("index", "size", "name", "enabled", "broken", "broken_reason", "serve_hook",
                 "_call_fd", "_err_fd", "_mem", "_inflight", "_kick", "_event_idx", "_indirect_ok",
                 "_notify_on_empty", "_max_indirect", "_mask", "_used_event_i", "_avail_event_i",
                 "_desc", "_avail", "_used_h", "_used_ring", "_addr", "_ready", "_stopped",
                 "_last_avail", "_shadow_avail", "_used_idx", "_used_shadow", "_signalled", "_inuse",
                 "_resubmit", "_batch", "_parked")

    def __init__(self, config: QueueConfig, mem: GuestMemory, features: int) -> None:
        self.index = config.index
        self.size = q = config.size
        #: Device name for log lines (``device=NAME`` first).
        self.name = config.name
        self.enabled = config.enabled
        self.broken = False
        #: Reason of ``mark_broken`` (None while healthy).
        self.broken_reason: str | None = None
        #: Set by the device's serving task while it sleeps in ``wait_kick``:
        #: a kick then drains the ring synchronously in the kick fd's reader
        #: callback (``_serve_inline``) instead of waking the task, which saves
        #: the future/task-resumption layers on every wake-up.  The device
        #: clears it (synchronously) in ``stop_queue``; the task is still what
        #: stop and broken-queue semantics are built on.
        self.serve_hook: Callable[[], None] | None = None
        self._call_fd = config.call_fd
        self._err_fd = config.err_fd
        self._mem = mem
        self._inflight = config.inflight
        self._kick = KickWaiter(config.loop, config.kick_fd, self._on_kick, self._kick_failed,
                                lambda: self.waiting)
        self._event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self._indirect_ok = bool(features & VirtioFeature.RING_INDIRECT_DESC)
        self._notify_on_empty = bool(features & VirtioFeature.NOTIFY_ON_EMPTY)
        self._max_indirect = max(MAX_INDIRECT, q)
        self._mask = q - 1
        self._used_event_i = ring.used_event_index(q)
        self._avail_event_i = ring.avail_event_index(q)
        self._desc = _NO_BYTES
        self._avail = _NO_U16
        self._used_h = _NO_U16
        self._used_ring = _NO_U64
        addr = config.addr
        if addr is None:
            raise ProtocolError(f"queue {self.index}: started without SET_VRING_ADDR")
        self._addr = addr
        self.map_rings(addr)
        self._ready = True           # running and not broken
        self._stopped = False
        self._last_avail = self._shadow_avail = config.base   # next avail slot; last avail.idx read
        self._used_idx = self._used_shadow = self._signalled = self._used_h[1]
        self._inuse = 0              # popped, not yet add_used
        self._resubmit: list[int] = []   # inflight heads, highest counter first
        self._batch: list[int] = []      # heads of the unpublished batch (inflight only)
        #: The loop's parked queues (``connection.kick.PollGroup.parked``),
        #: kept here: parking is a dict store on every wake-up.
        self._parked = self._kick.group.parked
        if self._inflight is not None:
            self._recover_inflight(self._inflight)
        self._suppress_notify()  # busy until the first wait_kick sleeps

    def _recover_inflight(self, inflight: InflightQueue) -> None:
        """Repair a half-published batch and queue the in-flight heads for
        resubmission (counter order), with ``last_avail = used_idx +
        in-flight`` as the spec says.  A region that does not check out
        breaks the queue: nothing in it is used."""
        fresh = inflight.version == 0
        try:
            heads = inflight.recover(self._used_idx)
        except ProtocolError as exc:
            self.mark_broken(str(exc))
            return
        bad = [h for h in heads if h >= self.size]
        if bad:
            self.mark_broken(f"inflight queue {self.index}: head {bad[0]} >= vring num {self.size}")
            return
        if not fresh:
            self._resubmit = heads[::-1]
            self._inuse = len(heads)
            self._last_avail = self._shadow_avail = (self._used_idx + len(heads)) & 0xFFFF

    # ---------------------------------------------------------------- rings

    def map_rings(self, addr: VringAddr) -> None:
        """Translate the ring QVAs in this queue's memory; ProtocolError
        naming the ring if one is misaligned or not mapped."""
        q = self.size
        mem = self._mem
        for field, value, align in (("desc", addr.desc, ring.DESC_ALIGN), ("avail", addr.avail, ring.AVAIL_ALIGN),
                                    ("used", addr.used, ring.USED_ALIGN)):
            if value % align:
                raise ProtocolError(f"SET_VRING_ADDR: queue {self.index} {field} address {value:#x} "
                                    f"is not {align}-byte aligned")
        try:
            desc = mem.qva(addr.desc, ring.desc_table_size(q))
        except GuestMemoryError as exc:
            raise ProtocolError(f"SET_VRING_ADDR: queue {self.index} desc: {exc}") from None
        try:
            avail = mem.qva(addr.avail, ring.avail_ring_size(q)).cast("H")
        except GuestMemoryError as exc:
            raise ProtocolError(f"SET_VRING_ADDR: queue {self.index} avail: {exc}") from None
        try:
            used = mem.qva(addr.used, ring.used_ring_size(q))
        except GuestMemoryError as exc:
            raise ProtocolError(f"SET_VRING_ADDR: queue {self.index} used: {exc}") from None
        off = ring.USED_RING_OFFSET
        self._desc = desc
        self._avail = avail
        self._used_h = used.cast("H")
        self._used_ring = used[off:off + ring.USED_ELEM_SIZE * q].cast("Q")
        self._addr = addr

    def remap(self, mem: GuestMemory) -> None:
        """Re-translate the rings after a memory-table change; a ring that
        is no longer mapped breaks the queue."""
        self._mem = mem
        if not self._stopped:
            try:
                self.map_rings(self._addr)
            except ProtocolError as exc:
                self.mark_broken(str(exc))

    def stop(self) -> int:
        """End this ring (called by ``QueueConfig.stop``, not by devices):
        publish what was completed,
        drop the views into guest memory, wake a waiter (it returns False).
        Returns the next avail index."""
        if self._ready:
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - stopping must not fail on a bad ring
                log.exception("%squeue %d: flush on stop failed", self._prefix(), self.index)
        self._ready = False
        self._stopped = True
        self._kick.unwatch()
        # The config owns (and may now close) the fds; the views keep guest
        # and inflight mappings alive.  A device still holding this object
        # reaches none of them.
        self._kick.fd = self._call_fd = self._err_fd = None
        self._inflight = None
        self._desc, self._avail, self._used_h, self._used_ring = _NO_BYTES, _NO_U16, _NO_U16, _NO_U64
        self._resubmit = []
        self._batch = []
        self._inuse = 0
        self._kick.wake(kicked=False)
        return self._last_avail

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
                idx = avail[1]
                if idx == last:
                    return None
                if (idx - last) & 0xFFFF > self.size:
                    self.mark_broken(f"avail idx {idx} is more than the queue size {self.size} "
                                     f"ahead of {last}")
                    return None
                self._shadow_avail = idx
            head = avail[2 + (last & self._mask)]
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
        translated inline from ``GuestMemory.last_gpa_region``; anything
        else goes through ``gpa_views``/``gpa_region``."""
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
        r_start, r_end, r_view, r_off = mem.last_gpa_region or _NO_REGION
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
                        found = self._indirect_table(head, addr, length)
                        if found is None:
                            return None
                        table = found
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
                        views = mem.gpa_views(addr, length)
                    except GuestMemoryError as exc:
                        return self._fail(f"head {head}: descriptor {i}: {exc}")
                    if len(views) == 1:  # inside one region: translate the next ones inline
                        r_start, r_end, r_view, r_off = mem.gpa_region(addr, length)
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
        return _new_chain(DescriptorChain, (head, readable, writable, rlen, wlen))

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
            return mem.gpa(addr, length)
        except GuestMemoryError:
            pass
        try:
            return memoryview(b"".join(mem.gpa_views(addr, length)))
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
        self._used_ring[i & self._mask] = head | (written << 32)
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
            self._used_h[1] = new
            self._used_idx = new
            if inflight is not None:
                inflight.commit_batch(self._batch, new)
                self._batch.clear()
        old = self._signalled
        if not notify or new == old:
            return
        self._signalled = new
        _fence_enter()   # fence()
        _fence_exit()
        avail = self._avail
        if self._event_idx:
            need = ((new - avail[self._used_event_i] - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            need = not avail[0] & AVAIL_F_NO_INTERRUPT
        if not need and self._notify_on_empty and not self._inuse and avail[1] == self._last_avail:
            need = True
        if need and self._call_fd is not None:   # notify(), without its frame
            try:
                _write(self._call_fd, _EVENTFD_ONE)
            except OSError:
                pass

    def publish(self) -> None:
        """``flush(notify=False)``: make the completions visible, no notification yet."""
        self.flush(False)

    def notify(self) -> None:
        """Signal the driver through the call eventfd, unconditionally (none set: nothing)."""
        fd = self._call_fd
        if fd is not None:
            try:
                _write(fd, _EVENTFD_ONE)
            except OSError:
                pass

    async def wait_kick(self) -> bool:
        """Wait until the avail ring may hold work; False once the queue is
        stopped or broken.

        Before sleeping, poll ``avail.idx`` for up to the adaptive window
        (``KickWaiter.poll``/``slept``).  While the device is busy, kicks
        stay suppressed (stale ``avail_event`` with EVENT_IDX,
        ``used.flags = NO_NOTIFY`` without); they are re-armed just before
        sleeping, followed by a fence and a re-check of ``avail.idx`` so a
        request published in between is not missed.  One waiter per queue
        (the device's task)."""
        if not self._ready:
            return False
        kick = self._kick
        if kick.kicked or self._resubmit:
            kick.kicked = False
            return True
        if self._work_before_sleep():
            return True
        if self.serve_hook is not None and kick.fd is not None:
            self._parked[kick] = self
        await kick.sleep(self._idle)
        kick.slept()
        if not self._ready:
            return False
        kick.kicked = False
        self._suppress_notify()
        return True

    def _idle(self) -> bool:
        """NOFD mode: nothing new on the avail ring yet."""
        return self._ready and self._avail[1] == self._last_avail

    def _work_before_sleep(self) -> bool:
        """The checks before sleeping: True if the avail ring has work (found
        at once or by polling; kicks stay suppressed); False once kicks are
        re-armed, fenced and the ring re-checked empty."""
        avail = self._avail
        last = self._last_avail
        kick = self._kick
        if avail[1] != last or kick.poll(avail, last):
            return True
        ahead = 0
        if self._event_idx:   # _arm_notify() and fence(), inline: once per wake-up
            ahead = kick.ahead
            if ahead and (kick.poll_ns or kick.fd is None):   # polling, or NOFD: no kicks to coalesce
                ahead = 0
            self._used_h[self._avail_event_i] = (last + ahead) & 0xFFFF
        else:
            self._used_h[0] = 0
        _fence_enter()
        _fence_exit()
        if avail[1] != last:
            self._suppress_notify()
            return True
        if ahead:
            kick.wait_ahead(self._kicks_late)
        return False

    def _on_kick(self, sleeping: bool) -> None:
        """The kick fd fired: serve inline when the task sleeps with a hook,
        else empty the fd and wake the task."""
        hook = self.serve_hook
        if hook is not None and sleeping and self._ready and not self._resubmit:
            self._serve_inline(hook)
        elif self._kick.consume():
            self._kick.wake(kicked=True)

    def _serve_inline(self, hook: Callable[[], None]) -> None:
        """A kick while the serving task sleeps: drain the ring here (the
        task's ``serve_hook``), then poll / re-arm as ``wait_kick`` would,
        and return to the loop with the task still asleep.  An exception
        breaks this queue only (as the device's task guard does); breaking
        or stopping wakes the task, which then ends.

        The ring is served first and the bookkeeping of the wake-up (the
        kick fd's read, the poll window's adaptation) follows it, so that
        the driver's notification is not behind them: at queue depth 1 in a
        guest this path is the device's whole share of every round trip,
        run on cold caches (benchmarks/README.md, "The cold wake-up path")."""
        kick = self._kick
        self._parked.pop(kick, None)
        kick.kicked = False
        if not self._event_idx:
            self._suppress_notify()
        try:
            hook()
            if not kick.consume():
                return          # the fd broke the queue (its task is woken)
            kick.slept()
            while self._ready and self.serve_hook is hook:
                if not self._work_before_sleep():
                    self._parked[kick] = self   # asleep, kicks armed: another queue's poll may serve it
                    return
                hook()
            kick.wake(kicked=True)  # broken (already woken) or hook withdrawn
        except Exception as exc:  # noqa: BLE001 - nothing the guest does may escape
            log.error("%squeue %d serving failed: %r; queue marked broken", self._prefix(), self.index, exc)
            self.mark_broken(f"device error: {exc!r}")

    def _kicks_late(self) -> None:
        """A coalesced sleep's timer ran out before its kick: serve what
        came (as a kick would), and coalesce less (``KickWaiter.missed``)."""
        kick = self._kick
        kick.missed(self.waiting if self._ready else 0)
        self._on_kick(kick.sleeping)

    # Parked: asleep with kicks armed, watched by another queue's poll
    # (connection.kick.PollGroup), which calls these three.

    def serve_parked(self) -> None:
        """Another queue's poll saw this ring move: drain it here, without a
        poll or a re-arm of its own (the poller re-arms it at its end)."""
        hook = self.serve_hook
        kick = self._kick
        if hook is None or not self._ready or self._resubmit or not kick.sleeping:
            self._parked.pop(kick, None)
            return
        self._suppress_notify()
        try:
            hook()
        except Exception as exc:  # noqa: BLE001 - nothing the guest does may escape
            log.error("%squeue %d serving failed: %r; queue marked broken", self._prefix(), self.index, exc)
            self.mark_broken(f"device error: {exc!r}")
            return
        if not self._ready or self.serve_hook is not hook:
            kick.wake(kicked=True)  # broken (already woken) or hook withdrawn

    def disarm(self) -> None:
        """Kicks off while another queue's poll watches this ring: an
        ``avail_event`` just behind the ring's index (no index the driver
        moves to can cross it), or ``NO_NOTIFY``."""
        if not self._ready:
            return
        if self._event_idx:
            self._used_h[self._avail_event_i] = (self._last_avail - 1) & 0xFFFF
        else:
            self._used_h[0] = USED_F_NO_NOTIFY

    def rearm(self) -> None:
        """The watching poll ends: kicks on again, then (fence) a re-check of
        the ring, serving what came in while they were off."""
        while self._ready and self._kick in self._parked:
            self._arm_notify()
            fence()
            if self._avail[1] == self._last_avail:
                return
            self.serve_parked()

    def parked_ring(self) -> tuple[memoryview, int]:
        """(avail ring view, next avail index): what a watching poll compares."""
        return self._avail, self._last_avail

    def _kick_failed(self, reason: str) -> None:
        self.mark_broken(reason)

    def mark_broken(self, reason: str) -> None:
        """Stop serving this queue because of the guest or front-end: logged
        once, err fd signalled, kicks no longer watched, waiters woken.
        Other queues are unaffected."""
        if self.broken:
            return
        self.broken = True
        self.broken_reason = reason
        self._ready = False
        self._kick.unwatch()
        log.error("%squeue %d broken: %s", self._prefix(), self.index, reason)
        self._signal_err()
        self._kick.wake(kicked=False)

    def _signal_err(self) -> None:
        if self._err_fd is not None:
            try:
                os.write(self._err_fd, _EVENTFD_ONE)
            except OSError:
                pass

    # ---------------------------------------------------------------- state

    @property
    def poll_max_ns(self) -> int:
        """Bound of the adaptive poll window (0: never poll); a device option."""
        return self._kick.poll_max_ns

    @poll_max_ns.setter
    def poll_max_ns(self, value: int) -> None:
        self._kick.poll_max_ns = value

    @property
    def coalesce_kicks(self) -> bool:
        """Kick coalescing allowed (``connection.kick``): for request queues
        whose requests do not wait for each other; needs EVENT_IDX, and a
        ring of at least 2 entries."""
        return self._kick.coalescing

    @coalesce_kicks.setter
    def coalesce_kicks(self, value: bool) -> None:
        self._kick.allow_coalescing(bool(value) and self._event_idx, min(COALESCE_AHEAD_MAX, self.size - 1))

    @property
    def poll_ns(self) -> int:
        """The current adaptive poll window."""
        return self._kick.poll_ns

    @poll_ns.setter
    def poll_ns(self, value: int) -> None:
        self._kick.poll_ns = value

    @property
    def stopped(self) -> bool:
        """True once the handler stopped this ring (GET_VRING_BASE, reset, disconnect)."""
        return self._stopped

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
    def waiting(self) -> int:
        """Chains on the avail ring now (a fresh ``avail.idx`` read) and not
        yet popped.  A hint only: the guest writes that index, so it may be
        anything up to 65535."""
        return (self._avail[1] - self._last_avail) & 0xFFFF

    @property
    def inuse(self) -> int:
        """Chains popped and not yet given back with ``add_used``."""
        return self._inuse

    def _prefix(self) -> str:
        return f"device={self.name} " if self.name else ""

    def _arm_notify(self) -> None:
        if self._event_idx:
            self._used_h[self._avail_event_i] = self._last_avail
        else:
            self._used_h[0] = 0

    def _suppress_notify(self) -> None:
        if not self._event_idx and self._ready:
            self._used_h[0] = USED_F_NO_NOTIFY
