"""The adaptive poll's CPU budget (connection.kick.KickWaiter.poll/slept).

Why: polling that keeps failing (a guest slower than the window, or one that
needs the CPU the spin takes) costs more CPU than the wake-ups it saves; the
budget must turn it off, keep it off for the back-off, and let it back on.
The assertions do not depend on timing: an expired window spins at least
its length, which is far over the budget, and a charge spread over many
requests is far under it whatever the machine's load.
"""

from __future__ import annotations

import asyncio

from connection.kick import (POLL_BACKOFF_MAX, POLL_BACKOFF_MIN, POLL_SPIN_BUDGET_NS, POLL_START_NS,
                             KickWaiter)


def _waiter() -> tuple[KickWaiter, memoryview]:
    loop = asyncio.new_event_loop()
    loop.close()   # poll/slept never touch the loop
    k = KickWaiter(loop, None, lambda: None, lambda reason: None)
    avail = memoryview(bytearray(8)).cast("H")   # [0] flags, [1] idx
    return k, avail


def _fail_window(k: KickWaiter, avail: memoryview, last: int, window: int) -> None:
    """A window that expires: nothing arrives while it spins."""
    avail[1] = last
    k.poll_max_ns = k.poll_ns = window
    assert k.poll(avail, last) is False
    assert k.poll_ns == window, "the window itself is left as it was until the charge"


def test_failed_windows_over_budget_turn_polling_off_for_a_backoff() -> None:
    k, avail = _waiter()
    window = 40 * POLL_SPIN_BUDGET_NS          # 8 of these over one request: 5x the budget
    _fail_window(k, avail, 0, window)
    # the next poll (one request served since) charges the whole window: over budget
    avail[1] = 1
    assert k.poll(avail, 1) is False
    assert k.poll_ns == 0
    for _ in range(POLL_BACKOFF_MIN):
        k.slept()                              # short gaps would grow the window...
        assert k.poll_ns == 0                  # ...but not during the back-off
    k.slept()
    assert k.poll_ns == POLL_START_NS          # probing again


def test_backoff_doubles_while_polling_keeps_failing() -> None:
    k, avail = _waiter()
    window = 40 * POLL_SPIN_BUDGET_NS
    expected = POLL_BACKOFF_MIN
    last = 0
    for _ in range(12):
        _fail_window(k, avail, last, window)
        last += 1
        avail[1] = last
        assert k.poll(avail, last) is False
        sleeps = 0
        while k.poll_ns == 0:
            k.slept()
            sleeps += 1
        assert sleeps == expected + 1
        expected = min(POLL_BACKOFF_MAX, expected * 2)


def test_spin_spread_over_many_requests_stays_within_budget() -> None:
    """A window that finds a batch of requests keeps polling on."""
    k, avail = _waiter()
    k.poll_max_ns = k.poll_ns = 1_000_000
    last = 0
    for _ in range(50):
        avail[1] = (last + 1000) & 0xFFFF        # the driver already published 1000 requests
        assert k.poll(avail, last) is True
        last = (last + 1000) & 0xFFFF          # the device served them
    assert k.poll_ns == 1_000_000
    assert k.spin_avg_ns <= POLL_SPIN_BUDGET_NS


def test_no_window_no_charge() -> None:
    """poll-us=0 (or an idle queue): nothing spun, nothing charged, no back-off."""
    k, avail = _waiter()
    k.poll_max_ns = 0
    for last in range(100):
        assert k.poll(avail, last) is False
        k.slept()
        assert k.poll_ns == 0
    assert k.spin_avg_ns == 0
