"""Guest-side block benchmark: fio inside a QEMU guest, our device vs qemu-storage-daemon.

Why inside a guest: host-side micro-benchmarks time the back-end alone; a guest run goes
through QEMU, the virtio-blk driver and the vhost-user data path the way production does.
Both back-ends serve the same image from the page cache, one after the other, alternating
(ours, qsd, ours, qsd, ...), so drift on the host hits both alike. Under TCG the guest's
emulated CPU dominates, so read the ratios and the QD1 latency, not the absolute numbers.

    python -m benchmarks.guest_fio [--runs 3] [--runtime 5] [--ours supervisor|device]

fio comes from the host (Debian's `fio` package) and is copied into the initramfs with
every library `ldd` lists.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.block_matrix import tree_stats
from frontend.guest import procs
from frontend.guest.backends import QsdBlock, start_our_block
from frontend.guest.initramfs import base_initramfs
from frontend.guest.kernel import HarnessError, ensure_kernel
from frontend.guest.qemu import Qemu, choose_accel

log = logging.getLogger("bench.guest_fio")

MiB = 1 << 20
IMAGE_SIZE = 512 * MiB
#: fio's --ramp_time: I/O that runs but is not in fio's figures.
RAMP_S = 1

# name -> fio arguments. 128 KiB sequential at iodepth 8: deep enough to stream.
JOBS = {
    "randread_4k_qd1": "--rw=randread --bs=4k --iodepth=1",
    "randread_4k_qd32": "--rw=randread --bs=4k --iodepth=32",
    "seqread_128k_qd8": "--rw=read --bs=128k --iodepth=8",
}

GUEST_SCRIPT = r"""
export LD_LIBRARY_PATH={libpath}
fio --version >/dev/null 2>&1 || {{ echo "E2E-RESULT error=fio_does_not_run"; /usr/bin/fio --version; exit 3; }}
for spec in {specs}; do
    name=${{spec%%:*}}; args=$(echo "${{spec#*:}}" | tr '+' ' ')
    echo "E2E-JOB-START $name"
    fio --name=$name --filename=/dev/vda --direct=1 --ioengine=libaio --thread \
        --runtime={runtime} --ramp_time={ramp} --time_based --size={size} \
        --output-format=json $args > /tmp/$name.json 2>/tmp/$name.err
    echo "E2E-RESULT rc_$name=$?"
    echo "E2E-FIO-BEGIN $name"
    cat /tmp/$name.json
    echo "E2E-FIO-END $name"
done
"""


def fio_files() -> dict[str, Path]:
    """fio and its shared libraries, at the same paths in the guest as on the host."""
    fio = shutil.which("fio")
    if not fio:
        raise HarnessError("fio is not installed on the host: apt-get install fio")
    out = subprocess.run(["ldd", fio], capture_output=True, text=True, check=True).stdout
    files: dict[str, Path] = {"usr/bin/fio": Path(fio).resolve()}
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            path = m.group(1)
            files[path.lstrip("/")] = Path(path).resolve()
    return files


def guest_script(runtime: int, files: dict[str, Path]) -> str:
    libdirs = sorted({str(Path("/" + p).parent) for p in files if ".so" in p})
    specs = " ".join(f"{name}:{args.replace(' ', '+')}" for name, args in JOBS.items())
    return GUEST_SCRIPT.format(libpath=":".join(libdirs), specs=specs, runtime=runtime, ramp=RAMP_S,
                               size=IMAGE_SIZE)


def parse_fio(console: str) -> dict[str, dict[str, float]]:
    """Each job's figures from the console (see ``_job_figures``)."""
    return {name: _job_figures(console, name) for name in JOBS}


def _job_figures(console: str, name: str) -> dict[str, float]:
    """Pick one job's JSON out of the console and keep the figures we report."""
    m = re.search(rf"E2E-FIO-BEGIN {name}\s*\n(.*?)\nE2E-FIO-END {name}", console, re.S)
    if not m:
        raise HarnessError(f"no fio output for {name} on the console")
    text = m.group(1)
    text = text[text.index("{") :]
    doc = json.loads(text)
    rd = doc["jobs"][0]["read"]
    clat = rd["clat_ns"]
    return {
        "iops": rd["iops"],
        "mb_s": rd["bw_bytes"] / 1e6,
        "lat_us_mean": rd["lat_ns"]["mean"] / 1000,  # submission + completion
        "clat_us_p50": clat.get("percentile", {}).get("50.000000", 0) / 1000,
    }


def _cpu_during_jobs(q: Qemu, backend_pid: int, runtime: int) -> dict[str, dict[str, float]]:
    """CPU seconds of the back-end's process tree and of QEMU during each job,
    sampled at the job's start marker and at its result line on the console
    (console polling: ~50 ms granularity, against 6 s jobs)."""
    out = {}
    for name in JOBS:
        q.wait_for_line(rf"^E2E-JOB-START {name}\b", 120)
        b0, w0 = tree_stats(backend_pid)
        q0 = tree_stats(q.proc.pid)[0]
        q.wait_for_line(rf"^E2E-RESULT rc_{name}=", runtime + 60)
        b1, w1 = tree_stats(backend_pid)
        q1 = tree_stats(q.proc.pid)[0]
        out[name] = {"backend_cpu_s": b1 - b0, "backend_wait_s": w1 - w0, "qemu_cpu_s": q1 - q0}
    return out


def make_image(path: Path) -> Path:
    """Non-zero data everywhere, so reads are real reads, not holes."""
    chunk = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE // MiB):
            f.write(chunk)
    return path


def run_once(backend: str, kernel, base: Path, accel: str, workdir: Path, image: Path,
             script: str, ours_mode: str, poll_us: int | None = None, runtime: int = 5) -> dict[str, dict[str, float]]:
    sock = workdir / f"{backend}.sock"
    if backend == "qsd":
        be = QsdBlock(image, sock, workdir / "qsd.log").start()
    else:
        be = start_our_block(ours_mode, workdir, image, sock, poll_us=poll_us)
    try:
        q = Qemu(kernel, workdir, accel=accel, base_initrd=base, mem_mb=1024, name=f"fio-{backend}")
        q.attach(be)
        q.add_vhost_user_blk(sock)
        try:
            q.start(script)
            cpu = _cpu_during_jobs(q, be.proc.pid, runtime)
            res = q.wait(60 + 4 * len(JOBS) * 20)
            if res.rc != 0:
                raise q.failure(f"guest script failed rc={res.rc} results={res.results}")
        finally:
            q.stop()
        bad = {k: v for k, v in res.results.items() if k.startswith("rc_") and v != "0"}
        if bad:
            raise HarnessError(f"fio failed in the guest: {bad}\n{res.console[-2000:]}")
        results = parse_fio(res.console)
        for name, figures in results.items():
            # I/Os in the CPU window: fio's rate over its ramp and timed phases.
            ios = figures["iops"] * (runtime + RAMP_S)
            c = cpu[name]
            figures["backend_cpu_us_per_io"] = c["backend_cpu_s"] * 1e6 / ios if ios else float("nan")
            figures["qemu_cpu_us_per_io"] = c["qemu_cpu_s"] * 1e6 / ios if ios else float("nan")
            figures["backend_wait_pct"] = 100 * c["backend_wait_s"] / (runtime + RAMP_S)
        return results
    finally:
        be.stop()


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per back-end, alternating (>= 3)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    ap.add_argument("--ours", choices=["supervisor", "device"], default="supervisor")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--poll-us", type=int, default=None,
                    help="our block device's poll-us option (default: the device's own, 200)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.runs < 3:
        ap.error("--runs must be at least 3")

    kernel = ensure_kernel()
    files = fio_files()
    base = base_initramfs(kernel, extra_files=files)
    accel = choose_accel(kernel)
    script = guest_script(args.runtime, files)
    workdir = Path(tempfile.mkdtemp(prefix="e2e-fio-", dir="/tmp"))
    image = make_image(workdir / "bench.img")
    samples: dict[str, list[dict[str, dict[str, float]]]] = {"ours": [], "qsd": []}
    t0 = time.monotonic()
    load0 = _loadavg()
    try:
        for i in range(args.runs):
            order = ("ours", "qsd") if i % 2 == 0 else ("qsd", "ours")
            for backend in order:
                r = run_once(backend, kernel, base, accel, workdir, image, script, args.ours, args.poll_us,
                             args.runtime)
                samples[backend].append(r)
                print(f"run {i + 1} {backend:4s} " + "  ".join(
                    f"{j}={v['iops']:.0f}iops/{v['mb_s']:.1f}MB/s/{v['lat_us_mean']:.0f}us"
                    f"/cpu{v['backend_cpu_us_per_io']:.0f}us" for j, v in r.items()
                ) + f"  load {_loadavg()}", flush=True)
    finally:
        procs.reap_all()
    shutil.rmtree(workdir, ignore_errors=True)

    def med(backend: str, job: str, key: str) -> float:
        return statistics.median(s[job][key] for s in samples[backend])

    rows = [
        ("4 KiB randread QD1 IOPS", "randread_4k_qd1", "iops"),
        ("4 KiB randread QD1 mean latency (us)", "randread_4k_qd1", "lat_us_mean"),
        ("4 KiB randread QD1 median completion latency (us)", "randread_4k_qd1", "clat_us_p50"),
        ("4 KiB randread QD32 IOPS", "randread_4k_qd32", "iops"),
        ("128 KiB seqread QD8 MB/s", "seqread_128k_qd8", "mb_s"),
        ("4 KiB randread QD1 back-end CPU us/IO", "randread_4k_qd1", "backend_cpu_us_per_io"),
        ("4 KiB randread QD32 back-end CPU us/IO", "randread_4k_qd32", "backend_cpu_us_per_io"),
        ("128 KiB seqread QD8 back-end CPU us/IO", "seqread_128k_qd8", "backend_cpu_us_per_io"),
        ("4 KiB randread QD1 QEMU CPU us/IO", "randread_4k_qd1", "qemu_cpu_us_per_io"),
    ]
    print(f"\naccel={accel}, load average {load0} at the start, {args.runs} alternating runs per back-end, {args.runtime}s per job, "
          f"ours={args.ours}, medians, {time.monotonic() - t0:.0f}s total\n")
    print("| metric | ours | qemu-storage-daemon | ours/qsd |")
    print("|---|---:|---:|---:|")
    summary = {}
    for label, job, key in rows:
        o, q = med("ours", job, key), med("qsd", job, key)
        ratio = o / q if q else float("nan")
        summary[label] = {"ours": o, "qsd": q, "ratio": ratio}
        print(f"| {label} | {o:.1f} | {q:.1f} | {ratio:.2f} |")
    print("\n(latency and CPU per I/O: lower is better, so a ratio above 1 means ours is slower or costlier;"
          " CPU per I/O is the back-end's process tree, or QEMU, over fio's ramp and timed phases)")
    print(f"load average at the end: {_loadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"accel": accel, "samples": samples, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
