"""A real supervisor in a subprocess, for the integration tests.

``SupervisorProc`` starts ``python -m supervisor.cli run ...`` with its own
NOTIFY_SOCKET (so a test waits for READY=1, as systemd would), a control
socket and a log file in a short private directory.  Teardown SIGKILLs the
supervisor and every device child it ever reported, so no test leaves a
process behind even when it fails half way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from supervisor.control import request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SupervisorProc:
    def __init__(self, workdir: str) -> None:
        self.dir = workdir
        self.control = os.path.join(workdir, "control.sock")
        self.log_path = os.path.join(workdir, "supervisor.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.notify_path = os.path.join(workdir, "notify.sock")
        self.pids: set[int] = set()
        self.messages: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def image(self, name: str = "disk.img", size: int = 8 << 20) -> str:
        p = self.path(name)
        with open(p, "wb") as f:
            f.truncate(size)
        return p

    def start(self, *args: str, wait_ready: bool = True, timeout: float = 20.0,
              env: dict[str, str] | None = None) -> "SupervisorProc":
        if self.notify is None:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(self.notify_path)
        e = dict(os.environ)
        e["NOTIFY_SOCKET"] = self.notify_path
        e.update(env or {})
        cmd = [sys.executable, "-m", "supervisor.cli", "run", "-s", self.control, *args]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     cwd=REPO, env=e)
        if wait_ready:
            self.wait_notify("READY=1", timeout)
        return self

    def wait_notify(self, what: str, timeout: float = 10.0) -> str:
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        for m in self.messages:
            if what in m:
                return m
        while time.monotonic() < deadline:
            exited = self.proc is not None and self.proc.poll() is not None
            self.notify.settimeout(0 if exited else 0.1)
            if exited:
                try:
                    msg = self.notify.recv(4096).decode()
                except (BlockingIOError, socket.timeout):
                    raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.read_log()}")
                self.messages.append(msg)
                if what in msg:
                    return msg
                continue
            try:
                msg = self.notify.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append(msg)
            if what in msg:
                return msg
        raise AssertionError(f"no {what!r} from the supervisor in {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def request(self, cmd: str, **kw: Any) -> dict[str, Any]:
        reply = request(self.control, {"cmd": cmd, **kw})
        return reply

    def status(self) -> dict[str, dict[str, Any]]:
        reply = self.request("status")
        assert reply["ok"], reply
        out = {d["name"]: d for d in reply["devices"]}
        self.pids.update(d["pid"] for d in out.values() if d["pid"])
        return out

    def wait_state(self, name: str, states: tuple[str, ...] | str, timeout: float = 10.0,
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

    def children(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR2)
            time.sleep(0.5)
            raise AssertionError(f"supervisor did not exit {timeout}s after SIGTERM:\n{self.read_log()}") from None

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.pids.update(self.children())
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.notify is not None:
            self.notify.close()
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture
def sup_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vs-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sup(sup_dir: str) -> Iterator[SupervisorProc]:
    s = SupervisorProc(sup_dir)
    try:
        yield s
    finally:
        s.cleanup()


def pid_alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
