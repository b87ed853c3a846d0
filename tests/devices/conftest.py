"""Run a device for a test: in a thread of this process (fast, for request
logic), or as the standalone program in a subprocess (for signals, crashes
and the exit status)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from connection.connection import VhostUserListener
from connection.executor import Executor

REPO = Path(__file__).resolve().parents[2]


class DeviceThread:
    """``VhostUserListener(path).run_device(Executor(), builder)`` in a thread,
    as the jailed child would run it."""

    def __init__(self, builder, path: str) -> None:
        self.builder = builder
        self.path = path
        self.listener = VhostUserListener(path)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ex = Executor()
        try:
            self.listener.run_device(ex, self.builder)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            ex.close()

    def join(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "device did not return after the front-end left"
        self.listener.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def run_device(tmp_path):
    """run_device(builder) -> DeviceThread listening on a fresh socket path."""
    started: list[DeviceThread] = []

    def start(builder, name: str = "dev.sock") -> DeviceThread:
        t = DeviceThread(builder, str(tmp_path / name))
        started.append(t)
        return t

    yield start
    for t in started:
        t.thread.join(5)
        t.listener.close()
        t.builder.close()


def standalone_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "devices.standalone", *args]


@contextmanager
def standalone(*args: str, log: Path | None = None):
    """The standalone program in a subprocess; yields the Popen."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(standalone_cmd(*args), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if log:
            out.close()


def wait_for_path(path: str, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"device exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)
