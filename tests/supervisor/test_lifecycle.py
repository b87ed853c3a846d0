"""The supervisor with real children, real sockets, real signals.

Why: the point of the supervisor is what crosvm's ``devices`` command does
not do - restart a device that died while its socket stays put, stop a
crash loop, and leave nothing behind (processes or socket files) however it
ends.  Each test checks one of those promises against the kernel's view
(pids, inodes, /proc), not the supervisor's word alone.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from frontend.exercise import drive_block, drive_rng

from .conftest import SupervisorProc, pid_alive, wait_exited

NOSANDBOX = ("--disable-sandbox",)
MODES = pytest.mark.parametrize("mode", [(), NOSANDBOX], ids=["jailed", "plain"])


def test_restart_after_sigkill_same_socket(sup: SupervisorProc) -> None:
    img = sup.image()
    blk = sup.path("blk.sock")
    sup.start(*NOSANDBOX, "--block", f"vhost={blk},path={img}")
    drive_block(blk, 0, b"A" * 4096)
    d = sup.wait_state("block-0", "ready", pred=lambda d: d["restarts"] == 1)
    inode = os.stat(blk).st_ino
    assert d["socket_inode"] == inode
    old = d["pid"]
    os.kill(old, signal.SIGKILL)
    d = sup.wait_state("block-0", "ready", pred=lambda d: d["pid"] not in (None, old))
    assert d["last_exit"]["kind"] == "signaled" and d["last_exit"]["signal"] == "SIGKILL"
    assert os.stat(blk).st_ino == inode, "the socket file was replaced"
    assert drive_block(blk, 0, b"A" * 4096) == b"A" * 4096  # data survived; served again
    assert "device=block-0 event=exit" in sup.read_log()
    assert sup.terminate() == 0


def test_crash_loop_breaker_and_restart_command(sup: SupervisorProc) -> None:
    """crash-loop=fail: today's breaker, for operators who want it."""
    rng = sup.path("rng.sock")
    sup.start(*NOSANDBOX, "--rng", f"vhost={rng},crash-loop=fail")
    t0 = time.monotonic()
    pids = set()
    for i in range(5):
        d = sup.wait_state("rng-0", "ready", pred=lambda d: d["pid"] not in pids)
        pids.add(d["pid"])
        os.kill(d["pid"], signal.SIGKILL)
        if i < 4:
            b = sup.wait_state("rng-0", ("backoff", "starting", "ready"), pred=lambda d: d["pid"] not in pids)
            assert b["restarts"] == i + 1 or b["state"] == "backoff"
    d = sup.wait_state("rng-0", "failed")
    assert d["pid"] is None
    elapsed = time.monotonic() - t0
    # backoff 0.1 + 0.2 + 0.4 + 0.8 s between the five crashes
    assert elapsed >= 1.5, elapsed
    assert "event=crash-loop" in sup.read_log()
    assert sup.status()["rng-0"]["restarts"] == 4
    reply = sup.request("restart", name="rng-0")
    assert reply["ok"], reply
    sup.wait_state("rng-0", "ready")
    # stayed failed until asked: one child forked between the breaker and the
    # control line (which is written after the fork), the requested one
    after_breaker = sup.read_log().split("event=crash-loop", 1)[1]
    assert after_breaker.split("device=rng-0 event=restart", 1)[0].count("event=spawn") == 1
    assert len(drive_rng(rng)) > 0
    assert sup.terminate() == 0


def test_clean_shutdown_leaves_nothing(sup: SupervisorProc) -> None:
    img = sup.image()
    socks = [sup.path(n) for n in ("b.sock", "r.sock", "c.sock")]
    sup.start(*NOSANDBOX, "--block", f"vhost={socks[0]},path={img}", "--rng", f"vhost={socks[1]}",
              "--serial", f"vhost={socks[2]},type=sink")
    pids = [d["pid"] for d in sup.status().values()]
    assert all(pids) and len(pids) == 3
    assert sorted(sup.children()) == sorted(pids)
    assert oct(os.stat(sup.control).st_mode & 0o777) == "0o600"
    assert sup.terminate() == 0
    assert "STOPPING=1" in sup.wait_notify("STOPPING=1")
    for pid in pids:
        assert not pid_alive(pid), pid
    for s in socks + [sup.control]:
        assert not os.path.exists(s), s


def test_shutdown_grace_sigkills_a_stuck_child(sup: SupervisorProc) -> None:
    rng = sup.path("rng.sock")
    sup.start(*NOSANDBOX, "--grace-period", "0.5", "--rng", f"vhost={rng}")
    pid = sup.status()["rng-0"]["pid"]
    os.kill(pid, signal.SIGSTOP)      # a stopped child cannot act on SIGTERM ...
    deadline = time.monotonic() + 5
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:  # ... once it has stopped
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t0 = time.monotonic()
    assert sup.terminate() == 0
    assert 0.4 < time.monotonic() - t0 < 5
    assert not pid_alive(pid)
    assert "event=sigkill" in sup.read_log()
    assert not os.path.exists(rng)


@MODES
def test_supervisor_sigkill_children_die_and_restart_cleans(sup: SupervisorProc, mode: tuple[str, ...]) -> None:
    rng = sup.path("rng.sock")
    img = sup.image()
    blk = sup.path("blk.sock")
    args = (*mode, "--rng", f"vhost={rng}", "--block", f"vhost={blk},path={img}")
    sup.start(*args)
    st = sup.status().values()
    pids = [d["pid"] for d in st] + [d["supervised_pid"] for d in st]
    assert sup.proc is not None
    sup.proc.kill()
    sup.proc.wait(5)
    assert wait_exited(pids, timeout=5.0), "device children outlived the supervisor"
    # the socket files stay behind (nobody could unlink them) ...
    assert os.path.exists(rng) and os.path.exists(blk) and os.path.exists(sup.control)
    # ... and the next start removes them and serves again
    sup.messages.clear()
    sup.start(*args)
    assert len(drive_rng(rng)) > 0
    drive_block(blk)
    assert sup.terminate() == 0
    assert not os.path.exists(rng) and not os.path.exists(blk)


def test_control_stop_start(sup: SupervisorProc) -> None:
    rng = sup.path("rng.sock")
    sup.start(*NOSANDBOX, "--rng", f"vhost={rng}")
    pid = sup.status()["rng-0"]["pid"]
    reply = sup.request("stop", name="rng-0")
    assert reply["ok"] and reply["device"]["state"] == "stopped"
    assert not pid_alive(pid)
    assert os.path.exists(rng), "stop keeps the socket (a VMM reconnecting still finds it)"
    reply = sup.request("start", name="rng-0")
    assert reply["ok"]
    sup.wait_state("rng-0", "ready")
    # stayed stopped until asked: one child forked between the stop and the
    # control line (written after the fork), the requested one
    after_stop = sup.read_log().split("device=rng-0 event=stopped", 1)[1]
    assert after_stop.split("device=rng-0 event=start", 1)[0].count("event=spawn") == 1
    assert len(drive_rng(rng)) > 0
    bad = sup.request("restart", name="nope")
    assert not bad["ok"] and "nope" in bad["error"]
    assert sup.terminate() == 0


def test_serving_state_and_frontend_column(sup: SupervisorProc) -> None:
    from frontend.vhost_user import VhostUserFrontend
    rng = sup.path("rng.sock")
    sup.start(*NOSANDBOX, "--rng", f"vhost={rng}")
    assert sup.status()["rng-0"]["frontend"] == "no"
    with VhostUserFrontend.connect(rng) as fe:
        fe.negotiate()
        d = sup.wait_state("rng-0", "serving", timeout=5)
        assert d["frontend"] == "yes"
    d = sup.wait_state("rng-0", "ready", pred=lambda d: d["restarts"] == 1)
    assert d["last_exit"]["kind"] == "disconnected"
    assert sup.terminate() == 0


def test_restart_policy_never_and_on_failure(sup: SupervisorProc, sup_dir: str) -> None:
    cfg = os.path.join(sup_dir, "sup.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[supervisor]
disable-sandbox = true

[[device]]
type = "rng"
name = "never"
vhost = "{sup.path('a.sock')}"
restart = "never"

[[device]]
type = "rng"
name = "onfail"
vhost = "{sup.path('b.sock')}"
restart = "on-failure"
""")
    sup.start("--config", cfg)
    drive_rng(sup.path("a.sock"))
    d = sup.wait_state("never", "stopped")
    assert d["last_exit"]["kind"] == "disconnected"
    drive_rng(sup.path("b.sock"))
    sup.wait_state("onfail", "stopped")
    sup.request("start", name="onfail")
    pid = sup.wait_state("onfail", "ready")["pid"]
    os.kill(pid, signal.SIGKILL)
    sup.wait_state("onfail", "ready", pred=lambda d: d["pid"] != pid)
    assert sup.terminate() == 0


@MODES
def test_many_devices(sup: SupervisorProc, mode: tuple[str, ...]) -> None:
    n = 32
    args = []
    for i in range(n):
        args += ["--rng", f"vhost={sup.path(f'r{i}.sock')}"]
    t0 = time.monotonic()
    sup.start(*mode, *args)
    st = sup.status()
    assert len(st) == n and all(d["state"] == "ready" and d["pid"] for d in st.values())
    assert len(set(d["pid"] for d in st.values())) == n
    for i in range(n):
        assert len(drive_rng(sup.path(f"r{i}.sock"))) > 0
    assert time.monotonic() - t0 < 30
    assert sup.terminate() == 0
    assert not any(os.path.exists(sup.path(f"r{i}.sock")) for i in range(n))


def test_json_logs_watchdog_and_status_line(sup: SupervisorProc) -> None:
    import json
    rng = sup.path("rng.sock")
    sup.start(*NOSANDBOX, "--log-format", "json", "--rng", f"vhost={rng}",
              env={"WATCHDOG_USEC": "200000"})
    ready = [m for m in sup.messages if "READY=1" in m][0]
    assert "STATUS=1 devices: 1 ready" in ready
    sup.wait_notify("WATCHDOG=1", timeout=2)
    drive_rng(rng)
    sup.wait_state("rng-0", "ready", pred=lambda d: d["restarts"] == 1)
    assert sup.terminate() == 0
    records = [json.loads(line) for line in sup.read_log().splitlines() if line.startswith("{")]
    assert records and all("device" in r and "event" in r and "ts" in r for r in records)
    exits = [r for r in records if r["event"] == "exit" and r["device"] == "rng-0"]
    assert exits[0]["kind"] == "disconnected"
    child_logs = [r for r in records if r["event"] == "log" and r["device"] == "rng-0"]
    assert any("front-end connected" in r["msg"] for r in child_logs), "child log lines are tagged with the device"


def test_no_fd_leak_across_restarts(sup: SupervisorProc) -> None:
    """A supervisor runs for months: every child's pidfd, pipes and seccomp
    listener must be closed when it is reaped."""
    rng = sup.path("rng.sock")
    sup.start("--rng", f"vhost={rng}")
    assert sup.proc is not None

    def fds() -> tuple[list[str], int]:
        """Every fd but sockets exactly (pidfds, pipes, seccomp listeners);
        sockets counted, since the control connections of the status requests
        may still be closing."""
        sup.wait_state("rng-0", "ready", pred=lambda d: d["frontend"] == "no")
        links = []
        for fd in os.listdir(f"/proc/{sup.proc.pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{sup.proc.pid}/fd/{fd}"))
            except FileNotFoundError:
                pass
        other = sorted(link.split("[")[0] for link in links if not link.startswith("socket:"))
        return other, len(links) - len(other)

    # A leak grows with every restart: compare the steady state after a few
    # restarts with the state 25 restarts later (the first children may
    # create what the supervisor then keeps for good).
    for _ in range(5):
        drive_rng(rng)
    sup.wait_state("rng-0", "ready", pred=lambda d: d["restarts"] >= 5)
    before, sockets = fds()
    for _ in range(25):
        drive_rng(rng)
    sup.wait_state("rng-0", "ready", pred=lambda d: d["restarts"] >= 30)
    # An exited child's fds are closed once its exit is processed (its stderr
    # drained first): wait for that, then compare.  A leak never settles.
    deadline = time.monotonic() + 10
    after, sockets_after = fds()
    while after != before and time.monotonic() < deadline:
        time.sleep(0.1)
        after, sockets_after = fds()
    from collections import Counter
    assert after == before, ("extra", Counter(after) - Counter(before), "missing", Counter(before) - Counter(after))
    assert sockets_after <= sockets + 2, (sockets, sockets_after)
    assert sup.terminate() == 0
