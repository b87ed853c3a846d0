"""Containment benchmarks, the supervisor's part: what a hostile child, a
hostile front-end or a local user with many sockets costs the supervisor.

Run: ``python -m benchmarks.containment [--part all|supervisor|devices] [--seconds N] [--code DIR] [--out FILE]``
(root, for the jail).  ``--code`` runs the supervisor from another checkout
(e.g. the commit before the containment work) for a before/after figure.

* stderr flood: one device child writes short lines to stderr as fast as its
  pipe takes them, from its event loop, for ``--seconds`` (10 s); the
  supervisor's CPU (user + system, /proc via psutil) as % of one core, the
  lines it re-emitted and the bytes of its log.  Goal: < 10 %.
* connect/garbage/close storm: 1000 cycles of a front-end that connects
  (waiting up to 5 ms for room in the accept queue), sends 64 bytes of
  garbage and closes; the supervisor's CPU over the storm, the children it
  started and the bytes of log it wrote.
* idle with 50k unrelated Unix sockets held by other processes: the
  supervisor's CPU over ``--seconds`` with one idle device.  Goal: < 1 %.
* the front-end check itself (``metrics.frontend_state``: our listener and
  one accepted connection the child showed us), per call, with 0 and 50k host sockets; beside it an
  exact sock_diag ``UNIX_DIAG`` request by inode (no dump), the alternative
  that was measured and rejected: the kernel walks every socket of the
  namespace to find the inode.

Nothing here is asserted: benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import psutil

from supervisor.control import request
from benchmarks import containment_devices
from frontend.hostile import garbage_storm, hold_unix_sockets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The supervisor CLI with a device whose child floods stderr (self-contained,
#: so that --code can point at any checkout).
FLOOD_BOOT = """
import os, sys
import devices
from devices.rng import RngBuilder
CHUNK = b"flood flood flood\\n" * 3640
class Flood(RngBuilder):
    def build(self, ex):
        dev = super().build(ex)
        def flood():
            try:
                os.write(2, CHUNK)
            except OSError:
                return
            ex.loop.call_soon(flood)
        ex.loop.call_soon(flood)
        return dev
import dataclasses
devices.DEVICE_TYPES["rng"] = dataclasses.replace(devices.DEVICE_TYPES["rng"], builder=Flood)
from supervisor.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Sup:
    """One supervisor subprocess, waited for with sd_notify READY=1."""

    def __init__(self, code: str, args: list[str], boot: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="vs-cont-", dir="/tmp")
        self.control = os.path.join(self.dir, "control.sock")
        self.log = os.path.join(self.dir, "supervisor.log")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(os.path.join(self.dir, "notify.sock"))
        self.notify.settimeout(60)
        cmd = [sys.executable] + (["-c", boot] if boot else ["-m", "supervisor.cli"])
        cmd += ["run", "-s", self.control] + [a.replace("{dir}", self.dir) for a in args]
        env = dict(os.environ, NOTIFY_SOCKET=os.path.join(self.dir, "notify.sock"), PYTHONPATH=code)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=code, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        while b"READY=1" not in self.notify.recv(4096):
            pass
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def status(self) -> dict[str, Any]:
        return {d["name"]: d for d in request(self.control, {"cmd": "status"})["devices"]}

    def log_bytes(self) -> int:
        return os.path.getsize(self.log)

    def close(self) -> None:
        kids = self.ps.children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
        self.notify.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(sup: Sup, seconds: float, during: Callable[[], Any] | None = None) -> tuple[float, float, Any]:
    """(supervisor CPU % of one core, wall seconds, what ``during`` returned)."""
    c0, t0 = sup.cpu(), time.monotonic()
    out = during() if during else time.sleep(seconds)
    c1, t1 = sup.cpu(), time.monotonic()
    return 100.0 * (c1 - c0) / (t1 - t0), t1 - t0, out


def bench_flood(code: str, seconds: float) -> dict[str, Any]:
    sup = Sup(code, ["--disable-sandbox", "--rng", "vhost={dir}/r.sock"], boot=FLOOD_BOOT)
    try:
        time.sleep(0.5)
        b0 = sup.log_bytes()
        child = psutil.Process(sup.status()["rng-0"]["pid"])
        k0 = child.cpu_times()
        cpu, wall, _ = measure(sup, seconds)
        k1 = child.cpu_times()
        with open(sup.log, "rb") as f:
            f.seek(b0)
            tail = f.read()
        return {"cpu": cpu, "wall": wall, "log_bytes": len(tail), "lines": tail.count(b"event=stderr"),
                "child_cpu": 100.0 * ((k1.user + k1.system) - (k0.user + k0.system)) / wall}
    finally:
        sup.close()


def bench_storm(code: str, cycles: int, jailed: bool) -> dict[str, Any]:
    sup = Sup(code, ([] if jailed else ["--disable-sandbox"]) + ["--rng", "vhost={dir}/r.sock"])
    try:
        b0 = sup.log_bytes()
        r0 = sup.status()["rng-0"]["restarts"]
        cpu, wall, connected = measure(sup, 0, lambda: garbage_storm(os.path.join(sup.dir, "r.sock"), cycles))
        restarts = sup.status()["rng-0"]["restarts"] - r0
        return {"cpu": cpu, "wall": wall, "connected": connected, "restarts": restarts,
                "log_bytes": sup.log_bytes() - b0}
    finally:
        sup.close()


def bench_idle_sockets(code: str, n: int, seconds: float) -> dict[str, Any]:
    holders = hold_unix_sockets(n) if n else []
    try:
        sup = Sup(code, ["--rng", "vhost={dir}/r.sock"])
        try:
            time.sleep(1.0)
            cpu, wall, _ = measure(sup, seconds)
            return {"cpu": cpu, "wall": wall, "sockets": n}
        finally:
            sup.close()
    finally:
        for pid in holders:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _sock_diag_exact(inode: int) -> None:
    """One NETLINK_SOCK_DIAG / UNIX_DIAG request for one inode (no NLM_F_DUMP)."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4)
    try:
        req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, 0x10, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(struct.pack("=IHHII", 16 + len(req), 20, 1, 1, 0) + req)
        nl.recv(65536)
    finally:
        nl.close()


def bench_frontend_check(n: int, calls: int = 200) -> dict[str, float]:
    """µs per frontend_state() call and per exact sock_diag request, with ``n`` host sockets."""
    from supervisor.metrics import frontend_state
    holders = hold_unix_sockets(n) if n else []
    work = tempfile.mkdtemp(prefix="vs-fe-", dir="/tmp")
    path = os.path.join(work, "s.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    a, _ = srv.accept()
    shown = [os.dup(a.fileno())]
    try:
        lino = os.fstat(srv.fileno()).st_ino
        t0 = time.perf_counter()
        for _ in range(calls):
            frontend_state(srv.fileno(), shown)
        fe = (time.perf_counter() - t0) / calls * 1e6
        t0 = time.perf_counter()
        for _ in range(calls):
            _sock_diag_exact(lino)
        diag = (time.perf_counter() - t0) / calls * 1e6
        return {"frontend_us": fe, "sock_diag_us": diag, "own_fds": len(os.listdir("/proc/self/fd"))}
    finally:
        for fd in shown:
            os.close(fd)
        for s in (a, c, srv):
            s.close()
        shutil.rmtree(work, ignore_errors=True)
        for pid in holders:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.containment")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--sockets", type=int, default=50000)
    ap.add_argument("--code", default=REPO, help="checkout whose supervisor is measured")
    ap.add_argument("--out")
    ap.add_argument("--part", choices=("all", "supervisor", "devices"), default="all",
                    help="the supervisor's sections, the devices' (benchmarks/containment_devices.py), or both")
    a = ap.parse_args(argv)
    if a.part == "devices":
        return containment_devices.main([])
    code = os.path.abspath(a.code)
    lines = [f"# containment, supervisor part ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs, {os.uname().release}, code {code})", "",
             "| case | supervisor CPU (% of a core) | detail |", "|---|---:|---|"]
    f = bench_flood(code, a.seconds)
    lines.append(f"| stderr flood, {f['wall']:.1f} s (goal < 10 %) | {f['cpu']:.1f} | "
                 f"{f['lines']} lines re-emitted, {f['log_bytes'] / 1024:.0f} KiB of log, "
                 f"flooding child {f['child_cpu']:.0f} % |")
    print(lines[-1], flush=True)
    for jailed in (True, False):
        s = bench_storm(code, a.cycles, jailed)
        lines.append(f"| {a.cycles} connect/garbage/close, {'jailed' if jailed else 'plain'} "
                     f"({s['wall']:.1f} s) | {s['cpu']:.1f} | {s['connected']} connected, {s['restarts']} "
                     f"children, {s['log_bytes'] / 1024:.1f} KiB of log |")
        print(lines[-1], flush=True)
    for n in (0, a.sockets):
        i = bench_idle_sockets(code, n, a.seconds)
        lines.append(f"| idle, {n} unrelated Unix sockets on the host{' (goal < 1 %)' if n else ''} | "
                     f"{i['cpu']:.2f} | {i['wall']:.0f} s |")
        print(lines[-1], flush=True)
    lines += ["", "| host Unix sockets | frontend_state() per call (µs) | exact sock_diag request (µs) |",
              "|---:|---:|---:|"]
    for n in (0, a.sockets):
        fc = bench_frontend_check(n)
        lines.append(f"| {n} | {fc['frontend_us']:.0f} | {fc['sock_diag_us']:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    if a.part == "all":
        print("\n# containment, device part")
        return containment_devices.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
