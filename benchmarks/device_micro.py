"""Micro-benchmark of the block device's whole request path, no sockets.

Why: on a shared 2-core machine wall-clock IOPS move by 2x from run to run;
CPU time per request of one thread, and instruction counts under
``valgrind --tool=callgrind``, do not.  This drives ``BlockDevice``'s own
drain (the queue's ``serve_hook``, exactly what a kick runs) over a ring in
a memfd "guest", with a page-cached image, so what is measured is the device:
pop (descriptor walk), ``parse_request``, ``preadv``/``pwritev``, the status
byte, ``add_used``, publication and the notification decisions.

    python -m benchmarks.device_micro [--op read|write] [--bs 4096] [--batch 16]
                                      [--requests 200000] [--indirect] [--repeat 5]

Prints µs of this thread's CPU per request (best of ``--repeat``) and the
syscalls it made per request (``/proc/self/io`` syscr/syscw).  Under
callgrind, run it twice with different ``--requests`` and divide the
difference of the totals: instructions per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from connection.executor import Executor
from connection.protocol import VirtioFeature
from connection.split_ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from devices.block import BlockDevice
from devices.virtio_blk import F_FLUSH, HEADER, T_IN, T_OUT

from .guest_ring import MiB, QSIZE, memfd_guest, queue_config, write_desc


def syscalls() -> int:
    with open("/proc/thread-self/io") as f:
        v = dict(line.split(": ") for line in f.read().splitlines())
    return int(v["syscr"]) + int(v["syscw"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=("read", "write"), default="read")
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16, help="requests per kick (the queue depth)")
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--indirect", action="store_true")
    ap.add_argument("--image-mib", type=int, default=64)
    ap.add_argument("--kick", action="store_true",
                    help="go through the kick eventfd and the event loop (the whole wake-up path "
                         "but the context switch: reader callback, kick read, drain, notification, "
                         "re-arm), one batch per kick, instead of calling the drain directly")
    args = ap.parse_args()

    batch = args.batch
    per = batch if args.indirect else min(batch, QSIZE // 3)
    stride = args.bs + 8192
    size = 4 * MiB + per * stride
    _host, hv, mem = memfd_guest(size)
    desc_gpa, avail_gpa, used_gpa, tables_gpa, data_gpa = 0x0, 0x4000, 0x5000, 0x8000, 4 * MiB
    desc = hv[desc_gpa:desc_gpa + 16 * QSIZE].cast("Q")
    avail = hv[avail_gpa:avail_gpa + 6 + 2 * QSIZE].cast("H")
    nblocks = (args.image_mib * MiB) // args.bs
    write = args.op == "write"
    dflags = 0 if write else DESC_F_WRITE
    heads = []
    for r in range(per):
        hdr, data, status = data_gpa + r * stride, data_gpa + r * stride + 4096, data_gpa + r * stride + 4096 + args.bs
        HEADER.pack_into(hv, hdr, T_OUT if write else T_IN, 0, (r * 7919 % nblocks) * (args.bs >> 9))
        if args.indirect:
            t = tables_gpa + 48 * r
            tv = hv[t:t + 48].cast("Q")
            write_desc(tv, 0, hdr, 16, DESC_F_NEXT, 1)
            write_desc(tv, 1, data, args.bs, dflags | DESC_F_NEXT, 2)
            write_desc(tv, 2, status, 1, DESC_F_WRITE)
            tv.release()
            write_desc(desc, r, t, 48, DESC_F_INDIRECT)
            heads.append(r)
        else:
            h = 3 * r
            write_desc(desc, h, hdr, 16, DESC_F_NEXT, h + 1)
            write_desc(desc, h + 1, data, args.bs, dflags | DESC_F_NEXT, h + 2)
            write_desc(desc, h + 2, status, 1, DESC_F_WRITE)
            heads.append(h)
    for k in range(QSIZE):
        avail[2 + k] = heads[k % per]

    with tempfile.TemporaryFile(dir="/var/tmp") as img:
        img.write(os.urandom(args.image_mib * MiB))
        img.flush()
        ex = Executor()
        asyncio.set_event_loop(ex.loop)
        dev = BlockDevice(ex, "micro", os.dup(img.fileno()), args.image_mib * MiB)
        dev.ack_features(int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX) | F_FLUSH)
        cfg, call, kick = queue_config(ex.loop, desc_gpa, avail_gpa, used_gpa)
        features = int(VirtioFeature.RING_EVENT_IDX | (VirtioFeature.RING_INDIRECT_DESC if args.indirect else 0))
        q = cfg.activate(mem, features)
        dev.poll_max_ns = 0   # start_queue gives the queue the device's bound: no polling here
        dev.start_queue(0, q, mem)
        ex.loop.run_until_complete(asyncio.sleep(0.01))   # the task parks in wait_kick, hook set
        drain = q.serve_hook
        assert drain is not None, "the device did not install its serve hook"
        idx = 0
        best = float("inf")
        rounds = max(1, args.requests // batch)
        for _ in range(args.repeat):
            s0 = syscalls()
            c0 = time.thread_time()
            if args.kick:
                idx = _kick_rounds(ex.loop, avail, idx, batch, rounds, kick, call)
            else:
                for _ in range(rounds):
                    idx = (idx + batch) & 0xFFFF
                    avail[1] = idx
                    drain()
                    try:
                        os.eventfd_read(call)
                    except BlockingIOError:
                        pass
            cpu = time.thread_time() - c0
            sc = syscalls() - s0
            best = min(best, cpu / (rounds * batch))
        assert not q.broken, q.broken_reason
        print(f"{args.op} {args.bs} B batch {batch} {'indirect' if args.indirect else 'direct'}"
              f"{' via kicks' if args.kick else ''}: "
              f"{best * 1e6:.2f} us CPU/request (best of {args.repeat}), "
              f"{sc / (rounds * batch):.2f} syscalls/request (incl. the harness's call-fd read)")
        dev.stop_queue(0)
        cfg.close()


def _kick_rounds(loop: asyncio.AbstractEventLoop, avail: memoryview, idx: int, batch: int, rounds: int,
                 kick: int, call: int) -> int:
    """``rounds`` batches, each published and kicked as a driver would, the
    next one when the device's notification arrives on the call fd.  The
    device's queue sleeps with kicks armed between batches (poll-us 0), so
    every batch goes through its kick fd's reader callback."""
    left = rounds
    done = loop.create_future()

    def completed() -> None:
        nonlocal left
        os.read(call, 8)
        left -= 1
        if not left:
            done.set_result(None)
            return
        publish()

    def publish() -> None:
        nonlocal idx
        idx = (idx + batch) & 0xFFFF
        avail[used_event] = (idx - 1) & 0xFFFF   # EVENT_IDX: notify me at the batch's last completion
        avail[1] = idx
        os.write(kick, _ONE)

    loop.add_reader(call, completed)
    used_event = 2 + QSIZE
    try:
        publish()
        loop.run_until_complete(done)
    finally:
        loop.remove_reader(call)
    return idx


_ONE = (1).to_bytes(8, "little")


if __name__ == "__main__":
    main()
