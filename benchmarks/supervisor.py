"""Supervisor benchmarks: start-up, restart latency, memory per device child.

Run: ``python -m benchmarks.supervisor [--quick] [--out FILE]`` (root, for the jail).

Each number is measured with and without the jail in the same run, so the
ratio (what the jail costs) is the result, not the absolute value of this
machine.  Nothing here is asserted: benchmarks are not tests.

* start-up: exec of ``vhost-supervisor run`` to READY=1 (sd_notify), which the
  supervisor sends once every socket listens and every first child has built
  its device; for 1, 8 and 64 rng devices.  The interpreter's own start-up
  (``python -c 'import supervisor.cli, devices, connection.connection'``) is
  the baseline.
* restart latency: SIGKILL to the device process -> a front-end (connected
  right after the kill, queued on the parent's listening socket) served a
  random-bytes request; median and p90 over N kills.  Every kill is a first
  crash (``restart`` clears the breaker before it), so the policy's 100 ms
  first backoff is included; "minus backoff" is what the machinery costs.
* memory: USS and PSS (psutil) of each device child while idle, 8 devices;
  for the jail also the forwarder process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

from frontend.exercise import drive_rng
from frontend.supervisor_process import SupervisorProcess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {"jailed": [], "plain": ["--disable-sandbox"]}


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]


def interpreter_baseline(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import supervisor.cli, devices, connection.connection"],
                       cwd=REPO, check=True)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def _with_supervisor(mode: str, n: int, fn):
    work = tempfile.mkdtemp(prefix="vs-bench-", dir="/tmp")
    sup = SupervisorProcess(work)
    try:
        args = list(MODES[mode])
        for i in range(n):
            args += ["--rng", f"vhost={work}/r{i}.sock"]
        took = sup.start(*args, timeout=120)
        return fn(sup, work, took)
    finally:
        try:
            if sup.proc is not None and sup.proc.poll() is None:
                sup.terminate()
        finally:
            sup.cleanup()
            shutil.rmtree(work, ignore_errors=True)


def bench_startup(mode: str, n: int, runs: int) -> float:
    return statistics.median(_with_supervisor(mode, n, lambda s, w, t: t) for _ in range(runs))


def bench_restart(mode: str, kills: int) -> list[float]:
    """Each kill is a first crash: ``restart`` (which clears the crash-loop
    breaker and the backoff) comes before it, so the 100 ms first backoff of
    the policy is part of every sample, and the breaker never trips."""
    def run(sup: SupervisorProcess, work: str, _t: float) -> list[float]:
        sock = f"{work}/r0.sock"
        drive_rng(sock)
        out: list[float] = []
        while len(out) < kills:
            reply = sup.request("restart", name="rng-0")
            pid = reply["device"]["pid"]
            d = sup.wait_state("rng-0", ("ready",), pred=lambda x: x["pid"] == pid, interval=0.002)
            t0 = time.monotonic()
            try:
                os.kill(d["pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue
            drive_rng(sock, timeout=10)
            out.append(time.monotonic() - t0)
        return out
    return _with_supervisor(mode, 1, run)


def bench_memory(mode: str, n: int) -> dict[str, float]:
    def run(sup: SupervisorProcess, work: str, _t: float) -> dict[str, float]:
        time.sleep(0.5)
        st = sup.status()
        dev = [psutil.Process(d["pid"]).memory_full_info() for d in st.values()]
        fwd = [psutil.Process(d["supervised_pid"]).memory_full_info() for d in st.values()
               if d["supervised_pid"] != d["pid"]]
        parent = psutil.Process(sup.proc.pid).memory_full_info()
        mib = float(1 << 20)
        out = {"uss": statistics.mean(m.uss for m in dev) / mib, "pss": statistics.mean(m.pss for m in dev) / mib,
               "rss": statistics.mean(m.rss for m in dev) / mib, "parent_uss": parent.uss / mib}
        if fwd:
            out["fwd_uss"] = statistics.mean(m.uss for m in fwd) / mib
            out["fwd_pss"] = statistics.mean(m.pss for m in fwd) / mib
        return out
    return _with_supervisor(mode, n, run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.supervisor")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--out", help="also write the markdown table here")
    a = ap.parse_args(argv)
    runs = 1 if a.quick else 3
    kills = 5 if a.quick else 30
    lines = [f"# supervisor benchmarks ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs, {os.uname().release}, Python {sys.version.split()[0]})", ""]
    base = interpreter_baseline(runs + 2)
    lines += ["## start-up: exec to READY=1 (median of %d)" % runs, "",
              f"interpreter + imports alone: {base * 1000:.0f} ms", "",
              "| devices | jailed (ms) | plain (ms) | jailed/plain | jailed per device (ms) |",
              "|---:|---:|---:|---:|---:|"]
    for n in (1, 8, 64):
        j = bench_startup("jailed", n, runs)
        p = bench_startup("plain", n, runs)
        lines.append(f"| {n} | {j * 1000:.0f} | {p * 1000:.0f} | {j / p:.2f} | {(j - base) / n * 1000:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", f"## restart latency: SIGKILL -> front-end served again ({kills} kills)", "",
              "| mode | median (ms) | p90 (ms) | max (ms) | median minus 100 ms backoff |",
              "|---|---:|---:|---:|---:|"]
    med = {}
    for mode in MODES:
        r = bench_restart(mode, kills)
        med[mode] = statistics.median(r)
        lines.append(f"| {mode} | {med[mode] * 1000:.1f} | {_pct(r, 0.9) * 1000:.1f} | {max(r) * 1000:.1f} | "
                     f"{med[mode] * 1000 - 100:.1f} |")
        print(lines[-1], flush=True)
    lines.append(f"\njailed/plain restart ratio: {med['jailed'] / med['plain']:.2f} "
                 f"(minus backoff: {(med['jailed'] - 0.1) / max(med['plain'] - 0.1, 1e-6):.2f})")
    lines += ["", "## memory per idle device child (8 rng devices, MiB, mean)", "",
              "| mode | USS | PSS | RSS | forwarder USS | forwarder PSS | supervisor USS |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        m = bench_memory(mode, 8)
        lines.append(f"| {mode} | {m['uss']:.2f} | {m['pss']:.2f} | {m['rss']:.2f} | "
                     f"{m.get('fwd_uss', 0):.2f} | {m.get('fwd_pss', 0):.2f} | {m['parent_uss']:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
