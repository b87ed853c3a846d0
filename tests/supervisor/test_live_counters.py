"""The device counters page (connection.counters): what crosses from child to parent.

Why: the parent reads memory a hostile child can scribble on.  Whatever the
page holds, reading it must give bounded, well-formed numbers or nothing,
and a new child of the same device must continue the counts, not reset them.
"""

from __future__ import annotations

import os

from connection.counters import (BYTES, ERRORS, HEADER_WORDS, HIST, LATENCY_SUM, MAGIC, MAX_QUEUES, PAGE,
                                 QUEUE_WORDS, REQUESTS, VERSION, CountersPage)


def test_fresh_page_reads_as_nothing_until_a_device_writes_its_header() -> None:
    page = CountersPage("t")
    try:
        assert page.read() is None
        dev = page.for_device(2)
        rep = page.read()
        assert rep is not None and rep.queues == 2
        assert [q.requests for q in rep.per_queue] == [0, 0]
        del dev
    finally:
        page.close()


def test_publish_and_a_new_child_continues_the_counts() -> None:
    page = CountersPage("t")
    try:
        first = page.for_device(1)
        t = first.tally(0)
        t[REQUESTS] += 5                 # all requests
        t[HIST + 1] += 2                 # two of them timed, second bucket
        t[LATENCY_SUM] += 2 * 100_000
        t[BYTES] += 4113 * 5
        t[ERRORS] += 1
        assert page.read().per_queue[0].requests == 0    # not published yet: nothing seen
        first.publish()
        q = page.read().per_queue[0]
        assert (q.requests, q.bytes, q.errors, q.latency_sum_ns) == (5, 4113 * 5, 1, 200_000)
        assert q.buckets == (0, 2, 0, 0, 0, 0)
        # the next child of the same device (same page): continues from there
        second = page.for_device(1)
        t2 = second.tally(0)
        t2[REQUESTS] += 1
        t2[HIST] += 1
        second.publish()
        q = page.read().per_queue[0]
        assert q.requests == 6 and q.buckets == (1, 2, 0, 0, 0, 0) and q.bytes == 4113 * 5
    finally:
        page.close()


def test_a_scribbled_page_gives_bounded_numbers() -> None:
    page = CountersPage("t")
    try:
        words = memoryview(page.map).cast("Q")
        words[0], words[1], words[2] = MAGIC, VERSION, 2**64 - 1     # claims 2^64-1 queues
        for i in range(HEADER_WORDS, PAGE // 8):
            words[i] = 2**64 - 1
        rep = page.read()
        assert rep is not None and rep.queues == MAX_QUEUES and len(rep.per_queue) == MAX_QUEUES
        assert all(0 <= q.requests < 2**64 and len(q.buckets) == QUEUE_WORDS - HIST for q in rep.per_queue)
        words[1] = VERSION + 1
        assert page.read() is None
        words.release()
    finally:
        page.close()


def test_the_page_cannot_be_resized() -> None:
    """Sealed: a child holding the memfd (it holds none) could not shrink it under the parent."""
    import fcntl
    page = CountersPage("t")
    try:
        fd = os.open(f"/proc/self/map_files/{_range(page)}", os.O_RDWR)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
            try:
                os.ftruncate(fd, 0)
            except PermissionError:
                pass
            else:
                raise AssertionError("a sealed counters page was truncated")
        finally:
            os.close(fd)
    finally:
        page.close()


def _range(page: CountersPage) -> str:
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page.map))
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.split()[0]
    raise AssertionError("counters page not in /proc/self/maps")


def test_metrics_listen_addresses() -> None:
    """Loopback or a Unix socket; everything else is a config error naming the key and value."""
    import pytest

    from devices import ConfigError
    from supervisor.prometheus import parse_listen
    assert parse_listen("127.0.0.1:9101").host == "127.0.0.1"
    assert parse_listen("127.8.9.10:9101").port == 9101
    assert parse_listen("[::1]:9101").host == "::1"
    assert parse_listen("localhost:9101").host == "127.0.0.1"
    assert parse_listen("unix:/tmp/m.sock").path == "/tmp/m.sock"
    assert parse_listen("/tmp/m.sock").text == "unix:/tmp/m.sock"
    for bad in ("0.0.0.0:9101", "192.168.1.1:9101", "[::]:9101", "host:9101", "127.0.0.1", "127.0.0.1:0",
                "127.0.0.1:70000", "/no/such/dir/m.sock", ""):
        with pytest.raises(ConfigError) as e:
            parse_listen(bad)
        assert "metrics-listen" in str(e.value)
