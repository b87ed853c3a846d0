"""virtio-blk requests on one ``DriverQueue`` (``frontend.vhost_user``), for tests,
benchmarks and ``probe``.

Why apart from the vhost-user driver: the driver speaks the protocol and owns the
rings for any device type; this module is what a virtio-blk guest driver adds on
top (request header, data, status byte; the config-space layout).

``BlockDriver(queue, depth=1, max_io=128 KiB, indirect=False, timeout=10.0)``: virtio-blk
requests on one queue.  One request, status checked (``BlockError`` otherwise):
``read``, ``write``, ``flush``, ``discard``, ``write_zeroes``, ``get_id``.  Batches:
``run([("read", off, len) | ("write", off, data), ...])`` keeps ``depth`` in flight with
one kick per batch.  Hot loops: ``free_slot()``, ``submit_read/submit_write(slot, sector,
nbytes)``, ``queue.kick()``, ``complete()`` (or ``queue.wait_used`` + ``by_head``); a
slot cannot be resubmitted while busy.  ``decode_blk_config(bytes)`` names the config
fields.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

from devices.virtio_blk import (HEADER, ID_BYTES, S_OK, SECTOR_SIZE, SEGMENT, STATUS_NAMES,
                                T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES)

from .vhost_user import DESC, DESC_F_NEXT, DESC_F_WRITE, DriverQueue




class BlockError(Exception):
    """A virtio-blk request completed with a status other than OK."""

    def __init__(self, op: str, status: int, detail: str = "") -> None:
        super().__init__(f"virtio-blk {op}: status {status} "
                         f"({STATUS_NAMES.get(status, 'unknown')}){detail}")
        self.status = status


def decode_blk_config(data: bytes) -> dict[str, int]:
    """The leading fields of a virtio-blk config space (as many as ``data`` holds)."""
    out: dict[str, int] = {}
    if len(data) >= 8:
        out["capacity"] = struct.unpack_from("<Q", data, 0)[0]
    if len(data) >= 16:
        out["size_max"], out["seg_max"] = struct.unpack_from("<II", data, 8)
    if len(data) >= 24:
        out["blk_size"] = struct.unpack_from("<I", data, 20)[0]
    if len(data) >= 33:
        out["writeback"] = data[32]
    if len(data) >= 36:
        out["num_queues"] = struct.unpack_from("<H", data, 34)[0]
    if len(data) >= 44:
        out["max_discard_sectors"], out["max_discard_seg"] = struct.unpack_from("<II", data, 36)
    if len(data) >= 56:
        out["max_write_zeroes_sectors"], out["max_write_zeroes_seg"] = struct.unpack_from("<II", data, 48)
    return out


class _Slot:
    """One request slot: its buffers, its prepared chain, where the data descriptor lives."""

    __slots__ = ("head", "hdr_gpa", "hdr", "hdr_q", "data_gpa", "data", "status_gpa", "status", "busy", "op",
                 "nbytes", "d_table", "d_off", "d_next", "d_key")


class BlockDriver:
    """virtio-blk requests on one ``DriverQueue``, ``depth`` at a time.

    Each slot owns a prepared 3-descriptor chain (header | data | status) whose
    data descriptor is patched per request, so the hot path writes one header,
    one descriptor and one avail entry and allocates nothing.  Requests without
    data (flush) go through the general ``submit`` path.
    """

    def __init__(self, queue: DriverQueue, depth: int = 1, max_io: int = 128 << 10,
                 indirect: bool = False, timeout: float = 10.0) -> None:
        # Each slot owns 1 (indirect) or 3 descriptors; 2 more stay free for flush.
        if depth < 1 or depth * (1 if indirect else 3) + 2 > queue.size:
            raise ValueError(f"depth {depth} does not fit queue size {queue.size}")
        self.queue = queue
        self.depth = depth
        self.max_io = max_io
        self.timeout = timeout
        self.slots: list[_Slot] = []
        self._by_head: dict[int, _Slot] = {}
        for _ in range(depth):
            s = _Slot()
            s.hdr_gpa, s.hdr = queue.alloc(HEADER.size, 16)
            s.data_gpa, s.data = queue.alloc(max_io, 4096)
            s.status_gpa, s.status = queue.alloc(1, 1)
            s.hdr_q = s.hdr.cast("Q")     # [0] type | ioprio << 32, [1] sector
            s.head = queue.prepare([(s.hdr_gpa, HEADER.size), (s.data_gpa, max_io)],
                                   [(s.status_gpa, 1)], indirect=indirect)
            s.d_table, s.d_off, s.d_next, _last = queue.desc_slot(s.head, 1)
            s.d_key = (s.data_gpa, max_io, DESC_F_NEXT)
            s.busy = False
            s.op = ""
            s.nbytes = 0
            self.slots.append(s)
            self._by_head[s.head] = s
        self._other_done: dict[int, int] = {}
        self.by_head = self._by_head
        self.completed = 0

    # ---- hot path
    def _start(self, s: _Slot, op: int, sector: int, addr: int, nbytes: int, write: bool) -> None:
        if s.busy:
            raise ValueError(f"slot with head {s.head} already has a request in flight")
        hq = s.hdr_q
        hq[0] = op
        hq[1] = sector
        s.status[0] = 0xFF
        key = (addr, nbytes, (DESC_F_NEXT | DESC_F_WRITE) if write else DESC_F_NEXT)
        if key != s.d_key:   # the data descriptor changes only with the op or the size
            DESC.pack_into(s.d_table, s.d_off, addr, nbytes, key[2], s.d_next)
            s.d_key = key
        s.busy = True
        s.nbytes = nbytes
        self.queue.resubmit(s.head)

    def free_slot(self) -> _Slot | None:
        """A slot with no request in flight, or None (a scan: depth is small)."""
        for s in self.slots:
            if not s.busy:
                return s
        return None

    def submit_read(self, s: _Slot, sector: int, nbytes: int) -> None:
        """Start a read of ``nbytes`` at ``sector`` into ``s.data`` (kick later)."""
        s.op = "read"
        self._start(s, T_IN, sector, s.data_gpa, nbytes, True)

    def submit_write(self, s: _Slot, sector: int, nbytes: int) -> None:
        """Start a write of ``s.data[:nbytes]`` at ``sector`` (kick later)."""
        s.op = "write"
        self._start(s, T_OUT, sector, s.data_gpa, nbytes, False)

    def submit_segment(self, s: _Slot, op: int, sector: int, num_sectors: int, flags: int = 0) -> None:
        """DISCARD / WRITE_ZEROES with one 16-byte segment in the slot's data buffer."""
        SEGMENT.pack_into(s.data, 0, sector, num_sectors, flags)
        s.op = {T_DISCARD: "discard", T_WRITE_ZEROES: "write-zeroes"}.get(op, str(op))
        self._start(s, op, 0, s.data_gpa, SEGMENT.size, False)

    def submit_get_id(self, s: _Slot) -> None:
        s.op = "get-id"
        self._start(s, T_GET_ID, 0, s.data_gpa, ID_BYTES, True)

    def complete(self, timeout: float | None = None, check: bool = True) -> list[_Slot]:
        """Wait for completions; returns the finished slots (free again).
        With ``check``, a status other than OK (or a read whose used len is not
        data + status) raises ``BlockError`` after the whole batch was taken in."""
        done = self.queue.wait_used(self.timeout if timeout is None else timeout)
        out = []
        error: BlockError | None = None
        by_head = self._by_head
        for head, length in done:
            s = by_head.get(head)
            if s is None:        # a chain submitted outside the slots (flush)
                self._other_done[head] = length
                continue
            s.busy = False
            out.append(s)
            if check and error is None:
                status = s.status[0]
                if status != S_OK:
                    error = BlockError(s.op, status, f" (used len {length})")
                elif s.op == "read" and length != s.nbytes + 1:
                    error = BlockError(s.op, status, f": used len {length}, expected {s.nbytes + 1}")
        self.completed += len(out)
        if error is not None:
            raise error
        return out

    # ---- one request at a time (tests)
    def _one(self, s: _Slot | None, start, *args) -> _Slot:
        if s is None:
            s = self.free_slot()
            if s is None:
                raise BufferError("all slots busy; complete() first")
        start(s, *args)
        self.queue.kick()
        while s.busy:
            self.complete()
        return s

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        s = self._one(None, self.submit_read, offset // SECTOR_SIZE, length)
        return bytes(s.data[:length])

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        s = self.free_slot()
        if s is None:
            raise BufferError("all slots busy; complete() first")
        s.data[:len(data)] = data
        self._one(s, self.submit_write, offset // SECTOR_SIZE, len(data))

    def flush(self) -> None:
        """A FLUSH (header + status, no data: the general ``submit`` path);
        waits for it, taking in other completions on the way."""
        s = self.free_slot()
        if s is None:
            raise BufferError("all slots busy; complete() first")
        s.busy = True   # its header and status buffers carry the flush
        try:
            HEADER.pack_into(s.hdr, 0, T_FLUSH, 0, 0)
            s.status[0] = 0xFF
            head = self.queue.submit([(s.hdr_gpa, HEADER.size)], [(s.status_gpa, 1)])
            self.queue.kick()
            deadline = time.monotonic() + self.timeout
            while head not in self._other_done:
                self.complete(max(0.0, deadline - time.monotonic()), check=False)
            del self._other_done[head]
        finally:
            s.busy = False
        if s.status[0] != S_OK:
            raise BlockError("flush", s.status[0])

    def discard(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check(offset, length)
        self._one(None, self.submit_segment, T_DISCARD, offset // SECTOR_SIZE, length // SECTOR_SIZE, int(unmap))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check(offset, length)
        self._one(None, self.submit_segment, T_WRITE_ZEROES, offset // SECTOR_SIZE, length // SECTOR_SIZE, int(unmap))

    def get_id(self) -> bytes:
        s = self._one(None, self.submit_get_id)
        return bytes(s.data[:ID_BYTES]).rstrip(b"\0")

    def _check(self, offset: int, length: int) -> None:
        if offset % SECTOR_SIZE or length % SECTOR_SIZE or length <= 0 or length > self.max_io:
            raise ValueError(f"offset {offset} / length {length}: not sector multiples in (0, {self.max_io}]")

    # ---- batches at queue depth
    def run(self, ops: Sequence[tuple[str, int, bytes | int]]) -> list[bytes | None]:
        """Run ``ops`` (("read", offset, length) or ("write", offset, data)) with
        up to ``depth`` in flight and one kick per batch; returns read data in order."""
        results: list[bytes | None] = [None] * len(ops)
        pending = {}
        nxt = 0
        while nxt < len(ops) or pending:
            while nxt < len(ops):
                s = self.free_slot()
                if s is None:
                    break
                op, offset, arg = ops[nxt]
                if op == "read":
                    assert isinstance(arg, int)
                    self._check(offset, arg)
                    self.submit_read(s, offset // SECTOR_SIZE, arg)
                elif op == "write":
                    assert isinstance(arg, (bytes, bytearray, memoryview))
                    self._check(offset, len(arg))
                    s.data[:len(arg)] = arg
                    self.submit_write(s, offset // SECTOR_SIZE, len(arg))
                else:
                    raise ValueError(f"op {op!r}: expected 'read' or 'write'")
                pending[s.head] = nxt
                nxt += 1
            self.queue.kick()
            for s in self.complete():
                i = pending.pop(s.head, None)
                if i is not None and ops[i][0] == "read":
                    results[i] = bytes(s.data[:s.nbytes])
        return results
