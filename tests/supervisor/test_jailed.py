"""The supervisor with the real jail (sandbox/): what only a jailed child shows.

Why separate from test_lifecycle: with the jail the supervised pid is the
jail's forwarder and the device runs as pid 1 of its own pid namespace, the
exit status passes through the forwarder, and a seccomp kill must come back
to the operator as the syscall's name, not just "SIGSYS".
"""

from __future__ import annotations

import json
import os
import shutil
import signal

from supervisor import cli
from supervisor.config import default_policy_dir
from frontend.exercise import drive_block, drive_rng

from .conftest import SupervisorProc, pid_alive


def _nspid(pid: int) -> list[str]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return line.split()[1:]
    return []


def test_jailed_restart_after_sigkill(sup: SupervisorProc) -> None:
    img = sup.image()
    blk = sup.path("blk.sock")
    sup.start("--block", f"vhost={blk},path={img}")
    d = sup.status()["block-0"]
    assert d["pid"] != d["supervised_pid"], "the jail runs the device under a forwarder"
    assert _nspid(d["pid"])[-1] == "1", "the device is pid 1 of its own pid namespace"
    drive_block(blk, 8192, b"J" * 4096)
    d = sup.wait_state("block-0", "ready", pred=lambda d: d["restarts"] == 1)
    inode = os.stat(blk).st_ino
    os.kill(d["supervised_pid"], signal.SIGKILL)
    new = sup.wait_state("block-0", "ready", pred=lambda x: x["pid"] not in (None, d["pid"]))
    assert new["last_exit"]["kind"] == "signaled" and new["last_exit"]["signal"] == "SIGKILL"
    assert not pid_alive(d["pid"]), "the device died with its forwarder"
    assert os.stat(blk).st_ino == inode
    assert drive_block(blk, 8192, b"J" * 4096) == b"J" * 4096
    assert sup.terminate() == 0
    assert not os.path.exists(blk)


def test_seccomp_kill_reported_with_syscall(sup: SupervisorProc, sup_dir: str) -> None:
    policies = os.path.join(sup_dir, "policies")
    shutil.copytree(default_policy_dir(), policies)
    path = os.path.join(policies, "vhost_user.policy")
    with open(path) as f:
        lines = [ln for ln in f if not ln.startswith("accept4:")]
    with open(path, "w") as f:
        f.writelines(lines)
    rng = sup.path("rng.sock")
    sup.start("--jail", f"seccomp-policy-dir={policies}", "--rng", f"vhost={rng},restart=never")
    d = sup.wait_state("rng-0", "failed")
    assert d["last_exit"]["kind"] == "seccomp", d
    assert d["last_exit"]["syscall"] == "accept4", d
    log = sup.read_log()
    assert "device=rng-0 event=seccomp-violation" in log and "syscall=accept4" in log
    assert sup.terminate() == 0


def test_audit_and_status_cli(sup: SupervisorProc, capsys) -> None:
    rng = sup.path("rng.sock")
    sup.start("--rng", f"vhost={rng}")
    assert cli.main(["status", "-s", sup.control]) == 0
    out = capsys.readouterr().out
    assert "rng-0" in out and "ready" in out and rng in out
    assert cli.main(["status", "--json", "-s", sup.control]) == 0
    st = json.loads(capsys.readouterr().out)
    pid = st["devices"][0]["pid"]
    assert cli.main(["audit", "--json", "-s", sup.control]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["rng-0"] and "error" not in audit["rng-0"], audit
    assert cli.main(["audit", "-s", sup.control]) == 0
    assert "rng-0" in capsys.readouterr().out
    assert cli.main(["restart", "rng-0", "-s", sup.control]) == 0
    capsys.readouterr()
    new = sup.wait_state("rng-0", "ready", pred=lambda d: d["pid"] != pid)
    assert new["last_exit"]["requested"] is True
    assert len(drive_rng(rng)) > 0
    assert sup.terminate() == 0


def test_jailed_device_sigkill_reported_through_forwarder(sup: SupervisorProc) -> None:
    """SIGKILL to the device process itself (pid 1 of its namespace): the
    forwarder mirrors the death, so the operator reads "killed by SIGKILL"."""
    rng = sup.path("rng.sock")
    sup.start("--rng", f"vhost={rng}")
    d = sup.status()["rng-0"]
    os.kill(d["pid"], signal.SIGKILL)
    new = sup.wait_state("rng-0", "ready", pred=lambda x: x["pid"] not in (None, d["pid"]))
    assert new["last_exit"]["kind"] == "signaled" and new["last_exit"]["signal"] == "SIGKILL", new["last_exit"]
    assert not pid_alive(d["supervised_pid"])
    assert len(drive_rng(rng)) > 0
    assert sup.terminate() == 0


def test_cli_dispatch_probe_policy_device(sup: SupervisorProc, capsys) -> None:
    """The one command reaches the other packages' tools with their own arguments."""
    rng = sup.path("rng.sock")
    sup.start("--rng", f"vhost={rng}")
    assert cli.main(["probe", rng, "--json", "--type", "rng"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device_type"] == "rng"
    assert cli.main(["policy", "check", str(default_policy_dir() / "rng.policy")]) == 0
    capsys.readouterr()
    assert cli.main(["device", "rng", "--print-capabilities"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "rng"
    sup.wait_state("rng-0", "ready", pred=lambda d: d["restarts"] >= 1)  # the probe was one front-end
    assert sup.terminate() == 0


def test_jail_setup_failure_reported(sup: SupervisorProc, sup_dir: str) -> None:
    """The pivot-root directory vanishes while the supervisor runs: the next
    child cannot build its jail, and the operator reads the jail's own reason."""
    root = os.path.join(sup_dir, "root")
    os.mkdir(root)
    rng = sup.path("rng.sock")
    sup.start("--jail", f"pivot-root={root}", "--rng", f"vhost={rng}")
    d = sup.status()["rng-0"]
    os.rmdir(root)
    os.kill(d["pid"], signal.SIGKILL)
    d = sup.wait_state("rng-0", ("backoff", "failed", "starting"),
                       pred=lambda x: (x["last_exit"] or {}).get("kind") == "jail_failed")
    assert "root" in d["last_exit"]["message"], d["last_exit"]
    assert "jail set-up failed" in d["last_exit"]["text"]
    os.mkdir(root)          # the operator fixes it; restart clears the breaker
    assert sup.request("restart", name="rng-0")["ok"]
    sup.wait_state("rng-0", "ready")
    assert len(drive_rng(rng)) > 0
    assert sup.terminate() == 0
