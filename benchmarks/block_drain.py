"""Micro-benchmark of the block device's drain: what one request costs the device.

Why: ``benchmarks/block.py`` measures the whole path (driver, sockets, kicks,
adaptive polling) and on a loaded machine its CPU-per-IO figures move by
tens of percent between runs, far more than a change of a few hundred
nanoseconds per request.  This drives ``BlockDevice``'s real drain (the
``serve_hook`` its queue task installs) on a real split ring over a memfd,
with 4 KiB IN requests read from a page-cached memfd image, and reports CPU
time per request (this thread's, best of ``--repeat``).  Comparing two
revisions: run this file from each tree alternately (see benchmarks/README.md,
"Device counters").

    python -m benchmarks.block_drain [--seconds 2] [--batch 1] [--batch 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import time

from connection.executor import Executor
from connection.protocol import VirtioFeature
from connection.split_ring import DESC_F_NEXT, DESC_F_WRITE

from .guest_ring import MiB, QSIZE, memfd_guest, queue_config, write_desc

T_IN = 0


def run(batch: int, seconds: float, repeat: int, requests: int = 0) -> float:
    """µs of CPU per request, best of ``repeat``; with ``requests``, serve exactly
    that many and return 0 (for an instruction count under valgrind, which no
    neighbour's load can blur)."""
    from devices.block import BlockDevice
    size = 8 * MiB
    host, hv, mem = memfd_guest(size)
    desc_gpa, avail_gpa, used_gpa, data_gpa = 0x0, 0x1000 * 4, 0x1000 * 5, MiB
    desc = hv[desc_gpa:desc_gpa + 16 * QSIZE].cast("Q")
    avail = hv[avail_gpa:avail_gpa + 6 + 2 * QSIZE].cast("H")
    per = QSIZE // 3
    for r in range(per):
        hdr, data, status = data_gpa + r * 8192, data_gpa + r * 8192 + 512, data_gpa + r * 8192 + 4608
        struct.pack_into("<IIQ", host, hdr, T_IN, 0, r * 8)
        head = 3 * r
        write_desc(desc, head, hdr, 16, DESC_F_NEXT, head + 1)
        write_desc(desc, head + 1, data, 4096, DESC_F_WRITE | DESC_F_NEXT, head + 2)
        write_desc(desc, head + 2, status, 1, DESC_F_WRITE)
        avail[2 + r] = head
    for k in range(per, QSIZE):
        avail[2 + k] = avail[2 + k % per]
    img = os.memfd_create("bench-image", os.MFD_CLOEXEC)
    os.ftruncate(img, 16 * MiB)
    os.pwrite(img, os.urandom(1 * MiB), 0)

    ex = Executor()
    asyncio.set_event_loop(ex.loop)
    dev = BlockDevice(ex, "bench", img, 16 * MiB)
    cfg, call, kick = queue_config(ex.loop, desc_gpa, avail_gpa, used_gpa)
    q = cfg.activate(mem, int(VirtioFeature.RING_EVENT_IDX | VirtioFeature.VERSION_1))
    dev.ack_features(int(VirtioFeature.VERSION_1))
    dev.start_queue(0, q, mem)
    for _ in range(3):   # let the queue's task install its drain hook
        ex.loop.run_until_complete(asyncio.sleep(0))
    drain = q.serve_hook
    assert drain is not None, "the block queue task installed no serve_hook"
    batch = min(batch, per)
    idx = 0
    best = float("inf")
    if requests:
        for _ in range(requests // batch):
            idx = (idx + batch) & 0xFFFF
            avail[1] = idx
            drain()
        repeat = 0
        best = 0.0
    for _ in range(repeat):
        done = 0
        end = time.perf_counter() + seconds / repeat
        c0 = time.thread_time()
        while time.perf_counter() < end:
            for _ in range(64):
                idx = (idx + batch) & 0xFFFF
                avail[1] = idx
                drain()
            done += 64 * batch
        best = min(best, (time.thread_time() - c0) / done * 1e6)
    assert not q.broken, q.broken_reason
    dev.stop_queue(0)
    ex.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, action="append", help="requests per drain (repeatable; default 1, 32)")
    ap.add_argument("--requests", type=int, default=0,
                    help="serve exactly this many per batch size, untimed (run under valgrind --tool=callgrind "
                         "twice with different counts; the difference of the Ir totals / the difference of "
                         "the counts is instructions per request)")
    args = ap.parse_args()
    if args.requests:
        for b in args.batch or [1, 32]:
            run(b, 0, 0, args.requests)
        return
    for b in args.batch or [1, 32]:
        print(f"batch {b:3d}: {run(b, args.seconds, args.repeat):6.3f} us CPU/request")


if __name__ == "__main__":
    main()
