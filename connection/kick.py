"""Waiting for a running queue's kicks, and polling before sleeping.

One ``KickWaiter`` per running queue (``connection.virtqueue.Virtqueue``).
It owns no fd: the queue's configuration owns the kick eventfd and hands
its number here.  What it does own is everything about *waiting*:

* the kick fd's reader callback, which drains the eventfd a bounded number
  of times per wake-up (``KICK_READS_PER_WAKE``): a counter-mode eventfd is
  empty after one read, so a fd that is still readable after the bound (a
  semaphore-mode eventfd with a huge count, or another kind of fd that never
  stops being readable) would otherwise spin the device at full CPU; it is
  reported to the queue, which breaks;
* the serving task's sleep (one future; or, without a kick fd, the NOFD
  mode, polling the ring at ``NOFD_POLL_PERIOD``);
* adaptive polling of ``avail.idx`` before sleeping (QEMU's poll-max-ns
  idea): the window grows (doubling, to at most ``poll_max_ns``) while the
  idle gaps (poll plus sleep, as QEMU's ``block_ns``) stay within
  ``POLL_BUSY_GAP_FACTOR`` times the bound, and drops to 0 after a longer gap.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

#: Adaptive polling of the avail ring before sleeping.  The bound must
#: exceed one driver round trip (notify, wake-up of the driver's vCPU, its
#: work, the next avail entry): ~70-110 us in the 2-vCPU VM of
#: benchmarks/README.md.  At 50 us the window collapsed to 0 whenever a
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
#: Reads of the kick fd per wake-up.  A counter-mode eventfd needs one (two
#: when the count was 1: the second one finds it empty); a legitimate
#: front-end cannot kick between our reads this many times in a row.
KICK_READS_PER_WAKE = 64

_ONE = (1).to_bytes(8, "little")
_perf_ns = time.perf_counter_ns


class KickWaiter:
    """The kick side of one running queue: reader callback, sleep, poll.

    ``on_kick()`` runs from the reader callback once the fd was drained;
    ``on_error(reason)`` instead when the fd cannot be drained (the reader is
    then already removed, so a broken fd cannot spin the loop)."""

    __slots__ = ("loop", "fd", "poll_ns", "poll_max_ns", "kicked", "_waiter", "_reader_fd", "_idle_t0",
                 "_on_kick", "_on_error")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None,
                 on_kick: Callable[[], None], on_error: Callable[[str], None]) -> None:
        self.loop = loop
        self.fd = fd
        #: Current and maximum poll window (0 disables polling).
        self.poll_ns = 0
        self.poll_max_ns = POLL_MAX_NS
        #: A kick (or anything that counts as one) arrived since the last look at the ring.
        self.kicked = True
        self._waiter: asyncio.Future[None] | None = None
        self._reader_fd: int | None = None
        #: Start of the current idle gap (perf_counter_ns, before the poll).
        self._idle_t0 = 0
        self._on_kick = on_kick
        self._on_error = on_error

    # ------------------------------------------------------------------ fd

    def watch(self) -> None:
        """Start watching the kick fd (OSError if the loop cannot poll it)."""
        if self.fd is not None and self._reader_fd is None:
            self.loop.add_reader(self.fd, self._readable)
            self._reader_fd = self.fd

    def unwatch(self) -> None:
        fd = self._reader_fd
        if fd is not None:
            self._reader_fd = None
            if not self.loop.is_closed():
                self.loop.remove_reader(fd)

    def set_fd(self, fd: int | None, watch: bool = True) -> None:
        """Use another fd (None: NOFD polling), watched unless ``watch`` is
        False (a broken ring); counts as a kick, so a request queued while
        the old fd went away is not left waiting."""
        self.unwatch()
        self.fd = fd
        if watch:
            self.watch()
        self.wake(kicked=True)

    def drain(self) -> str | None:
        """Read the kick fd until it is empty, at most ``KICK_READS_PER_WAKE``
        times; None when drained, else why it could not be."""
        fd = self.fd
        if fd is None:
            return None
        read = os.read
        for _ in range(KICK_READS_PER_WAKE):
            try:
                data = read(fd, 8)
            except BlockingIOError:
                return None
            except OSError as exc:
                return f"reading kick fd {fd}: {exc}"
            if data != _ONE:
                # A counter-mode eventfd hands over its whole count (> 1) and
                # is empty now; a semaphore-mode one always reads 1.
                return None if data else f"kick fd {fd}: end of file"
        return (f"kick fd {fd} still readable after {KICK_READS_PER_WAKE} reads "
                f"(a semaphore-mode eventfd, or not an eventfd)")

    def _readable(self) -> None:
        reason = self.drain()
        if reason is None:
            self._on_kick()
        else:
            self.unwatch()
            self._on_error(reason)

    # -------------------------------------------------------------- sleeping

    @property
    def sleeping(self) -> bool:
        """The serving task is asleep in ``sleep``."""
        w = self._waiter
        return w is not None and not w.done()

    def wake(self, kicked: bool) -> None:
        """Wake the sleeping task; ``kicked`` says the ring may hold work."""
        if kicked:
            self.kicked = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def sleep(self, idle: Callable[[], bool]) -> None:
        """Sleep until ``wake``; without a kick fd (NOFD), until ``idle()``
        turns False, checked every ``NOFD_POLL_PERIOD``.  One sleeper at a time."""
        fut = self.loop.create_future()
        self._waiter = fut
        try:
            if self.fd is None:
                while not fut.done() and idle():
                    await asyncio.sleep(NOFD_POLL_PERIOD)
            else:
                await fut
        finally:
            self._waiter = None

    # --------------------------------------------------------------- polling

    def poll(self, avail: memoryview, last: int) -> bool:
        """Spin on ``avail[1]`` (avail.idx) for up to ``poll_ns``; True if it
        moved from ``last``.  Starts the idle-gap clock either way."""
        t0 = self._idle_t0 = _perf_ns()
        window = self.poll_ns
        if window:
            deadline = t0 + window
            while avail[1] == last:
                if _perf_ns() >= deadline:
                    return False
            return True
        return False

    def slept(self) -> None:
        """Adapt the window to the idle gap that just ended: grow it when the
        gap was at most ``POLL_BUSY_GAP_FACTOR`` times the bound (a busy
        driver: a full window would have caught its next request or come
        close), drop it to 0 after a longer one (idle)."""
        bound = self.poll_max_ns
        if _perf_ns() - self._idle_t0 > bound * POLL_BUSY_GAP_FACTOR:
            self.poll_ns = 0
        elif bound:
            self.poll_ns = min(bound, max(POLL_START_NS, self.poll_ns * 2))
