"""virtio-blk over vhost-user: a raw image file or block device.

The request path is the hot path a benchmark against qemu-storage-daemon
judges, so it is written for the interpreter: one task per queue, a batch of
chains served synchronously between two awaits, a few notification decisions
per batch (see ``_serve``), ``os.preadv``/``os.pwritev`` straight into and
out of guest memory (no copies), the status byte stored in place, and no
allocation beyond the list slices that carry the data views.  Everything unusual (a header split
across buffers, a short transfer, O_DIRECT with unaligned buffers,
discard, malformed requests) leaves the fast path for a helper.

Synchronous I/O on the loop is deliberate: for a page-cached image a
``preadv`` costs less than handing it to a thread and back.

Requests the guest gets wrong get the virtio status they deserve (IOERR,
UNSUPP); only a chain with no writable byte for the status breaks its queue.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import mmap
import os
import struct
import threading
from time import monotonic_ns
from typing import Any, NamedTuple

from connection.counters import BYTES, ERRORS, HIST, LATENCY_BOUNDS_NS, LATENCY_SUM, REQUESTS, DeviceCounters
from connection.executor import Executor
from connection.protocol import ProtocolFeature, VirtioFeature
from connection.kick import POLL_MAX_NS

from . import diskfile
from .base import DeviceBuilder, QueueTaskDevice
from .devtype import DeviceType
from .options import ConfigError, Option
from .virtio_blk import (CONFIG, F_BLK_SIZE, F_DISCARD, F_FLUSH, F_MQ, F_RO, F_SEG_MAX, F_SIZE_MAX,
                         F_TOPOLOGY, F_WRITE_ZEROES, HEADER, ID_BYTES, S_IOERR, S_OK, S_UNSUPP,
                         SECTOR_SHIFT, SECTOR_SIZE, SEG_FLAG_UNMAP, SEGMENT, T_DISCARD, T_FLUSH,
                         T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, BlkConfig)

log = logging.getLogger("devices.block")

MAX_QUEUES = 16

#: Limits advertised in the config space.  seg_max follows
#: qemu-storage-daemon; size_max only has to be non-zero for Linux.
SEG_MAX = 126
SIZE_MAX = 1 << 20
MAX_DISCARD_SECTORS = 0xFFFFFFFF
MAX_WRITE_ZEROES_SECTORS = 0xFFFFFFFF
#: Segments per DISCARD / WRITE_ZEROES request (max_discard_seg and
#: max_write_zeroes_seg): one by default, as QEMU's block exports and its
#: built-in virtio-blk advertise, since no userspace API submits several
#: ranges in one call; the ``max-discard-segments`` option raises it up to
#: the bound (Linux's own cap on discard segments).
DISCARD_SEGMENTS = 1
DISCARD_SEGMENTS_BOUND = 256
#: Requests served before the driver is notified even if more wait.
MAX_BATCH = 64
#: I/O threads per device with direct=true.
DIRECT_IO_THREADS = 8
#: Bounce buffer per serving thread for O_DIRECT requests whose guest
#: buffers are not aligned: a request moves through it in chunks.
BOUNCE_SIZE = 1 << 20
#: One drain in this many (a power of two) is timed for the latency histogram.
LATENCY_SAMPLE = 8
#: Bytes moved before the used index is published (without a notification)
#: even if more requests wait.
FLUSH_BYTES = 64 << 10
#: Large requests: once this many bytes moved since the last notification
#: decision, one is taken in the middle of a batch as soon as the
#: completions it would signal are ``NOTIFY_AHEAD`` times the chains still
#: waiting on the avail ring (three quarters of what the device holds).  The
#: driver then refills the ring while the rest is copied, so the device
#: neither polls nor sleeps between batches, and the driver still wakes about
#: once per batch (at one half: up to 2.5x as often, and 1.3-1.5x qsd's
#: client CPU per I/O at 1 MiB).  Small requests never reach the byte bound:
#: waking a driver twice per batch of 4 KiB requests costs more than it
#: saves (see ``_serve``).  benchmarks/README.md, block matrix, change 4
#: ("Large requests: a notification before the batch runs out").
NOTIFY_BYTES = 512 << 10
NOTIFY_AHEAD = 3
#: Reads past our config fields (secure-erase, zoned) return zeros, up to
#: this size, because front-ends size the read from their own struct.
CONFIG_READ_LIMIT = 256
#: Not a virtio type: what ``parse_request`` calls a request whose header
#: is shorter than ``HEADER`` (it completes with IOERR).
T_SHORT_HEADER = -1

_unpack_header = HEADER.unpack_from
_HEADER_SIZE = HEADER.size

_RING_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                  | VirtioFeature.RING_EVENT_IDX)


class BlockRequest(NamedTuple):
    """One virtio-blk request, parsed once from its descriptor chain.

    ``data`` are the request's data buffers without the header and the
    status byte: device-writable for IN and GET_ID, device-readable for
    every other type; ``length`` is their size in bytes; ``status`` is a
    one-byte view of the status byte (the chain's last writable byte)."""

    type: int
    sector: int
    data: list
    length: int
    status: memoryview


#: ``BlockRequest(...)`` without the generated ``__new__`` (a Python-level
#: call): this runs once per request on the hot path.
_new_tuple = tuple.__new__


def parse_request(chain: Any) -> BlockRequest | None:
    """The request ``chain`` carries, or None when it has no device-writable
    byte for the status (then nothing can be answered: the queue breaks).

    Written for the hot path: the common shape (the header alone or at the
    start of the first readable buffer) is served here, a split header by
    ``_parse_split_header``."""
    w = chain.writable
    if not w:
        return None
    last = w[-1]
    nlast = len(last) - 1  # index of the status byte
    r = chain.readable
    try:
        rtype, _, sector = _unpack_header(r[0])
    except (IndexError, struct.error):
        return _parse_split_header(chain, last, nlast)
    if rtype == T_IN or rtype == T_GET_ID:
        data = w[:-1]
        if nlast:
            data.append(last[:nlast])
            last = last[nlast:]
        return _new_tuple(BlockRequest, (rtype, sector, data, chain.writable_len - 1, last))
    data = r[1:]
    first = r[0]
    if len(first) != _HEADER_SIZE:
        data.insert(0, first[_HEADER_SIZE:])
    return _new_tuple(BlockRequest, (rtype, sector, data, chain.readable_len - _HEADER_SIZE,
                                     last[nlast:] if nlast else last))


def _parse_split_header(chain: Any, last: memoryview, nlast: int) -> BlockRequest:
    """A header spread over several readable buffers is gathered; one shorter
    than ``HEADER`` gives type ``T_SHORT_HEADER`` (answered with IOERR)."""
    status = last[nlast:] if nlast else last
    r = chain.readable
    n = chain.readable_len
    if n < _HEADER_SIZE:
        return BlockRequest(T_SHORT_HEADER, 0, [], n, status)
    rtype, _, sector = HEADER.unpack(_gather(r, _HEADER_SIZE))
    if rtype == T_IN or rtype == T_GET_ID:
        data = chain.writable[:-1]
        if nlast:
            data.append(last[:nlast])
        return BlockRequest(rtype, sector, data, chain.writable_len - 1, status)
    return BlockRequest(rtype, sector, _skip(r, _HEADER_SIZE), n - _HEADER_SIZE, status)


class BlockDevice(QueueTaskDevice):
    """The device inside the child: serves requestq0..N-1 on one image fd."""

    def __init__(self, ex: Executor, name: str, fd: int, size: int, *, read_only: bool = False,
                 sparse: bool = True, direct: bool = False, block_size: int = SECTOR_SIZE,
                 num_queues: int = 1, disk_id: bytes | None = None,
                 io_threads: int | None = None, poll_max_ns: int = POLL_MAX_NS,
                 discard_segments: int = DISCARD_SEGMENTS, coalesce_kicks: bool = True) -> None:
        super().__init__(ex, name)
        #: max_discard_seg and max_write_zeroes_seg of the config space.
        self.discard_segments = discard_segments
        #: Bound of each queue's adaptive avail-ring polling before it sleeps on
        #: the kick eventfd: QD1 latency bought with CPU (0 = never poll).
        self.poll_max_ns = poll_max_ns
        #: Kick coalescing while a queue does not poll (connection.kick): a
        #: request queue's requests do not wait for each other.
        self.coalesce_kicks = coalesce_kicks
        self.fd = fd
        self.size = size - size % SECTOR_SIZE  # bytes the guest may address
        self.capacity = self.size >> SECTOR_SHIFT
        self.read_only = read_only
        self.sparse = sparse and not read_only
        self.direct = direct
        self.block_size = block_size
        self.num_queues = num_queues
        self.disk_id = disk_id
        #: No FLUSH negotiated means no write cache: writes are stable on completion.
        self.writethrough = True
        self._warned: set[int] = set()
        self._config = self._build_config()
        #: With O_DIRECT every request waits for the disk, so requests go to
        #: a few threads and complete out of order; page-cached I/O is
        #: cheaper served inline than handed to a thread.
        self.io_threads = (io_threads if io_threads is not None
                           else (DIRECT_IO_THREADS if direct else 0))
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._pooled: dict[int, _PooledQueue] = {}
        #: Per-thread bounce buffer (see ``_bounce_buffer``).
        self._bounce = threading.local()
        self._bounce_failed = False
        self._oom_logged = False
        #: The device's own I/O counters (connection.counters): private until
        #: the supervisor attaches its shared page.
        self.counters = DeviceCounters.private(num_queues)
        self._syncs: dict[int, Any] = {}   # queue -> store its serving closure's totals in the tally

    def attach_counters(self, counters: DeviceCounters) -> None:
        """Count into ``counters`` (the supervisor's page) from the next queue start."""
        self.counters = counters

    def publish_counters(self) -> None:
        """Copy the running totals to the counters page (cold path: heartbeat, queue stop)."""
        for sync in self._syncs.values():
            sync()
        self.counters.publish()

    # ---------------------------------------------------------------- virtio

    def max_queue_num(self) -> int:
        return self.num_queues

    def features(self) -> int:
        f = int(_RING_FEATURES) | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_MQ
        if self.read_only:
            f |= F_RO
        if self.sparse:
            f |= F_DISCARD | F_WRITE_ZEROES
        return f

    def protocol_features(self) -> int:
        return int(ProtocolFeature.CONFIG)

    def ack_features(self, features: int) -> None:
        super().ack_features(features)
        self.writethrough = not features & F_FLUSH

    def _build_config(self) -> bytes:
        align = max(self.block_size >> SECTOR_SHIFT, 1)
        return CONFIG.pack(*BlkConfig(
            capacity=self.capacity, size_max=SIZE_MAX, seg_max=SEG_MAX,
            cylinders=0, heads=0, sectors=0,          # geometry (not offered)
            blk_size=self.block_size,
            physical_block_exp=0, alignment_offset=0, min_io_size=1, opt_io_size=1,
            writeback=1, unused0=0,                   # writeback: only meaningful with CONFIG_WCE
            num_queues=self.num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS, max_discard_seg=self.discard_segments,
            discard_sector_alignment=align,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS, max_write_zeroes_seg=self.discard_segments,
            write_zeroes_may_unmap=1,
        ))

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > CONFIG_READ_LIMIT:
            raise ValueError(f"config read offset {offset} size {size} outside [0, {CONFIG_READ_LIMIT})")
        data = self._config[offset:offset + size]
        return data + bytes(size - len(data))

    def start_queue(self, index: int, queue: Any, mem: Any) -> None:
        queue.poll_max_ns = self.poll_max_ns
        queue.coalesce_kicks = self.coalesce_kicks
        if self.io_threads:
            pooled = _PooledQueue(self, index, queue)
            self._spawn(index, queue, pooled.serve())  # stops an older one first
            self._pooled[index] = pooled
        else:
            self._spawn(index, queue, self._serve(index, queue))

    def stop_queue(self, index: int) -> None:
        super().stop_queue(index)
        pooled = self._pooled.pop(index, None)
        if pooled is not None:
            pooled.stop()
        sync = self._syncs.pop(index, None)
        if sync is not None:
            sync()
        self.counters.publish()

    def reset(self) -> None:
        super().reset()
        for index in list(self._pooled):
            self.stop_queue(index)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The I/O threads, made on first use (in the child, after the jail)."""
        if self._threads is None and self.io_threads:
            self._threads = concurrent.futures.ThreadPoolExecutor(
                self.io_threads, thread_name_prefix=f"{self.name}-io")
        return self._threads

    # ------------------------------------------------------------- hot path

    async def _serve(self, qi: int, queue: Any) -> None:
        """One queue: drain the avail ring, publish and notify per batch, wait.

        Notification policy (measured in benchmarks/README.md): the used idx
        is published (one store, no notification) every ``FLUSH_BYTES``
        moved, so a driver that is awake can take completions early; the
        notification decision (``flush()``: one ``vring_need_event`` over
        everything published since the last decision, at most one eventfd
        write) is taken at the end of the batch, or every ``MAX_BATCH``
        requests, and for large requests (``NOTIFY_BYTES``) once three
        quarters of what the device holds is done, so the driver refills
        the ring before it runs dry.  A half-way notification for every
        request size was dropped: under libblkio it woke the driver about
        twice per batch (client CPU per I/O 1.8-2x qemu-storage-daemon's,
        1.0x without).  A queue-depth-1 driver is still notified after
        every request.

        Wake-up path: while this task sleeps in ``wait_kick``, the queue's
        ``serve_hook`` (the drain below) runs straight from the kick fd's
        reader callback, so a kick costs no future, task step or coroutine
        resumption; the task only serves the first batch, in-band kicks and
        the NOFD mode, and ends when the queue stops or breaks."""
        pop = queue.pop
        add_used = queue.add_used
        flush = queue.flush
        handle = self._handle
        wait_kick = queue.wait_kick
        publish = queue.publish
        # Counters (connection.counters): running totals in this closure's
        # cells (the cheapest add there is), stored into the queue's tally by
        # ``sync`` on the cold path (``publish_counters``, ``stop_queue``).
        # Requests are added at each notification decision, never per
        # request.  Latency is sampled: a drain that starts with the request
        # count a multiple of LATENCY_SAMPLE is timed, and the requests of its
        # first batch go to the histogram (from the start of the drain, when
        # they were waiting, to the decision that makes them visible to the
        # driver).  Timing every drain would cost a QD1 request more than the
        # rest of the counting (benchmarks/README.md, "Device counters").
        tally = self.counters.tally(qi)
        reqs = tally[REQUESTS]
        nbytes = tally[BYTES]
        b0, b1, b2, b3, b4 = LATENCY_BOUNDS_NS
        sample = LATENCY_SAMPLE - 1

        def sync() -> None:
            tally[REQUESTS] = reqs
            tally[BYTES] = nbytes

        self._syncs[qi] = sync

        def drain() -> None:
            nonlocal reqs, nbytes
            n = 0        # completions since the last notification decision
            moved = 0    # bytes in this drain
            mark = 0     # ``moved`` at the last publication
            told = 0     # ``moved`` at the last notification decision
            timed = not reqs & sample
            t0 = monotonic_ns() if timed else 0
            while (chain := pop()) is not None:
                try:
                    written = handle(chain, qi)
                except MemoryError:  # over memory-limit=: this request fails, not the queue
                    written = self._over_budget(chain, qi)
                if written < 0:
                    queue.mark_broken("block request without a status byte")
                    break
                add_used(chain.head, written)
                n += 1
                moved += written + chain.readable_len
                if n < MAX_BATCH:
                    if moved - mark < FLUSH_BYTES:
                        continue
                    mark = moved
                    # Every FLUSH_BYTES: publish; a large batch three quarters
                    # done also gets a notification decision (NOTIFY_BYTES).
                    if moved - told < NOTIFY_BYTES or n < queue.waiting * NOTIFY_AHEAD:
                        publish()
                        continue
                flush()
                told = mark = moved
                reqs += n
                if timed:   # the drain's first batch only: later ones arrived after t0
                    dt = monotonic_ns() - t0
                    tally[LATENCY_SUM] += dt * n
                    tally[(HIST if dt <= b0 else HIST + 1) if dt <= b1 else
                          (HIST + 2 if dt <= b2 else HIST + 3 if dt <= b3 else HIST + 4 if dt <= b4
                           else HIST + 5)] += n
                    timed = False
                n = 0
            flush()
            if n:
                reqs += n
                if timed:
                    dt = monotonic_ns() - t0
                    tally[LATENCY_SUM] += dt * n
                    tally[(HIST if dt <= b0 else HIST + 1) if dt <= b1 else
                          (HIST + 2 if dt <= b2 else HIST + 3 if dt <= b3 else HIST + 4 if dt <= b4
                           else HIST + 5)] += n
            nbytes += moved

        self._hook(qi, queue, drain)
        try:
            while await wait_kick():
                drain()
        finally:
            if queue.serve_hook is drain:
                queue.serve_hook = None

    def _handle(self, chain: Any, qi: int) -> int:
        """Serve one request; return the used length, or -1 if the chain has
        no status byte (the queue must be broken).  IN and OUT are served
        here, in one path, the rest by ``_other``."""
        req = parse_request(chain)
        if req is None:
            self._bad(qi, "no device-writable status byte")
            return -1
        rtype, sector, bufs, total, status = req
        if rtype == T_IN:
            read, transfer = True, os.preadv
        elif rtype == T_OUT:
            if self.read_only:
                self._bad(qi, "OUT on a read-only disk")
                status[0] = S_IOERR
                return 1
            read, transfer = False, os.pwritev
        else:
            return self._other(qi, req)
        offset = sector << SECTOR_SHIFT
        if total & (SECTOR_SIZE - 1) or offset + total > self.size:
            self._bad(qi, f"{'IN' if read else 'OUT'} sector {sector} length {total} "
                          f"outside the disk or not sector-sized")
            status[0] = S_IOERR
            return 1
        try:
            n = transfer(self.fd, bufs, offset)
            if n != total:
                self._finish(transfer, bufs, offset, n, total)
        except OSError as exc:
            if not self._direct_retry(exc, read, bufs, offset, total):
                self._failed(qi)
                status[0] = S_IOERR
                return 1
        if read:
            status[0] = S_OK
            return total + 1
        if self.writethrough:
            try:
                os.fdatasync(self.fd)
            except OSError:
                self._failed(qi)
                status[0] = S_IOERR
                return 1
        status[0] = S_OK
        return 1

    # ----------------------------------------------------------- rare paths

    def _handle_or_ioerr(self, chain: Any, qi: int) -> int:
        """``_handle`` for the I/O threads and the pooled queue (the inline
        drain has the same ``try`` in its loop)."""
        try:
            return self._handle(chain, qi)
        except MemoryError:
            return self._over_budget(chain, qi)

    def _over_budget(self, chain: Any, qi: int) -> int:
        """An allocation failed (the device's ``memory-limit=``): IOERR for
        this request; the queue and the device go on."""
        if not self._oom_logged:  # once: a guest near the budget could repeat it forever
            self._oom_logged = True
            log.warning("device=%s queue=%d out of memory (memory-limit=) serving a request; "
                        "it and any later one that runs out get IOERR", self.name, qi)
        w = chain.writable
        if not w:
            return -1
        last = w[-1]
        last[len(last) - 1] = S_IOERR
        return 1

    def _failed(self, qi: int) -> None:
        """Count a request answered with an error (rare path; counters.ERRORS)."""
        self.counters.tally(qi)[ERRORS] += 1

    def _bad(self, qi: int, what: str) -> None:
        """Log a malformed request once per queue (a guest can send millions); count it."""
        self._failed(qi)
        if qi not in self._warned:
            self._warned.add(qi)
            log.warning("device=%s queue=%d bad request: %s (further ones on this queue not logged)",
                        self.name, qi, what)

    def _finish(self, fn: Any, bufs: list, offset: int, done: int, total: int) -> None:
        """Complete a short preadv/pwritev (signals, huge requests)."""
        while done < total:
            rest = []
            skip = done
            for b in bufs:
                n = len(b)
                if skip >= n:
                    skip -= n
                    continue
                rest.append(b[skip:] if skip else b)
                skip = 0
            n = fn(self.fd, rest, offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short transfer at byte {offset + done}")
            done += n

    def _direct_retry(self, exc: OSError, read: bool, bufs: list, offset: int, total: int) -> bool:
        """O_DIRECT refuses guest buffers that are not aligned for the host
        device: go through an aligned bounce buffer.  True if it worked.

        The bounce is ``BOUNCE_SIZE`` bytes per serving thread, reused, and
        the request moves through it a chunk at a time: a chain that lists
        one guest buffer a thousand times costs the device one chunk, not
        the request's length (its size is never the guest's to choose)."""
        if not (self.direct and exc.errno == errno.EINVAL and total):
            return False
        bounce = self._bounce_buffer()
        if bounce is None:
            return False
        try:
            done = 0
            pieces = _Cursor(bufs)
            while done < total:
                n = min(BOUNCE_SIZE, total - done)
                chunk = bounce[:n]
                try:
                    if read:
                        self._finish(os.preadv, [chunk], offset + done, 0, n)
                        pieces.copy(chunk, to_guest=True)
                    else:
                        pieces.copy(chunk, to_guest=False)
                        self._finish(os.pwritev, [chunk], offset + done, 0, n)
                finally:
                    chunk.release()
                done += n
        except OSError:
            return False
        return True

    def _bounce_buffer(self) -> memoryview | None:
        """This thread's page-aligned bounce buffer (made on first use; the
        loop thread and each I/O thread have one, so at most
        ``1 + io_threads`` exist).  Private anonymous memory, so it counts
        against the device's RLIMIT_DATA: None if over budget."""
        view = getattr(self._bounce, "view", None)
        if view is None:
            try:
                buf = mmap.mmap(-1, BOUNCE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except OSError as exc:
                if not self._bounce_failed:  # once: a guest can retry forever
                    self._bounce_failed = True
                    log.warning("device=%s cannot map a %d-byte bounce buffer (memory-limit?): %s; "
                                "unaligned O_DIRECT requests fail with IOERR", self.name, BOUNCE_SIZE, exc)
                return None
            view = self._bounce.view = memoryview(buf)
        return view

    def _other(self, qi: int, req: BlockRequest) -> int:
        """Everything but IN and OUT."""
        rtype, _, data, length, status = req
        if rtype == T_FLUSH:
            if not self.read_only:
                try:
                    os.fdatasync(self.fd)
                except OSError:
                    self._failed(qi)
                    status[0] = S_IOERR
                    return 1
            status[0] = S_OK
            return 1

        if rtype == T_GET_ID:
            if self.disk_id is None:
                status[0] = S_UNSUPP
                return 1
            ident = self.disk_id.ljust(ID_BYTES, b"\0")
            pos = 0
            for v in data:
                n = min(len(v), ID_BYTES - pos)
                if n <= 0:
                    break
                v[:n] = ident[pos:pos + n]
                pos += n
            status[0] = S_OK
            return pos + 1

        if rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
            status[0] = self._discard(qi, req)
            return 1

        if rtype == T_SHORT_HEADER:
            self._bad(qi, f"request header of {length} bytes, expected {HEADER.size}")
            status[0] = S_IOERR
            return 1

        self._bad(qi, f"unsupported request type {rtype}")
        status[0] = S_UNSUPP
        return 1

    def _discard(self, qi: int, req: BlockRequest) -> int:
        """DISCARD -> punch a hole; WRITE_ZEROES -> zero range (or punch a
        hole when the driver allows unmapping).  Returns the status."""
        rtype, _, data, dlen, _ = req
        name = "DISCARD" if rtype == T_DISCARD else "WRITE_ZEROES"
        if self.read_only:
            self._bad(qi, f"{name} on a read-only disk")
            return S_IOERR
        if not self.sparse:
            self._bad(qi, f"{name} not offered (sparse=false)")
            return S_UNSUPP
        if dlen <= 0 or dlen % SEGMENT.size:
            self._bad(qi, f"{name} with {dlen} bytes of segments (not whole 16-byte segments)")
            return S_IOERR
        if dlen // SEGMENT.size > self.discard_segments:
            # More ranges than the config space offers: a command this device
            # does not support (QEMU answers UNSUPP too), not a failed one.
            self._bad(qi, f"{name} with {dlen // SEGMENT.size} segments, at most {self.discard_segments}")
            return S_UNSUPP
        raw = _gather(data, dlen)  # dlen is bounded above
        segments = [SEGMENT.unpack_from(raw, i) for i in range(0, dlen, SEGMENT.size)]
        for sector, count, flags in segments:
            if flags & ~SEG_FLAG_UNMAP or (rtype == T_DISCARD and flags & SEG_FLAG_UNMAP):
                self._bad(qi, f"{name} segment flags {flags:#x} not supported")
                return S_UNSUPP
            if (sector + count) << SECTOR_SHIFT > self.size:
                self._bad(qi, f"{name} sector {sector} count {count} outside the disk")
                return S_IOERR
        for sector, count, flags in segments:
            if not count:
                continue
            offset, length = sector << SECTOR_SHIFT, count << SECTOR_SHIFT
            try:
                if rtype == T_DISCARD:
                    self._punch(offset, length, must_zero=False)
                elif flags & SEG_FLAG_UNMAP:
                    self._punch(offset, length, must_zero=True)
                else:
                    self._zero(offset, length)
            except OSError as exc:
                self._bad(qi, f"{name} at byte {offset} length {length} failed: {exc}")
                return S_IOERR
        if self.writethrough:
            try:
                os.fdatasync(self.fd)
            except OSError:
                self._failed(qi)
                return S_IOERR
        return S_OK

    def _punch(self, offset: int, length: int, must_zero: bool) -> None:
        try:
            diskfile.fallocate(self.fd, diskfile.FALLOC_FL_PUNCH_HOLE | diskfile.FALLOC_FL_KEEP_SIZE,
                               offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if must_zero:
                self._zero(offset, length)
            # a discard is a hint: a file system that cannot punch holes ignores it

    def _zero(self, offset: int, length: int) -> None:
        try:
            diskfile.fallocate(self.fd, diskfile.FALLOC_FL_ZERO_RANGE | diskfile.FALLOC_FL_KEEP_SIZE,
                               offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        try:  # e.g. tmpfs: no ZERO_RANGE, but holes read as zeros
            diskfile.fallocate(self.fd, diskfile.FALLOC_FL_PUNCH_HOLE | diskfile.FALLOC_FL_KEEP_SIZE,
                               offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        chunk = bytes(min(length, 1 << 20))
        view = memoryview(chunk)
        done = 0
        while done < length:
            done += os.pwrite(self.fd, view[:min(len(chunk), length - done)], offset + done)


class _PooledQueue:
    """One queue served through the device's I/O threads (direct=true).

    The loop pops and submits; each request runs ``BlockDevice._handle`` in
    a thread (the status byte is stored there); completions come back to the
    loop, which adds them to the used ring and publishes once per loop
    iteration.  ``stop`` waits for the requests still running, so no thread
    touches guest memory after ``stop_queue`` returns, and completes them
    into the ring before the handler stops it.
    """

    def __init__(self, dev: BlockDevice, qi: int, queue: Any) -> None:
        self.dev = dev
        self.qi = qi
        self.queue = queue
        self.loop = dev.ex.loop
        self.running: dict[concurrent.futures.Future, int] = {}
        self.active = True
        self._flush_scheduled = False

    async def serve(self) -> None:
        queue = self.queue
        pop = queue.pop
        handle = self.dev._handle_or_ioerr
        qi = self.qi
        while await queue.wait_kick():
            chain = pop()
            while chain is not None:
                nxt = pop()
                if nxt is None:
                    # The last request of the batch runs here while the
                    # threads run the others: at queue depth 1 there is no
                    # thread hand-off at all.
                    written = handle(chain, qi)
                    if written < 0:
                        queue.mark_broken("block request without a status byte")
                        return
                    t = self.dev.counters.tally(qi)   # not timed: served beside the threads
                    t[REQUESTS] += 1
                    t[BYTES] += written + chain.readable_len
                    queue.add_used(chain.head, written)
                    queue.flush()
                    break
                self._submit(chain)
                chain = nxt

    def _submit(self, chain: Any) -> None:
        pool = self.dev._pool()
        try:
            fut = pool.submit(self.dev._handle_or_ioerr, chain, self.qi)  # type: ignore[union-attr]
        except RuntimeError:  # no threads here (rlimit, policy): serve inline
            log.warning("device=%s queue=%d cannot start I/O threads; serving inline",
                        self.dev.name, self.qi)
            self._complete(chain.head, self.dev._handle_or_ioerr(chain, self.qi))
            return
        self.running[fut] = chain.head
        fut.add_done_callback(self._done_in_thread)

    def _done_in_thread(self, fut: concurrent.futures.Future) -> None:
        try:
            self.loop.call_soon_threadsafe(self._done, fut)
        except RuntimeError:  # loop closed: stop() already accounted for it
            pass

    def _done(self, fut: concurrent.futures.Future) -> None:
        head = self.running.pop(fut, None)
        if head is None or not self.active:
            return
        try:
            written = fut.result()
        except Exception as exc:  # noqa: BLE001 - a bug, not the guest: break this queue
            log.error("device=%s queue=%d request failed: %r", self.dev.name, self.qi, exc)
            written = -1
        self._complete(head, written)

    def _complete(self, head: int, written: int) -> None:
        if written < 0:
            self.queue.mark_broken("block request without a status byte")
            return
        t = self.dev.counters.tally(self.qi)
        t[REQUESTS] += 1
        t[BYTES] += written   # the device-written part (the chain is gone with the thread)
        self.queue.add_used(head, written)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.active:
            self.queue.flush()

    def stop(self) -> None:
        """Wait for the running requests and complete them into the ring."""
        self.active = False
        running = dict(self.running)
        self.running.clear()
        if running:
            concurrent.futures.wait(list(running))
        for fut, head in running.items():
            try:
                written = fut.result()
            except Exception:  # noqa: BLE001
                written = -1
            if written >= 0:
                self.queue.add_used(head, written)
        self.queue.flush()


class _Cursor:
    """Walks guest views in order, copying one bounce chunk at a time to or
    from them, so nothing is ever joined into a buffer of the request's size."""

    __slots__ = ("bufs", "i", "pos")

    def __init__(self, bufs: list) -> None:
        self.bufs = bufs
        self.i = 0
        self.pos = 0

    def copy(self, chunk: memoryview, to_guest: bool) -> None:
        filled = 0
        n = len(chunk)
        bufs = self.bufs
        while filled < n:
            b = bufs[self.i]
            pos = self.pos
            take = min(len(b) - pos, n - filled)
            if to_guest:
                b[pos:pos + take] = chunk[filled:filled + take]
            else:
                chunk[filled:filled + take] = b[pos:pos + take]
            filled += take
            pos += take
            if pos >= len(b):
                self.i += 1
                pos = 0
            self.pos = pos


def _gather(views: list, count: int) -> bytes:
    """The first ``count`` bytes of ``views`` as one small bytes object (a
    split header, discard segments): copies ``count`` bytes whatever the
    number or size of the views."""
    out = bytearray()
    for v in views:
        need = count - len(out)
        if need <= 0:
            break
        out += v[:need]
    return bytes(out)


def _skip(views: list, count: int) -> list:
    """The views after their first ``count`` bytes."""
    out = []
    for v in views:
        n = len(v)
        if count >= n:
            count -= n
            continue
        out.append(v[count:] if count else v)
        count = 0
    return out


# --------------------------------------------------------------------------
# Builder

class BlockBuilder(DeviceBuilder):
    """Opens (and locks) the image in the parent; builds a BlockDevice in the child."""

    def __init__(self, name: str, path: str, fd: int, size: int, *, read_only: bool, sparse: bool,
                 direct: bool, block_size: int, num_queues: int, disk_id: bytes | None,
                 poll_max_ns: int = POLL_MAX_NS, discard_segments: int = DISCARD_SEGMENTS,
                 coalesce_kicks: bool = True) -> None:
        self.name = name
        self.discard_segments = discard_segments
        self.poll_max_ns = poll_max_ns
        self.coalesce_kicks = coalesce_kicks
        self.path = path
        self.fd = fd
        self.size = size
        self.read_only = read_only
        self.sparse = sparse
        self.direct = direct
        self.block_size = block_size
        self.num_queues = num_queues
        self.disk_id = disk_id

    @classmethod
    def from_options(cls, name: str, options: dict[str, str]) -> "BlockBuilder":
        """Check the options (``OPTIONS``), open and lock the image."""
        o = cls.declaration.parse(name, options)
        path: str = o["path"]
        read_only: bool = o["ro"]
        direct: bool = o["direct"]
        block_size: int = o["block-size"]
        disk_id = None if o["id"] is None else o["id"].encode()
        try:
            fd, resolved = diskfile.open_image(name, path, read_only=read_only, direct=direct)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise ConfigError(f"{path} does not support O_DIRECT", "direct", name, "true") from None
            raise ConfigError(f"cannot open {'read-only' if read_only else 'read-write'}: {exc.strerror}",
                              "path", name, path) from None
        log.info("device=%s path=%r resolved to %s (opened once; later changes to the path are not followed)",
                 name, path, resolved)
        try:
            if o["lock"]:
                try:
                    diskfile.lock_image(fd, resolved, writable=not read_only)
                except diskfile.LockError as exc:
                    raise ConfigError(str(exc.strerror), "lock", name, "true") from None
            size = diskfile.file_size(fd)
            if size < block_size:
                raise ConfigError(f"the image is {size} bytes, smaller than block-size={block_size}",
                                  "path", name, path)
        except BaseException:
            os.close(fd)
            raise
        builder = cls(name, resolved, fd, size, read_only=read_only, sparse=o["sparse"], direct=direct,
                      block_size=block_size, num_queues=o["num-queues"], disk_id=disk_id,
                      poll_max_ns=o["poll-us"] * 1000, discard_segments=o["max-discard-segments"],
                      coalesce_kicks=o["coalesce-kicks"])
        builder.memory_limit = o["memory-limit"]
        return builder

    def keep_fds(self) -> list[int]:
        return [self.fd] if self.fd >= 0 else []

    def build(self, ex: Executor) -> BlockDevice:
        if self.fd < 0:
            raise RuntimeError(f"{self.name}: builder already closed")
        return BlockDevice(ex, self.name, self.fd, self.size, read_only=self.read_only,
                           sparse=self.sparse, direct=self.direct, block_size=self.block_size,
                           num_queues=self.num_queues, disk_id=self.disk_id,
                           poll_max_ns=self.poll_max_ns, discard_segments=self.discard_segments,
                           coalesce_kicks=self.coalesce_kicks)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


# --------------------------------------------------------------------------
# Declaration: the one place the rest of the project learns about "block"

def _power_of_two(value: int) -> str | None:
    return None if value & (value - 1) == 0 else "not a power of two"


def _id_fits(value: str) -> str | None:
    try:
        n = len(value.encode())
    except UnicodeEncodeError:   # undecodable argv bytes arrive as surrogates
        return "not UTF-8 text"
    return None if n <= ID_BYTES else f"{n} bytes, at most {ID_BYTES}"


def _no_packed(value: bool) -> str | None:
    return "not supported over vhost-user (split rings only)" if value else None


#: crosvm ``--block`` keys, with our ``lock``, ``num-queues`` and ``poll-us``.
OPTIONS = (
    Option("path", str, help="image file or block device", required=True,
           flags=("--file", "--blk-file"), metavar="PATH"),
    Option("ro", bool, False, "export read-only (VIRTIO_BLK_F_RO)", aliases=("read-only", "read_only"),
           flags=("--read-only",)),
    Option("sparse", bool, True, "offer DISCARD and WRITE_ZEROES"),
    Option("direct", bool, False, "open with O_DIRECT", aliases=("o_direct", "o-direct")),
    Option("lock", bool, True, "take the advisory image lock (shared when read-only)"),
    Option("block-size", int, SECTOR_SIZE, "logical block size in bytes, a power of two",
           aliases=("block_size",), lo=SECTOR_SIZE, hi=1 << 16, check=_power_of_two, metavar="BYTES"),
    Option("num-queues", int, 1, f"request queues (1..{MAX_QUEUES})", aliases=("num_queues",),
           lo=1, hi=MAX_QUEUES, metavar="N"),
    Option("poll-us", int, POLL_MAX_NS // 1000,
           "bound of the adaptive ring polling before sleeping, in µs (0..1000; 0 saves CPU on hosts "
           "with many idle disks at the cost of queue-depth-1 latency)",
           aliases=("poll_us",), lo=0, hi=1000, metavar="US"),
    Option("coalesce-kicks", bool, True,
           "while the ring is not polled, ask an EVENT_IDX driver for one kick per up to 4 requests, "
           "a 1 ms timer serving what came (fewer wake-ups, kicks and interrupts at queue depth > 1)",
           aliases=("coalesce_kicks",)),
    Option("max-discard-segments", int, DISCARD_SEGMENTS,
           f"ranges per DISCARD/WRITE_ZEROES request (1..{DISCARD_SEGMENTS_BOUND}; default 1, as QEMU's "
           "virtio-blk and block exports advertise)",
           aliases=("max_discard_segments",), lo=1, hi=DISCARD_SEGMENTS_BOUND, metavar="N"),
    Option("id", str, help=f"GET_ID answer (a serial of at most {ID_BYTES} bytes)", check=_id_fits,
           metavar="SERIAL"),
    Option("packed-queue", bool, False, "crosvm's packed ring: refused", aliases=("packed_queue",),
           check=_no_packed, cli=False),
)

DEVICE = DeviceType(
    name="block",
    builder=BlockBuilder,
    summary="virtio-blk on a raw image file or block device",
    options=OPTIONS,
    seccomp_policy="block.policy",
    capabilities=("read-only", "blk-file"),
    child_modules=("devices.diskfile", "devices.virtio_blk", "concurrent.futures",
                   "concurrent.futures.thread", "mmap"),
    # crosvm --block keys that concern the VMM side, accepted and ignored.
    ignored=("root", "bootindex", "multiple-workers", "async-executor", "dontcache"),
)
