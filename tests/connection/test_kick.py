"""The adaptive poll's CPU test (connection.kick.KickWaiter.poll/slept).

Why: polling that costs more CPU per request than sleeping (a guest slower
than the window, or one that needs the CPU the spin takes) must turn itself
off, stay off for the back-off, and come back; polling that pays must stay.
The assertions do not depend on the machine's speed or load: an expired
window spins at least its length, a CPU burn in the test costs at least
what it burns, and each margin is 8x or more.
"""

from __future__ import annotations

import asyncio
import time

from connection.kick import (POLL_BACKOFF_MAX, POLL_BACKOFF_MIN, POLL_EPOCH, POLL_SPIN_BUDGET_NS,
                             POLL_START_NS, KickWaiter)

#: A window longer than an epoch's whole fallback allowance: spinning it once
#: in an epoch puts the epoch over POLL_SPIN_BUDGET_NS per request (2x).
OVER = 2 * POLL_EPOCH * POLL_SPIN_BUDGET_NS


def _waiter() -> tuple[KickWaiter, memoryview]:
    loop = asyncio.new_event_loop()
    loop.close()   # poll/slept never touch the loop
    k = KickWaiter(loop, None, lambda sleeping: None, lambda reason: None)
    avail = memoryview(bytearray(8)).cast("H")   # [0] flags, [1] idx
    return k, avail


def _fail_window(k: KickWaiter, avail: memoryview, last: int, window: int) -> None:
    """A window that expires: nothing arrives while it spins."""
    avail[1] = last
    k.poll_max_ns = k.poll_ns = window
    assert k.poll(avail, last) is False
    assert k.poll_ns == window, "the window itself is left as it was until the epoch ends"


def _epoch_served(k: KickWaiter, avail: memoryview, last: int) -> int:
    """The device served an epoch's worth of requests; the next poll closes the epoch."""
    last = (last + POLL_EPOCH) & 0xFFFF
    avail[1] = last
    k.poll(avail, last)
    return last


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _sleeping_epoch(k: KickWaiter, avail: memoryview, burn: float = 0.0) -> int:
    """One request per wake-up for a whole epoch, each costing ``burn``
    seconds of CPU: the group measures what sleeping costs.  Returns the
    avail index reached."""
    k.poll_max_ns = 0
    last = 0
    k.poll(avail, last)                        # the first poll sets the reference index
    for _ in range(POLL_EPOCH):
        if burn:
            _burn(burn)
        last += 1
        avail[1] = last
        k.poll(avail, last)
    assert k.group.sleep_cpu_ns is not None
    return last


def test_losing_epoch_turns_polling_off_for_a_backoff() -> None:
    """No sleeping epoch measured yet: the spin budget decides."""
    k, avail = _waiter()
    _fail_window(k, avail, 0, OVER)
    _epoch_served(k, avail, 0)
    assert k.poll_ns == 0
    for _ in range(POLL_BACKOFF_MIN):
        k.slept()                              # short gaps would grow the window...
        assert k.poll_ns == 0                  # ...but not during the back-off
    k.slept()
    assert k.poll_ns == POLL_START_NS          # probing again


def test_backoff_doubles_while_polling_keeps_losing() -> None:
    k, avail = _waiter()
    expected = POLL_BACKOFF_MIN
    last = 0
    for _ in range(9):
        _fail_window(k, avail, last, OVER)
        last = _epoch_served(k, avail, last)
        sleeps = 0
        while k.poll_ns == 0:
            k.slept()
            sleeps += 1
        assert sleeps == expected + 1
        expected = min(POLL_BACKOFF_MAX, expected * 2)


def test_polling_that_costs_less_than_measured_sleeping_stays_on() -> None:
    """Sleeping measured dear (here 1 ms of CPU per request: a burn), a
    polling epoch that spins 40 us per request keeps polling, although that
    is over the fallback budget."""
    k, avail = _waiter()
    last = _sleeping_epoch(k, avail, burn=0.001)
    assert k.group.sleep_cpu_ns >= 1_000_000
    _fail_window(k, avail, last, OVER)         # 2.56 ms over the next 64 requests: 40 us each
    _epoch_served(k, avail, last)
    assert k.group.poll_cpu_ns is not None and k.group.poll_cpu_ns < k.group.sleep_cpu_ns
    assert k.poll_ns == OVER


def test_polling_that_costs_more_than_measured_sleeping_backs_off() -> None:
    k, avail = _waiter()
    last = _sleeping_epoch(k, avail)           # cheap: no work at all
    window = 8 * POLL_EPOCH * max(k.group.sleep_cpu_ns, 1_000)   # 8x what sleeping cost per request
    _fail_window(k, avail, last, window)
    _epoch_served(k, avail, last)
    assert k.poll_ns == 0


def test_one_expired_window_in_an_epoch_is_tolerated() -> None:
    """A window that expires once (the driver was preempted) among requests
    found at once does not stop polling."""
    k, avail = _waiter()
    window = POLL_EPOCH * POLL_SPIN_BUDGET_NS // 8   # 1/8 of the fallback allowance
    _fail_window(k, avail, 0, window)
    last = 0
    for _ in range(POLL_EPOCH + 1):
        last += 1
        avail[1] = last + 1                    # the next request is already there
        assert k.poll(avail, last) is True
    assert k.poll_ns == window


def test_no_window_no_charge() -> None:
    """poll-us=0 (or an idle queue): nothing spun, nothing charged, no back-off."""
    k, avail = _waiter()
    k.poll_max_ns = 0
    for last in range(3 * POLL_EPOCH):
        avail[1] = last
        assert k.poll(avail, last) is False
        k.slept()
        assert k.poll_ns == 0
    assert k.group.poll_cpu_ns is None
    k.poll_max_ns = 1_000_000                   # polling allowed again: no back-off was charged
    assert k.poll(avail, 3 * POLL_EPOCH) is False
    k.slept()
    assert k.poll_ns == POLL_START_NS


def test_a_polling_epoch_that_cannot_win_ends_at_once() -> None:
    """Sleeping measured cheap; one window that spins (and burns) more than
    a whole sleeping epoch costs: the next poll ends the epoch as lost after
    one request, instead of spinning on to ``POLL_EPOCH`` requests."""
    k, avail = _waiter()
    last = _sleeping_epoch(k, avail)           # cheap: no work at all
    sleep = k.group.sleep_cpu_ns
    window = 2 * POLL_EPOCH * max(sleep, 1_000)   # twice a whole sleeping epoch
    _fail_window(k, avail, last, window)
    last += 1                                  # one request served, then the next poll
    avail[1] = last
    assert k.poll(avail, last) is False
    assert k.poll_ns == 0, "the doomed epoch did not end"
    assert k.group.poll_cpu_ns is not None and k.group.served == 0
    assert k.group.backoff == POLL_BACKOFF_MIN


def test_an_epoch_that_can_still_win_goes_on() -> None:
    """Spin below a whole sleeping epoch's cost: the epoch goes on, even
    when its spin per request so far is above what sleeping costs."""
    k, avail = _waiter()
    last = _sleeping_epoch(k, avail, burn=0.001)
    sleep = k.group.sleep_cpu_ns
    assert sleep >= 1_000_000
    _fail_window(k, avail, last, 4 * sleep)    # 4x sleeping's cost, for one request
    last += 1
    avail[1] = last
    k.poll(avail, last)
    assert k.poll_ns == 4 * sleep, "an epoch that could still win was ended"
    assert k.group.served == 1 and k.group.backoff == 0
