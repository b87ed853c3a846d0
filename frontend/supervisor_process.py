"""Run a supervisor in a subprocess and talk to it (demo and benchmarks).

It waits for READY=1 on its own NOTIFY_SOCKET, exactly as systemd's
``Type=notify`` would, so "ready" means what an operator's unit sees.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from supervisor.control import request



class SupervisorProcess:
    def __init__(self, workdir: str, log_path: str | None = None) -> None:
        self.dir = workdir
        self.control = os.path.join(workdir, "control.sock")
        self.log_path = log_path or os.path.join(workdir, "supervisor.log")
        self.notify_path = os.path.join(workdir, "notify.sock")
        self.notify: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.messages: list[str] = []
        self.pids: set[int] = set()
        self.t_start = 0.0

    def start(self, *args: str, wait_ready: bool = True, timeout: float = 60.0,
              env: dict[str, str] | None = None, wrap: tuple[str, ...] = (),
              pass_fds: tuple[int, ...] = ()) -> float:
        """Start; returns seconds from exec to READY=1 (0 if not waited).

        ``wrap`` goes before the interpreter (e.g. a shell that sets
        LISTEN_PID=$$ and execs), ``pass_fds`` are inherited by it.
        """
        if self.notify is None:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(self.notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path, **(env or {}))
        self.messages.clear()
        with open(self.log_path, "ab") as log:
            self.t_start = time.monotonic()
            self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "supervisor.cli", "run", "-s", self.control,
                                          *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.dir,
                                         env=env, pass_fds=pass_fds)
        if not wait_ready:
            return 0.0
        self.wait_notify("READY=1", timeout)
        return time.monotonic() - self.t_start

    def wait_notify(self, what: str, timeout: float = 10.0) -> str:
        """The first sd_notify datagram (since start) containing ``what``."""
        assert self.notify is not None
        for m in self.messages:
            if what in m:
                return m
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc is not None and self.proc.poll() is not None
            self.notify.settimeout(0 if exited else 0.05)
            try:
                msg = self.notify.recv(4096).decode()
            except (BlockingIOError, socket.timeout):
                if exited:
                    break
                continue
            self.messages.append(msg)
            if what in msg:
                return msg
        raise RuntimeError(f"no {what!r} from the supervisor (log {self.log_path}):\n{self.read_log()[-4000:]}")

    def read_log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def request(self, cmd: str, **kw: Any) -> dict[str, Any]:
        return request(self.control, {"cmd": cmd, **kw})

    def status(self) -> dict[str, dict[str, Any]]:
        reply = self.request("status")
        out = {d["name"]: d for d in reply["devices"]}
        self.pids.update(d["pid"] for d in out.values() if d["pid"])
        return out

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 10.0, pred: Any = None,
                   interval: float = 0.005) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        d: dict[str, Any] = {}
        while time.monotonic() < deadline:
            d = self.status()[name]
            if d["state"] in states and (pred is None or pred(d)):
                return d
            time.sleep(interval)
        raise RuntimeError(f"{name} not in {states} after {timeout}s: {d}")

    def children(self) -> list[int]:
        """Every live descendant of the supervisor (device children, jail forwarders)."""
        import psutil
        if self.proc is None:
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; on a timeout, dump the supervisor's stacks into its log first."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR2)
            time.sleep(0.5)
            raise

    def cleanup(self) -> None:
        """SIGKILL whatever is left (the supervisor and any child it reported)."""
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
            self.notify = None
            try:
                os.unlink(self.notify_path)
            except FileNotFoundError:
                pass
