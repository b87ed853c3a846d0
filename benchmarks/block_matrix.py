"""Block matrix: our device against qemu-storage-daemon under two clients.

Why: ``benchmarks.block`` drives both back-ends with our own Python driver,
which shares its authors' assumptions with the device.  Here every row also
runs under an independent client, libblkio's virtio-blk-vhost-user driver
(``benchmarks/blkio/blkio_bench.c``, built against Debian 13's libblkio by
``benchmarks/blkio/fetch.sh``, cached outside the tree), and the two
back-ends alternate cell by cell in one run, so each ratio compares two
cells measured back to back on the same (shared, noisy) machine.

    python -m benchmarks.block_matrix [--clients blkio,ours] [--rounds 3]
        [--seconds 2] [--rows "randread 4K QD1,..."] [--peers qsd,contrib] [--json FILE]

Back-ends, each started fresh for every cell (and ended after it):
* ours: ``python -m devices.standalone block --socket-path S --file IMG
  --num-queues N`` (the standalone back-end program, no jail);
* qsd: ``qemu-storage-daemon`` with an iothread (``frontend.qsd``);
* contrib (``--peers qsd,contrib``): QEMU's own example back-end,
  ``contrib/vhost-user-blk`` on libvhost-user, a third peer built from
  Debian's QEMU source package alone (``conformance/build_qemu.sh`` builds
  and caches it beside the qtest binaries).

All are pinned to CPU 1 and the client to CPU 0 (``--pin none`` leaves them
free).  Per cell: IOPS, MB/s, median completion latency (client side), and
the back-end's CPU seconds per 100k I/Os: user+system time of the back-end's
process tree (``/proc/PID/stat`` of the process and its descendants) over
the I/O phase only (the blkio client waits on stdin between connecting,
running and disconnecting, so the harness reads the CPU time at those
points).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from frontend.qsd import qsd_command

from .common import fill_image, machine_summary, qsd_version, wait_for_socket

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT_CPU, BACKEND_CPU = {0}, {1}


@dataclass(frozen=True)
class Row:
    rw: str       # randread | randwrite | read | write (the last two sequential)
    bs: int
    qd: int
    jobs: int = 1

    @property
    def label(self) -> str:
        size = f"{self.bs >> 20}M" if self.bs >= 1 << 20 else f"{self.bs >> 10}K"
        return f"{self.rw} {size} QD{self.qd}" + (f" x{self.jobs}q" if self.jobs > 1 else "")


ROWS = [
    Row("randread", 4096, 1), Row("randread", 4096, 16), Row("randread", 4096, 64),
    Row("randwrite", 4096, 1), Row("randwrite", 4096, 16), Row("randwrite", 4096, 64),
    Row("read", 128 << 10, 8), Row("write", 128 << 10, 8),
    Row("read", 1 << 20, 8), Row("write", 1 << 20, 8),
    Row("randread", 4096, 16, 2), Row("randwrite", 4096, 16, 2),
]


@dataclass
class Cell:
    ios: int
    seconds: float
    bytes: int
    lat_p50_us: float
    cpu_s: float          # back-end CPU seconds over the I/O phase
    client_cpu_s: float = 0.0   # the client's CPU seconds (blkio: whole process)
    runq_wait_s: float = 0.0    # back-end threads' time runnable but not running (schedstat)

    @property
    def iops(self) -> float:
        return self.ios / self.seconds

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu_s / max(self.ios, 1) * 1e5


# ---------------------------------------------------------------- back-ends

def tree_cpu(pid: int) -> float:
    """User+system CPU seconds of ``pid``, its threads and its descendants."""
    return tree_stats(pid)[0]


def tree_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, seconds spent runnable but waiting for a CPU) of
    ``pid``, its threads and its descendants (/proc/PID/stat, and the
    threads' /proc/PID/task/TID/schedstat)."""
    wait = 0.0
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/schedstat") as f:
                    wait += int(f.read().split()[1]) / 1e9
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, IndexError, ValueError):
            pass
    return total, wait


class Backend:
    """One back-end process serving one image on one socket; ended by pid."""

    def __init__(self, kind: str, image: Path, sock: Path, jobs: int, log: Path, pin: bool,
                 extra: list[str] = ()) -> None:
        if sock.exists():
            sock.unlink()
        self.kind = kind
        if kind == "ours":
            cmd = [sys.executable, "-m", "devices.standalone", "block", "--socket-path", str(sock),
                   "--file", str(image), "--num-queues", str(jobs), *extra]
        elif kind == "contrib":
            cmd = [contrib_backend(), "--socket-path", str(sock), "--blk-file", str(image)]
        else:
            binary = shutil.which("qemu-storage-daemon")
            if binary is None:
                raise RuntimeError("qemu-storage-daemon not found (Debian: qemu-system-common)")
            cmd = qsd_command(binary, image, sock, iothread=True, num_queues=jobs)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, cwd=ROOT, start_new_session=True,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, BACKEND_CPU)) if pin else None)
        self.sock = sock
        try:
            wait_for_socket(str(sock), lambda: self.proc.poll() is None, timeout=30)
        except BaseException:
            self.stop()
            raise

    def cpu(self) -> float:
        cpu, self.last_wait = tree_stats(self.proc.pid)
        return cpu

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(2)   # ours leaves when the front-end does
                return
            except subprocess.TimeoutExpired:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@functools.cache
def contrib_backend() -> str:
    """QEMU's contrib/vhost-user-blk for the installed QEMU (built and cached once;
    looked up once per run, not per cell)."""
    out = subprocess.run(["sh", str(ROOT / "conformance" / "build_qemu.sh")], check=True, capture_output=True,
                         text=True)
    binary = Path(out.stdout.strip().splitlines()[-1]) / "contrib" / "vhost-user-blk" / "vhost-user-blk"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"{binary} was not built (conformance/build_qemu.sh)")
    return str(binary)


# ------------------------------------------------------------------ clients

def blkio_client() -> str:
    out = subprocess.run(["sh", str(HERE / "blkio" / "fetch.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def run_blkio(binary: str, be: Backend, row: Row, seconds: float, pin: bool) -> Cell:
    p = subprocess.Popen([binary, str(be.sock), row.rw, str(row.bs), str(row.qd), str(seconds), str(row.jobs)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         preexec_fn=(lambda: os.sched_setaffinity(0, CLIENT_CPU)) if pin else None)
    try:
        assert p.stdin and p.stdout
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"blkio_bench did not connect to {be.sock} (exit {p.wait()})")
        c0 = be.cpu()
        w0 = be.last_wait
        p.stdin.write("\n")
        p.stdin.flush()
        line = p.stdout.readline()
        c1 = be.cpu()
        p.stdin.write("\n")
        p.stdin.flush()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0 or not line:
            raise RuntimeError(f"blkio_bench failed on {row.label} (exit {p.returncode})")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    r = json.loads(line)
    return Cell(r["ios"], r["seconds"], r["bytes"], r["lat_p50_us"], c1 - c0, usage.ru_utime + usage.ru_stime,
                be.last_wait - w0)


def run_ours(be: Backend, row: Row, seconds: float, pin: bool) -> Cell:
    """Our Python driver (``frontend``): one process per queue (forked after
    set-up: the driver memory and eventfds are shared), ``row.qd`` requests in
    flight on each, completion latency per request."""
    from frontend.vhost_user import VhostUserFrontend
    from frontend.virtio_blk import BlockDriver

    if pin:
        os.sched_setaffinity(0, CLIENT_CPU)
    fe = VhostUserFrontend.connect(str(be.sock), timeout=10)
    try:
        fe.negotiate()
        fe.setup_memory(max(64 << 20, row.jobs * row.qd * row.bs * 2))
        if be.kind == "contrib":
            # libvhost-user stops a queue that has INFLIGHT_SHMFD negotiated but no
            # inflight region (QEMU always sends one); our device and qsd do not need it
            fe.get_inflight(row.jobs, 256)
        queues = [fe.setup_queue(i, 256) for i in range(row.jobs)]
        drivers = [BlockDriver(q, depth=row.qd, max_io=row.bs) for q in queues]
        size = int.from_bytes(fe.get_config(0, 8), "little") * 512
        for d in drivers:
            for s in d.slots:
                s.data[:] = os.urandom(row.bs)
        c0 = be.cpu()
        w0 = be.last_wait
        pipes = []
        for j in range(1, row.jobs):
            r, w = os.pipe()
            if os.fork() == 0:
                try:
                    res = _drive(drivers[j], row, seconds, size, j)
                    os.write(w, json.dumps(res).encode())
                finally:
                    os._exit(0)
            os.close(w)
            pipes.append(r)
        results = [_drive(drivers[0], row, seconds, size, 0)]
        for r in pipes:
            data = b""
            while chunk := os.read(r, 1 << 16):
                data += chunk
            os.close(r)
            results.append(json.loads(data))
            os.wait()
        c1 = be.cpu()
    finally:
        fe.close()
    ios = sum(r["ios"] for r in results)
    lats = sorted(x for r in results for x in r["lat"])
    return Cell(ios, seconds, ios * row.bs, statistics.median(lats) if lats else 0.0, c1 - c0,
                runq_wait_s=be.last_wait - w0)


def idle_cpu(work: Path, pin: bool, seconds: float = 3.0) -> float:
    """Our back-end's CPU share (fraction of one CPU) while a connected
    driver with a running queue sends nothing, after a burst of QD1 I/O
    (the adaptive poll must switch itself off)."""
    from frontend.vhost_user import VhostUserFrontend
    from frontend.virtio_blk import BlockDriver

    be = Backend("ours", work / "disk.img", work / "ours.sock", 1, work / "ours.log", pin)
    try:
        fe = VhostUserFrontend.connect(str(be.sock), timeout=10)
        try:
            fe.negotiate()
            fe.setup_memory(64 << 20)
            blk = BlockDriver(fe.setup_queue(0, 256), depth=1, max_io=4096)
            for i in range(2000):
                blk.read(i * 4096, 4096)
            time.sleep(0.1)
            c0 = be.cpu()
            time.sleep(seconds)
            return (be.cpu() - c0) / seconds
        finally:
            fe.close()
    finally:
        be.stop()


def _drive(blk, row: Row, seconds: float, size: int, job: int) -> dict:
    import random
    q = blk.queue
    by_head = blk.by_head
    submit = blk.submit_write if "write" in row.rw else blk.submit_read
    step = row.bs // 512
    nblocks = size // row.bs
    rnd = random.Random(job + 1)
    seq = nblocks // row.jobs * job
    sample_every = 1 + row.qd // 4   # latency of a sample of requests: bounded memory
    lat: list[float] = []
    started: dict[int, float] = {}
    perf = time.perf_counter

    def next_block() -> int:
        nonlocal seq
        if row.rw.startswith("rand"):
            return rnd.randrange(nblocks)
        seq = (seq + 1) % nblocks
        return seq

    for s in blk.slots:
        started[s.head] = perf()
        submit(s, next_block() * step, row.bs)
    q.kick()
    count = 0
    t0 = perf()
    end = t0 + seconds
    submitting = True
    while q.outstanding:
        done = q.wait_used(10.0)
        now = perf()
        for head, _ in done:
            s = by_head[head]
            s.busy = False
            if s.status[0]:
                raise RuntimeError(f"{row.label}: status {s.status[0]}")
            if started[head] < end:
                count += 1
                if count % sample_every == 0:
                    lat.append((now - started[head]) * 1e6)
            if submitting:
                started[head] = now
                submit(s, next_block() * step, row.bs)
        if submitting and now >= end:
            submitting = False
        q.kick()
    return {"ios": count, "lat": lat}


# --------------------------------------------------------------------- main

def ratio_cols(ours: list[Cell], qsd: list[Cell]) -> tuple[float, float, float]:
    """Median over rounds of the per-round ratios ours/qsd: throughput,
    median latency, CPU per I/O (>1 is better only for the first)."""
    pairs = list(zip(ours, qsd))
    return (statistics.median(o.iops / q.iops for o, q in pairs),
            statistics.median(o.lat_p50_us / q.lat_p50_us for o, q in pairs if q.lat_p50_us),
            statistics.median(o.cpu_per_100k / q.cpu_per_100k for o, q in pairs if q.cpu_per_100k))


def peer_table(results: dict, clients: list[str], rows: list[Row], peer: str) -> str:
    """The third peer beside qsd and ours: its throughput and CPU per I/O as
    ratios to qsd, and ours to it."""
    out = []
    for client in clients:
        out.append(f"\n**client: {client}, third peer: {peer}**\n")
        out.append(f"| row | {peer} | throughput {peer}/qsd | CPU/IO {peer}/qsd | throughput ours/{peer} "
                   f"| CPU/IO ours/{peer} |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            o, q, c = (results.get((client, row.label, k), []) for k in ("ours", "qsd", peer))
            if not (o and q and c):
                continue
            big = row.bs >= 128 << 10
            val = f"{statistics.median(x.mbps for x in c):,.0f} MB/s" if big else \
                f"{statistics.median(x.iops for x in c):,.0f} IOPS"
            ct, _, cc = ratio_cols(c, q)
            ot, _, oc = ratio_cols(o, c)
            out.append(f"| {row.label} | {val} | {ct:.2f} | {cc:.2f} | **{ot:.2f}** | {oc:.2f} |")
    return "\n".join(out)


def table(results: dict, clients: list[str], rows: list[Row]) -> str:
    out = []
    for client in clients:
        out.append(f"\n**client: {client}**\n")
        out.append("| row | ours | qsd | throughput ours/qsd | p50 latency µs ours / qsd (ratio) "
                   "| CPU s/100k IO ours / qsd (ratio) |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            o = results.get((client, row.label, "ours"), [])
            q = results.get((client, row.label, "qsd"), [])
            if not o or not q:
                continue
            big = row.bs >= 128 << 10
            unit = (lambda cs: f"{statistics.median(c.mbps for c in cs):,.0f} MB/s") if big else \
                (lambda cs: f"{statistics.median(c.iops for c in cs):,.0f} IOPS")
            tr, lr, cr = ratio_cols(o, q)
            med = statistics.median
            out.append(f"| {row.label} | {unit(o)} | {unit(q)} | **{tr:.2f}** "
                       f"| {med(c.lat_p50_us for c in o):.0f} / {med(c.lat_p50_us for c in q):.0f} ({lr:.2f}) "
                       f"| {med(c.cpu_per_100k for c in o):.2f} / {med(c.cpu_per_100k for c in q):.2f} ({cr:.2f}) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.block_matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="blkio,ours")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rows", help="comma-separated label prefixes, e.g. 'randread 4K QD16,read 128K'")
    p.add_argument("--pin", choices=("split", "none"), default="split")
    p.add_argument("--ours-flags", default="", help="extra flags for our back-end, e.g. '--poll-us 0'")
    p.add_argument("--peers", default="qsd", help="back-ends beside ours: qsd (always), contrib (QEMU's "
                   "contrib/vhost-user-blk)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    peers = [x.strip() for x in args.peers.split(",") if x.strip() and x.strip() != "qsd"]
    if any(x != "contrib" for x in peers):
        p.error(f"--peers: unknown back-end in {args.peers!r} (qsd, contrib)")
    kinds = ["ours", "qsd", *peers]
    rows = ROWS
    if args.rows:
        wanted = [x.strip() for x in args.rows.split(",")]
        rows = [r for r in ROWS if any(r.label.startswith(w) for w in wanted)]
    clients = [c.strip() for c in args.clients.split(",")]
    pin = args.pin == "split" and (os.cpu_count() or 1) >= 2
    binary = blkio_client() if "blkio" in clients else ""
    results: dict[tuple[str, str, str], list[Cell]] = {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="vhost-matrix-") as tmp:
        work = Path(tmp)
        print(f"# block matrix {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"# machine: {machine_summary()}; {qsd_version()}; libblkio client {binary or '-'}")
        print(f"# {args.rounds} rounds x {args.seconds}s per cell, image {args.size_mib} MiB (page cache), "
              f"{'client CPU 0, back-end CPU 1' if pin else 'no pinning'}; our flags: {args.ours_flags or '-'}")
        # One image for every back-end (cells run one at a time): the same file
        # and page-cache pages for all; with a copy each, the 1 MiB read row read
        # 1.17-1.20x qsd's CPU per I/O, with one file 1.02-1.04x (README, run E).
        fill_image(work / "disk.img", args.size_mib << 20)
        for r in range(args.rounds):
            for client in clients:
                for row in rows:
                    shift = (r + rows.index(row)) % len(kinds)
                    order = kinds[shift:] + kinds[:shift]     # who goes first rotates
                    for kind in order:
                        if kind == "contrib" and client == "blkio" and row.jobs > 1:
                            # its config space says num_queues 1, and libblkio keeps to it
                            if r == 0:
                                print(f"  skipped {client} {row.label} contrib: one queue only", file=sys.stderr)
                            continue
                        be = Backend(kind, work / "disk.img", work / f"{kind}.sock", row.jobs,
                                     work / f"{kind}.log", pin, args.ours_flags.split())
                        try:
                            if client == "blkio":
                                cell = run_blkio(binary, be, row, args.seconds, pin)
                            else:
                                cell = run_ours(be, row, args.seconds, pin)
                        except Exception as exc:  # noqa: BLE001 - report and go on
                            print(f"  FAILED round {r + 1} {client} {row.label} {kind}: {exc}", file=sys.stderr)
                            ok = False
                            continue
                        finally:
                            be.stop()
                        results.setdefault((client, row.label, kind), []).append(cell)
                        print(f"  round {r + 1} {client:<5} {row.label:<22} {kind:<7} {cell.iops:>9,.0f} IOPS "
                              f"{cell.mbps:>8.1f} MB/s p50 {cell.lat_p50_us:7.1f} µs "
                              f"CPU {cell.cpu_per_100k:6.2f} s/100k client {cell.client_cpu_s / max(cell.ios, 1) * 1e5:6.2f} runq-wait {cell.runq_wait_s / cell.seconds * 100:3.0f}%  load {os.getloadavg()[0]:.1f}",
                              file=sys.stderr, flush=True)
        if not ok:
            for kind in kinds:
                log = work / f"{kind}.log"
                if log.exists():
                    print(f"--- {kind} log tail ---\n" + "\n".join(log.read_text(errors='replace').splitlines()[-10:]),
                          file=sys.stderr)
        if "ours" in clients:
            print(f"# our back-end idle after QD1 I/O, connected: {idle_cpu(work, pin) * 100:.2f}% of a CPU")
    print(table(results, clients, rows))
    for peer in peers:
        print(peer_table(results, clients, rows, peer))
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({f"{k[0]}|{k[1]}|{k[2]}": [vars(c) for c in v]
                                         for k, v in results.items()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
