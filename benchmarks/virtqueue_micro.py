"""Micro-benchmark of the virtqueue hot path: pop + add_used + flush.

Chains look like virtio-blk reads of 4 KiB (16-byte header readable, 4 KiB
data + 1-byte status writable), direct or indirect.  The "driver" only bumps
``avail.idx``: the avail ring and descriptors are written once, so the time
measured is the device side.  Reports requests per second for each variant;
numbers are for comparing variants and revisions on one machine, not
thresholds.  Rates are per second of this thread's CPU time (best of 5), so
a busy neighbour on a shared machine skews them less than wall time would.

    python -m benchmarks.virtqueue_micro [--seconds 2.0] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import uvloop

from connection.inflight import InflightRegion
from connection.protocol import VirtioFeature
from connection.split_ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

from .guest_ring import MiB, QSIZE, memfd_guest, queue_config, write_desc


def run(name: str, *, indirect: bool, event_idx: bool, inflight: bool, batch: int, seconds: float,
        repeat: int = 5) -> float:
    size = 8 * MiB
    host, hv, mem = memfd_guest(size)
    desc_gpa, avail_gpa, used_gpa, tables_gpa, data_gpa = 0x0, 0x1000 * 4, 0x1000 * 5, 0x1000 * 8, MiB
    desc = hv[desc_gpa:desc_gpa + 16 * QSIZE].cast("Q")
    avail = hv[avail_gpa:avail_gpa + 6 + 2 * QSIZE].cast("H")
    per = QSIZE // 3 if not indirect else QSIZE
    for r in range(per):
        hdr, data, status = data_gpa + r * 8192, data_gpa + r * 8192 + 512, data_gpa + r * 8192 + 4608
        if indirect:
            t = tables_gpa + 48 * r
            tv = hv[t:t + 48].cast("Q")
            write_desc(tv, 0, hdr, 16, DESC_F_NEXT, 1)
            write_desc(tv, 1, data, 4096, DESC_F_WRITE | DESC_F_NEXT, 2)
            write_desc(tv, 2, status, 1, DESC_F_WRITE)
            tv.release()
            write_desc(desc, r, t, 48, DESC_F_INDIRECT)
            head = r
        else:
            head = 3 * r
            write_desc(desc, head, hdr, 16, DESC_F_NEXT, head + 1)
            write_desc(desc, head + 1, data, 4096, DESC_F_WRITE | DESC_F_NEXT, head + 2)
            write_desc(desc, head + 2, status, 1, DESC_F_WRITE)
        avail[2 + r] = head
    for k in range(per, QSIZE):          # slots beyond `per` repeat the first chains
        avail[2 + k] = avail[2 + k % per]
    loop = uvloop.new_event_loop()
    cfg, call, _ = queue_config(loop, desc_gpa, avail_gpa, used_gpa, kick=False)
    q = cfg
    region = InflightRegion.create(1, QSIZE) if inflight else None
    q.set_inflight(region.queue(0) if region else None)
    features = (VirtioFeature.RING_INDIRECT_DESC if indirect else 0) | \
               (VirtioFeature.RING_EVENT_IDX if event_idx else 0)
    q = cfg.activate(mem, int(features))
    batch = min(batch, per)

    idx = 0
    pop, add_used, flush = q.pop, q.add_used, q.flush
    rate = 0.0
    for _ in range(repeat):  # best of `repeat`: the machine is shared
        done = 0
        t0 = time.perf_counter()
        c0 = time.thread_time()
        end = t0 + seconds / repeat
        while True:
            for _ in range(64):
                idx = (idx + batch) & 0xFFFF
                avail[1] = idx
                for _ in range(batch):
                    c = pop()
                    add_used(c.head, 4097)
                flush()
            done += 64 * batch
            now = time.perf_counter()
            if now >= end:
                break
        # CPU time of this thread: the machine may be shared, and a device
        # is bounded by its own CPU time, not by its neighbours'.
        rate = max(rate, done / max(time.thread_time() - c0, 1e-9))
    assert not q.broken, q.broken_reason
    cfg.close()
    loop.close()
    if region:
        region.close()
    desc.release()
    avail.release()
    hv.release()
    mem.clear()
    host.close()
    print(f"{name:<34} {rate / 1e3:9.1f} k req/s  {1e6 / rate:6.2f} us/req")
    return rate


def calibrate() -> float:
    """ns per iteration of a trivial Python loop, to compare machines."""
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter_ns()
        x = 0
        for i in range(100_000):
            x += i
        best = min(best, (time.perf_counter_ns() - t) / 100_000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per variant (best of 5 runs)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    print(f"pop + add_used + flush, 4 KiB chains (3 buffers), batch {args.batch}, queue {QSIZE}; "
          f"python loop iteration {calibrate():.1f} ns")
    for name, kw in [
        ("direct, EVENT_IDX", dict(indirect=False, event_idx=True, inflight=False)),
        ("direct, notify every batch", dict(indirect=False, event_idx=False, inflight=False)),
        ("indirect, EVENT_IDX", dict(indirect=True, event_idx=True, inflight=False)),
        ("direct, EVENT_IDX, inflight", dict(indirect=False, event_idx=True, inflight=True)),
        ("indirect, EVENT_IDX, inflight", dict(indirect=True, event_idx=True, inflight=True)),
    ]:
        run(name, batch=args.batch, seconds=args.seconds, **kw)
    run("direct, EVENT_IDX, batch 1", indirect=False, event_idx=True, inflight=False,
        batch=1, seconds=args.seconds)


if __name__ == "__main__":
    main()
