"""Class 4, resource exhaustion: a guest, a front-end or a compromised child
spends host memory, disk, supervisor CPU or restarts.  Each case measures
the cost and holds it to the budget stated in issue 9 ("Containment").
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import struct
import time
from typing import Any

import psutil

from connection.protocol import VERSION
from frontend.vhost_user import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, VhostUserFrontend

from ..catalog import Case, CaseFailed, check, register
from ..env import kill_quietly, wait_until
from ..guestmem import GuardedMemory, RawRing

MiB = 1 << 20
N, W, I = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT


def _hwm(pid: int) -> int:
    """Peak resident set (VmHWM) of a process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(pid)


def _connect(env: Any, inst: Any, queues: int, size: int, region: int = 8 * MiB) -> tuple[VhostUserFrontend, GuardedMemory]:
    mem = GuardedMemory(region)
    fe = VhostUserFrontend.connect(inst.socket, timeout=5.0)
    fe.mem = mem
    fe.negotiate()
    fe.setup_memory()
    for i in range(queues):
        fe.setup_queue(i, size)
    return fe, mem


def _close(fe: VhostUserFrontend) -> None:
    fe.disconnect()
    fe.close()


# ---------------------------------------------------------------------------
# Memory amplification

def _amplification(env: Any) -> str:
    inst = env.instance("block", "direct")
    pid = env.wait_ready(inst.name)["pid"]
    fe, mem = _connect(env, inst, 1, 64)
    try:
        q = fe.queues[0]
        r = RawRing(q)
        hdr, hv = mem.alloc(16, 64, region=1)
        struct.pack_into("<IIQ", hv, 0, 0, 0, 0)                    # read from sector 0
        buf, _ = mem.alloc(MiB + 512, 4096, region=1)
        st, sv = mem.alloc(1, 64, region=1)
        count = 128                                                 # 128 x the same unaligned 1 MiB
        table, tv = mem.alloc(16 * (count + 2), 64, region=1)
        r.desc(0, hdr, 16, N, 1, table=tv)
        for i in range(1, count + 1):
            r.desc(i, buf + 1, MiB, W | N, i + 1, table=tv)
        r.desc(count + 1, st, 1, W, 0, table=tv)
        before = _hwm(pid)
        r.desc(0, table, 16 * (count + 2), I, 0)
        r.publish(0)
        kind, _head, _len = r.wait(10.0)
        grew = _hwm(pid) - before
    finally:
        _close(fe)
    env.recovered(env.instances[inst.name], pid, allow_crash=True)
    outcome = "queue broken" if kind == "broken" else f"completed (status {sv[0]})" if kind == "used" else "no completion"
    if not _direct_needs_alignment(env.path("img", f"{inst.name}.img")):
        outcome += " (this host's O_DIRECT takes unaligned buffers: no bounce needed)"
    check(grew < 64 * MiB, f"{outcome}; device peak RSS grew {grew / MiB:.0f} MiB from a 1 MiB guest buffer "
                           f"(budget 64 MiB)")
    return f"{outcome}; device peak RSS grew {grew / MiB:.1f} MiB (budget 64 MiB)"


def _direct_needs_alignment(path: str) -> bool:
    """Whether O_DIRECT on this file system refuses a byte-aligned buffer
    (only then does the device bounce, and only then can it amplify)."""
    import mmap
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    m = mmap.mmap(-1, 2 * 4096)
    v = memoryview(m)
    try:
        os.preadv(fd, [v[1:1 + 4096]], 0)
        return False
    except OSError:
        return True
    finally:
        v.release()
        m.close()
        os.close(fd)


def _console_join(env: Any) -> str:
    inst = env.instance("console", "fill")
    pid = env.wait_ready(inst.name)["pid"]
    fe, mem = _connect(env, inst, 2, 1024)
    try:
        tx = RawRing(fe.queues[1])
        buf, view = mem.alloc(256 << 10, 4096, region=1)
        view[:] = b"\n" * len(view)
        count = 1024
        for i in range(count):
            tx.desc(i, buf, 256 << 10, N if i + 1 < count else 0, i + 1)
        before = _hwm(pid)
        tx.publish(0)
        kind, _h, _l = tx.wait(10.0)
        grew = _hwm(pid) - before
    finally:
        _close(fe)
    env.recovered(env.instances[inst.name], pid, allow_crash=True)
    _truncate_outputs(env, inst.name)
    check(grew < 64 * MiB, f"one transmit chain of {count} x 256 KiB (the same buffer) grew the device's "
                           f"peak RSS by {grew / MiB:.0f} MiB (budget 64 MiB)")
    return f"{kind}; device peak RSS grew {grew / MiB:.1f} MiB (budget 64 MiB)"


# ---------------------------------------------------------------------------
# Disk fill

def _outputs(env: Any, name: str) -> list[str]:
    return sorted(glob.glob(env.path("out", f"{name}.out*")))


def _truncate_outputs(env: Any, name: str) -> None:
    for p in _outputs(env, name):
        with open(p, "r+b") as f:
            f.truncate(0)


def _disk_fill(env: Any) -> str:
    inst = env.instance("console", "fill")
    pid = env.wait_ready(inst.name)["pid"]
    total = 64 * MiB
    fe, mem = _connect(env, inst, 2, 64)
    try:
        q = fe.queues[1]
        buf, view = mem.alloc(MiB, 4096, region=1)
        view[:] = (b"flood " * (MiB // 6 + 1))[:MiB]
        sent = 0
        while sent < total:
            q.submit([(buf, MiB)], [])
            q.kick(force=True)
            q.wait_used(10.0)
            sent += MiB
    finally:
        _close(fe)
    env.recovered(env.instances[inst.name], pid, allow_crash=True)
    files = _outputs(env, inst.name)
    used = sum(os.path.getsize(p) for p in files)
    _truncate_outputs(env, inst.name)
    budget = 16 * MiB * 3
    check(used <= budget, f"a guest wrote {total // MiB} MiB; {used / MiB:.0f} MiB landed on disk in "
                          f"{len(files)} file(s) (budget max-size 16 MiB x (keep 2 + 1) = 48 MiB)")
    return f"{used / MiB:.1f} MiB on disk in {len(files)} file(s) after {total // MiB} MiB of output (budget 48 MiB)"


# ---------------------------------------------------------------------------
# Restart storm, crash loop, hang

def _restart_storm(env: Any) -> str:
    inst = env.instance("rng", "storm")
    env.wait_ready(inst.name)
    before = env.status()[inst.name]["restarts"]
    log_before = len(env.log())
    sup = psutil.Process(env.sup.proc.pid)
    cpu0 = sup.cpu_times()
    t0 = time.monotonic()
    cycles = 0
    garbage = struct.pack("=III", 0xDEAD, VERSION, 0)
    while time.monotonic() - t0 < 3.0:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.2)
        try:
            s.connect(inst.socket)
            s.sendall(garbage)
            s.recv(1)     # the child ends the connection (or the timeout does)
        except OSError:
            pass
        finally:
            s.close()
        cycles += 1
    elapsed = time.monotonic() - t0
    cpu1 = sup.cpu_times()
    restarts = env.status()[inst.name]["restarts"] - before
    log_bytes = len(env.log()) - log_before
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
    env.wait_ready(inst.name, timeout=15)
    budget = 10 + int(elapsed) + 2
    check(restarts <= budget and log_bytes <= 16 << 10,
          f"{cycles} connect/garbage/close cycles in {elapsed:.1f}s caused {restarts} restarts (budget {budget}: "
          f"burst 10 then 1/s), {log_bytes} bytes of supervisor log (budget 16 KiB), supervisor CPU {cpu:.0%}")
    return f"{cycles} cycles: {restarts} restarts (budget {budget}), {log_bytes} log bytes, supervisor CPU {cpu:.0%}"


def _crash_loop(env: Any) -> str:
    inst = env.instance("block", "crash")
    kills = 6
    done = 0

    def settled() -> dict[str, Any]:
        wait_until(lambda: env.status()[inst.name]["state"] in ("ready", "failed"), 8.0, 0.05)
        return env.status()[inst.name]

    try:
        for _ in range(kills):
            st = settled()
            if st["state"] != "ready":
                break
            os.kill(st["pid"], signal.SIGKILL)
            done += 1
            wait_until(lambda: env.status()[inst.name]["pid"] != st["pid"], 5.0)
        st = settled()
    finally:
        if env.status()[inst.name]["state"] == "failed":
            env.request("restart", name=inst.name)
            env.wait_ready(inst.name)
    check(done == kills and st["state"] == "ready",
          f"after {done} kills the device is '{st['state']}' and does not come back by itself "
          f"(a crash loop must back off and retry, not fail for good); restarted by hand")
    env.exercise(inst)
    return f"after {kills} kills the device came back by itself ({st['restarts']} restarts) and serves"


def _hung(env: Any) -> str:
    inst = env.instance("block", "hang")
    for _ in range(5):   # the instance may be between children (an earlier case killed it)
        pid = env.wait_ready(inst.name, timeout=15)["pid"]
        try:
            os.kill(pid, signal.SIGSTOP)
            break
        except ProcessLookupError:
            time.sleep(0.2)
    else:
        raise CaseFailed(f"{inst.name}: no live child to stop after 5 tries")
    try:
        came_back = wait_until(lambda: env.status()[inst.name]["pid"] not in (pid, None), 6.5, 0.1)
        st = env.status()[inst.name]
    finally:
        kill_quietly(pid, signal.SIGCONT)
    if not came_back:
        env.request("restart", name=inst.name)
        env.wait_ready(inst.name, not_pid=pid)
        raise CaseFailed(f"the SIGSTOPped child stayed '{st['state']}' for 6.5 s (watchdog-sec 5 s); restarted by hand")
    reason = (st.get("last_exit") or {}).get("text", "?")
    check("hung" in reason, f"restarted, but the exit reason reads '{reason}', not 'hung'")
    env.wait_ready(inst.name, not_pid=pid)
    return f"killed and restarted after missing its heartbeat: {reason}"


# ---------------------------------------------------------------------------
# Supervisor CPU: connection flood, log flood, Unix socket scan

def _connection_flood(env: Any) -> str:
    target = env.instance("block")
    other = env.any_instance(exclude=target)
    env.settle()
    sup = psutil.Process(env.sup.proc.pid)
    fds_before = sup.num_fds()
    socks: list[socket.socket] = []
    refused = 0
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(target.socket)
            socks.append(s)
        except (BlockingIOError, OSError):
            refused += 1
            s.close()
    try:
        t0 = time.monotonic()
        env.status()
        status_s = time.monotonic() - t0
        env.exercise(other)
        fds_during = sup.num_fds()
    finally:
        for s in socks:
            s.close()
    env.settle(10)
    env.exercise(target)
    check(status_s < 1.0 and fds_during - fds_before <= 4,
          f"status took {status_s:.2f}s, supervisor fds {fds_before} -> {fds_during}")
    return (f"{len(socks)} connections held, {refused} refused by the backlog; status answered in "
            f"{status_s * 1000:.0f} ms; other device served; supervisor fds {fds_before} -> {fds_during}; "
            f"device served again")


def _unix_scan(env: Any) -> str:
    """An unprivileged user holds many Unix sockets; the idle supervisor's
    periodic front-end scan must not grow with them."""
    from ..inchild import UNPRIVILEGED_UID, drop_to
    env.settle()
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    spare = (hard - len(os.listdir("/proc/self/fd")) - 256) if hard != resource.RLIM_INFINITY else 20_000
    pairs = max(1, min(10_000, spare // 2))
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(done_w)
            # room for the pairs above whatever this process already holds (pytest holds many)
            want = 2 * pairs + len(os.listdir("/proc/self/fd")) + 256
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
            drop_to(UNPRIVILEGED_UID)
            try:
                held = [socket.socketpair() for _ in range(pairs)]
            except OSError as e:
                os.write(ready_w, f"E{e} (rlimit {resource.getrlimit(resource.RLIMIT_NOFILE)}, "
                                  f"{len(os.listdir('/proc/self/fd'))} fds open)".encode()[:500])
                raise
            os.write(ready_w, b"R")
            os.read(done_r, 1)        # until the parent has measured (or died)
            assert len(held) == pairs
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        got = os.read(ready_r, 512)
        if got != b"R":
            raise CaseFailed(f"the process holding the sockets could not create them: "
                             f"{got[1:].decode(errors='replace') or 'it died'}")
        sup = psutil.Process(env.sup.proc.pid)
        c0 = sup.cpu_times()
        time.sleep(3.0)
        c1 = sup.cpu_times()
    finally:
        os.close(done_w)
        os.waitpid(pid, 0)
        os.close(ready_r)
    cpu = (c1.user + c1.system - c0.user - c0.system) / 3.0
    check(cpu < 0.01, f"with {2 * pairs} Unix sockets held by another user the idle supervisor used "
                      f"{cpu:.1%} of a core (budget 1%)")
    return f"idle supervisor CPU {cpu:.2%} of a core with {2 * pairs} foreign Unix sockets (budget 1%)"


class _FloodBuilder:
    """A compromised device: floods stderr with short lines from the jail."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def build(self, ex: Any) -> Any:
        line = b"x\n" * 512
        while True:
            try:
                os.write(2, line)
            except BlockingIOError:
                time.sleep(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _log_flood(env: Any) -> str:
    """A real Supervisor (own process) whose one child floods its stderr."""
    from supervisor.config import build_config, open_builders
    d = env.path("flood")
    os.makedirs(d, exist_ok=True)
    log_path = os.path.join(d, "supervisor.log")
    sock = os.path.join(d, "flood.sock")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            from supervisor import logs
            from supervisor.supervision import Supervisor
            cfg = build_config(ordered_flags=[("rng", f"vhost={sock},name=flooder")],
                               control_socket=os.path.join(d, "control.sock"), grace_period=1.0)
            builders = open_builders(cfg)
            builders = {k: _FloodBuilder(b) for k, b in builders.items()}
            logs.setup_logging(cfg.log_format)
            code = Supervisor(cfg, builders).run()
        finally:
            os._exit(code)
    try:
        proc = psutil.Process(pid)
        wait_until(lambda: os.path.exists(log_path) and os.path.getsize(log_path) > 4096, 10.0, 0.05)
        time.sleep(0.3)
        c0 = proc.cpu_times()
        size0 = os.path.getsize(log_path)
        time.sleep(2.0)
        c1 = proc.cpu_times()
        size1 = os.path.getsize(log_path)
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.05)
        kill_quietly(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    cpu = (c1.user + c1.system - c0.user - c0.system) / 2.0
    rate = (size1 - size0) / 2.0
    check(cpu < 0.10, f"a child flooding stderr kept the supervisor {cpu:.0%} busy (budget 10% of a core); "
                      f"log grew {rate / 1024:.0f} KiB/s")
    return f"supervisor CPU {cpu:.1%} of a core while a child floods stderr (budget 10%); log {rate / 1024:.1f} KiB/s"


# ---------------------------------------------------------------------------

def _add(id: str, dev: str, tries: str, expected: str, fn: Any, finding: str) -> None:
    """``finding``: the issue-9 finding the case guards (documentation only)."""
    register(Case(f"exhaustion.{id}", "exhaustion", dev, tries, expected, fn))


_add("amplification-direct-bounce.block", "block",
     "one O_DIRECT read listing the same unaligned 1 MiB guest buffer 128 times",
     "device peak RSS grows < 64 MiB (bounce buffer chunked)", _amplification,
     "issue 9 #2: the O_DIRECT bounce is chunked to a fixed size")
_add("console-iov-join.console", "console", "one transmit chain of 1024 x the same 256 KiB buffer",
     "device peak RSS grows < 64 MiB (output written in bounded pieces)", _console_join, None)
_add("disk-fill.console", "console", "a guest writes 64 MiB to a type=file console",
     "at most max-size 16 MiB x (keep 2 + 1) = 48 MiB on disk", _disk_fill,
     "issue 9 #3: console max-size and rotation")
_add("restart-storm.rng", "rng", "connect / send garbage / close in a loop for 3 s",
     "restarts <= burst 10 + 1/s; supervisor log <= 16 KiB", _restart_storm,
     "issue 9 #6: clean exits rate-limited, one summary line per interval")
_add("crash-loop-recovers.block", "block", "SIGKILL the device child 6 times in a row (a transient killer)",
     "the device backs off and comes back by itself, never 'failed' for good", _crash_loop,
     "issue 9 #9: crash loops back off (capped) and keep retrying")
_add("hung-child.block", "block", "SIGSTOP the device child (it hangs, the socket still accepts)",
     "killed and restarted with exit reason 'hung' within watchdog-sec (5 s)", _hung,
     "issue 9 liveness: heartbeat and watchdog-sec")
_add("connection-flood.block", "block", "open 300 connections to one device socket at once",
     "status answers < 1 s, other devices serve, supervisor fds do not grow, device serves again",
     _connection_flood, None)
_add("unix-socket-scan.-", "-", "another user holds ~20,000 Unix sockets while the supervisor idles",
     "idle supervisor CPU < 1% of a core", _unix_scan,
     "issue 9 #7: front-end state from a query that does not scan every Unix socket")
_add("log-flood.rng", "rng", "a compromised child floods stderr with short lines",
     "supervisor CPU < 10% of a core", _log_flood,
     "issue 9 #7: children's stderr read with a per-child byte and line budget")
