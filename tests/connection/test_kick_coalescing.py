"""Kick coalescing (connection.kick, "kick coalescing"): a queue that does
not poll asks an EVENT_IDX driver for one kick per several requests, and a
timer serves what came when that kick does not.

Why: in a TCG guest at queue depth 32 every request cost the device a
wake-up and the guest a kick and an interrupt; coalescing serves several
per wake-up.  What must hold whatever the driver does: no request is left
waiting longer than the timer, a driver that waits for each completion
(queue depth 1) turns coalescing off, a polling queue and a queue without
EVENT_IDX are never coalesced, and an idle queue keeps no timer.

Real eventfds, memfd guest memory and uvloop; the driver below obeys
EVENT_IDX (``vring_need_event`` on ``avail_event``), as Linux's does.
"""

from __future__ import annotations

import asyncio
import os
import time

from connection.kick import (COALESCE_AHEAD_MAX, COALESCE_EARLY_MAX, COALESCE_PROBE_MAX, COALESCE_PROBE_MIN, COALESCE_WAIT_S,
                             KickWaiter)
from connection.split_ring import vring_need_event

from .test_virtqueue import EVENT_IDX, _pop_all, eventfd_count, setup  # noqa: F401 - the fixture

#: Generous bound for "served": the timer is COALESCE_WAIT_S; a loaded test
#: machine may run it late, never 1000x late.
SERVED_WITHIN_S = 1000 * COALESCE_WAIT_S


def _coalescing_queue(setup, size=8):
    """An EVENT_IDX queue that coalesces, served inline, with its driver ring."""
    q, ring = setup.queue(size=size, features=EVENT_IDX)
    q.coalesce_kicks = True
    q.poll_max_ns = 0            # never polls: coalescing may run
    hook, served = _pop_all(q)
    calls = []

    def counting_hook():
        calls.append(len(served))
        hook()
    q.serve_hook = counting_hook
    return q, ring, served, calls


def _driver_adds(setup, ring, buf) -> bool:
    """Add one request as an EVENT_IDX driver does; True if it kicked."""
    old = ring.avail[1]
    ring.chain([(buf, 64, True)])
    new = ring.avail[1]
    if vring_need_event(ring.avail_event, new, old):
        os.eventfd_write(setup.kick[0], 1)
        return True
    return False


async def _until(pred, timeout=SERVED_WITHIN_S):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        await asyncio.sleep(0.0005)
    return pred()


async def _asleep(q):
    """Start the device's task and let it arm kicks and sleep."""
    assert await q.wait_kick() is True
    sleeper = asyncio.ensure_future(q.wait_kick())
    await asyncio.sleep(0)
    return sleeper


def test_a_coalesced_kick_serves_several_requests_in_one_wake_up(setup):
    q, ring, served, calls = _coalescing_queue(setup)
    bufs = [setup.guest.alloc(64) for _ in range(8)]
    q._kick.ahead = 1                     # as after a probe

    async def scenario():
        sleeper = await _asleep(q)
        assert ring.avail_event == (q.last_avail_idx + 1) & 0xFFFF, "kick asked for on the second request"
        assert q._kick.timer is not None
        assert _driver_adds(setup, ring, bufs[0]) is False
        assert _driver_adds(setup, ring, bufs[1]) is True
        assert await _until(lambda: len(served) == 2)
        assert calls == [0], "both requests in one wake-up"
        assert q._kick.ahead == 3, "the kick came first: wait for more next time"
        assert ring.avail_event == (q.last_avail_idx + 3) & 0xFFFF
        kicks = [_driver_adds(setup, ring, b) for b in bufs[2:6]]
        assert kicks == [False, False, False, True]
        assert await _until(lambda: len(served) == 6)
        assert calls == [0, 2]
        assert q._kick.ahead == COALESCE_AHEAD_MAX
        q.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False
        assert q._kick.timer is None, "a broken queue keeps no timer"

    setup.run(scenario())


def test_a_request_whose_kick_never_comes_is_served_by_the_timer(setup):
    """A queue-depth-1 driver adds one request and waits for it: the timer
    serves it, coalescing stops, and the next request gets a kick at once."""
    q, ring, served, calls = _coalescing_queue(setup)
    bufs = [setup.guest.alloc(64) for _ in range(3)]
    q._kick.ahead = COALESCE_AHEAD_MAX

    async def scenario():
        sleeper = await _asleep(q)
        assert _driver_adds(setup, ring, bufs[0]) is False   # the driver may not kick
        assert await _until(lambda: len(served) == 1), "the timer must serve a request whose kick never comes"
        assert q._kick.ahead == 0 and q._kick.timer is None
        assert q._kick.probe_in == COALESCE_PROBE_MIN, "probed again only after a back-off (in kicks)"
        assert ring.avail_event == q.last_avail_idx, "a kick per request again"
        assert _driver_adds(setup, ring, bufs[1]) is True
        assert await _until(lambda: len(served) == 2)
        assert eventfd_count(setup.kick[0]) == 0
        q.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False

    setup.run(scenario())


def test_the_timer_shrinks_the_wait_to_what_came(setup):
    q, ring, served, calls = _coalescing_queue(setup)
    bufs = [setup.guest.alloc(64) for _ in range(3)]
    q._kick.ahead = 3

    async def scenario():
        sleeper = await _asleep(q)
        assert [_driver_adds(setup, ring, b) for b in bufs[:2]] == [False, False]
        assert await _until(lambda: len(served) == 2)
        assert calls == [0]
        assert q._kick.ahead == 1, "two came: next time the kick comes with the second"
        assert ring.avail_event == (q.last_avail_idx + 1) & 0xFFFF
        q.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False

    setup.run(scenario())


def test_an_idle_queue_keeps_no_timer(setup):
    """A device with no I/O must use no CPU: a coalesced sleep whose driver
    pauses ends with kicks armed for the next request and no timer; that
    request's kick probes coalescing again, and when the driver pauses again
    the queue is back to no timer, and stops probing for a back-off."""
    q, ring, served, calls = _coalescing_queue(setup)
    bufs = [setup.guest.alloc(64) for _ in range(2)]
    q._kick.ahead = 1

    async def scenario():
        sleeper = await _asleep(q)
        for n in range(2):
            assert q._kick.timer is not None and q._kick.ahead == 1
            await asyncio.sleep(20 * COALESCE_WAIT_S)
            assert q._kick.timer is None and q._kick.ahead == 0
            assert ring.avail_event == q.last_avail_idx, "kicks armed for the next request"
            assert len(served) == n
            await asyncio.sleep(20 * COALESCE_WAIT_S)
            assert q._kick.timer is None, "no timer while idle"
            assert _driver_adds(setup, ring, bufs[n]) is True
            assert await _until(lambda: len(served) == n + 1)
            if n == 0:
                assert q._kick.ahead == 1, "the kick after a pause probes again"
                continue
            assert q._kick.ahead == 0, "a second pause without a coalesced kick stops coalescing"
            assert q._kick.probe_in == COALESCE_PROBE_MIN - 1
        q.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False
        assert q._kick.timer is None

    setup.run(scenario())


def test_a_polling_queue_is_not_coalesced(setup):
    q, ring, served, calls = _coalescing_queue(setup)
    q.poll_max_ns = 1_000_000_000
    q.poll_ns = 1_000                     # a window: the queue polls before it sleeps
    q._kick.ahead = 3

    async def scenario():
        sleeper = await _asleep(q)
        assert ring.avail_event == q.last_avail_idx
        assert q._kick.timer is None
        q.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False

    setup.run(scenario())


def test_no_coalescing_without_event_idx_or_room(setup):
    """Without EVENT_IDX the driver's only choices are a kick per request or
    none; a one-entry ring has no second request to wait for."""
    q, _ = setup.queue(features=0)
    q.coalesce_kicks = True
    assert q.coalesce_kicks is False
    q1, _ = setup.queue(size=1, features=EVENT_IDX)
    q1.coalesce_kicks = True
    assert q1.coalesce_kicks is False
    q2, _ = setup.queue(size=2, features=EVENT_IDX)
    q2.coalesce_kicks = True
    assert q2.coalesce_kicks is True and q2._kick.ahead_max == 1


def test_stop_cancels_a_coalesced_sleep(setup):
    q, ring, served, calls = _coalescing_queue(setup)
    q._kick.ahead = 1

    async def scenario():
        sleeper = await _asleep(q)
        timer = q._kick.timer
        assert timer is not None
        setup.configs[0].stop()
        assert await asyncio.wait_for(sleeper, 1) is False
        assert q._kick.timer is None and timer.cancelled()

    setup.run(scenario())


def test_probes_back_off_while_the_driver_waits_for_each_completion():
    """Coalescing is probed after COALESCE_PROBE_MIN kicks; each probe that a
    queue-depth-1 driver fails doubles the back-off, up to
    COALESCE_PROBE_MAX.  Only kicks count: the timer's serve does not."""
    loop = asyncio.new_event_loop()
    try:
        kicks = []
        k = KickWaiter(loop, None, kicks.append, lambda reason: None)
        k.allow_coalescing(True, COALESCE_AHEAD_MAX)
        waits = []
        for _ in range(9):
            n = 0
            while not k.ahead:
                k._readable()             # a kick
                n += 1
                assert n <= 2 * COALESCE_PROBE_MAX
            waits.append(n)
            k.missed(1)                   # the probe: one request waited for the timer
        assert waits == [COALESCE_PROBE_MIN] + [COALESCE_PROBE_MIN << i for i in range(8)]
        assert waits[-1] == COALESCE_PROBE_MAX
        assert len(kicks) == sum(waits), "every kick still reaches the queue"
        k.allow_coalescing(False, COALESCE_AHEAD_MAX)
        for _ in range(2 * COALESCE_PROBE_MAX):
            k._readable()
        assert k.ahead == 0, "a queue that does not allow it is never coalesced"
    finally:
        loop.close()


def test_a_burst_tail_undoes_the_growth_not_the_coalescing():
    """A driver whose bursts end at a completion it waits for: ``ahead``
    grew in mid-burst and the burst's tail (one request) waited for the
    timer.  That undoes the growth (back to what it was) and slows the next
    one; only a timer with no growth to undo reads as queue depth 1."""
    loop = asyncio.new_event_loop()
    try:
        k = KickWaiter(loop, None, lambda sleeping: None, lambda reason: None)
        k.allow_coalescing(True, COALESCE_AHEAD_MAX)
        k.ahead = 1                       # a probe
        k.timer = loop.call_later(1, lambda: None)
        k.hit(2)                          # its kick came first, with the second request: grows
        assert k.ahead == 3
        k.timer = loop.call_later(1, lambda: None)
        k.missed(1)                       # the tail of the burst waited
        assert k.ahead == 1, "back to before the growth, still coalescing"
        for _ in range(2):
            assert k.ahead == 1
            k.timer = loop.call_later(1, lambda: None)
            k.hit(2)                      # growing again takes two coalesced kicks now
        assert k.ahead == 3
        k.timer = loop.call_later(1, lambda: None)
        k.missed(2)
        assert k.ahead == 1
        k.timer = loop.call_later(1, lambda: None)
        k.missed(1)                       # no growth since the last timer: queue depth 1
        assert k.ahead == 0 and k.probe_in == COALESCE_PROBE_MIN
    finally:
        loop.close()


def test_a_driver_that_kicks_every_request_is_not_coalesced(setup):
    """A driver that kicks whatever ``avail_event`` says gains nothing from
    coalescing and would pay a timer per sleep: after COALESCE_EARLY_MAX
    kicks that came before ``avail_event`` was reached, coalescing stops
    (and is probed again after a back-off)."""
    q, ring, served, calls = _coalescing_queue(setup)
    bufs = [setup.guest.alloc(64) for _ in range(COALESCE_EARLY_MAX + 1)]
    q._kick.ahead = 1

    async def scenario():
        sleeper = await _asleep(q)
        for n, buf in enumerate(bufs[:COALESCE_EARLY_MAX]):
            assert q._kick.ahead == 1 and q._kick.timer is not None
            ring.chain([(buf, 64, True)])
            os.eventfd_write(setup.kick[0], 1)      # a kick although avail_event did not ask for it
            assert await _until(lambda: len(served) == n + 1)
        assert q._kick.ahead == 0 and q._kick.timer is None
        assert q._kick.probe_in == COALESCE_PROBE_MIN
        assert ring.avail_event == q.last_avail_idx
        q.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False

    setup.run(scenario())


def test_requests_one_at_a_time_and_far_apart_stop_coalescing():
    """A pause (a timer that finds nothing) re-probes at the next kick; a
    second one without a coalesced kick in between is a driver that sends
    one request at a time with long gaps: each probe would cost it a
    timer's wake-up, so coalescing stops and backs off."""
    loop = asyncio.new_event_loop()
    try:
        k = KickWaiter(loop, None, lambda sleeping: None, lambda reason: None)
        k.allow_coalescing(True, COALESCE_AHEAD_MAX)
        k.ahead = 1
        k.timer = loop.call_later(1, lambda: None)
        k.missed(0)                   # paused
        assert k.ahead == 0 and k.probe_in == 1
        k._readable()                 # its next request's kick probes again
        assert k.ahead == 1
        k.timer = loop.call_later(1, lambda: None)
        k.missed(0)                   # paused again, no coalesced kick in between
        assert k.ahead == 0 and k.probe_in == COALESCE_PROBE_MIN
        k.probe_in = 1
        k._readable()
        k.timer = loop.call_later(1, lambda: None)
        k.hit(2)                      # a burst: coalescing works again
        k.timer = loop.call_later(1, lambda: None)
        k.missed(0)                   # a pause after it is a pause
        assert k.probe_in == 1
    finally:
        loop.close()
