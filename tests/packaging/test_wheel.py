"""The operator's path: build the wheel, install it into a fresh venv outside
the repository (dependencies from PyPI), run it from another directory.

Nothing here imports the project from the source tree: the installed
``vhost-supervisor`` script runs with a clean environment (no PYTHONPATH) and
a working directory that is not the checkout, so any data file read relative
to the source tree, or missing from the wheel, fails the jailed demo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(venv, wheel): the wheel built from this checkout, installed with its dependencies."""
    if os.geteuid() != 0:
        pytest.fail("the jailed demo needs root (namespaces with other uids, seccomp)")
    base = tmp_path_factory.mktemp("wheel", numbered=True)
    assert not str(base).startswith(str(REPO)), base
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(dist)], cwd=REPO)
    wheels = list(dist.glob("vhost_supervisor-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], cwd=base)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheels[0])], cwd=base)
    return venv, wheels[0]


def test_wheel_carries_policies_and_units(installed: tuple[Path, Path]) -> None:
    names = set(zipfile.ZipFile(installed[1]).namelist())
    policies = {p.name for p in (REPO / "seccomp").glob("*.policy")}
    assert policies and {f"sandbox/policies/{p}" for p in policies} <= names
    assert "vhost_supervisor.py" in names
    assert any(n.startswith("supervisor/units/") and n.endswith(".service") for n in names)
    assert "supervisor/units/vhost-supervisor.sysusers" in names    # the unit's User= comes from it


def test_installed_version_and_jailed_demo_from_elsewhere(installed: tuple[Path, Path], tmp_path: Path) -> None:
    venv, _ = installed
    exe = str(venv / "bin" / "vhost-supervisor")
    out = _run([exe, "--version"], cwd=tmp_path)
    assert out.stdout.strip() == "vhost-supervisor 0.1.0", out
    where = _run([str(venv / "bin" / "python"), "-c", "import sandbox.data, supervisor; "
                  "print(sandbox.data.policy_dir()); print(supervisor.__file__)"], cwd=tmp_path).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where
    demo = _run([exe, "demo"], cwd=tmp_path, timeout=300)
    assert "(sandbox on)" in demo.stdout, demo.stdout
    assert "demo passed" in demo.stdout, demo.stdout


def test_supervisord_clash_is_reported(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """PyPI's supervisor (supervisord) installed over us: the launcher names it, exit 3."""
    venv, _ = installed
    _run([str(venv / "bin" / "pip"), "install", "-q", "supervisor"], cwd=tmp_path)
    exe = str(venv / "bin" / "vhost-supervisor")
    proc = _run([exe, "status"], cwd=tmp_path, check=False)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert "PyPI's 'supervisor' (supervisord)" in proc.stderr, proc.stderr
    assert "own virtual environment" in proc.stderr, proc.stderr
