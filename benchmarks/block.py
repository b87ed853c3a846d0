"""Block benchmark: our vhost-user-blk device against qemu-storage-daemon.

Why this shape: a ratio measured side by side in one run is the only number
that survives a change of machine, so both back-ends serve copies of the same
image, are driven by the same front-end driver (``frontend.vhost_user``) with
the same pinning, and alternate workload by workload over several rounds;
the table reports the median and the spread (min-max) of each.

    python -m benchmarks.block [--rounds 5] [--seconds 2] [--size-mib 256]
                               [--pin split|none] [--qsd-only] [--profile FILE]

Pinning (``--pin split``, the default): the driver runs on CPU 0 and each
back-end process (all its threads) on CPU 1, so driver and device never fight
for a core and both back-ends get the same placement.  ``--pin none`` leaves
the scheduler free, for both alike.

qemu-storage-daemon runs with an iothread (its fast configuration), cache
mode default (page cache), like our device's default (no O_DIRECT).

A qsd stall (no completion within ``--stall-timeout``; qsd 7.2 has been seen
to print "request missing headers" then "Virtqueue size exceeded" under a
Python driver) is counted, the daemon restarted fresh and the cell retried.
Exit status: 0 when every cell ran, 1 otherwise (e.g. our device missing).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from connection.errors import QueueBrokenError
from frontend.vhost_user import VhostUserFrontend
from frontend.virtio_blk import BlockDriver, BlockError
from connection.protocol import ProtocolFeature

from .common import (OurBlockProcess, QsdProcess, fill_image, copy_image, machine_summary, qsd_version,
                     spread)

QUEUE_SIZE = 256
MAX_DEPTH = 32
MAX_IO = 128 << 10
DRIVER_MEMORY = 64 << 20


@dataclass(frozen=True)
class Workload:
    op: str        # "read" | "write"
    bs: int
    depth: int

    @property
    def label(self) -> str:
        return f"{self.op} {self.bs >> 10} KiB QD{self.depth}"


WORKLOADS = [
    Workload("read", 4096, 1), Workload("read", 4096, 32), Workload("read", 128 << 10, 8),
    Workload("write", 4096, 1), Workload("write", 4096, 32), Workload("write", 128 << 10, 8),
]


@dataclass
class Cell:
    iops: float
    mbps: float
    driver_cpu: float    # fraction of one CPU the driver used
    device_cpu: float    # fraction of one CPU the back-end used (all threads)
    calls_per_io: float = 0.0   # call-eventfd wake-ups of the driver per request
    kicks_per_io: float = 0.0   # kicks the driver had to send per request
    steal: float = 0.0          # CPU time the hypervisor took from this VM (all vCPUs), fraction of one CPU
    others: float = 0.0         # CPU used by other processes (not driver, not back-end), fraction of one CPU


def cpu_times() -> tuple[float, float]:
    """(busy, steal) seconds of all CPUs from /proc/stat; zeros where not
    readable.  Noisy-neighbour gauges: steal is the hypervisor's, busy minus
    the driver's and the back-end's CPU is other processes' (with autogroup
    scheduling a niced test suite in another session still takes about half
    of a CPU from whoever shares it)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        tck = os.sysconf("SC_CLK_TCK")
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / tck, v[7] / tck
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


@dataclass
class Results:
    cells: dict[tuple[str, str], list[Cell]] = field(default_factory=dict)   # (workload, backend)
    stalls: dict[str, int] = field(default_factory=dict)                       # workload -> qsd stalls
    stall_logs: list[str] = field(default_factory=list)


class Target:
    """One back-end and the front-end connected to it."""

    def __init__(self, name: str, start, stall_retry: bool, indirect: bool = False,
                 inflight: bool = True) -> None:
        self.name = name
        self.indirect = indirect
        #: Use GET/SET_INFLIGHT_FD when the back-end offers INFLIGHT_SHMFD, as
        #: QEMU's vhost-user-blk does (our device offers it; qsd 7.2 does not).
        self.inflight = inflight
        self.uses_inflight = False
        self._start = start
        self.stall_retry = stall_retry
        self.proc = None
        self.fe: VhostUserFrontend | None = None
        self.blk: BlockDriver | None = None
        self.restarts = 0

    def up(self) -> None:
        self.proc = self._start()
        fe = VhostUserFrontend.connect(self.proc.sock, timeout=10)
        fe.negotiate()
        fe.setup_memory(DRIVER_MEMORY)
        self.uses_inflight = bool(self.inflight and fe.acked_protocol_features & ProtocolFeature.INFLIGHT_SHMFD)
        if self.uses_inflight:
            fe.get_inflight(1, QUEUE_SIZE)
        q = fe.setup_queue(0, QUEUE_SIZE)
        self.fe = fe
        self.blk = BlockDriver(q, depth=MAX_DEPTH, max_io=MAX_IO, indirect=self.indirect)
        rnd = random.Random(7)
        for s in self.blk.slots:   # write payloads: random, written once
            s.data[:] = rnd.randbytes(MAX_IO)

    def down(self) -> None:
        if self.fe is not None:
            try:
                self.fe.close()
            except Exception:
                pass
            self.fe = None
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def restart(self) -> None:
        # Drop the stalled connection without waiting for it.
        if self.fe is not None:
            self.fe.disconnect()
            self.fe.close()
            self.fe = None
        self.down()
        self.restarts += 1
        self.up()


def run_cell(t: Target, w: Workload, seconds: float, offsets: list[int], stall_timeout: float) -> Cell:
    """Keep ``w.depth`` requests in flight for ``seconds``; one kick per batch."""
    blk = t.blk
    assert blk is not None and t.proc is not None
    q = blk.queue
    by_head = blk.by_head
    submit = blk.submit_read if w.op == "read" else blk.submit_write
    nbytes = w.bs
    step = w.bs // 512
    mask = len(offsets) - 1
    slots = blk.slots[:w.depth]
    i = 0
    count = 0
    calls0, kicks0 = q.calls, q.kicks
    dev_cpu0 = t.proc.cpu_seconds()
    busy0, steal0 = cpu_times()
    drv0 = time.process_time()
    t0 = time.perf_counter()
    end = t0 + seconds
    for s in slots:
        submit(s, offsets[i & mask] * step, nbytes)
        i += 1
    q.kick()
    submitting = True
    wait_used = q.wait_used
    perf = time.perf_counter
    while q.outstanding:
        done = wait_used(stall_timeout)
        for head, _length in done:
            s = by_head[head]
            s.busy = False
            if s.status[0]:
                raise BlockError(w.op, s.status[0], f" at request {count}")
            count += 1
            if submitting:
                submit(s, offsets[i & mask] * step, nbytes)
                i += 1
        if submitting and perf() >= end:
            submitting = False
        q.kick()
    elapsed = time.perf_counter() - t0
    drv = time.process_time() - drv0
    dev = t.proc.cpu_seconds() - dev_cpu0
    busy1, steal1 = cpu_times()
    iops = count / elapsed
    return Cell(iops, iops * nbytes / 1e6, drv / elapsed, dev / elapsed,
                (q.calls - calls0) / max(count, 1), (q.kicks - kicks0) / max(count, 1),
                (steal1 - steal0) / elapsed, max(0.0, busy1 - busy0 - drv - dev) / elapsed)


def verify(t: Target, size: int) -> None:
    """A data check before timing: what we write is what we read back."""
    assert t.blk is not None
    rnd = random.Random(3)
    ops = [("write", rnd.randrange(0, size // 4096) * 4096, rnd.randbytes(4096)) for _ in range(64)]
    seen: dict[int, bytes] = {}
    for _, off, data in ops:
        seen[off] = data
    t.blk.run(ops)
    got = t.blk.run([("read", off, 4096) for off in seen])
    if got != list(seen.values()):
        raise RuntimeError(f"{t.name}: data read back differs from data written")


def measure(t: Target, w: Workload, args, offsets: list[int], res: Results) -> Cell | None:
    attempts = args.qsd_retries + 1 if t.stall_retry else 1
    for attempt in range(attempts):
        try:
            return run_cell(t, w, args.seconds, offsets, args.stall_timeout)
        except (TimeoutError, QueueBrokenError, BlockError) as exc:
            if not t.stall_retry:
                raise
            res.stalls[w.label] = res.stalls.get(w.label, 0) + 1
            tail = t.proc.log_tail() if t.proc is not None else ""
            res.stall_logs.append(f"{w.label} attempt {attempt + 1}: {exc}; qsd log: {tail!r}")
            print(f"  qsd stalled on {w.label} ({exc}); restarting a fresh daemon", file=sys.stderr)
            t.restart()
    return None


def fmt_spread(values: list[float], digits: int = 0) -> str:
    med, lo, hi = spread(values)
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def table(res: Results, names: list[str]) -> str:
    """Markdown: median (min-max) per workload; the ratio is per round (ours/qsd
    measured back to back), and device CPU per I/O is back-end CPU time (all
    threads) divided by completed requests, a measure of efficiency that the
    shared driver does not blur."""
    head = ("| workload | ours IOPS | qsd IOPS | ratio ours/qsd | ours MB/s | qsd MB/s "
            "| device CPU µs/IO ours / qsd | driver CPU ours / qsd |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for w in WORKLOADS:
        qsd = res.cells.get((w.label, "qsd"), [])
        ours = res.cells.get((w.label, "ours"), [])
        if not qsd and not ours:
            continue

        def col(cells: list[Cell], attr: str, digits: int = 0) -> str:
            return fmt_spread([getattr(c, attr) for c in cells], digits) if cells else "n/a"

        def us_per_io(cells: list[Cell]) -> str:
            return f"{spread([c.device_cpu / c.iops * 1e6 for c in cells])[0]:.1f}" if cells else "n/a"

        def drv(cells: list[Cell]) -> str:
            return f"{spread([c.driver_cpu for c in cells])[0] * 100:.0f}%" if cells else "n/a"

        if ours and qsd and len(ours) == len(qsd):
            ratio = fmt_spread([o.iops / q.iops for o, q in zip(ours, qsd)], 2)
        else:
            ratio = "n/a"
        rows.append(f"| {w.label} | {col(ours, 'iops')} | {col(qsd, 'iops')} | {ratio} | {col(ours, 'mbps', 1)} "
                    f"| {col(qsd, 'mbps', 1)} | {us_per_io(ours)} / {us_per_io(qsd)} | {drv(ours)} / {drv(qsd)} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.block", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per cell (one workload on one back-end)")
    p.add_argument("--size-mib", type=int, default=256, help="image size")
    p.add_argument("--pin", choices=("split", "none"), default="split")
    p.add_argument("--qsd-only", action="store_true", help="measure qemu-storage-daemon alone")
    p.add_argument("--indirect", action="store_true",
                   help="one INDIRECT descriptor per request, as Linux guests do (default: 3-descriptor chains)")
    p.add_argument("--no-iothread", action="store_true", help="qsd without an iothread")
    p.add_argument("--no-inflight", action="store_true",
                   help="never use GET/SET_INFLIGHT_FD (default: used when the back-end offers "
                        "INFLIGHT_SHMFD, as QEMU does; our device offers it, qsd 7.2 does not)")
    p.add_argument("--profile", type=Path, help="cProfile our device process; stats written here")
    p.add_argument("--workloads", help="comma-separated labels' prefixes, e.g. 'read 4 KiB QD1'")
    p.add_argument("--stall-timeout", type=float, default=10.0)
    p.add_argument("--qsd-retries", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write raw results here")
    p.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global WORKLOADS
    if args.workloads:
        wanted = [x.strip() for x in args.workloads.split(",")]
        WORKLOADS = [w for w in WORKLOADS if any(w.label.startswith(x) for x in wanted)]
    size = args.size_mib << 20
    ncpu = os.cpu_count() or 1
    if args.pin == "split" and ncpu >= 2:
        driver_cpus, device_cpus = {0}, {1}
        os.sched_setaffinity(0, driver_cpus)
        pin_text = "driver pinned to CPU 0, each back-end process (all threads) to CPU 1"
    else:
        device_cpus = None
        pin_text = "no pinning (driver and back-ends free on all CPUs)"
    workdir_ctx = tempfile.TemporaryDirectory(prefix="vhost-bench-") if args.dir is None else None
    workdir = Path(workdir_ctx.name) if workdir_ctx else args.dir
    workdir.mkdir(parents=True, exist_ok=True)
    ok = True
    targets: list[Target] = []
    res = Results()
    try:
        print(f"# block benchmark {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
        print(f"# machine: {machine_summary()}; {qsd_version()}")
        print(f"# {pin_text}; image {args.size_mib} MiB random data, page cache; "
              f"{args.rounds} rounds x {args.seconds}s per cell; queue size {QUEUE_SIZE}; "
              f"{'indirect' if args.indirect else 'direct'} descriptors")
        base = workdir / "base.img"
        fill_image(base, size)
        copy_image(base, workdir / "qsd.img")
        qsd_log = workdir / "qsd.log"
        targets.append(Target("qsd", lambda: QsdProcess(workdir / "qsd.img", str(workdir / "qsd.sock"), qsd_log,
                                                        iothread=not args.no_iothread, cpus=device_cpus),
                              stall_retry=True, indirect=args.indirect, inflight=not args.no_inflight))
        if not args.qsd_only:
            copy_image(base, workdir / "ours.img")
            try:
                import devices.block  # noqa: F401
                targets.append(Target("ours", lambda: OurBlockProcess(workdir / "ours.img", str(workdir / "ours.sock"),
                                                                      cpus=device_cpus, profile=args.profile),
                                      stall_retry=False, indirect=args.indirect,
                                      inflight=not args.no_inflight))
            except Exception as exc:
                print(f"ERROR: our block device cannot be started: {type(exc).__name__}: {exc}\n"
                      f"       (devices/block.py missing or broken); measuring qsd only, exit status 1",
                      file=sys.stderr)
                ok = False
        base.unlink()
        for t in list(targets):
            try:
                t.up()
                verify(t, size)
            except Exception as exc:
                if t.name != "ours":
                    raise
                traceback.print_exc()
                print(f"ERROR: our block device failed to start or to verify: {type(exc).__name__}: {exc}; "
                      f"measuring qsd only, exit status 1", file=sys.stderr)
                t.down()
                targets.remove(t)
                ok = False
        print("# inflight region (GET/SET_INFLIGHT_FD): "
              + ", ".join(f"{t.name} {'yes' if t.uses_inflight else 'no'}" for t in targets))
        rnd = random.Random(11)
        offsets = {bs: [rnd.randrange(0, size // bs) for _ in range(1 << 16)] for bs in {w.bs for w in WORKLOADS}}
        # Warm-up: one short pass of everything on every back-end.
        for w in WORKLOADS:
            for t in targets:
                measure(t, w, argparse.Namespace(**{**vars(args), "seconds": 0.3}), offsets[w.bs], Results())
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for w in WORKLOADS:
                for t in order:
                    cell = measure(t, w, args, offsets[w.bs], res)
                    if cell is None:
                        ok = False
                        continue
                    res.cells.setdefault((w.label, t.name), []).append(cell)
                    print(f"  round {r + 1} {w.label:<18} {t.name:<4} {cell.iops:>10,.0f} IOPS "
                          f"{cell.mbps:>8.1f} MB/s  dev CPU {cell.device_cpu * 100:3.0f}%  "
                          f"drv CPU {cell.driver_cpu * 100:3.0f}%  calls/IO {cell.calls_per_io:.2f} "
                          f"kicks/IO {cell.kicks_per_io:.2f} steal {cell.steal * 100:3.0f}% "
                          f"others {cell.others * 100:3.0f}%", file=sys.stderr, flush=True)
    except Exception:
        traceback.print_exc()
        ok = False
    finally:
        for t in targets:
            t.down()
        if workdir_ctx:
            workdir_ctx.cleanup()
    names = [t.name for t in targets]
    print()
    print(table(res, names))
    print()
    stalls = sum(res.stalls.values())
    restarts = sum(t.restarts for t in targets)
    print(f"qsd stalls: {stalls} (daemon restarts: {restarts})" + (f" {res.stalls}" if stalls else ""))
    all_cells = [c for cells in res.cells.values() for c in cells]
    if all_cells:
        for what, attr in (("hypervisor steal", "steal"), ("other processes' CPU", "others")):
            med, lo, hi = spread([getattr(c, attr) for c in all_cells])
            print(f"{what} during timed cells: median {med * 100:.0f}% of one CPU ({lo * 100:.0f}-{hi * 100:.0f}%)")
    for line in res.stall_logs:
        print(f"  {line}")
    if args.profile and args.profile.exists():
        print(f"\nprofile of our device process ({args.profile}), top by total time:")
        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("tottime").print_stats(15)
    if args.json:
        args.json.write_text(json.dumps({
            "cells": {f"{k[0]}|{k[1]}": [vars(c) for c in v] for k, v in res.cells.items()},
            "stalls": res.stalls, "stall_logs": res.stall_logs}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
