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
from typing import Any, ClassVar

from connection.executor import Executor
from connection.protocol import ProtocolFeature, VirtioFeature
from connection.virtqueue import POLL_MAX_NS

from . import diskfile
from .base import ConfigError, DeviceBuilder, Options, QueueTaskDevice

log = logging.getLogger("devices.block")

# --------------------------------------------------------------------------
# virtio-blk constants (virtio spec 5.2)

F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
ID_BYTES = 20
MAX_QUEUES = 16

#: Limits advertised in the config space.  seg_max follows
#: qemu-storage-daemon; size_max only has to be non-zero for Linux.
SEG_MAX = 126
SIZE_MAX = 1 << 20
MAX_DISCARD_SECTORS = 0xFFFFFFFF
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = 0xFFFFFFFF
MAX_WRITE_ZEROES_SEG = 32
#: Requests served before the driver is notified even if more wait.
MAX_BATCH = 64
#: I/O threads per device with direct=true.
DIRECT_IO_THREADS = 8
#: Bounce buffer per serving thread for O_DIRECT requests whose guest
#: buffers are not aligned: a request moves through it in chunks.
BOUNCE_SIZE = 1 << 20
#: Bytes moved before the used index is published (without a notification)
#: even if more requests wait.
FLUSH_BYTES = 64 << 10
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
SEG_FLAG_UNMAP = 1

HEADER = struct.Struct("<IIQ")  # type, ioprio, sector
_unpack_header = HEADER.unpack_from

#: struct virtio_blk_config up to write_zeroes_may_unmap (60 bytes).
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG.size == 60
#: Reads past our fields (secure-erase, zoned) return zeros, up to this size,
#: because front-ends size the read from their own struct.
CONFIG_READ_LIMIT = 256

_RING_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                  | VirtioFeature.RING_EVENT_IDX)


class BlockDevice(QueueTaskDevice):
    """The device inside the child: serves requestq0..N-1 on one image fd."""

    def __init__(self, ex: Executor, name: str, fd: int, size: int, *, read_only: bool = False,
                 sparse: bool = True, direct: bool = False, block_size: int = SECTOR_SIZE,
                 num_queues: int = 1, disk_id: bytes | None = None,
                 io_threads: int | None = None, poll_max_ns: int = POLL_MAX_NS) -> None:
        super().__init__(ex, name)
        #: Bound of each queue's adaptive avail-ring polling before it sleeps on
        #: the kick eventfd: QD1 latency bought with CPU (0 = never poll).
        self.poll_max_ns = poll_max_ns
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
        return CONFIG.pack(
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,                      # geometry (not offered)
            self.block_size,
            0, 0, 1, 1,                   # topology: physical_block_exp, alignment, min_io, opt_io
            1, 0,                         # writeback (only meaningful with CONFIG_WCE), unused0
            self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, align,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, 1,
        )

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > CONFIG_READ_LIMIT:
            raise ValueError(f"config read offset {offset} size {size} outside [0, {CONFIG_READ_LIMIT})")
        data = self._config[offset:offset + size]
        return data + bytes(size - len(data))

    def start_queue(self, index: int, queue: Any, mem: Any) -> None:
        queue.poll_max_ns = self.poll_max_ns
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
        write) is taken once the completions not yet signalled are as many
        as the chains still waiting in the snapshot of the avail ring
        (``queue.pending``), i.e. about half-way through a batch, so the
        driver refills while we serve the rest; and at the end of the batch.
        A queue-depth-1 driver is still notified after every request.

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

        def drain() -> None:
            n = 0        # completions since the last notification decision
            moved = 0    # bytes since the last publication
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
                if n >= MAX_BATCH or n >= queue.pending:
                    flush()
                    n = moved = 0
                elif moved >= FLUSH_BYTES:
                    publish()
                    moved = 0
            flush()

        self._hook(qi, queue, drain)
        try:
            while await wait_kick():
                drain()
        finally:
            if queue.serve_hook is drain:
                queue.serve_hook = None

    def _handle(self, chain: Any, qi: int) -> int:
        """Serve one request; return the used length, or -1 if the chain has
        no status byte (the queue must be broken)."""
        w = chain.writable
        if not w:
            self._bad(qi, "no device-writable status byte")
            return -1
        last = w[-1]
        nlast = len(last) - 1  # index of the status byte
        r = chain.readable
        try:
            rtype, _, sector = _unpack_header(r[0])
        except (IndexError, struct.error):
            return self._split_header(chain, qi, last, nlast)
        offset = sector << SECTOR_SHIFT

        if rtype == T_IN:
            total = chain.writable_len - 1
            if total & (SECTOR_SIZE - 1) or offset + total > self.size:
                self._bad(qi, f"IN sector {sector} length {total} outside the disk or not sector-sized")
                last[nlast] = S_IOERR
                return 1
            bufs = w[:-1]
            if nlast:
                bufs.append(last[:nlast])
            try:
                n = os.preadv(self.fd, bufs, offset)
                if n != total:
                    self._finish(os.preadv, bufs, offset, n, total)
            except OSError as exc:
                if not self._direct_retry(exc, True, bufs, offset, total):
                    last[nlast] = S_IOERR
                    return 1
            last[nlast] = S_OK
            return total + 1

        if rtype == T_OUT:
            bufs = r[1:]
            if len(r[0]) != HEADER.size:
                bufs.insert(0, r[0][HEADER.size:])
            return self._write(qi, bufs, sector, offset, chain.readable_len - HEADER.size, last, nlast)

        return self._other(chain, qi, rtype, sector, HEADER.size, last, nlast)

    def _write(self, qi: int, bufs: list, sector: int, offset: int, total: int,
               last: memoryview, nlast: int) -> int:
        if self.read_only:
            self._bad(qi, "OUT on a read-only disk")
            last[nlast] = S_IOERR
            return 1
        if total & (SECTOR_SIZE - 1) or offset + total > self.size:
            self._bad(qi, f"OUT sector {sector} length {total} outside the disk or not sector-sized")
            last[nlast] = S_IOERR
            return 1
        try:
            n = os.pwritev(self.fd, bufs, offset)
            if n != total:
                self._finish(os.pwritev, bufs, offset, n, total)
        except OSError as exc:
            if not self._direct_retry(exc, False, bufs, offset, total):
                last[nlast] = S_IOERR
                return 1
        if self.writethrough:
            try:
                os.fdatasync(self.fd)
            except OSError:
                last[nlast] = S_IOERR
                return 1
        last[nlast] = S_OK
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

    def _bad(self, qi: int, what: str) -> None:
        """Log a malformed request once per queue (a guest can send millions)."""
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

    def _split_header(self, chain: Any, qi: int, last: memoryview, nlast: int) -> int:
        """The header does not sit in the first readable buffer: gather it."""
        r = chain.readable
        if chain.readable_len < HEADER.size:
            self._bad(qi, f"request header of {chain.readable_len} bytes, expected {HEADER.size}")
            last[nlast] = S_IOERR
            return 1
        head = _gather(r, HEADER.size)
        rtype, _, sector = HEADER.unpack(head)
        if rtype == T_OUT:
            return self._write(qi, _skip(r, HEADER.size), sector, sector << SECTOR_SHIFT,
                               chain.readable_len - HEADER.size, last, nlast)
        if rtype == T_IN:
            # Rebuild the chain's view of things: IN has no readable data, so
            # only the header was split; serve it like the fast path does.
            return self._other(chain, qi, T_IN, sector, HEADER.size, last, nlast)
        return self._other(chain, qi, rtype, sector, HEADER.size, last, nlast)

    def _other(self, chain: Any, qi: int, rtype: int, sector: int, hdr: int,
               last: memoryview, nlast: int) -> int:
        """Everything but the fast-path IN/OUT."""
        w = chain.writable
        data_views = w[:-1]
        if nlast:
            data_views.append(last[:nlast])
        wlen = chain.writable_len - 1

        if rtype == T_IN:  # reached only with a split header
            offset = sector << SECTOR_SHIFT
            if wlen & (SECTOR_SIZE - 1) or offset + wlen > self.size:
                self._bad(qi, f"IN sector {sector} length {wlen} outside the disk or not sector-sized")
                last[nlast] = S_IOERR
                return 1
            try:
                self._finish(os.preadv, data_views, offset, 0, wlen)
            except OSError as exc:
                if not self._direct_retry(exc, True, data_views, offset, wlen):
                    last[nlast] = S_IOERR
                    return 1
            last[nlast] = S_OK
            return wlen + 1

        if rtype == T_FLUSH:
            if not self.read_only:
                try:
                    os.fdatasync(self.fd)
                except OSError:
                    last[nlast] = S_IOERR
                    return 1
            last[nlast] = S_OK
            return 1

        if rtype == T_GET_ID:
            if self.disk_id is None:
                last[nlast] = S_UNSUPP
                return 1
            ident = self.disk_id.ljust(ID_BYTES, b"\0")
            pos = 0
            for v in data_views:
                n = min(len(v), ID_BYTES - pos)
                if n <= 0:
                    break
                v[:n] = ident[pos:pos + n]
                pos += n
            last[nlast] = S_OK
            return pos + 1

        if rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
            status = self._discard(chain, qi, rtype, hdr)
            last[nlast] = status
            return 1

        self._bad(qi, f"unsupported request type {rtype}")
        last[nlast] = S_UNSUPP
        return 1

    def _discard(self, chain: Any, qi: int, rtype: int, hdr: int) -> int:
        """DISCARD -> punch a hole; WRITE_ZEROES -> zero range (or punch a
        hole when the driver allows unmapping).  Returns the status."""
        name = "DISCARD" if rtype == T_DISCARD else "WRITE_ZEROES"
        if self.read_only:
            self._bad(qi, f"{name} on a read-only disk")
            return S_IOERR
        if not self.sparse:
            self._bad(qi, f"{name} not offered (sparse=false)")
            return S_UNSUPP
        dlen = chain.readable_len - hdr
        max_seg = MAX_DISCARD_SEG if rtype == T_DISCARD else MAX_WRITE_ZEROES_SEG
        if dlen <= 0 or dlen % SEGMENT.size or dlen // SEGMENT.size > max_seg:
            self._bad(qi, f"{name} with {dlen} bytes of segments (16-byte segments, at most {max_seg})")
            return S_IOERR
        data = _gather(_skip(chain.readable, hdr), dlen)  # dlen is bounded above
        segments = [SEGMENT.unpack_from(data, i) for i in range(0, dlen, SEGMENT.size)]
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

#: crosvm --block keys that concern the VMM side, accepted and ignored here.
_IGNORED = ("vhost", "root", "bootindex", "pci-address", "multiple-workers", "async-executor",
            "dontcache")


class BlockBuilder(DeviceBuilder):
    """Opens (and locks) the image in the parent; builds a BlockDevice in the child."""

    device_type: ClassVar[str] = "block"
    seccomp_policy: ClassVar[str] = "block.policy"

    def __init__(self, name: str, path: str, fd: int, size: int, *, read_only: bool, sparse: bool,
                 direct: bool, block_size: int, num_queues: int, disk_id: bytes | None,
                 poll_max_ns: int = POLL_MAX_NS) -> None:
        self.name = name
        self.poll_max_ns = poll_max_ns
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
        """Keys (crosvm ``--block``): path (required), ro, sparse (true),
        direct/o_direct (false), lock (true), block-size (512), id (<= 20
        bytes), num-queues (1, at most 16), poll-us (the bound of the adaptive
        ring polling before sleeping, 0..1000 µs, default 200; 0 saves CPU on
        hosts with many idle disks at the cost of queue-depth-1 latency)."""
        o = Options(name, options, ignored=_IGNORED)
        path = o.required("path")
        read_only = o.flag("ro", False, "read-only", "read_only")
        sparse = o.flag("sparse", True)
        direct = o.flag("direct", False, "o_direct", "o-direct")
        lock = o.flag("lock", True)
        block_size = o.integer("block-size", SECTOR_SIZE, SECTOR_SIZE, 1 << 16, "block_size")
        if block_size & (block_size - 1):
            raise ConfigError(f"{name}: block-size={block_size} is not a power of two")
        num_queues = o.integer("num-queues", 1, 1, MAX_QUEUES, "num_queues")
        poll_us = o.integer("poll-us", POLL_MAX_NS // 1000, 0, 1000, "poll_us")
        ident = o.text("id")
        disk_id = None
        if ident is not None:
            disk_id = ident.encode()
            if len(disk_id) > ID_BYTES:
                raise ConfigError(f"{name}: id={ident!r} is {len(disk_id)} bytes, at most {ID_BYTES}")
        if o.flag("packed-queue", False, "packed_queue"):
            raise ConfigError(f"{name}: packed-queue=true is not supported over vhost-user")
        memory_limit = o.memory_limit()
        o.check_unknown()

        try:
            fd, resolved = diskfile.open_image(name, path, read_only=read_only, direct=direct)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise ConfigError(f"{name}: direct=true: {path} does not support O_DIRECT") from None
            raise ConfigError(f"{name}: path={path!r}: cannot open "
                              f"{'read-only' if read_only else 'read-write'}: {exc.strerror}") from None
        log.info("device=%s path=%r resolved to %s (opened once; later changes to the path are not followed)",
                 name, path, resolved)
        try:
            if lock:
                try:
                    diskfile.lock_image(fd, resolved, writable=not read_only)
                except diskfile.LockError as exc:
                    raise ConfigError(f"{name}: lock=true: {exc.strerror}") from None
            size = diskfile.file_size(fd)
            if size < block_size:
                raise ConfigError(f"{name}: path={path!r} is {size} bytes, smaller than block-size={block_size}")
        except BaseException:
            os.close(fd)
            raise
        builder = cls(name, resolved, fd, size, read_only=read_only, sparse=sparse, direct=direct,
                      block_size=block_size, num_queues=num_queues, disk_id=disk_id,
                      poll_max_ns=poll_us * 1000)
        builder.memory_limit = memory_limit
        return builder

    def keep_fds(self) -> list[int]:
        return [self.fd] if self.fd >= 0 else []

    def build(self, ex: Executor) -> BlockDevice:
        if self.fd < 0:
            raise RuntimeError(f"{self.name}: builder already closed")
        return BlockDevice(ex, self.name, self.fd, self.size, read_only=self.read_only,
                           sparse=self.sparse, direct=self.direct, block_size=self.block_size,
                           num_queues=self.num_queues, disk_id=self.disk_id,
                           poll_max_ns=self.poll_max_ns)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
