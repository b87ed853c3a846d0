"""Waiting for a running queue's kicks, and polling before sleeping.

One ``KickWaiter`` per running queue (``connection.virtqueue.Virtqueue``).
It owns no fd: the queue's configuration owns the kick eventfd and hands
its number here.  What it does own is everything about *waiting*:

* the kick fd's reader callback, which reads the eventfd once per wake-up
  (a counter-mode eventfd is empty after one read) and, one wake-up in
  ``KICK_CHECK_EVERY`` whose read returned 1, reads on a bounded number of
  times (``KICK_READS_PER_WAKE``): a fd that is still readable after the
  bound (a semaphore-mode eventfd with a huge count, or another kind of fd
  that never stops being readable) would otherwise spin the device at full
  CPU; it is reported to the queue, which breaks;
* the serving task's sleep (one future; or, without a kick fd, the NOFD
  mode, polling the ring at ``NOFD_POLL_PERIOD``);
* adaptive polling of ``avail.idx`` before sleeping (QEMU's poll-max-ns
  idea): the window grows (doubling, to at most ``poll_max_ns``) while the
  idle gaps (poll plus sleep, as QEMU's ``block_ns``) stay within
  ``POLL_BUSY_GAP_FACTOR`` times the bound, and drops to 0 after a longer gap;
* one poll for all the queues of a loop (``PollGroup``): a queue that
  polls also watches the rings of the loop's queues that sleep, with
  their kicks off for its window, and serves one that moves from inside
  the window; at its end it turns their kicks back on and re-checks their
  rings;
* a CPU test of that polling, per loop (the thread's, over all its
  queues): the thread CPU per request served is
  measured over epochs of ``POLL_EPOCH`` requests, apart for epochs that
  polled and epochs that only slept; when a polling epoch costs more per
  request than the last sleeping one (so the spin costs more CPU than the
  wake-ups it saves), polling stops for ``POLL_BACKOFF_MIN`` sleeps (at
  least an epoch, which measures sleeping again), doubling up to
  ``POLL_BACKOFF_MAX`` while it keeps happening.  A polling epoch that has
  already cost more than a whole sleeping epoch ends there, lost, instead
  of spinning on to its last request.  Before any sleeping epoch
  was measured, ``POLL_SPIN_BUDGET_NS`` of spinning per request stands in
  for the cost of a wake-up.  A driver whose next request comes later than
  a wake-up's worth of spinning (a TCG guest; any guest on an
  oversubscribed host, where the spin takes the CPU its next request
  needs) is then served by kicks, like qemu-storage-daemon; a fast driver
  keeps the window (benchmarks/README.md, "QD1 in a TCG guest, again");
* kick coalescing, for a queue that opts in (``coalescing``; the block
  device's request queues) and only while it does not poll (polling lost
  the CPU test above, or is off: ``poll_max_ns`` 0): with EVENT_IDX the
  device may ask for a kick only when the driver has added ``ahead + 1``
  requests (``avail_event`` that far past the ring's index), so each
  wake-up serves several requests, and the driver makes one kick and gets
  one interrupt per several requests.  A timer (``COALESCE_WAIT_S``) serves
  whatever came if that kick does not; ``ahead`` doubles (+1) while the kick
  comes first and shrinks to what came when the timer runs out
  (``KickWaiter.hit``, ``missed``: burst tails, early kicks).  A driver
  that waits for each completion before its next request (queue depth 1)
  cannot kick a second time: at the first timer with one request waiting,
  coalescing stops and is probed again only after a back-off
  (``COALESCE_PROBE_MIN`` kicks, doubling to ``COALESCE_PROBE_MAX``), so
  such a driver pays one ``COALESCE_WAIT_S`` per back-off.  In a TCG guest
  at queue depth 32 the device went from ~0.9 wake-ups per request to ~0.25,
  and the guest from 0.91x qemu-storage-daemon's IOPS to 1.95x, at 0.57x its
  CPU per request (benchmarks/README.md, "Kick coalescing").
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

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
#: Until a sleeping epoch was measured: spinning may cost at most this much
#: per request served, about what a sleep and a kick cost the device at QD1
#: (libblkio 4 KiB reads, benchmarks/README.md: ~19 us).  The measured
#: comparison replaces it because the real cost of a wake-up varies (cold
#: caches after a sleep make heavier requests dearer: 4 KiB writes cost
#: ~115 us per request sleeping against 60-70 us polling, 25 us of it spin).
POLL_SPIN_BUDGET_NS = 20_000
#: Requests per accounting epoch: long enough that a few windows that
#: expire because the driver was preempted once do not decide (a running
#: average of 1/8 weight did: one expired 200 us window tipped it), short
#: enough that a probe is cheap.
POLL_EPOCH = 64
#: Sleeps without polling after a polling epoch lost: the first back-off
#: (one epoch, so sleeping is measured again), doubled at each new loss up
#: to the last (a losing probe then costs one epoch of polling per ~8000
#: requests: ~1 us per request for a TCG guest's ~100 us spins).
POLL_BACKOFF_MIN = POLL_EPOCH
POLL_BACKOFF_MAX = 8192
#: Polling epochs in a row that won after which the back-off starts from
#: ``POLL_BACKOFF_MIN`` again.
POLL_BACKOFF_RESET = 4
#: Without a kick fd (NOFD flag) the ring is polled at this period.
NOFD_POLL_PERIOD = 0.001
#: Reads of the kick fd in a full drain (see ``KickWaiter.consume``): a
#: legitimate front-end cannot kick between our reads this many times in a
#: row.
KICK_READS_PER_WAKE = 64
#: Wake-ups whose single read returned 1 between two full drains (a power of two).
KICK_CHECK_EVERY = 8

#: Kick coalescing (see the module docstring).  How long requests may wait
#: for the coalesced kick before the timer serves them: one tick of the
#: loop's timers (uvloop's are in whole milliseconds); several round trips
#: of a driver slow enough to be coalesced (a TCG guest adds a request every
#: ~130 us at queue depth 32).
COALESCE_WAIT_S = 0.001
#: Most requests past the next a coalesced kick may wait for (the kick
#: then comes with the fourth): the wake-ups saved shrink as 1/n, the wait
#: of the first request grows as n.
COALESCE_AHEAD_MAX = 3
#: Kicks before the first probe of coalescing, and between probes after one
#: failed with a request waiting (a queue-depth-1 driver): the first
#: back-off, doubled at each new failure up to the last (a failed probe
#: delays one request by ``COALESCE_WAIT_S``: at most one per 8192 kicks,
#: once the back-off is long).
COALESCE_PROBE_MIN = 64
COALESCE_PROBE_MAX = 8192
#: Kicks in a row that come before the driver reached ``avail_event`` (a
#: driver that kicks every request) after which coalescing stops.
COALESCE_EARLY_MAX = 4
#: At most this many coalesced kicks before ``ahead`` grows again after
#: timers that found several requests (see ``KickWaiter.missed``).
COALESCE_GROW_MAX = 64

_ONE = (1).to_bytes(8, "little")
_perf_ns = time.perf_counter_ns
_thread_ns = time.thread_time_ns


class PollGroup:
    """The queues one event loop serves (one thread), seen from their polls.

    Two things are shared by every queue on a loop, because they are facts
    about the thread, not about a queue:

    * the CPU test of polling (``epoch_end``): the thread's CPU
      per request, over all its queues' requests, in polling epochs against
      sleeping ones, and the back-off that follows a losing polling epoch.
      Measured per queue, each queue's account would also carry the other
      queues' work;
    * the parked queues: those asleep with kicks armed and a serve hook
      (each stores itself in ``parked``, keyed by its KickWaiter).  A queue
      that polls watches their rings too and serves one that moves from
      inside its window (``member.serve_parked()``), instead of leaving that
      queue's kick waiting on a loop that is busy spinning; for the window
      it turns their kicks off (``member.disarm()``) and on again at its end
      (``member.rearm()``, which re-checks the ring and serves what came in
      between), as QEMU's iothread polls all of its handlers at once
      (benchmarks/README.md, block matrix, change 5)."""

    __slots__ = ("parked", "served", "spent", "cpu0", "sleep_cpu_ns", "poll_cpu_ns", "backoff", "off",
                 "within", "doomed_at")

    _by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PollGroup]" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "PollGroup":
        """The group of ``loop`` (made on first use, gone with the loop)."""
        group = cls._by_loop.get(loop)
        if group is None:
            group = cls._by_loop[loop] = cls()
        return group

    def __init__(self) -> None:
        #: Parked queues: their KickWaiter -> the queue (``serve_parked``,
        #: ``parked_ring``, ``disarm``, ``rearm``).
        self.parked: dict[KickWaiter, Any] = {}
        self.served = 0          # requests served in this epoch (all queues)
        self.spent = 0           # ns spun in this epoch (all queues)
        self.cpu0 = _thread_ns()  # thread CPU at the epoch's start
        #: Thread CPU per request of the last epoch that only slept, and of
        #: the last one that polled (None: not measured yet).
        self.sleep_cpu_ns: int | None = None
        self.poll_cpu_ns: int | None = None
        self.backoff = 0         # sleeps left without polling
        self.off = 0             # length of the last back-off
        self.within = 0          # polling epochs in a row that won
        #: ns of spin past which a polling epoch cannot win any more
        #: (``doomed``): what a whole epoch of sleeping costs.
        self.doomed_at = POLL_EPOCH * POLL_SPIN_BUDGET_NS

    def doomed(self) -> bool:
        """This polling epoch has already cost more CPU than a whole epoch of
        sleeping: whatever its remaining requests cost, it loses, so it ends
        now instead of spinning on to ``POLL_EPOCH`` requests (in a TCG
        guest, a probe that ran its whole epoch cost ~6 ms of spin).  The
        spin is wall time and may include time this thread was preempted,
        so against a measured sleeping epoch the thread's CPU decides."""
        if self.sleep_cpu_ns is None:   # the fallback compares spin only
            return True
        return _thread_ns() - self.cpu0 > self.doomed_at

    def epoch_end(self) -> bool:
        """Close the epoch: record its CPU per request; True if polling lost
        (then polling is off for a back-off)."""
        now = _thread_ns()
        served = self.served or 1
        per = (now - self.cpu0) // served
        self.cpu0 = now
        polled = self.spent
        spin = polled // served
        self.spent = self.served = 0
        if not polled:
            self.sleep_cpu_ns = per
            self.doomed_at = POLL_EPOCH * max(per, 1)
            return False
        self.poll_cpu_ns = per
        sleep = self.sleep_cpu_ns
        if per > sleep if sleep is not None else spin > POLL_SPIN_BUDGET_NS:
            # Polling costs more than the wake-ups it saves: stop, and
            # probe again after a back-off that grows while this lasts.
            self.within = 0
            self.off = self.backoff = min(POLL_BACKOFF_MAX, max(POLL_BACKOFF_MIN, self.off * 2))
            return True
        self.within += 1
        if self.within >= POLL_BACKOFF_RESET:
            self.off = 0
        return False


class KickWaiter:
    """The kick side of one running queue: reader callback, sleep, poll.

    ``on_kick(sleeping)`` runs from the reader callback (``sleeping``: the
    serving task is asleep in ``sleep``); it must call ``consume()`` before
    it next re-arms kicks.  ``on_error(reason)`` runs from ``consume`` when
    the fd cannot be emptied (the reader is then already removed, so a
    broken fd cannot spin the loop).  ``waiting()`` (optional) counts the
    requests on the ring, for kick coalescing (``hit``)."""

    __slots__ = ("loop", "fd", "group", "poll_ns", "poll_max_ns", "kicked", "_waiter", "_reader_fd", "_idle_t0",
                 "_on_kick", "_on_error", "_spun", "_poll_last", "_ones",
                 "coalescing", "ahead", "ahead_max", "timer", "probe_in", "_probe_off", "_hits", "_grow_after",
                 "_ahead_before", "_early", "_paused", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None,
                 on_kick: Callable[[bool], None], on_error: Callable[[str], None],
                 waiting: Callable[[], int] | None = None) -> None:
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
        #: The loop's queues: the shared CPU test and the parked queues.
        self.group = PollGroup.of(loop)
        self._spun = 0           # ns spun by the last poll, not yet charged
        self._poll_last: int | None = None   # avail index at the last poll
        self._ones = 0           # reads of exactly 1 since the last full drain (modulo KICK_CHECK_EVERY)
        self._on_kick = on_kick
        self._on_error = on_error
        #: Kick coalescing: the timer of a coalesced sleep; the length of the
        #: last probe back-off; the rest is set by ``allow_coalescing``.
        self.timer: asyncio.TimerHandle | None = None
        self._probe_off = 0
        #: Requests on the ring not yet taken (the queue's), read when a
        #: coalesced kick comes; None: every such kick counts as on time.
        self._waiting = waiting
        self.allow_coalescing(False, COALESCE_AHEAD_MAX)

    # ------------------------------------------------------------------ fd

    def watch(self) -> None:
        """Start watching the kick fd (OSError if the loop cannot poll it)."""
        if self.fd is not None and self._reader_fd is None:
            self.loop.add_reader(self.fd, self._readable)
            self._reader_fd = self.fd

    def unwatch(self) -> None:
        self.group.parked.pop(self, None)
        self._cancel_timer()
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

    def consume(self) -> bool:
        """Empty the kick fd; False (the fd unwatched and ``on_error`` told
        why) when it cannot be emptied.

        A counter-mode eventfd (what every front-end sends) is empty after
        one read, so one read is all a wake-up costs.  A read of exactly 1
        is also what a semaphore-mode eventfd always returns, so one such
        wake-up in ``KICK_CHECK_EVERY`` reads on until the fd is empty, at
        most ``KICK_READS_PER_WAKE`` times: a fd that is still readable then
        is reported (at most that many wake-ups of spinning first).  The
        read that finds the fd empty raises an OSError, whose construction
        (strerror decoded to text) costs about as much as the read; doing
        it on every wake-up was ~3 % of a queue-depth-1 request.

        The queue calls this once it has served the request the kick was
        for (``Virtqueue._on_kick``), before it re-arms kicks and re-checks
        the ring: a kick consumed then cannot hide a request."""
        fd = self.fd
        if fd is None:
            return True
        read = os.read
        reason = None
        for i in range(KICK_READS_PER_WAKE):
            try:
                data = read(fd, 8)
            except BlockingIOError:
                return True
            except OSError as exc:
                reason = f"reading kick fd {fd}: {exc}"
                break
            if data != _ONE:
                # A counter-mode eventfd hands over its whole count (> 1) and
                # is empty now; a semaphore-mode one always reads 1.
                if data:
                    return True
                reason = f"kick fd {fd}: end of file"
                break
            if not i:
                self._ones = n = (self._ones + 1) & (KICK_CHECK_EVERY - 1)
                if n:
                    return True
        else:
            reason = (f"kick fd {fd} still readable after {KICK_READS_PER_WAKE} reads "
                      f"(a semaphore-mode eventfd, or not an eventfd)")
        self.unwatch()
        self._on_error(reason)
        return False

    def _readable(self) -> None:
        """The reader callback: hand the kick to the queue with whether its
        task sleeps; the queue consumes the fd (``consume``).  First the
        coalescing bookkeeping, which counts kicks only (not the timer's
        serves, so an idle queue never probes): a coalesced kick that came
        in time, or one kick nearer the next probe."""
        if self.timer is not None:
            self.hit(self._waiting() if self._waiting is not None else self.ahead + 1)
        elif self.probe_in:
            self.probe_in -= 1
            if not self.probe_in:
                self.ahead = 1   # the probe: the next sleep asks for a kick on the second request
        w = self._waiter
        self._on_kick(w is not None and not w.done())

    # -------------------------------------------------------------- sleeping

    @property
    def sleeping(self) -> bool:
        """The serving task is asleep in ``sleep``."""
        w = self._waiter
        return w is not None and not w.done()

    def wake(self, kicked: bool) -> None:
        """Wake the sleeping task; ``kicked`` says the ring may hold work."""
        self.group.parked.pop(self, None)
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
            self.group.parked.pop(self, None)

    # --------------------------------------------------------------- polling

    def poll(self, avail: memoryview, last: int) -> bool:
        """Spin on ``avail[1]`` (avail.idx) for up to ``poll_ns``; True if it
        moved from ``last`` (the next avail index to serve).  Starts the
        idle-gap clock either way.  While it spins, the loop's parked queues
        are watched and served too (``PollGroup``).

        First the previous poll's spin and the requests served since
        (``last`` minus the index then) go to the group's epoch; at the end
        of an epoch, a polling epoch that cost more CPU per request than
        sleeping turns polling off for a back-off (see the module
        docstring)."""
        t0 = self._idle_t0 = _perf_ns()
        group = self.group
        prev = self._poll_last
        self._poll_last = last
        if prev is not None:
            group.served += (last - prev) & 0xFFFF
        if self._spun:
            group.spent += self._spun
            self._spun = 0
        if (group.served >= POLL_EPOCH or group.spent > group.doomed_at and group.doomed()) \
                and group.epoch_end():
            self.poll_ns = 0
            return False
        window = self.poll_ns
        if not window or group.backoff:
            return False
        deadline = t0 + window
        if group.parked:
            return self._poll_group(avail, last, t0, deadline)
        while avail[1] == last:
            now = _perf_ns()
            if now >= deadline:
                self._spun = now - t0
                return False
        self._spun = _perf_ns() - t0
        return True

    def _poll_group(self, avail: memoryview, last: int, t0: int, deadline: int) -> bool:
        """``poll`` with parked queues on the loop: their kicks are off while
        this spins, and one whose ring moves is served from here (time not
        charged as spin); at the end each is re-armed (and served again if
        its ring moved meanwhile)."""
        parked = self.group.parked
        members = list(parked.values())
        for q in members:
            q.disarm()
        busy = 0
        moved = False
        try:
            rings = [(q, *q.parked_ring()) for q in members]
            while True:
                if avail[1] != last:
                    moved = True
                    break
                for q, other, seen in rings:
                    if other[1] != seen:
                        s0 = _perf_ns()
                        q.serve_parked()
                        busy += _perf_ns() - s0
                        rings = [(q, *q.parked_ring()) for q in parked.values()]
                        break
                now = _perf_ns()
                if now >= deadline:
                    break
        finally:
            for q in list(parked.values()):
                q.rearm()
        self._spun = max(_perf_ns() - t0 - busy, 0)
        return moved

    def slept(self) -> None:
        """Adapt the window to the idle gap that just ended: grow it when the
        gap was at most ``POLL_BUSY_GAP_FACTOR`` times the bound (a busy
        driver: a full window would have caught its next request or come
        close), drop it to 0 after a longer one (idle); keep it at 0 during
        a back-off."""
        bound = self.poll_max_ns
        group = self.group
        if group.backoff:
            group.backoff -= 1
            self.poll_ns = 0
        elif _perf_ns() - self._idle_t0 > bound * POLL_BUSY_GAP_FACTOR:
            self.poll_ns = 0
        elif bound:
            self.poll_ns = min(bound, max(POLL_START_NS, self.poll_ns * 2))

    # ------------------------------------------------------------ coalescing

    def allow_coalescing(self, allowed: bool, ahead_max: int) -> None:
        """Let this queue's kicks be coalesced (for at most ``ahead_max``
        requests past the next), or not; a first probe after
        ``COALESCE_PROBE_MIN`` kicks."""
        self.coalescing = allowed and ahead_max > 0
        self.ahead_max = ahead_max
        #: Requests past the next the kick may wait for now (0: a kick per request).
        self.ahead = 0
        #: Kicks until the next probe (0: not counting), counted down in ``_readable``.
        self.probe_in = COALESCE_PROBE_MIN if self.coalescing else 0
        self._hits = 0           # coalesced kicks since ``ahead`` last changed
        self._grow_after = 1     # coalesced kicks before ``ahead`` grows
        self._ahead_before = 0   # ``ahead`` before its last growth (0: it has not grown since a timer)
        self._early = 0          # kicks in a row that came before the driver reached avail_event
        self._paused = 0         # timers that found nothing, since the last coalesced kick

    def wait_ahead(self, expired: Callable[[], None]) -> None:
        """Going to sleep with kicks ``ahead`` requests late: ``expired``
        runs after ``COALESCE_WAIT_S`` unless a kick comes first (``hit``)."""
        self.timer = self.loop.call_later(COALESCE_WAIT_S, expired)

    def hit(self, waiting: int) -> None:
        """A kick came while coalesced, with ``waiting`` requests on the ring.

        With more than ``ahead`` (it came when the driver passed
        ``avail_event``, before the timer), the driver keeps several
        requests coming: after ``_grow_after`` such kicks the next may wait
        for more (doubled, +1).  With fewer it came early: a kick left over
        from before the sleep, or a driver that kicks every request whatever
        ``avail_event`` says; ``COALESCE_EARLY_MAX`` of those in a row stop
        coalescing as a failed probe does (it saves such a driver nothing,
        and the timer costs each sleep)."""
        self._cancel_timer()
        if waiting <= self.ahead:
            self._early += 1
            if self._early >= COALESCE_EARLY_MAX:
                self._stop()
            return
        self._early = 0
        self._paused = 0
        self._hits += 1
        if self._hits >= self._grow_after and self.ahead < self.ahead_max:
            self._hits = 0
            self._ahead_before = self.ahead
            self.ahead = min(self.ahead_max, self.ahead * 2 + 1)
            self._probe_off = 0

    def _cancel_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    def _stop(self) -> None:
        """Coalescing failed: a kick per request, and a probe again after a
        back-off that doubles (from ``COALESCE_PROBE_MIN`` kicks, at most
        ``COALESCE_PROBE_MAX``) while this lasts."""
        self.ahead = 0
        self._early = 0
        self._probe_off = min(COALESCE_PROBE_MAX, max(COALESCE_PROBE_MIN, self._probe_off * 2))
        self.probe_in = self._probe_off

    def missed(self, waiting: int) -> None:
        """The timer ran out with ``waiting`` requests on the ring.

        With some waiting, wait for no more than that next time, and for
        no less than before the last growth: a driver whose bursts end at a
        completion it waits for (a batch, then its fsync) saw ``ahead`` grow
        in mid-burst, and the burst's tail is what waited.  Growing again
        then takes twice as many coalesced kicks, so a later growth falls
        on a burst's end and stays.  With one waiting and no growth to undo,
        the driver waits for each completion (queue depth 1): stop, and
        probe again after a back-off that grows while this lasts.  With none
        waiting, the driver paused: kicks are armed for its next request,
        whose kick probes again (an idle queue keeps no timer: nothing
        counts down without kicks); the second such timer without a
        coalesced kick in between is a driver whose requests come one at a
        time and far apart, each of which would otherwise cost a timer's
        wake-up: that stops coalescing as a failed probe does."""
        self.timer = None
        self._hits = 0
        before, self._ahead_before = self._ahead_before, 0
        if not waiting:
            self._paused += 1
            if self._paused >= 2:
                self._paused = 0
                self._stop()
            else:
                self.ahead = 0
                self.probe_in = 1
            return
        ahead = max(min(self.ahead, waiting - 1), before)
        if ahead:
            self.ahead = ahead
            self._grow_after = min(COALESCE_GROW_MAX, self._grow_after * 2)
        else:
            self._stop()
