"""The launcher names a foreign ``supervisor`` package instead of failing obscurely
(offline; test_wheel.py does the same with the real supervisord from PyPI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import vhost_supervisor

ROOT = str(Path(vhost_supervisor.__file__).resolve().parent)


def _run(pythonpath: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
    code = "import sys, vhost_supervisor; sys.exit(vhost_supervisor.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd="/")


def test_supervisord_first_on_path_is_named(tmp_path: Path) -> None:
    pkg = tmp_path / "supervisor"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("# this is a package\n")
    (pkg / "supervisord.py").write_text("raise SystemExit('supervisord must not run')\n")
    proc = _run([str(tmp_path), ROOT], "status")
    assert proc.returncode == vhost_supervisor.EXIT_CLASH, proc
    assert f"finds PyPI's 'supervisor' (supervisord) at {pkg}" in proc.stderr, proc.stderr
    version = _run([str(tmp_path), ROOT], "--version")
    assert version.returncode == 0 and version.stdout.startswith("vhost-supervisor ")
    assert "warning:" in version.stderr


def test_ours_runs() -> None:
    proc = _run([ROOT], "systemd-units")
    assert proc.returncode == 0, proc.stderr
    assert "[Service]" in proc.stdout and "# ---- vhost-supervisor@.socket" in proc.stdout
