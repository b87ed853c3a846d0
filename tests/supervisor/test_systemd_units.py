"""The shipped units: printed and installed by the CLI, accepted by systemd's own parser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from supervisor import cli, units


def test_install_writes_units_with_this_bindir(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sysusers = tmp_path / "sysusers.d"
    assert cli.main(["systemd-units", "--install", str(tmp_path), "--bindir", str(bindir),
                     "--sysusers-dir", str(sysusers)]) == 0
    service = (tmp_path / "vhost-supervisor.service").read_text()
    assert f"ExecStart={bindir}/vhost-supervisor run " in service
    for line in ("Type=notify", "Restart=on-failure", "Delegate=yes", "NoNewPrivileges=yes",
                 "User=vhost-supervisor", "AmbientCapabilities=CAP_SETUID CAP_SETGID"):
        assert line in service.splitlines(), line
    assert (sysusers / "vhost-supervisor.conf").read_text().startswith("#")
    assert any(line.startswith("WatchdogSec=") for line in service.splitlines())
    sock = (tmp_path / "vhost-supervisor@.socket").read_text()
    assert "Service=vhost-supervisor.service" in sock and "FileDescriptorName=%i" in sock
    assert oct(os.stat(tmp_path / "vhost-supervisor.service").st_mode & 0o777) == "0o644"


def test_install_into_missing_directory_is_a_usage_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert cli.main(["systemd-units", "--install", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed to check the shipped units"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "vhost-supervisor"
    exe.write_text(f"#!{sys.executable}\n")
    exe.chmod(0o755)
    units.install(str(tmp_path), str(bindir), None)
    inst = tmp_path / "vhost-supervisor@blk0.socket"
    inst.symlink_to(tmp_path / "vhost-supervisor@.socket")
    proc = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "vhost-supervisor.service"), str(inst)],
                          capture_output=True, text=True, timeout=60)
    noise = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 0 and not noise, proc.stderr


def _unit_dir(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "vhost-supervisor"
    exe.write_text(f"#!{sys.executable}\n")
    exe.chmod(0o755)
    units.install(str(tmp_path), str(bindir), str(tmp_path / "etc" / "sysusers.d"))
    return tmp_path


def test_sysusers_entry_creates_the_units_user(tmp_path: Path) -> None:
    """systemd-sysusers, run on a scratch root, creates the user the unit names."""
    tool = shutil.which("systemd-sysusers")
    assert tool, "systemd-sysusers (package systemd) is needed to check the shipped sysusers.d entry"
    root = _unit_dir(tmp_path)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text("")
    proc = subprocess.run([tool, f"--root={root}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    users = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc" / "passwd").read_text().splitlines()}
    service = (root / "vhost-supervisor.service").read_text().splitlines()
    user = next(ln.split("=", 1)[1] for ln in service if ln.startswith("User="))
    assert user == units.SERVICE_USER and user in users, users
    assert 0 < int(users[user][2]) < 1000 and users[user][6] == "/usr/sbin/nologin"   # a system account


def test_exposure_score_meets_the_goal(tmp_path: Path) -> None:
    """systemd-analyze security of the shipped service, offline: 2.0 or lower."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed to score the shipped unit"
    root = _unit_dir(tmp_path)
    proc = subprocess.run([analyze, "security", "--offline=true", "--no-pager",
                           str(root / "vhost-supervisor.service")], capture_output=True, text=True, timeout=60)
    line = proc.stdout.strip().splitlines()[-1]
    score = float(line.split(":")[1].split()[0])
    assert score <= 2.0, proc.stdout
