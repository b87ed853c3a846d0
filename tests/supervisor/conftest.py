"""A real supervisor in a subprocess, for the integration tests.

``SupervisorProc`` (``frontend.supervisor_process.SupervisorProcess`` plus test
helpers) starts ``python -m supervisor.cli run ...`` with its own
NOTIFY_SOCKET (a test waits for READY=1, as systemd would), a control socket
and a log file in a short private directory.  Teardown SIGKILLs the
supervisor and every device child it ever reported, so no test leaves a
process behind even when it fails half way.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from frontend.supervisor_process import SupervisorProcess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["REPO", "SupervisorProc", "pid_alive", "wait_exited"]


class SupervisorProc(SupervisorProcess):
    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def image(self, name: str = "disk.img", size: int = 8 << 20) -> str:
        p = self.path(name)
        with open(p, "wb") as f:
            f.truncate(size)
        return p

    def start(self, *args: str, wait_ready: bool = True, timeout: float = 20.0,  # type: ignore[override]
              env: dict[str, str] | None = None, **kw: Any) -> "SupervisorProc":
        try:
            super().start(*args, wait_ready=wait_ready, timeout=timeout, env=env, **kw)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None
        return self

    def wait_notify(self, what: str, timeout: float = 10.0) -> str:
        try:
            return super().wait_notify(what, timeout)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None

    def status(self) -> dict[str, dict[str, Any]]:
        reply = self.request("status")
        assert reply["ok"], reply
        out = {d["name"]: d for d in reply["devices"]}
        self.pids.update(p for d in out.values() for p in (d["pid"], d["supervised_pid"]) if p)
        return out

    def wait_state(self, name: str, states: tuple[str, ...] | str, timeout: float = 10.0,  # type: ignore[override]
                   pred: Any = None) -> dict[str, Any]:
        states = (states,) if isinstance(states, str) else states
        deadline = time.monotonic() + timeout
        d: dict[str, Any] = {}
        while time.monotonic() < deadline:
            d = self.status()[name]
            if d["state"] in states and (pred is None or pred(d)):
                return d
            time.sleep(0.02)
        raise AssertionError(f"{name} not in {states} after {timeout}s: {json.dumps(d)}\n{self.read_log()}")

    def terminate(self, timeout: float = 15.0) -> int:
        try:
            return super().terminate(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor did not exit {timeout}s after SIGTERM:\n{self.read_log()}") from None


@pytest.fixture
def sup_dir(sock_dir: str) -> str:
    """The supervisor's working directory: the shared short socket directory."""
    return sock_dir


@pytest.fixture
def sup(sup_dir: str) -> Iterator[SupervisorProc]:
    s = SupervisorProc(sup_dir)
    try:
        yield s
    finally:
        s.cleanup()


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_exited(pids: list[int], timeout: float) -> bool:
    """Wait on the processes' pidfds (readable when they exit) rather than polling."""
    fds = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + timeout
        pending = set(fds)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select(list(pending), [], [], remaining)
            pending -= set(ready)
        return not any(pid_alive(p) for p in pids)   # exited and reaped (or a zombie)
    finally:
        for fd in fds:
            os.close(fd)
