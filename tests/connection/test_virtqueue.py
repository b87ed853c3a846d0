"""Split virtqueue, device side: chains, completion, notification, malicious
guests, kicks.  Real memfds and eventfds; the driver side is the small ring
writer below (independent of frontend/vhost_user.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import mmap
import os
import select
import threading
import time

import pytest
import uvloop
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from connection.inflight import InflightQueue
from connection.memory import GuestMemory
from connection.protocol import MemoryRegion, VirtioFeature, VringAddr
from connection.split_ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, vring_need_event
from connection.virtqueue import DescriptorChain, QueueConfig, Virtqueue, fence

KiB, MiB = 1 << 10, 1 << 20
INDIRECT = int(VirtioFeature.RING_INDIRECT_DESC)
EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)
CANARY = 0xA5


# --------------------------------------------------------------------------
# A tiny driver: guest memory in one memfd, rings written by hand.

class Guest:
    """Guest memory as a VMM shares it.  File layout (canaries are inside
    the device's mappings, since regions are mapped from file offset 0, but
    outside every region)::

        [0, 4K) canary | A: 1M at GPA 0 | 4K canary | B: 1M at GPA 1M | 4K canary

    A and B are adjacent in GPA space (a buffer may straddle them) but not
    in the file, and their QVAs are unrelated to their GPAs."""

    A_OFF = 4 * KiB
    B_OFF = A_OFF + MiB + 4 * KiB
    SIZE = B_OFF + MiB + 4 * KiB
    END = 2 * MiB  # first GPA past guest memory

    def __init__(self) -> None:
        self.fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.SIZE)
        self.host = mmap.mmap(self.fd, self.SIZE)
        self.hv = memoryview(self.host)
        self.hv[:] = bytes([CANARY]) * self.SIZE
        self.hv[self.A_OFF:self.A_OFF + MiB] = bytes(MiB)
        self.hv[self.B_OFF:self.B_OFF + MiB] = bytes(MiB)
        self.regions = [MemoryRegion(0, MiB, 0x7F12_3400_0000, self.A_OFF),
                        MemoryRegion(MiB, MiB, 0x7F99_0000_0000, self.B_OFF)]
        self.mem = GuestMemory()
        for r in self.regions:
            self.mem.add_region(r, os.dup(self.fd))
        self._next = 0x1000

    def off(self, gpa: int) -> int:
        return (self.A_OFF + gpa) if gpa < MiB else (self.B_OFF + gpa - MiB)

    def qva(self, gpa: int) -> int:
        r = self.regions[0] if gpa < MiB else self.regions[1]
        return r.userspace_addr + gpa - r.guest_phys_addr

    def view(self, gpa: int, length: int) -> memoryview:
        o = self.off(gpa)
        return self.hv[o:o + length]

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest memory (split at the A/B boundary, like the guest sees it)."""
        cut = max(0, min(len(data), MiB - gpa)) if gpa < MiB else 0
        if cut:
            self.view(gpa, cut)[:] = data[:cut]
        if cut < len(data):
            self.view(gpa + cut, len(data) - cut)[:] = data[cut:]

    def read(self, gpa: int, length: int) -> bytes:
        cut = max(0, min(length, MiB - gpa)) if gpa < MiB else 0
        return (bytes(self.view(gpa, cut)) if cut else b"") + \
            (bytes(self.view(gpa + cut, length - cut)) if cut < length else b"")

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa < MiB <= gpa + size:
            gpa = MiB
        self._next = gpa + size
        assert self._next <= self.END
        return gpa

    def canaries_intact(self) -> bool:
        spans = [(0, self.A_OFF), (self.A_OFF + MiB, self.B_OFF), (self.B_OFF + MiB, self.SIZE)]
        return all(self.hv[a:b] == bytes([CANARY]) * (b - a) for a, b in spans)

    def close(self) -> None:
        self.mem.clear()
        self.hv.release()
        self.host.close()
        os.close(self.fd)


class DriverRing:
    """Driver side of one split ring in ``Guest`` memory."""

    def __init__(self, guest: Guest, size: int, avail_idx: int = 0) -> None:
        self.g, self.size = guest, size
        self.desc_gpa = guest.alloc(16 * size, 16)
        self.avail_gpa = guest.alloc(6 + 2 * size, 2)
        self.used_gpa = guest.alloc(6 + 8 * size, 4)
        self.desc = guest.view(self.desc_gpa, 16 * size).cast("Q")
        self.avail = guest.view(self.avail_gpa, 6 + 2 * size).cast("H")
        self.used = guest.view(self.used_gpa, 6 + 8 * size).cast("H")
        self.used_elems = guest.view(self.used_gpa + 4, 8 * size).cast("I")
        self.avail[1] = avail_idx
        self.used[1] = avail_idx
        self.next_desc = 0
        self.last_used = avail_idx

    def vring_addr(self, index: int) -> VringAddr:
        return VringAddr(index, 0, self.g.qva(self.desc_gpa), self.g.qva(self.used_gpa),
                         self.g.qva(self.avail_gpa), 0)

    @staticmethod
    def write_desc(table: memoryview, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        table[2 * i] = addr
        table[2 * i + 1] = length | (flags << 32) | (nxt << 48)

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.write_desc(self.desc, i, addr, length, flags, nxt)

    def put(self, head: int) -> None:
        """Publish one head: ring entry first, then the index."""
        idx = self.avail[1]
        self.avail[2 + idx % self.size] = head
        self.avail[1] = (idx + 1) & 0xFFFF

    def chain(self, bufs: list[tuple[int, int, bool]], indirect: bool = False,
              publish: bool = True) -> int:
        """Build a chain of ``(gpa, len, device_writable)`` buffers and
        publish its head; with ``indirect`` the buffers go in a table."""
        if indirect:
            table_gpa = self.g.alloc(16 * len(bufs), 16)
            table = self.g.view(table_gpa, 16 * len(bufs)).cast("Q")
            for k, (addr, length, w) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.write_desc(table, k, addr, length,
                                (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT), k + 1 if not last else 0)
            head = self._take(1)[0]
            self.set_desc(head, table_gpa, 16 * len(bufs), DESC_F_INDIRECT)
        else:
            idxs = self._take(len(bufs))
            for k, (addr, length, w) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.set_desc(idxs[k], addr, length,
                              (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT), 0 if last else idxs[k + 1])
            head = idxs[0]
        if publish:
            self.put(head)
        return head

    def _take(self, n: int) -> list[int]:
        out = [(self.next_desc + k) % self.size for k in range(n)]
        self.next_desc = (self.next_desc + n) % self.size
        return out

    @property
    def used_event(self) -> int:
        return self.avail[2 + self.size]

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.avail[2 + self.size] = value

    @property
    def avail_event(self) -> int:
        return self.used[2 + 4 * self.size]

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        while self.last_used != self.used[1]:
            k = self.last_used % self.size
            out.append((self.used_elems[2 * k], self.used_elems[2 * k + 1]))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def release(self) -> None:
        for v in (self.desc, self.avail, self.used, self.used_elems):
            v.release()


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def eventfd_count(fd: int) -> int:
    """Read (and reset) an eventfd counter; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class Setup:
    """A guest, a loop and queues with real kick/call/err eventfds; the
    driver keeps its own ends (dups) of each eventfd."""

    def __init__(self) -> None:
        self.guest = Guest()
        self.loop = uvloop.new_event_loop()
        self.rings: list[DriverRing] = []
        self.configs: list[QueueConfig] = []
        self.kick: list[int] = []
        self.call: list[int] = []
        self.err: list[int] = []

    def queue(self, size: int = 8, features: int = INDIRECT, base: int = 0,
              inflight: InflightQueue | None = None, start: bool = True,
              name: str = "") -> tuple[Virtqueue, DriverRing]:
        """A configured queue and its ring; started (the running
        ``Virtqueue``) unless ``start=False`` (then see ``configs``)."""
        index = len(self.configs)
        ring = DriverRing(self.guest, size, base)
        q = QueueConfig(index, 1024, self.loop, name=name)
        q.set_size(size)
        q.set_addresses(ring.vring_addr(index))
        q.set_base(base)
        k, c, e = eventfd(), eventfd(), eventfd()
        q.set_kick_fd(os.dup(k))
        q.set_call_fd(os.dup(c))
        q.set_err_fd(os.dup(e))
        q.set_inflight(inflight)
        self.rings.append(ring)
        self.configs.append(q)
        self.kick.append(k)
        self.call.append(c)
        self.err.append(e)
        return (q.activate(self.guest.mem, features) if start else q), ring  # type: ignore[return-value]

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        for q in self.configs:
            q.close()
        for r in self.rings:
            r.release()
        for fd in self.kick + self.call + self.err:
            os.close(fd)
        self.loop.close()
        self.guest.close()


@pytest.fixture
def setup():
    s = Setup()
    yield s
    s.close()


def addr_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def inside_regions(mem: GuestMemory, view: memoryview) -> bool:
    """The view's bytes lie inside one region's guest range of a mapping."""
    start = addr_of(view)
    for r in mem.regions:
        base = addr_of(r.view) + r.mmap_offset
        if base <= start and start + len(view) <= base + r.memory_size:
            return True
    return False


# --------------------------------------------------------------------------
# Chains

def test_direct_chain_is_zero_copy(setup):
    q, ring = setup.queue()
    g = setup.guest
    hdr, data, status = g.alloc(16), g.alloc(4096), g.alloc(1)
    g.write(hdr, b"H" * 16)
    g.write(data, b"D" * 4096)
    head = ring.chain([(hdr, 16, False), (data, 4096, False), (status, 1, True)])
    chain = q.pop()
    assert isinstance(chain, DescriptorChain)
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"H" * 16, b"D" * 4096]
    assert chain.readable_len == 4112 and chain.writable_len == 1
    chain.writable[0][0] = 0x5A                          # device writes into guest memory
    assert g.read(status, 1) == b"\x5a"
    g.write(hdr, b"h" * 16)                              # and sees guest writes: no copy
    assert bytes(chain.readable[0]) == b"h" * 16
    assert q.pop() is None
    assert all(inside_regions(g.mem, v) for v in chain.readable + chain.writable)


def test_indirect_and_mixed_chains(setup):
    q, ring = setup.queue(features=INDIRECT)
    g = setup.guest
    a, b, c = g.alloc(512), g.alloc(512), g.alloc(512)
    g.write(a, b"a" * 512)
    g.write(b, b"b" * 512)
    h1 = ring.chain([(a, 512, False), (b, 512, False), (c, 512, True)], indirect=True)
    chain = q.pop()
    assert chain.head == h1
    assert [bytes(v[:1]) for v in chain.readable] == [b"a", b"b"] and chain.writable_len == 512
    # mixed: one direct descriptor, then an indirect one (spec 2.7.5.3.2)
    table = g.alloc(32)
    tv = g.view(table, 32).cast("Q")
    DriverRing.write_desc(tv, 0, b, 512, DESC_F_NEXT, 1)
    DriverRing.write_desc(tv, 1, c, 512, DESC_F_WRITE)
    ring.set_desc(5, a, 512, DESC_F_NEXT, 6)
    ring.set_desc(6, table, 32, DESC_F_INDIRECT)
    ring.put(5)
    chain = q.pop()
    assert chain.head == 5
    assert [bytes(v[:1]) for v in chain.readable] == [b"a", b"b"]
    assert chain.readable_len == 1024 and chain.writable_len == 512
    tv.release()
    assert not q.broken


def test_indirect_table_ignores_write_flag_on_pointer(setup):
    q, ring = setup.queue(features=INDIRECT)
    g = setup.guest
    a = g.alloc(64)
    head = ring.chain([(a, 64, False)], indirect=True, publish=False)
    ring.set_desc(head, ring.desc[2 * head], 16, DESC_F_INDIRECT | DESC_F_WRITE)
    ring.put(head)
    chain = q.pop()
    assert chain.readable_len == 64 and chain.writable == []


def test_buffer_straddling_two_regions(setup):
    q, ring = setup.queue()
    g = setup.guest
    g.write(MiB - 4, b"abcd")
    g.write(MiB, b"efgh")
    ring.chain([(MiB - 4, 8, False)])
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"abcd", b"efgh"]
    assert chain.readable_len == 8
    assert all(inside_regions(g.mem, v) for v in chain.readable)


def test_ring_index_wraps(setup):
    q, ring = setup.queue(size=4, base=65533)
    g = setup.guest
    buf = g.alloc(64)
    heads = []
    for _ in range(6):
        heads.append(ring.chain([(buf, 64, True)]))
        chain = q.pop()
        assert chain.head == heads[-1]
        q.add_used(chain.head, 64)
        q.flush()
    assert ring.used[1] == (65533 + 6) & 0xFFFF
    assert [h for h, _ in ring.get_used()] == heads
    assert q.last_avail_idx == 3 and not q.broken


def test_pop_stops_at_avail_idx_and_resumes(setup):
    q, ring = setup.queue()
    buf = setup.guest.alloc(64)
    h1 = ring.chain([(buf, 64, False)])
    ring.chain([(buf, 64, False)], publish=False)      # written, not published
    assert q.pop().head == h1
    assert q.pop() is None
    ring.put(1)
    assert q.pop().head == 1


# --------------------------------------------------------------------------
# Completion and notification

def test_used_idx_is_published_once_per_batch(setup):
    q, ring = setup.queue(features=0)
    buf = setup.guest.alloc(64)
    heads = [ring.chain([(buf, 64, True)]) for _ in range(3)]
    chains = [q.pop() for _ in range(3)]
    for c, n in zip(reversed(chains), (10, 20, 30)):   # out of order
        q.add_used(c.head, n)
    assert ring.used[1] == 0                           # nothing published yet
    assert eventfd_count(setup.call[0]) == 0
    q.flush()
    assert ring.used[1] == 3
    assert ring.get_used() == [(heads[2], 10), (heads[1], 20), (heads[0], 30)]
    assert eventfd_count(setup.call[0]) == 1           # one notification per batch
    q.flush()                                          # nothing new: nothing happens
    assert eventfd_count(setup.call[0]) == 0
    assert q.inuse == 0


def test_no_interrupt_flag_without_event_idx(setup):
    q, ring = setup.queue(features=0)
    buf = setup.guest.alloc(64)
    ring.avail[0] = 1                                  # VRING_AVAIL_F_NO_INTERRUPT
    ring.chain([(buf, 64, True)])
    q.add_used(q.pop().head, 1)
    q.flush()
    assert ring.used[1] == 1 and eventfd_count(setup.call[0]) == 0
    ring.avail[0] = 0
    ring.chain([(buf, 64, True)])
    q.add_used(q.pop().head, 1)
    q.flush()
    assert eventfd_count(setup.call[0]) == 1


@pytest.mark.parametrize("event, new, old, expected", [
    (0, 1, 0, True), (0, 0, 0, False), (5, 3, 0, False), (5, 6, 3, True), (5, 5, 3, False),
    (2, 6, 3, False),                                  # the driver asked earlier: already past
    (0xFFFF, 0, 0xFFFE, True), (0xFFFE, 1, 0xFFFF, False),  # u16 wrap-around
    (7, 8, 7, True), (7, 7, 7, False),
])
def test_vring_need_event(event, new, old, expected):
    assert vring_need_event(event, new, old) is expected


def test_split_ring_layout_is_the_spec():
    """virtio 1.x 2.7: the sizes and event-field positions both sides use,
    here for a 256-entry queue, as the one module states them."""
    from connection import split_ring as sr
    assert (sr.DESC.size, sr.DESC.format) == (16, "<QIHH")
    assert sr.DESC.pack(1, 2, sr.DESC_F_NEXT | sr.DESC_F_WRITE, 3) == \
        (1).to_bytes(8, "little") + (2).to_bytes(4, "little") + b"\x03\x00\x03\x00"
    assert (sr.desc_table_size(256), sr.avail_ring_size(256), sr.used_ring_size(256)) == (4096, 518, 2054)
    assert sr.used_event_index(256) * 2 == 4 + 2 * 256            # after avail ring[256]
    assert sr.avail_event_index(256) * 2 == 4 + 8 * 256           # after used ring[256]
    assert (sr.DESC_ALIGN, sr.AVAIL_ALIGN, sr.USED_ALIGN, sr.MAX_QUEUE_SIZE) == (16, 2, 4, 32768)
    import connection.virtqueue as vq
    assert vq.vring_need_event is sr.vring_need_event          # one definition, re-exported


def test_event_idx_suppression(setup):
    q, ring = setup.queue(size=16, features=EVENT_IDX)
    buf = setup.guest.alloc(64)
    ring.avail[0] = 1        # NO_INTERRUPT is ignored with EVENT_IDX
    ring.used_event = 4      # "notify me when used idx passes 4"

    def complete(n: int) -> int:
        for _ in range(n):
            ring.chain([(buf, 64, True)])
        for _ in range(n):
            q.add_used(q.pop().head, 64)
        q.flush()
        return eventfd_count(setup.call[0])

    assert complete(3) == 0  # used idx 0 -> 3: 4 not crossed
    assert complete(3) == 1  # 3 -> 6: crossed (4 in [3, 6))
    assert complete(1) == 0  # 6 -> 7: event 4 is behind
    ring.used_event = 7
    assert complete(1) == 1  # 7 -> 8
    assert ring.used[1] == 8


def test_publish_then_flush_decides_once_over_the_whole_range(setup):
    """publish() makes completions visible without notifying; the next flush()
    applies vring_need_event to everything published since the last decision, so
    a used_event crossed during an earlier publish still gets its notification."""
    q, ring = setup.queue(size=16, features=EVENT_IDX)
    buf = setup.guest.alloc(64)
    ring.used_event = 1      # "notify me when used idx passes 1"
    for _ in range(4):
        ring.chain([(buf, 64, True)])
    chains = [q.pop() for _ in range(4)]
    q.add_used(chains[0].head, 64)
    q.add_used(chains[1].head, 64)
    q.publish()              # 0 -> 2 crosses used_event, but no decision yet
    assert ring.used[1] == 2 and eventfd_count(setup.call[0]) == 0
    q.add_used(chains[2].head, 64)
    q.add_used(chains[3].head, 64)
    q.flush()                # decides over 0 -> 4: one notification
    assert ring.used[1] == 4 and eventfd_count(setup.call[0]) == 1
    assert q.pending == 0
    ring.used_event = 3      # already behind: nothing new to decide
    q.flush()
    assert eventfd_count(setup.call[0]) == 0


def test_notify_on_empty(setup):
    q, ring = setup.queue(features=int(VirtioFeature.NOTIFY_ON_EMPTY))
    buf = setup.guest.alloc(64)
    ring.avail[0] = 1
    ring.chain([(buf, 64, True)])
    ring.chain([(buf, 64, True)])
    c1, c2 = q.pop(), q.pop()
    q.add_used(c1.head, 1)
    q.flush()
    assert eventfd_count(setup.call[0]) == 0           # one still in use
    q.add_used(c2.head, 1)
    q.flush()
    assert eventfd_count(setup.call[0]) == 1           # queue ran empty


def test_stop_returns_next_avail_and_flushes(setup):
    q, ring = setup.queue()
    buf = setup.guest.alloc(64)
    for _ in range(3):
        ring.chain([(buf, 64, True)])
    c1, c2 = q.pop(), q.pop()
    q.add_used(c1.head, 7)
    cfg = setup.configs[0]
    assert cfg.stop() == 2 and cfg.base == 2
    assert ring.used[1] == 1                           # completed work was published
    assert eventfd_count(setup.call[0]) == 1           # and signalled
    assert q.pop() is None and not cfg.started and cfg.running is None
    q.add_used(c2.head, 1)                             # ignored when stopped
    q.flush()
    q.notify()                                         # the fds are the config's now: untouched
    assert ring.used[1] == 1 and eventfd_count(setup.call[0]) == 0
    cfg.set_base(2)
    q2 = cfg.activate(setup.guest.mem, INDIRECT)       # a restart is a new running ring
    assert q2 is not q and cfg.running is q2
    assert q2.pop().head == 2 and q.pop() is None


def test_config_forwards_fds_and_enable_to_the_running_ring(setup):
    q, ring = setup.queue(features=0)
    cfg = setup.configs[0]
    assert q.enabled is False
    cfg.enabled = True
    assert q.enabled is True
    new_call = eventfd()
    cfg.set_call_fd(os.dup(new_call))                 # SET_VRING_CALL on a running ring
    buf = setup.guest.alloc(64)
    ring.chain([(buf, 64, True)])
    q.add_used(q.pop().head, 1)
    q.flush()
    assert eventfd_count(new_call) == 1 and eventfd_count(setup.call[0]) == 0
    cfg.set_call_fd(None)                              # no call fd: nothing to signal, no error
    q.notify()
    assert eventfd_count(new_call) == 0
    os.close(new_call)


def test_remap_after_memory_change(setup):
    q, ring = setup.queue()
    g = setup.guest
    buf = g.alloc(64)
    ring.chain([(buf, 64, True)])
    g.mem.clear()
    for r in g.regions:
        g.mem.add_region(r, os.dup(g.fd))
    setup.configs[0].remap(g.mem)
    chain = q.pop()
    assert chain is not None and not q.broken
    q.add_used(chain.head, 1)
    q.flush()
    assert ring.used[1] == 1
    # a table without the ring's region breaks the queue, nothing else
    g.mem.remove_region(g.regions[0])
    setup.configs[0].remap(g.mem)
    assert q.broken and "desc" in q.broken_reason


def test_start_refuses_unmapped_or_misaligned_rings(setup):
    from connection.errors import ProtocolError
    q, ring = setup.queue(start=False)
    q.set_addresses(VringAddr(0, 0, 0x1234_0000_0000, ring.vring_addr(0).used, ring.vring_addr(0).avail, 0))
    with pytest.raises(ProtocolError, match="desc"):
        q.activate(setup.guest.mem, 0)
    a = ring.vring_addr(0)
    q.set_addresses(a._replace(used=a.used + 2))
    with pytest.raises(ProtocolError, match="used address .* aligned"):
        q.activate(setup.guest.mem, 0)
    with pytest.raises(ProtocolError, match="power of two"):
        q.set_size(3)
    assert not q.started


# --------------------------------------------------------------------------
# Malicious guests: only the offending queue breaks, once, and nothing
# outside guest memory is touched.

def _loop(ring, g):
    buf = g.alloc(64)
    ring.set_desc(0, buf, 64, DESC_F_NEXT, 1)
    ring.set_desc(1, buf, 64, DESC_F_NEXT, 0)
    ring.put(0)


def _long_chain(ring, g):  # a chain of size+1 descriptors in an 8-entry ring is a loop
    buf = g.alloc(64)
    for i in range(ring.size):
        ring.set_desc(i, buf, 64, DESC_F_NEXT, (i + 1) % ring.size)
    ring.put(3)


def _indirect_loop(ring, g):
    buf, table = g.alloc(64), g.alloc(32)
    tv = g.view(table, 32).cast("Q")
    DriverRing.write_desc(tv, 0, buf, 64, DESC_F_NEXT, 1)
    DriverRing.write_desc(tv, 1, buf, 64, DESC_F_NEXT, 0)
    ring.set_desc(0, table, 32, DESC_F_INDIRECT)
    ring.put(0)


def _nested_indirect(ring, g):
    buf, inner, outer = g.alloc(64), g.alloc(16), g.alloc(16)
    DriverRing.write_desc(g.view(inner, 16).cast("Q"), 0, buf, 64, 0)
    DriverRing.write_desc(g.view(outer, 16).cast("Q"), 0, inner, 16, DESC_F_INDIRECT)
    ring.set_desc(0, outer, 16, DESC_F_INDIRECT)
    ring.put(0)


def _next_out_of_range(ring, g):
    ring.set_desc(0, g.alloc(64), 64, DESC_F_NEXT, ring.size)
    ring.put(0)


def _indirect_next_out_of_range(ring, g):
    buf, table = g.alloc(64), g.alloc(32)
    DriverRing.write_desc(g.view(table, 32).cast("Q"), 0, buf, 64, DESC_F_NEXT, 2)
    ring.set_desc(0, table, 32, DESC_F_INDIRECT)
    ring.put(0)


def _avail_jump(ring, g):
    ring.set_desc(0, g.alloc(64), 64)
    ring.avail[2] = 0
    ring.avail[1] = ring.size + 1


def _head_out_of_range(ring, g):
    ring.set_desc(0, g.alloc(64), 64)
    ring.put(ring.size)


def _readable_after_writable(ring, g):
    buf = g.alloc(64)
    ring.set_desc(0, buf, 64, DESC_F_WRITE | DESC_F_NEXT, 1)
    ring.set_desc(1, buf, 64, 0)
    ring.put(0)


def _zero_length(ring, g):
    buf = g.alloc(64)
    ring.set_desc(0, buf, 64, DESC_F_NEXT, 1)
    ring.set_desc(1, buf, 0, DESC_F_WRITE)
    ring.put(0)


def _indirect_and_next(ring, g):
    buf, table = g.alloc(64), g.alloc(16)
    DriverRing.write_desc(g.view(table, 16).cast("Q"), 0, buf, 64, 0)
    ring.set_desc(0, table, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    ring.set_desc(1, buf, 64, 0)
    ring.put(0)


def _indirect_len_not_multiple(ring, g):
    table = g.alloc(32)
    ring.set_desc(0, table, 24, DESC_F_INDIRECT)
    ring.put(0)


def _indirect_len_zero(ring, g):
    ring.set_desc(0, g.alloc(16), 0, DESC_F_INDIRECT)
    ring.put(0)


def _indirect_table_outside(ring, g):
    ring.set_desc(0, Guest.END - 8, 16, DESC_F_INDIRECT)
    ring.put(0)


def _buffer_outside(ring, g):
    ring.set_desc(0, Guest.END + 0x1000, 64, DESC_F_WRITE)
    ring.put(0)


def _buffer_runs_off_memory(ring, g):
    ring.set_desc(0, Guest.END - 8, 16, DESC_F_WRITE)
    ring.put(0)


def _addr_len_overflow(ring, g):
    ring.set_desc(0, 2**64 - 0x10, 0x20, DESC_F_WRITE)
    ring.put(0)


def _huge_length(ring, g):
    ring.set_desc(0, 0x1000, 0xFFFF_FFFF, 0)
    ring.put(0)


MALICIOUS = [
    (_loop, "longer than"),
    (_long_chain, "longer than"),
    (_indirect_loop, "longer than"),
    (_nested_indirect, "nested"),
    (_next_out_of_range, "next 8 out of range"),
    (_indirect_next_out_of_range, "next 2 out of range"),
    (_avail_jump, "more than the queue size"),
    (_head_out_of_range, "head 8 out of range"),
    (_readable_after_writable, "readable descriptor 1 after a writable"),
    (_zero_length, "length 0"),
    (_indirect_and_next, "both INDIRECT and NEXT"),
    (_indirect_len_not_multiple, "multiple of 16"),
    (_indirect_len_zero, "multiple of 16"),
    (_indirect_table_outside, "indirect table"),
    (_buffer_outside, hex(Guest.END + 0x1000)),
    (_buffer_runs_off_memory, hex(Guest.END - 8)),
    (_addr_len_overflow, hex(2**64 - 0x10)),
    (_huge_length, "4294967295"),
]


@pytest.mark.parametrize("attack, reason", MALICIOUS, ids=[f.__name__.strip("_") for f, _ in MALICIOUS])
def test_malicious_chain_breaks_only_its_queue(setup, caplog, attack, reason):
    bad, bad_ring = setup.queue(size=8, features=INDIRECT)
    good, good_ring = setup.queue(size=8, features=INDIRECT)
    g = setup.guest
    buf = g.alloc(64)
    attack(bad_ring, g)
    attack_bytes = bytes(g.hv)
    caplog.set_level(logging.ERROR, logger="vhost.virtqueue")
    for _ in range(3):
        assert bad.pop() is None
    assert bad.broken
    records = [r for r in caplog.records if r.name == "vhost.virtqueue"]
    assert len(records) == 1, records
    msg = records[0].getMessage()
    assert "queue 0 broken" in msg and reason in msg and "\n" not in msg
    assert eventfd_count(setup.err[0]) == 1 and eventfd_count(setup.err[1]) == 0
    assert bad_ring.used[1] == 0
    assert setup.run(bad.wait_kick()) is False
    # the device wrote nothing: not into the guest, not around it
    assert bytes(g.hv) == attack_bytes
    assert g.canaries_intact()
    # the other queue works
    head = good_ring.chain([(buf, 64, True)])
    chain = good.pop()
    assert chain.head == head and not good.broken
    chain.writable[0][:4] = b"good"
    good.add_used(chain.head, 4)
    good.flush()
    assert good_ring.get_used() == [(head, 4)]
    assert g.canaries_intact()


def test_indirect_without_feature_breaks(setup, caplog):
    q, ring = setup.queue(features=0)
    buf = setup.guest.alloc(64)
    ring.chain([(buf, 64, False)], indirect=True)
    assert q.pop() is None and q.broken
    assert "INDIRECT_DESC" in q.broken_reason


def test_total_length_overflowing_u32_breaks():
    """Two 3 GiB buffers inside a (sparse) 6 GiB region: each is valid, the
    chain's total length does not fit the used ring's u32."""
    fd = os.memfd_create("big-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 6 << 30)
    mem = GuestMemory()
    mem.add_region(MemoryRegion(0, 6 << 30, 0x7F00_0000_0000, 0), os.dup(fd))
    host = mmap.mmap(fd, 1 << 20)
    loop = uvloop.new_event_loop()
    cfg = QueueConfig(0, 8, loop)
    try:
        with memoryview(host) as view, view[0:128].cast("Q") as desc, view[128:150].cast("H") as avail:
            DriverRing.write_desc(desc, 0, 1 << 30, 3 << 30, DESC_F_NEXT, 1)
            DriverRing.write_desc(desc, 1, 2 << 30, 3 << 30, DESC_F_WRITE)
            avail[2], avail[1] = 0, 1
        base = 0x7F00_0000_0000
        cfg.set_size(8)
        cfg.set_addresses(VringAddr(0, 0, base, base + 0x1000, base + 128, 0))
        q = cfg.activate(mem, 0)
        assert q.pop() is None and q.broken and "overflows u32" in q.broken_reason
    finally:
        cfg.close()
        loop.close()
        host.close()
        mem.clear()
        os.close(fd)


def test_broken_queue_never_touches_rings(setup, caplog):
    q, ring = setup.queue()
    buf = setup.guest.alloc(64)
    ring.chain([(buf, 64, True)])
    chain = q.pop()
    caplog.set_level(logging.ERROR, logger="vhost.virtqueue")
    q.mark_broken("test")
    q.mark_broken("again")                             # logged once
    assert [r.getMessage() for r in caplog.records] == ["queue 0 broken: test"]
    ring.chain([(buf, 64, True)])
    before = bytes(setup.guest.hv)
    assert q.pop() is None
    q.add_used(chain.head, 1)                          # dropped, as QEMU does
    q.flush()
    cfg = setup.configs[0]
    assert cfg.started                                 # broken is not stopped: GET_VRING_BASE stops
    assert cfg.stop() == 1
    assert bytes(setup.guest.hv) == before and ring.used[1] == 0
    assert q.broken_reason == "test"
    cfg.set_base(1)
    q = cfg.activate(setup.guest.mem, INDIRECT)        # a restart is a healthy new ring
    assert not q.broken and q.pop() is not None


def test_device_name_in_log_line(setup, caplog):
    q, _ = setup.queue(name="blk0")
    caplog.set_level(logging.ERROR, logger="vhost.virtqueue")
    q.mark_broken("why")
    assert caplog.records[0].getMessage() == "device=blk0 queue 0 broken: why"


# --------------------------------------------------------------------------
# Kicks (real eventfds on a uvloop loop)

def test_wait_kick_sleeps_until_kicked_event_idx(setup):
    q, ring = setup.queue(features=EVENT_IDX)
    buf = setup.guest.alloc(64)

    async def scenario():
        assert await q.wait_kick() is True             # start counts as a kick
        assert q.pop() is None
        task = asyncio.ensure_future(q.wait_kick())
        await asyncio.sleep(0)                          # one step: the waiter arms kicks and sleeps
        assert not task.done()
        assert ring.avail_event == q.last_avail_idx == 0   # written before sleeping
        ring.chain([(buf, 64, True)])
        os.eventfd_write(setup.kick[0], 1)
        assert await asyncio.wait_for(task, 1) is True
        assert q.pop() is not None
        # the kick was consumed from the eventfd
        with pytest.raises(BlockingIOError):
            os.eventfd_read(setup.kick[0])

    setup.run(scenario())


def test_wait_kick_toggles_no_notify_without_event_idx(setup):
    q, ring = setup.queue(features=0)
    buf = setup.guest.alloc(64)

    async def scenario():
        await q.wait_kick()
        task = asyncio.ensure_future(q.wait_kick())
        await asyncio.sleep(0)                          # one step: the waiter arms kicks and sleeps
        assert ring.used[0] == 0                       # kicks wanted while sleeping
        ring.chain([(buf, 64, True)])
        os.eventfd_write(setup.kick[0], 1)
        assert await asyncio.wait_for(task, 1) is True
        assert ring.used[0] == 1                       # NO_NOTIFY while busy

    setup.run(scenario())


def test_wait_kick_sees_work_published_before_sleep(setup):
    q, ring = setup.queue(features=EVENT_IDX)
    buf = setup.guest.alloc(64)

    async def scenario():
        await q.wait_kick()
        ring.chain([(buf, 64, True)])                  # no kick at all
        assert await asyncio.wait_for(q.wait_kick(), 1) is True
        assert q.pop() is not None

    setup.run(scenario())


def test_polling_finds_work_without_a_kick(setup):
    """A driver thread publishes during the poll window and never kicks."""
    q, ring = setup.queue(features=EVENT_IDX)
    buf = setup.guest.alloc(64)
    q.poll_max_ns = q.poll_ns = 2_000_000_000          # a long window for the test

    async def scenario():
        await q.wait_kick()
        t = threading.Timer(0.02, lambda: ring.chain([(buf, 64, True)]))
        t.start()
        t0 = time.monotonic()
        assert await asyncio.wait_for(q.wait_kick(), 5) is True
        t.join()
        assert time.monotonic() - t0 < 1.5
        assert q.pop() is not None
        assert eventfd_count(setup.kick[0]) == 0

    setup.run(scenario())


def _pop_all(q):
    """A serve hook: pop everything, complete it, publish."""
    served = []

    def hook():
        while (chain := q.pop()) is not None:
            served.append(chain.head)
            q.add_used(chain.head, 0)
        q.flush()
    return hook, served


def test_a_polling_queue_serves_a_parked_one(setup):
    """Two queues on one loop: while queue 0 spins in its poll window, queue
    1 (asleep, kicks armed) is watched too.  Its kicks are off for the
    window (the driver's own check says no kick is needed), a request on it
    is served from inside queue 0's window, and when the window ends its
    kicks are armed again (avail_event at its next index)."""
    q0, ring0 = setup.queue(features=EVENT_IDX)
    q1, ring1 = setup.queue(features=EVENT_IDX)
    buf0, buf1 = setup.guest.alloc(64), setup.guest.alloc(64)
    hook, served = _pop_all(q1)
    q1.serve_hook = hook
    seen = {}

    def driver():
        time.sleep(0.02)
        old = ring1.avail[1]
        ring1.chain([(buf1, 64, True)])
        fence()
        seen["kick_needed"] = vring_need_event(ring1.avail_event, ring1.avail[1], old)
        deadline = time.monotonic() + 5
        while not served and time.monotonic() < deadline:
            time.sleep(0.001)
        seen["served_before_q0"] = list(served)
        ring0.chain([(buf0, 64, True)])

    async def scenario():
        assert await q0.wait_kick() and await q1.wait_kick()   # the first wait returns at once
        sleeper = asyncio.ensure_future(q1.wait_kick())
        await asyncio.sleep(0)                                  # queue 1 re-arms, parks, sleeps
        assert not sleeper.done()
        assert ring1.avail_event == q1.last_avail_idx
        q0.poll_max_ns = q0.poll_ns = 2_000_000_000
        t = threading.Thread(target=driver)
        t.start()
        assert await asyncio.wait_for(q0.wait_kick(), 10) is True   # found by the poll
        t.join()
        assert q0.pop() is not None
        assert seen["kick_needed"] is False, "queue 1's kicks were not off during the window"
        assert len(seen["served_before_q0"]) == 1, "queue 1 was not served from queue 0's window"
        assert ring1.get_used() == [(served[0], 0)]
        assert ring1.avail_event == q1.last_avail_idx == 1, "queue 1 not re-armed at the window's end"
        assert eventfd_count(setup.kick[1]) == 0
        assert not sleeper.done(), "queue 1's task stays asleep: it was served, not woken"
        q1.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False

    setup.run(scenario())


def test_a_parked_queue_that_breaks_inside_a_window_leaves_the_group(setup):
    """A guest that publishes a malformed chain on a parked queue while
    another queue's window watches it breaks that queue only: it leaves the
    group, its task wakes and ends, and the window goes on serving its own
    queue."""
    q0, ring0 = setup.queue(features=EVENT_IDX)
    q1, ring1 = setup.queue(features=EVENT_IDX)
    buf0 = setup.guest.alloc(64)
    hook, served = _pop_all(q1)
    q1.serve_hook = hook

    def driver():
        time.sleep(0.02)
        ring1.put(ring1.size + 3)             # a head out of range
        deadline = time.monotonic() + 5
        while not q1.broken and time.monotonic() < deadline:
            time.sleep(0.001)
        ring0.chain([(buf0, 64, True)])

    async def scenario():
        await q0.wait_kick()
        await q1.wait_kick()
        sleeper = asyncio.ensure_future(q1.wait_kick())
        await asyncio.sleep(0)
        q0.poll_max_ns = q0.poll_ns = 2_000_000_000
        t = threading.Thread(target=driver)
        t.start()
        assert await asyncio.wait_for(q0.wait_kick(), 10) is True
        t.join()
        assert q1.broken and "out of range" in q1.broken_reason
        assert q1 not in q0._kick.group.parked.values()
        assert await asyncio.wait_for(sleeper, 1) is False
        assert q0.pop() is not None and not q0.broken
        assert served == []

    setup.run(scenario())


class _RequestAtRearm(Virtqueue):
    """A queue whose driver publishes a request just as the watching poll
    re-arms its kicks (after the poll's last look at the ring)."""

    __slots__ = ()
    publish = None

    def _arm_notify(self) -> None:
        publish, type(self).publish = type(self).publish, None
        if publish is not None:
            publish()
        super()._arm_notify()


def test_a_request_between_window_and_rearm_is_served(setup):
    """The re-arm re-checks the ring after its fence: a request published
    after the window's last look but before kicks were on again is served
    then (no kick will ever come for it)."""
    q0, ring0 = setup.queue(features=EVENT_IDX)
    q1, ring1 = setup.queue(features=EVENT_IDX)
    buf1 = setup.guest.alloc(64)
    hook, served = _pop_all(q1)
    q1.serve_hook = hook

    async def scenario():
        await q0.wait_kick()
        await q1.wait_kick()
        sleeper = asyncio.ensure_future(q1.wait_kick())
        await asyncio.sleep(0)                          # queue 1 parked
        q1.__class__ = _RequestAtRearm
        _RequestAtRearm.publish = lambda: ring1.chain([(buf1, 64, True)])
        q0.poll_max_ns = q0.poll_ns = 1_000             # a window that expires at once
        waiter = asyncio.ensure_future(q0.wait_kick())
        await asyncio.sleep(0.01)
        assert _RequestAtRearm.publish is None, "the re-arm did not run"
        assert len(served) == 1 and ring1.get_used() == [(served[0], 0)]
        assert ring1.avail_event == q1.last_avail_idx == 1
        for q in (q0, q1):
            q.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False
        assert await asyncio.wait_for(waiter, 1) is False

    setup.run(scenario())


class _DriverRaces(Virtqueue):
    """A queue whose driver adds a request and kicks right after the
    queue's last look at the ring before sleeping (kicks re-armed, fenced,
    ring re-checked empty)."""

    __slots__ = ()
    race = None

    def _work_before_sleep(self) -> bool:
        work = super()._work_before_sleep()
        race, type(self).race = type(self).race, None
        if not work and race is not None:
            race()
        return work


@pytest.mark.parametrize("when", ["during the serve", "after the re-check"])
def test_a_kick_that_races_an_inline_serve_is_not_lost(setup, when):
    """The kick fd is read after the ring is served (the driver's
    notification comes first) but before kicks are re-armed.  A driver that
    adds a request and kicks while the serve hook runs is served by the
    re-check that follows the re-arm (its kick was consumed); one that does
    so after that re-check is served on its kick, which must still be
    unread."""
    q, ring = setup.queue(features=EVENT_IDX)
    bufs = [setup.guest.alloc(64) for _ in range(2)]
    hook, served = _pop_all(q)

    def race():
        ring.chain([(bufs[1], 64, True)])
        os.eventfd_write(setup.kick[0], 1)

    def hook_with_a_racing_driver():
        hook()
        if when == "during the serve" and len(served) == 1:
            race()

    q.serve_hook = hook_with_a_racing_driver

    async def scenario():
        assert await q.wait_kick() is True      # the first wait returns at once
        sleeper = asyncio.ensure_future(q.wait_kick())
        await asyncio.sleep(0)                  # asleep, kicks armed, parked
        q.__class__ = _DriverRaces
        _DriverRaces.race = race if when == "after the re-check" else None
        ring.chain([(bufs[0], 64, True)])
        os.eventfd_write(setup.kick[0], 1)
        deadline = time.monotonic() + 5
        while len(served) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert len(served) == 2, f"the request added {when} was not served"
        assert eventfd_count(setup.kick[0]) == 0
        assert ring.avail_event == q.last_avail_idx == 2, "not re-armed at the next index"
        assert not sleeper.done(), "served inline: the task stays asleep"
        q.mark_broken("test end")
        assert await asyncio.wait_for(sleeper, 1) is False

    setup.run(scenario())


def test_stopped_queue_is_not_watched(setup):
    """A stopped queue leaves the group: nothing reads its ring afterwards."""
    q0, _ = setup.queue(features=EVENT_IDX)
    q1, _ = setup.queue(features=EVENT_IDX)
    q1.serve_hook = lambda: None

    async def scenario():
        await q1.wait_kick()
        sleeper = asyncio.ensure_future(q1.wait_kick())
        await asyncio.sleep(0)
        assert q1 in q0._kick.group.parked.values()
        setup.configs[1].stop()
        assert await asyncio.wait_for(sleeper, 1) is False
        assert q1 not in q0._kick.group.parked.values()

    setup.run(scenario())


def test_poll_window_adapts(setup):
    q, ring = setup.queue(features=EVENT_IDX)
    buf = setup.guest.alloc(64)
    q.poll_max_ns = 500_000_000       # generous bounds: the test machine may be loaded

    async def scenario():
        await q.wait_kick()
        assert q.poll_ns == 0
        # a kick that comes quickly: polling would have caught it -> grow
        setup.loop.call_soon(lambda: (ring.chain([(buf, 64, True)]), os.eventfd_write(setup.kick[0], 1)))
        await q.wait_kick()
        assert 0 < q.poll_ns <= q.poll_max_ns
        grown = q.poll_ns
        assert q.pop() is not None
        setup.loop.call_soon(lambda: os.eventfd_write(setup.kick[0], 1))
        await q.wait_kick()
        assert q.poll_ns == min(2 * grown, q.poll_max_ns)
        # a long idle sleep -> polling off
        q.poll_max_ns = q.poll_ns = 1_000_000
        setup.loop.call_later(0.05, lambda: os.eventfd_write(setup.kick[0], 1))
        await q.wait_kick()
        assert q.poll_ns == 0

    setup.run(scenario())


def test_stop_and_break_wake_waiters(setup):
    q0, _ = setup.queue()
    q1, _ = setup.queue()

    async def scenario():
        await q0.wait_kick()
        await q1.wait_kick()
        t0 = asyncio.ensure_future(q0.wait_kick())
        t1 = asyncio.ensure_future(q1.wait_kick())
        await asyncio.sleep(0)                          # one step each: both waiters sleep
        assert not t0.done() and not t1.done()
        setup.configs[0].stop()
        q1.mark_broken("test")
        assert await asyncio.wait_for(t0, 1) is False
        assert await asyncio.wait_for(t1, 1) is False
        assert await q0.wait_kick() is False

    setup.run(scenario())


def test_nofd_polling(setup):
    q, ring = setup.queue(features=EVENT_IDX)
    buf = setup.guest.alloc(64)

    async def scenario():
        await q.wait_kick()
        setup.configs[0].set_kick_fd(None)             # NOFD: the ring is polled
        await q.wait_kick()                            # (a new kick fd counts as a kick)
        setup.loop.call_later(0.01, lambda: ring.chain([(buf, 64, True)]))
        assert await asyncio.wait_for(q.wait_kick(), 1) is True
        assert q.pop() is not None

    setup.run(scenario())


def test_kick_fd_is_watched_only_while_started(setup):
    q, ring = setup.queue()
    setup.queue()                                      # a witness: its kick fd stays watched

    async def drained(fd: int) -> None:
        """Until the loop has read ``fd`` (readability checked, nothing read)."""
        deadline = time.monotonic() + 5
        while select.select([fd], [], [], 0)[0]:
            assert time.monotonic() < deadline, f"kick eventfd {fd} was never read"
            await asyncio.sleep(0.001)

    os.eventfd_write(setup.kick[0], 1)
    setup.run(drained(setup.kick[0]))                  # drained on the loop
    setup.configs[0].stop()
    os.eventfd_write(setup.kick[0], 1)
    os.eventfd_write(setup.kick[1], 1)
    setup.run(drained(setup.kick[1]))                  # the loop polled since both kicks
    assert eventfd_count(setup.kick[0]) == 1          # nobody reads a stopped queue's fd


def test_semaphore_kick_fd_breaks_the_queue_instead_of_spinning(setup, caplog):
    """A semaphore-mode eventfd stays readable for ``count`` reads: the
    reader would fire on every loop iteration.  After a bounded number of
    reads per wake-up the queue breaks, and its reader is gone."""
    from connection.kick import KICK_CHECK_EVERY, KICK_READS_PER_WAKE
    sem = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
    q, ring = setup.queue(features=EVENT_IDX)
    setup.configs[0].set_kick_fd(os.dup(sem))
    caplog.set_level(logging.ERROR, logger="vhost.virtqueue")
    os.eventfd_write(sem, 2**64 - 2)                   # the largest count

    async def scenario():
        assert await q.wait_kick() is True             # start counts as a kick
        # a wake-up per single read, then the full drain finds it still readable
        for _ in range(KICK_CHECK_EVERY):
            if not await asyncio.wait_for(q.wait_kick(), 2):
                break
        else:
            raise AssertionError(f"still serving after {KICK_CHECK_EVERY} wake-ups")
        for _ in range(5):
            await asyncio.sleep(0)

    setup.run(scenario())
    assert q.broken and "still readable" in q.broken_reason
    assert f"after {KICK_READS_PER_WAKE} reads" in q.broken_reason
    # one read per wake-up for KICK_CHECK_EVERY - 1 wake-ups, then one
    # wake-up read the bound, then the reader was removed: no more reads
    assert _eventfd_count_of(sem) == 2**64 - 2 - (KICK_CHECK_EVERY - 1) - KICK_READS_PER_WAKE
    assert eventfd_count(setup.err[0]) == 1            # the front-end is told
    os.close(sem)


def _eventfd_count_of(fd: int) -> int:
    """An eventfd's counter without reading it (a semaphore-mode read returns 1)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-count:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"fd {fd} is not an eventfd")


def test_counter_mode_kick_fd_is_read_once_or_twice(setup):
    """A normal eventfd is emptied by one read; a count of 1 costs one
    more read that finds it empty once in KICK_CHECK_EVERY wake-ups.
    Neither breaks the queue."""
    q, ring = setup.queue(features=EVENT_IDX)
    buf = setup.guest.alloc(64)

    async def scenario():
        await q.wait_kick()
        for count in (1, 5, 2**40, *[1] * 20):
            task = asyncio.ensure_future(q.wait_kick())
            await asyncio.sleep(0.005)
            ring.chain([(buf, 64, True)])
            os.eventfd_write(setup.kick[0], count)
            assert await asyncio.wait_for(task, 1) is True
            assert q.pop() is not None
        assert eventfd_count(setup.kick[0]) == 0

    setup.run(scenario())
    assert not q.broken


def test_device_loop_end_to_end(setup):
    """The loop a device runs: wait_kick, pop until empty, complete, flush."""
    q, ring = setup.queue(size=64, features=EVENT_IDX | INDIRECT)
    g = setup.guest
    bufs = [g.alloc(512) for _ in range(8)]
    served: list[int] = []

    async def device():
        while await q.wait_kick():
            while (chain := q.pop()) is not None:
                chain.writable[0][:1] = b"\x01"
                served.append(chain.head)
                q.add_used(chain.head, 1)
            q.flush()

    async def driver():
        heads = []
        for k in range(40):
            heads.append(ring.chain([(bufs[k % 8], 16, False), (bufs[(k + 1) % 8], 1, True)],
                                    indirect=bool(k % 2)))
            if vring_need_event(ring.avail_event, ring.avail[1], (ring.avail[1] - 1) & 0xFFFF):
                os.eventfd_write(setup.kick[0], 1)
            await asyncio.sleep(0)
        deadline = time.monotonic() + 2
        done = []
        while len(done) < 40 and time.monotonic() < deadline:
            done += ring.get_used()
            await asyncio.sleep(0.001)
        setup.configs[0].stop()
        return heads, done

    async def main():
        task = asyncio.ensure_future(device())
        heads, done = await driver()
        await asyncio.wait_for(task, 1)
        return heads, done

    heads, done = setup.run(main())
    assert [h for h, _ in done] == heads == served


# --------------------------------------------------------------------------
# Property: whatever the guest writes, pop() returns chains inside guest
# memory or breaks the queue; nothing escapes.

ADDRS = st.one_of(
    st.integers(0, 2 * MiB - 1),
    st.sampled_from([0, 0x40, MiB - 16, MiB - 8, MiB, 2 * MiB - 64, 2 * MiB - 8, 2 * MiB,
                     2 * MiB + 0x1000, 2**63, 2**64 - 16]),
    st.integers(0, 2**64 - 1),
)
LENS = st.one_of(st.integers(1, 4096), st.sampled_from([0, 1, 8, 15, 16, 32, 48, 64, 0xFFFF_FFFF]),
                 st.integers(0, 2**32 - 1))
FLAGS = st.one_of(st.sampled_from([0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE]), st.integers(0, 7))
NEXTS = st.one_of(st.integers(0, 3), st.integers(0, 20))
DESCS = st.tuples(ADDRS, LENS, FLAGS, NEXTS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([1, 2, 4, 8, 16]),
       descs=st.lists(DESCS, min_size=16, max_size=16),
       table=st.lists(DESCS, min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 20), min_size=16, max_size=16),
       avail_delta=st.one_of(st.integers(0, 4), st.integers(0, 18), st.integers(0, 0xFFFF)),
       base=st.integers(0, 0xFFFF),
       features=st.sampled_from([0, INDIRECT, INDIRECT | EVENT_IDX]))
def test_pop_never_escapes_guest_memory(size, descs, table, heads, avail_delta, base, features):
    avail_idx = (base + avail_delta) & 0xFFFF
    s = Setup()
    try:
        g = s.guest
        ring = DriverRing(g, size, base)
        table_gpa = 0x8000          # a guest-written indirect table the descriptors may point at
        tv = g.view(table_gpa, 128).cast("Q")
        for k, (a, n, f, nx) in enumerate(table):
            DriverRing.write_desc(tv, k, a, n, f, nx)
        tv.release()
        for k in range(size):
            a, n, f, nx = descs[k]
            if f & DESC_F_INDIRECT and k % 2:
                a = table_gpa        # make some indirect descriptors point at the table
                n = (n % 9) * 16
            ring.set_desc(k, a, n, f, nx if nx >= 16 else nx % size)   # mostly in range
        for k in range(size):
            ring.avail[2 + k] = heads[k] if heads[k] >= 16 else heads[k] % size
        ring.avail[1] = avail_idx
        cfg = QueueConfig(0, 64, s.loop)
        cfg.set_size(size)
        cfg.set_addresses(ring.vring_addr(0))
        cfg.set_base(base)
        q = cfg.activate(g.mem, features)
        s.configs.append(cfg)
        s.rings.append(ring)
        before = bytes(g.hv)
        popped = 0
        for _ in range(size + 2):
            chain = q.pop()                  # must never raise
            if chain is None:
                break
            popped += 1
            assert 0 <= chain.head < size
            assert chain.readable_len == sum(map(len, chain.readable))
            assert chain.writable_len == sum(map(len, chain.writable))
            assert chain.readable_len + chain.writable_len <= 0xFFFF_FFFF
            for v in chain.readable + chain.writable:
                assert len(v) > 0 and inside_regions(g.mem, v)
        event(f"popped {min(popped, 3)}{'+' if popped >= 3 else ''} chains, "
              f"{'then broken' if q.broken else 'queue healthy'}")
        pending = (avail_idx - base) & 0xFFFF
        assert q.broken or popped == min(pending, size + 2) or pending > size
        if pending > size:
            assert q.broken
        assert bytes(g.hv) == before and g.canaries_intact()
    finally:
        s.close()


BUF = st.tuples(st.integers(0x20000, 2 * MiB - 1), st.integers(1, 3000))  # rings and tables live below


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains=st.lists(st.tuples(st.lists(BUF, max_size=3), st.lists(BUF, max_size=3), st.booleans()),
                       min_size=1, max_size=6),
       base=st.integers(0, 0xFFFF))
def test_valid_chains_are_returned_exactly(chains, base):
    """Random well-formed chains (direct or indirect, buffers anywhere in
    memory, straddling A/B allowed) come back with exactly their bytes."""
    s = Setup()
    try:
        q, ring = s.queue(size=32, features=INDIRECT, base=base)
        g = s.guest
        expected = []
        for n, (rd, wr, indirect) in enumerate(chains):
            rd = [(min(a, 2 * MiB - ln), ln) for a, ln in rd]
            wr = [(min(a, 2 * MiB - ln), ln) for a, ln in wr]
            if not rd and not wr:
                wr = [(0x20000, 1)]
            bufs = [(a, ln, False) for a, ln in rd] + [(a, ln, True) for a, ln in wr]
            contents = []
            for k, (a, ln, _) in enumerate(bufs):
                data = bytes([(n * 7 + k) % 251 + 1]) * ln
                g.write(a, data)             # later buffers may overlap earlier ones
                contents.append((a, ln))
            head = ring.chain(bufs, indirect=indirect and len(bufs) > 0)
            expected.append((head, rd, wr))
        for head, rd, wr in expected:
            chain = q.pop()
            assert chain is not None, q.broken_reason
            assert chain.head == head
            assert b"".join(chain.readable) == b"".join(g.read(a, ln) for a, ln in rd)
            assert b"".join(chain.writable) == b"".join(g.read(a, ln) for a, ln in wr)
            assert chain.readable_len == sum(ln for _, ln in rd)
            assert chain.writable_len == sum(ln for _, ln in wr)
            assert all(inside_regions(g.mem, v) for v in chain.readable + chain.writable)
            q.add_used(chain.head, chain.writable_len)
        assert q.pop() is None and not q.broken
        q.flush()
        assert [h for h, _ in ring.get_used()] == [h for h, _, _ in expected]
        assert g.canaries_intact()
    finally:
        s.close()
