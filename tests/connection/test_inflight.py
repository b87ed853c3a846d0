"""Inflight tracking: the buffer layout read back raw, the Virtqueue's
bookkeeping, recovery after a back-end crash, and regions a front-end
forged (real memfds)."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

import pytest

from connection.errors import ProtocolError
from connection.inflight import InflightRegion, queue_stride
from connection.protocol import InflightInfo
from connection.virtqueue import QueueConfig, Virtqueue
from tests.connection.test_virtqueue import INDIRECT, Setup

HEADER = struct.Struct("<QHHHH")      # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("<B5xHQ")        # inflight, pad, next, counter


class Raw:
    """An independent mapping of the inflight fd, as the front-end holds it."""

    def __init__(self, region: InflightRegion) -> None:
        self.mm = mmap.mmap(region.fd, region.mmap_size)
        self.stride = region.stride

    def header(self, q: int = 0) -> tuple[int, int, int, int, int]:
        return HEADER.unpack_from(self.mm, q * self.stride)

    def desc(self, head: int, q: int = 0) -> tuple[int, int, int]:
        return DESC.unpack_from(self.mm, q * self.stride + 16 + 16 * head)

    def inflight_heads(self, q: int = 0) -> list[int]:
        n = self.header(q)[2]
        return [i for i in range(n) if self.desc(i, q)[0]]

    def close(self) -> None:
        self.mm.close()


@pytest.fixture
def setup():
    s = Setup()
    yield s
    s.close()


def test_stride_and_layout():
    assert queue_stride(1) == 64
    assert queue_stride(128) == 2112          # ALIGN_UP(16*128 + 16, 64)
    assert queue_stride(256) == 4160
    for n in range(1, 600):                   # same as libvhost-user's 16*n + 2
        assert queue_stride(n) == (16 * n + 2 + 63) // 64 * 64
    assert HEADER.size == DESC.size == 16


def test_create_is_a_sealed_zeroed_memfd():
    region = InflightRegion.create(2, 128)
    try:
        assert region.mmap_size == 2 * 2112 and region.info == InflightInfo(2 * 2112, 0, 2, 128)
        assert os.fstat(region.fd).st_size == region.mmap_size
        seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        assert fcntl.fcntl(region.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with pytest.raises(OSError):
            os.ftruncate(region.fd, 0)
        raw = Raw(region)
        assert raw.mm[:] == bytes(region.mmap_size)
        raw.close()
        assert region.queue(1) is region.queue(1)
        with pytest.raises(ProtocolError, match="queue index 2"):
            region.queue(2)
    finally:
        region.close()
    region.close()                            # idempotent


@pytest.mark.parametrize("num_queues, queue_size, field", [(0, 128, "num_queues"), (1, 0, "queue_size"),
                                                           (1, 40000, "queue_size"), (300, 8, "num_queues")])
def test_create_checks_geometry(num_queues, queue_size, field):
    with pytest.raises(ProtocolError, match=field):
        InflightRegion.create(num_queues, queue_size)


@pytest.mark.parametrize("info, field", [
    (InflightInfo(4160, 0, 2, 256), "mmap_size"),           # needs 2 * 4160
    (InflightInfo(8320, 100, 2, 256), "mmap_offset"),       # not page aligned
    (InflightInfo(8320, 4096, 2, 256), "file size"),        # beyond the file
    (InflightInfo(8320, 0, 0, 256), "num_queues"),
    (InflightInfo(8320, 0, 2, 0), "queue_size"),
])
def test_from_fd_validates_and_consumes_fd(info, field):
    src = InflightRegion.create(2, 256)
    fd = os.dup(src.fd)
    with pytest.raises(ProtocolError, match=field):
        InflightRegion.from_fd(fd, info)
    with pytest.raises(OSError):
        os.fstat(fd)                                        # closed on error
    ok = InflightRegion.from_fd(os.dup(src.fd), src.info)
    ok.queue(0).initialise()
    assert src.queue(0).version == 1                        # same shared buffer
    ok.close()
    src.close()


def test_fetched_and_completed_in_the_raw_buffer():
    region = InflightRegion.create(2, 8)
    raw = Raw(region)
    q = region.queue(1)
    q.initialise(used_idx=5)
    assert raw.header(1) == (0, 1, 8, 0, 5) and raw.header(0) == (0, 0, 0, 0, 0)
    for head in (3, 6, 1):
        q.fetched(head)
    assert raw.inflight_heads(1) == [1, 3, 6]
    assert [raw.desc(h, 1)[2] for h in (3, 6, 1)] == [0, 1, 2]
    q.link_batch([6, 3])                                    # before the ring's used idx store
    assert raw.inflight_heads(1) == [1, 3, 6]
    q.commit_batch([6, 3], 7)                               # after it
    assert raw.inflight_heads(1) == [1]
    features, version, n, last_batch_head, used_idx = raw.header(1)
    assert (last_batch_head, used_idx) == (3, 7)
    assert raw.desc(3, 1)[1] == 6                           # next links the batch
    assert raw.inflight_heads(0) == []                      # queue 0 untouched
    raw.close()
    region.close()


def test_virtqueue_keeps_inflight_current(setup):
    region = InflightRegion.create(1, 8)
    raw = Raw(region)
    q, ring = setup.queue(size=8, inflight=region.queue(0))
    assert raw.header() == (0, 1, 8, 0, 0)                  # fresh: initialised at start
    buf = setup.guest.alloc(64)
    heads = [ring.chain([(buf, 64, True)]) for _ in range(4)]
    chains = [q.pop() for _ in range(4)]
    assert raw.inflight_heads() == sorted(heads)
    assert [raw.desc(h)[2] for h in heads] == [0, 1, 2, 3]   # fetch order
    q.add_used(chains[2].head, 1)
    q.add_used(chains[0].head, 1)
    assert raw.inflight_heads() == sorted(heads)            # nothing published yet
    q.flush()
    assert ring.used[1] == 2
    assert raw.inflight_heads() == sorted([heads[1], heads[3]])
    assert raw.header()[3:] == (heads[0], 2)                # last_batch_head, used_idx
    assert raw.desc(heads[0])[1] == heads[2]
    raw.close()
    region.close()


def _crash(q: QueueConfig) -> None:
    """The back-end dies: no stop, no flush, its fds go away."""
    q.set_kick_fd(None)
    q.set_call_fd(None)
    q.set_err_fd(None)


def _reconnect(setup, ring, region: InflightRegion, base: int) -> Virtqueue:
    """A new back-end process: the same rings, the inflight fd handed back."""
    again = InflightRegion.from_fd(os.dup(region.fd), region.info)
    setup.regions.append(again)
    cfg = QueueConfig(0, 1024, setup.loop)
    cfg.set_size(ring.size)
    cfg.set_addresses(ring.vring_addr(0))
    cfg.set_base(base)
    cfg.set_inflight(again.queue(0))
    setup.configs.append(cfg)
    return cfg.activate(setup.guest.mem, INDIRECT)


@pytest.fixture
def crash_setup(setup):
    setup.regions = []
    yield setup
    for r in setup.regions:
        r.close()


def test_crash_after_publishing_a_batch_before_clearing_it(crash_setup):
    s = crash_setup
    region = InflightRegion.create(1, 8)
    s.regions.append(region)
    q, ring = s.queue(size=8, inflight=region.queue(0))
    buf = s.guest.alloc(64)
    heads = [ring.chain([(buf, 64, True)]) for _ in range(4)]
    for _ in range(4):
        q.pop()
    cfg = s.configs.pop()
    # the first half of flush(): link the batch, publish used idx ... crash
    q.add_used(heads[2], 1)
    q.add_used(heads[0], 1)
    region.queue(0).link_batch([heads[2], heads[0]])
    ring.used[1] = 2
    _crash(cfg)
    raw = Raw(region)
    assert raw.header()[4] == 0 and len(raw.inflight_heads()) == 4   # used_idx != ring used idx

    q2 = _reconnect(s, ring, region, base=0)
    assert raw.header()[4] == 2                             # repaired
    assert raw.inflight_heads() == sorted([heads[1], heads[3]])
    assert q2.last_avail_idx == 4 and q2.inuse == 2         # used_idx + in flight
    assert [q2.pop().head, q2.pop().head] == [heads[1], heads[3]]
    new = ring.chain([(buf, 64, True)])
    assert q2.pop().head == new
    for h in (heads[3], new, heads[1]):
        q2.add_used(h, 1)
    q2.flush()
    assert raw.inflight_heads() == [] and raw.header()[4] == 5
    raw.close()


def test_crash_before_publishing_resubmits_the_whole_batch(crash_setup):
    s = crash_setup
    region = InflightRegion.create(1, 8)
    s.regions.append(region)
    q, ring = s.queue(size=8, inflight=region.queue(0))
    buf = s.guest.alloc(64)
    heads = [ring.chain([(buf, 64, True)]) for _ in range(3)]
    for _ in range(3):
        q.pop()
    cfg = s.configs.pop()
    q.add_used(heads[1], 1)
    region.queue(0).link_batch([heads[1]])                  # linked, never published
    _crash(cfg)
    q2 = _reconnect(s, ring, region, base=0)
    assert [q2.pop().head for _ in range(3)] == heads
    assert q2.pop() is None and ring.used[1] == 0


def test_resubmission_in_counter_order_with_out_of_order_completion(crash_setup):
    s = crash_setup
    region = InflightRegion.create(1, 8)
    s.regions.append(region)
    q, ring = s.queue(size=8, inflight=region.queue(0))
    buf = s.guest.alloc(64)
    order = [5, 2, 7, 0, 3]                                 # head indices in fetch order
    for h in order:
        ring.set_desc(h, buf, 64, 2)
        ring.put(h)
    assert [q.pop().head for _ in order] == order
    q.add_used(0, 1)                                        # complete D and B, out of order
    q.add_used(2, 1)
    q.flush()
    assert ring.used[1] == 2
    ring.set_desc(6, buf, 64, 2)                            # the guest queues more meanwhile
    ring.put(6)
    _crash(s.configs.pop())
    q2 = _reconnect(s, ring, region, base=2)                # QEMU resumes from used idx
    assert q2.last_avail_idx == 5
    got = []
    while (c := q2.pop()) is not None:
        got.append(c.head)
    assert got == [5, 7, 3, 6]                              # A, C, E in counter order, then new
    raw = Raw(region)
    counters = {h: raw.desc(h)[2] for h in got}
    assert counters[6] > max(counters[5], counters[7], counters[3])
    raw.close()


def test_clean_restart_with_nothing_in_flight(crash_setup):
    s = crash_setup
    region = InflightRegion.create(1, 8)
    s.regions.append(region)
    q, ring = s.queue(size=8, inflight=region.queue(0))
    buf = s.guest.alloc(64)
    ring.chain([(buf, 64, True)])
    q.add_used(q.pop().head, 1)
    base = s.configs[0].stop()
    assert base == 1
    q2 = _reconnect(s, ring, region, base=base)
    assert q2.pop() is None and q2.last_avail_idx == 1


def test_fresh_region_keeps_vring_base(crash_setup):
    s = crash_setup
    region = InflightRegion.create(1, 8)
    s.regions.append(region)
    q, ring = s.queue(size=8, base=40, inflight=region.queue(0))
    assert q.last_avail_idx == 40
    assert region.queue(0).version == 1 and region.queue(0).used_idx == 40


def test_inconsistent_region_breaks_the_queue(crash_setup, caplog):
    """What the front-end hands back is its data, like the ring: a region
    that does not check out breaks that queue (clear reason, err fd
    signalled) and nothing in it is used; a region smaller than the ring is
    a configuration error (ProtocolError, the connection ends)."""
    s = crash_setup
    region = InflightRegion.create(1, 8)
    s.regions.append(region)
    region.queue(0).initialise()
    raw = mmap.mmap(region.fd, region.mmap_size)
    struct.pack_into("<H", raw, 10, 16)                     # desc_num: not what we wrote
    cfg, ring = s.queue(size=8, inflight=region.queue(0), start=False)
    q = cfg.activate(s.guest.mem, 0)
    assert q.broken and "desc_num 16" in q.broken_reason and cfg.started
    assert q.pop() is None and os.eventfd_read(s.err[0]) == 1
    cfg.stop()
    struct.pack_into("<HHH", raw, 10, 8, 0, 0)
    ring.used[1] = 100                                      # 100 completions unaccounted for
    q = cfg.activate(s.guest.mem, 0)
    assert q.broken and "used_idx 0 is 100 behind" in q.broken_reason
    cfg.stop()
    small = InflightRegion.create(1, 4)
    s.regions.append(small)
    cfg.set_inflight(small.queue(0))
    with pytest.raises(ProtocolError, match="queue_size 4"):
        cfg.activate(s.guest.mem, 0)
    assert not cfg.started
    raw.close()


def _forge(region: InflightRegion, head: int, counter: int) -> mmap.mmap:
    """Mark ``head`` in flight with ``counter`` in a version-1 region, as a
    hostile front-end can write its own mapping."""
    raw = mmap.mmap(region.fd, region.mmap_size)
    HEADER.pack_into(raw, 0, 0, 1, region.queue_size, 0, 0)
    DESC.pack_into(raw, 16 + 16 * head, 1, 0, counter)
    return raw


@pytest.mark.parametrize("counter", [2**64 - 1, 2**63])
def test_counter_out_of_range_breaks_the_queue_before_use(crash_setup, counter):
    """A counter we cannot count on from (2^64-1 overflowed the next fetch
    with a bare ValueError) breaks the queue at start, with the slot and
    value named; the region is left as it was."""
    s = crash_setup
    region = InflightRegion.create(1, 8)
    s.regions.append(region)
    raw = _forge(region, 3, counter)
    before = bytes(raw)
    cfg, ring = s.queue(size=8, inflight=region.queue(0), start=False)
    q = cfg.activate(s.guest.mem, INDIRECT)
    assert q.broken and q.broken_reason == (f"inflight queue 0: slot 3 counter {counter:#x} "
                                            f"is not below 2^63")
    assert bytes(raw) == before and q.pop() is None
    raw.close()


@pytest.mark.parametrize("forge, field", [
    (lambda raw: DESC.pack_into(raw, 16 + 16 * 5, 1, 0, 2**64 - 1), "slot 5 counter 0xffffffffffffffff"),
    (lambda raw: struct.pack_into("<H", raw, 8, 7), "version 7"),
    (lambda raw: struct.pack_into("<H", raw, 10, 9), "desc_num 9"),
])
def test_forged_region_is_refused_by_set_inflight_fd(forge, field):
    """SET_INFLIGHT_FD checks every queue's region before taking it: the
    fd is closed and the error names the queue, field and value."""
    region = InflightRegion.create(2, 8)
    raw = mmap.mmap(region.fd, region.mmap_size)
    stride = region.stride
    HEADER.pack_into(raw, stride, 0, 1, 8, 0, 0)           # queue 1: a valid version-1 header
    forge(memoryview(raw)[stride:])
    fd = os.dup(region.fd)
    with pytest.raises(ProtocolError, match=f"SET_INFLIGHT_FD: inflight queue 1: {field}"):
        InflightRegion.from_fd(fd, region.info)
    with pytest.raises(OSError):
        os.fstat(fd)                                        # consumed
    raw.close()
    region.close()


def test_closing_the_region_under_a_running_queue_is_safe(crash_setup):
    s = crash_setup
    region = InflightRegion.create(1, 8)
    q, ring = s.queue(size=8, inflight=region.queue(0))
    buf = s.guest.alloc(64)
    ring.chain([(buf, 64, True)])
    chain = q.pop()
    region.close()                                          # e.g. a new SET_INFLIGHT_FD
    q.add_used(chain.head, 1)
    q.flush()                                               # still a valid mapping: no error
    assert ring.used[1] == 1 and not q.broken
