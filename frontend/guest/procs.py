"""Process bookkeeping: every process the harness starts is ended by its own pid.

Why a registry: a failing assertion in the middle of a case must not leave a QEMU, a
qemu-storage-daemon or a supervisor behind. Each Popen goes through `spawn`, and the
fixture teardown calls `reap_all`, which signals exactly those pids (never by name).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

log = logging.getLogger("e2e.procs")

_LIVE: list[subprocess.Popen] = []


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """Start `cmd` in its own session with stdout+stderr appended to `log_path`."""
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(
            f"{cmd[0]} is not installed (Debian: qemu-system-x86 / qemu-system-common); "
            "run `make system-packages`"
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out: IO[bytes] = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            **kw,
        )
    finally:
        out.close()
    _LIVE.append(proc)
    log.info("started pid=%d: %s", proc.pid, " ".join(cmd))
    return proc


def stop(proc: subprocess.Popen, grace: float = 3.0) -> int | None:
    """SIGTERM, then SIGKILL after `grace` seconds; always waits. Returns the exit code."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    if proc in _LIVE:
        _LIVE.remove(proc)
    return proc.returncode


def kill_pid(pid: int) -> None:
    """SIGKILL one process by pid (a device child we did not start: the supervisor reaps it)."""
    os.kill(pid, signal.SIGKILL)
    log.info("SIGKILL pid=%d", pid)


def reap_all() -> list[int]:
    """End every process still registered; returns the pids that had to be stopped."""
    stopped = []
    for proc in list(reversed(_LIVE)):
        if proc.poll() is None:
            stopped.append(proc.pid)
        stop(proc)
    return stopped


def wait_for_path(path: Path, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until `path` exists (a socket being bound); fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode} before creating {path}")
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear within {timeout:.1f}s")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return "\n".join(text.splitlines()[-lines:])
