"""Containment (issue 9), each from the attacker's position.

Why: a hostile guest, front-end or local user must only be able to spend
its own device's budget.  Each test plays the attacker for real (a second
local uid via setuid in a forked process, a front-end looping
connect/garbage/close, a child flooding stderr, a front-end shrinking guest
RAM, a killer) and asserts the contained outcome against the kernel's view.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from frontend.exercise import drive_rng
from frontend.hostile import garbage_storm, hold_unix_sockets

from .conftest import REPO, SupervisorProc, pid_alive

NOSANDBOX = ("--disable-sandbox",)


def _as_other_user(fn: Any, uid: int = 65534) -> Any:
    """Run ``fn()`` in a forked process that dropped to ``uid`` (a second,
    unprivileged local user); its result (an int) comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.write(w, str(fn()).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(w, f"error {type(e).__name__}: {e}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()


def _uid_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    return []


# ---------------------------------------------------------------- identity

def test_another_local_user_cannot_signal_any_device(sup: SupervisorProc) -> None:
    """Finding 1: with every child as "nobody", nobody could SIGSTOP or SIGKILL them."""
    img = sup.image()
    sup.start("--rng", f"vhost={sup.path('r.sock')}", "--block", f"vhost={sup.path('b.sock')},path={img}")
    st = sup.status()
    targets = [p for d in st.values() for p in (d["pid"], d["supervised_pid"])]

    def try_signals() -> str:
        results = []
        for pid in targets:
            for sig in (0, signal.SIGSTOP, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                    results.append(f"{pid}:{sig}:sent")
                except PermissionError:
                    results.append("denied")
        return ",".join(results)

    out = _as_other_user(try_signals)
    assert out == ",".join(["denied"] * (3 * len(targets))), out
    uids = {d.get("uid") for d in st.values()}
    assert len(uids) == 2 and 65534 not in uids, st
    for d in st.values():
        assert set(_uid_of(d["pid"])) == {d["uid"]}, "the device runs as its own host uid"
    for d in st.values():
        assert pid_alive(d["pid"])
    assert sup.status()["rng-0"]["pid"] == st["rng-0"]["pid"]
    assert len(drive_rng(sup.path("r.sock"))) > 0
    assert sup.terminate() == 0


def test_two_supervisors_with_default_ids_get_disjoint_slices(sup: SupervisorProc, sup_dir: str) -> None:
    """uid-range unset: each supervisor claims its own slice of the pool, so a
    second one on the host (another tenant, a test beside production) starts,
    and no device of one can signal a device of the other."""
    other_dir = os.path.join(sup_dir, "second")
    os.makedirs(other_dir)
    other = SupervisorProc(other_dir)
    try:
        sup.start("--rng", f"vhost={sup.path('r.sock')}")
        other.start("--rng", f"vhost={other.path('r.sock')}")
        a, b = sup.status()["rng-0"], other.status()["rng-0"]
        assert a["uid"] != b["uid"] and abs(a["uid"] - b["uid"]) >= 1024, (a["uid"], b["uid"])
        assert set(_uid_of(a["pid"])) == {a["uid"]} and set(_uid_of(b["pid"])) == {b["uid"]}
        assert len(drive_rng(sup.path("r.sock"))) > 0 and len(drive_rng(other.path("r.sock"))) > 0
        assert other.terminate() == 0
    finally:
        other.cleanup()
    assert sup.terminate() == 0


def test_uid_range_in_use_is_a_config_error(sup: SupervisorProc, sup_dir: str) -> None:
    """A range some process already runs in is refused at start, naming the process."""
    uid = 1879048192 + 4000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        os.close(w)
        time.sleep(60)
        os._exit(0)
    os.close(w)
    os.read(r, 1)        # EOF: the process now runs as uid
    os.close(r)
    try:
        cfg = os.path.join(sup_dir, "sup.toml")
        with open(cfg, "w") as f:
            f.write(f'[supervisor]\nuid-range = "{uid - 10}-{uid + 10}"\n\n'
                    f'[[device]]\ntype = "rng"\nvhost = "{sup.path("r.sock")}"\n')
        p = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "-s", sup.path("c.sock"),
                            "--config", cfg], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, p.stderr
        assert "uid-range" in p.stderr and f"process {pid}" in p.stderr, p.stderr
        # a fixed jail-user stays possible
        with open(cfg, "a") as f:
            f.write('jail-user = "4242:4243"\n')
        sup.start("--config", cfg)
        d = sup.status()["rng-0"]
        assert (d["uid"], d["gid"]) == (4242, 4243) and set(_uid_of(d["pid"])) == {4242}
        assert sup.terminate() == 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# ---------------------------------------------------------------- liveness

@pytest.mark.parametrize("mode", [(), NOSANDBOX], ids=["jailed", "plain"])
def test_a_stopped_child_is_killed_as_hung_and_replaced(sup: SupervisorProc, mode: tuple[str, ...]) -> None:
    rng = sup.path("r.sock")
    sup.start(*mode, "--rng", f"vhost={rng},watchdog-sec=1")
    d = sup.wait_state("rng-0", "ready", pred=lambda d: d["heartbeat_age"] is not None)
    assert d["heartbeat_age"] < 5 and d["watchdog_sec"] == 1
    os.kill(d["pid"], signal.SIGSTOP)      # what finding 1's attacker did; the supervisor said "ready"
    new = sup.wait_state("rng-0", "ready", timeout=15, pred=lambda x: x["pid"] not in (None, d["pid"]))
    assert new["last_exit"]["kind"] == "hung", new["last_exit"]
    assert "no heartbeat" in new["last_exit"]["text"]
    assert not pid_alive(d["pid"])
    assert "event=hung" in sup.read_log()
    assert len(drive_rng(rng)) > 0
    assert sup.terminate() == 0


# ---------------------------------------------------------------- restart discipline

def test_connect_garbage_close_storm_bounded_restarts_and_log(sup: SupervisorProc) -> None:
    """Finding 6: 1000 cycles drove 1000 restarts and 645 bytes of log each."""
    rng = sup.path("r.sock")
    sup.start("--rng", f"vhost={rng}")
    log_before = len(sup.read_log().splitlines())
    t0 = time.monotonic()
    connected = garbage_storm(rng, 1000)
    elapsed = time.monotonic() - t0
    d = sup.wait_state("rng-0", "ready", timeout=20, pred=lambda d: d["frontend"] == "no")
    window = time.monotonic() - t0
    # a burst of 10, then at most one per second (+2 for the edges of the window)
    assert d["restarts"] <= 10 + window + 2, (d["restarts"], connected, elapsed, window)
    assert d["crash_loops"] == 0 and d["last_exit"]["kind"] == "disconnected"
    assert sup.terminate() == 0
    lines = sup.read_log().splitlines()[log_before:]
    # every restart costs a few lines (spawn, ready, exit, the child's own); never one per cycle
    assert len(lines) <= 40 + 8 * d["restarts"], (len(lines), d["restarts"])
    assert any("event=clean-exits" in ln and "throttled=" in ln for ln in lines), (d, [ln for ln in lines if "event=log " not in ln][-30:])


# ---------------------------------------------------------------- crash loops

def test_crash_loop_keeps_retrying_with_backoff(sup: SupervisorProc) -> None:
    """Finding 9: five kills in a minute left the device failed for good."""
    rng = sup.path("r.sock")
    sup.start(*NOSANDBOX, "--rng", f"vhost={rng}")
    seen: set[int] = set()
    for _ in range(5):
        d = sup.wait_state("rng-0", "ready", pred=lambda d: d["pid"] not in seen)
        seen.add(d["pid"])
        os.kill(d["pid"], signal.SIGKILL)
    looping = sup.wait_state("rng-0", ("crash-looping",))
    assert looping["crash_loops"] == 1 and looping["backoff_remaining"] is not None
    assert "event=crash-loop" in sup.read_log()
    back = sup.wait_state("rng-0", "ready", timeout=15, pred=lambda d: d["pid"] not in seen)
    assert back["crash_loops"] == 1
    assert len(drive_rng(rng)) > 0
    assert sup.terminate() == 0


# ---------------------------------------------------------------- control

def _sigterm_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("ShdPnd:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_restart_during_stop_never_leaves_a_serving_child_reported_stopped(sup: SupervisorProc) -> None:
    """Finding 5: stop timed out, reported stopped, and the child a concurrent
    restart had started kept serving."""
    rng = sup.path("r.sock")
    sup.start(*NOSANDBOX, "--grace-period", "1", "--rng", f"vhost={rng}")
    old = sup.status()["rng-0"]["pid"]
    os.kill(old, signal.SIGSTOP)          # SIGTERM cannot act: stop has to wait for SIGKILL
    replies: dict[str, Any] = {}
    stopper = threading.Thread(target=lambda: replies.update(stop=sup.request("stop", name="rng-0")))
    stopper.start()
    deadline = time.monotonic() + 10
    while not _sigterm_pending(old):       # the stop has sent SIGTERM and now waits
        assert time.monotonic() < deadline, "stop never signalled the child"
        time.sleep(0.005)
    replies["restart"] = sup.request("restart", name="rng-0")   # arrives while stop waits
    stopper.join(30)
    stop, restart = replies["stop"], replies["restart"]
    assert stop["ok"] and restart["ok"], replies
    # each reply agrees with the process table at its time ...
    assert stop["device"]["state"] == "stopped" and stop["device"]["pid"] is None, stop
    assert restart["device"]["state"] in ("starting", "ready") and restart["device"]["pid"], restart
    # ... and so does the final state
    d = sup.wait_state("rng-0", "ready")
    assert d["pid"] != old and pid_alive(d["pid"]) and not pid_alive(old)
    assert sorted(sup.children()) == [d["pid"]]
    assert len(drive_rng(rng)) > 0
    assert sup.terminate() == 0


# ---------------------------------------------------------------- supervisor CPU

class FloodProc(SupervisorProc):
    """The supervisor CLI with a device whose child floods stderr (flood_supervisor.py)."""

    def start(self, *args: str, wait_ready: bool = True, timeout: float = 20.0,  # type: ignore[override]
              env: dict[str, str] | None = None) -> "FloodProc":
        if self.notify is None:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(self.notify_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.supervisor.flood_supervisor", "run", "-s", self.control, *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO,
                env=dict(os.environ, NOTIFY_SOCKET=self.notify_path, PYTHONPATH=REPO))
        if wait_ready:
            self.wait_notify("READY=1", timeout)
        return self


def test_stderr_flood_is_dropped_and_counted(sup_dir: str) -> None:
    """Finding 7: a child flooding short lines kept the supervision thread ~88 % busy."""
    sup = FloodProc(sup_dir)
    try:
        rng = sup.path("r.sock")
        sup.start(*NOSANDBOX, "--rng", f"vhost={rng}")
        pid = sup.status()["rng-0"]["pid"]
        deadline = time.monotonic() + 30
        while "event=log-dropped" not in sup.read_log():   # the flood has met the budget
            assert time.monotonic() < deadline, sup.read_log()[-2000:]
            sup.wait_state("rng-0", "ready")
        d = sup.wait_state("rng-0", "ready", pred=lambda d: d["log_dropped_lines"] > 10000)
        assert d["pid"] == pid, "the flooding child is still served (heartbeats answered)"
        log = sup.read_log()
        emitted = log.count("device=rng-0 event=stderr")
        assert emitted < d["log_dropped_lines"] / 5, (emitted, d["log_dropped_lines"])
        assert "device=rng-0 dropped" in log
        assert len(drive_rng(rng)) > 0
        assert sup.terminate() == 0
    finally:
        sup.cleanup()


def test_frontend_state_cost_does_not_grow_with_host_unix_sockets(sup: SupervisorProc) -> None:
    """Finding 7: the 1 Hz scan of /proc/net/unix read every socket on the host."""
    holders = hold_unix_sockets(20000)
    try:
        rng = sup.path("r.sock")
        sup.start("--rng", f"vhost={rng}")
        assert sup.proc is not None

        def rchar() -> int:
            with open(f"/proc/{sup.proc.pid}/io") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

        from frontend.vhost_user import VhostUserFrontend
        with VhostUserFrontend.connect(rng) as fe:
            fe.negotiate()
            before = rchar()
            for _ in range(10):      # each status request asks about every front-end
                assert sup.wait_state("rng-0", "serving")["frontend"] == "yes"
            read = rchar() - before
        # /proc/net/unix with 20k sockets is ~2 MB per scan; the child's fd table is a few entries
        assert read < 256 << 10, f"the supervisor read {read} bytes for 10 status requests"
        sup.wait_state("rng-0", "ready", pred=lambda d: d["frontend"] == "no")
        assert sup.terminate() == 0
    finally:
        for pid in holders:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# ---------------------------------------------------------------- self-harm

@pytest.mark.parametrize("mode", [(), NOSANDBOX], ids=["jailed", "plain"])
def test_frontend_truncating_guest_ram_is_its_own_exit_reason(sup: SupervisorProc, mode: tuple[str, ...]) -> None:
    from frontend.vhost_user import VhostUserFrontend
    rng = sup.path("r.sock")
    sup.start(*mode, "--rng", f"vhost={rng}")
    pid = sup.status()["rng-0"]["pid"]
    with VhostUserFrontend.connect(rng) as fe:
        fe.negotiate()
        mem = fe.setup_memory(16 << 20)
        q = fe.setup_queue(0, 64)
        gpa, _ = q.alloc(64)
        q.submit([], [(gpa, 64)])
        os.ftruncate(mem.fd, 0)       # after SET_MEM_TABLE: the device's mapping loses its pages
        q.kick(force=True)
        d = sup.wait_state("rng-0", ("ready", "backoff"), pred=lambda d: d["pid"] != pid and d["last_exit"])
        os.ftruncate(mem.fd, 16 << 20)   # our own mapping must have pages again before we touch it
    assert d["last_exit"]["kind"] == "shm_truncated", d["last_exit"]
    assert d["last_exit"]["text"] == "front-end truncated shared memory (SIGBUS)"
    assert len(drive_rng(rng)) > 0
    assert sup.terminate() == 0
