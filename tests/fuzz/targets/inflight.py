"""Target: the inflight region a front-end hands back (connection/inflight.py
``InflightRegion.from_fd`` and ``InflightQueue.recover``).

The input is the geometry of SET_INFLIGHT_FD (mostly consistent, sometimes
anything) and the region's bytes: headers (version, desc_num,
last_batch_head, used_idx) and per-descriptor inflight flags, next links
and counters, structured or raw.  The region is mapped from a memfd and
every queue recovered against a fuzzed ring used index; then the back-end
keeps using it (fetch, complete in batches) and a second recovery must
report exactly the heads still in flight.  Checked: recovered heads are
distinct, below the queue size, in counter order; fine: ProtocolError.
"""

from __future__ import annotations

import os
import struct

from connection.errors import ProtocolError
from connection.inflight import InflightRegion, queue_stride
from connection.protocol import InflightInfo

from ..data import Data
from ..harness import FuzzBug, check_no_leak, memfd, open_fds


def _region_bytes(d: Data, nq: int, qs: int, stride: int) -> bytes:
    out = bytearray()
    for _ in range(nq):
        if d.below(8) == 0:
            out += d.bytes(stride).ljust(stride, b"\0")
            continue
        q = bytearray(stride)
        version = d.pick((1, 1, 1, 0, 2, d.u16()))
        desc_num = d.pick((qs, qs, qs, 0, qs + 1, d.u16()))
        struct.pack_into("<QHHHH", q, 0, 0, version, desc_num, d.pick((0, d.below(qs + 1), d.u16())), d.u16())
        for _ in range(d.below(min(qs, 32) + 1)):
            head = d.below(qs)
            struct.pack_into("<B5xHQ", q, 16 + 16 * head, d.pick((1, 1, 0, 2, d.u8())),
                             d.pick((d.below(qs), d.u16())), d.pick((d.below(64), d.u64())))
        out += q
    return bytes(out)


def _check_heads(heads: list[int], q, qs: int, what: str) -> None:
    if len(set(heads)) != len(heads) or any(not 0 <= h < qs for h in heads):
        raise FuzzBug(f"{what}: heads {heads[:16]} not distinct in [0, {qs})")
    # the counter of slot h: the u64 after its flags/next (16-byte header, 16-byte slots)
    counters = [struct.unpack_from("<Q", q._b, 16 + 16 * h + 8)[0] for h in heads]
    if counters != sorted(counters):
        raise FuzzBug(f"{what}: heads not in counter order")


def one_input(buf: bytes) -> None:
    d = Data(buf)
    nq = d.pick((1, 1, 2, 4, 0, 257))
    qs = d.pick((1, 2, 16, 64, 256, 0, 32768, 32769))
    stride = queue_stride(qs) if qs else 64
    size = d.pick((nq * stride, nq * stride, nq * stride - 1, 0, d.u64())) & 0xFFFF_FFFF_FFFF_FFFF
    offset = d.pick((0, 0, 4096, 1, d.u64()))
    info = InflightInfo(size, offset, nq, qs)
    content = _region_bytes(d, min(nq, 4), qs, stride) if 0 < qs <= 1024 else d.blob(256)
    file_size = min(d.pick((offset + size, offset + size, 4096, 0)), 4 << 20)  # u64 fields: >= 0
    before = open_fds()
    fd = memfd(file_size)
    if content and file_size:
        os.pwrite(fd, content[:max(0, file_size - offset)], offset if offset < file_size else 0)
    try:
        region = InflightRegion.from_fd(fd, info)
    except ProtocolError:
        check_no_leak(before, "inflight from_fd")
        return
    q = None
    try:
        for index in range(min(nq, 4)):
            q = region.queue(index)
            used = d.u16()
            try:
                heads = q.recover(used)
            except ProtocolError:
                continue
            _check_heads(heads, q, qs, f"queue {index} recover")
            inflight = set(heads)
            # serve on: fetch some free heads, complete some in-flight ones in batches
            free = [h for h in range(qs) if h not in inflight]
            for _ in range(d.below(8)):
                if free and d.flag():
                    h = free.pop(d.below(len(free)))
                    q.fetched(h)
                    inflight.add(h)
                elif inflight:
                    batch = sorted(inflight)[:1 + d.below(4)]
                    used = (used + len(batch)) & 0xFFFF
                    q.completed(batch, used)
                    inflight.difference_update(batch)
                    free.extend(batch)
            again = q.recover(used)
            _check_heads(again, q, qs, f"queue {index} second recover")
            if set(again) != inflight:
                raise FuzzBug(f"queue {index}: recovered {sorted(again)[:8]}, in flight {sorted(inflight)[:8]}")
    finally:
        q = None   # the last queue view: the mapping (and mmap's fd dup) goes with it
        region.close()
    check_no_leak(before, "inflight")
