"""When the block device tells the driver about completions.

Why: the notification policy decides how often the driver wakes, and for
large requests whether the ring runs dry between batches (benchmarks/README.md,
block matrix, change 4).  Small requests: one notification decision per
drained batch.  Large requests (``NOTIFY_BYTES`` moved): one as soon as
three quarters of what the device holds is done, so the driver can refill
the ring while the rest is copied.  The device's own drain runs here
synchronously over a memfd guest, and each call-eventfd write is recorded
with the used index it made visible, so the assertions are exact.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from benchmarks.guest_ring import QSIZE, MiB, memfd_guest, queue_config, write_desc
from connection.executor import Executor
from connection.protocol import VirtioFeature
from connection.split_ring import DESC_F_NEXT, DESC_F_WRITE
from connection import virtqueue
from devices.block import NOTIFY_BYTES, BlockDevice
from devices.virtio_blk import F_FLUSH, HEADER, T_IN

DESC_GPA, AVAIL_GPA, USED_GPA, DATA_GPA = 0x0, 0x4000, 0x5000, 4 * MiB
USED_EVENT = 2 + QSIZE   # avail ring, as 16-bit words: flags, idx, ring[QSIZE], used_event


@pytest.mark.parametrize("size, expected", [
    (4096, [8]),               # small: one decision, at the end of the batch
    (1 << 20, [6, 8]),         # large: at three quarters, then at the end
])
def test_notifications_per_batch(size: int, expected: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    depth = 8
    assert depth * 4096 < NOTIFY_BYTES <= 1 << 20   # the two cases sit on either side of the bound
    stride = size + 8192
    _host, hv, mem = memfd_guest(DATA_GPA + depth * stride)
    desc = hv[DESC_GPA:DESC_GPA + 16 * QSIZE].cast("Q")
    avail = hv[AVAIL_GPA:AVAIL_GPA + 6 + 2 * QSIZE].cast("H")
    for r in range(depth):
        hdr, data = DATA_GPA + r * stride, DATA_GPA + r * stride + 4096
        status = data + size
        HEADER.pack_into(hv, hdr, T_IN, 0, r * (size >> 9))
        write_desc(desc, 3 * r, hdr, 16, DESC_F_NEXT, 3 * r + 1)
        write_desc(desc, 3 * r + 1, data, size, DESC_F_WRITE | DESC_F_NEXT, 3 * r + 2)
        write_desc(desc, 3 * r + 2, status, 1, DESC_F_WRITE)
        avail[2 + r] = 3 * r
    with tempfile.TemporaryFile() as img:
        img.write(os.urandom(depth * size))
        img.flush()
        ex = Executor()
        asyncio.set_event_loop(ex.loop)
        dev = BlockDevice(ex, "notify", os.dup(img.fileno()), depth * size)
        dev.ack_features(int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX) | F_FLUSH)
        cfg, call, _ = queue_config(ex.loop, DESC_GPA, AVAIL_GPA, USED_GPA)
        try:
            q = cfg.activate(mem, int(VirtioFeature.RING_EVENT_IDX))
            seen: list[int] = []

            def recording_write(fd: int, data: bytes) -> int:
                """The queue's call-eventfd write: record ``used.idx`` and
                re-arm ``used_event`` there, as a driver that is awake would
                (it wants the next completion)."""
                if fd == call:
                    seen.append(q.used_idx)
                    avail[USED_EVENT] = q.used_idx
                return os.write(fd, data)

            monkeypatch.setattr(virtqueue, "_write", recording_write)
            dev.poll_max_ns = 0
            dev.start_queue(0, q, mem)
            ex.loop.run_until_complete(asyncio.sleep(0.01))   # the task sleeps, its hook set
            drain = q.serve_hook
            assert drain is not None
            avail[USED_EVENT] = 0            # the driver wants the first completion
            avail[1] = depth                 # 8 requests at once
            drain()
            assert q.used_idx == depth and not q.broken
            assert seen == expected
            assert os.eventfd_read(call) == len(expected)
            for r in range(depth):           # every request answered, with its data
                status = DATA_GPA + r * stride + 4096 + size
                assert hv[status] == 0
                img.seek(r * size)
                assert hv[DATA_GPA + r * stride + 4096:status] == img.read(size)
        finally:
            dev.stop_queue(0)
            cfg.close()              # closes the call and kick fds too
            ex.loop.close()
            asyncio.set_event_loop(None)
