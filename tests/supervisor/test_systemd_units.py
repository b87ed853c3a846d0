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
    assert cli.main(["systemd-units", "--install", str(tmp_path), "--bindir", str(bindir)]) == 0
    service = (tmp_path / "vhost-supervisor.service").read_text()
    assert f"ExecStart={bindir}/vhost-supervisor run " in service
    for line in ("Type=notify", "Restart=on-failure", "Delegate=yes", "NoNewPrivileges=yes"):
        assert line in service.splitlines(), line
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
    units.install(str(tmp_path), str(bindir))
    inst = tmp_path / "vhost-supervisor@blk0.socket"
    inst.symlink_to(tmp_path / "vhost-supervisor@.socket")
    proc = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "vhost-supervisor.service"), str(inst)],
                          capture_output=True, text=True, timeout=60)
    noise = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 0 and not noise, proc.stderr
