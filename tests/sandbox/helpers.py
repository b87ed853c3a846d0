"""Run a function inside a real jail and get its JSON-able result back.

The function runs after pivot_root, so everything it uses must already be
imported (this module imports what the tests need up front).
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from sandbox import ExitReason, JailConfig, JailedChild, spawn
from sandbox.data import policy_dir

POLICY_DIR = policy_dir()


def wait(child: JailedChild, timeout: float = 10.0) -> ExitReason:
    """Reap the child (watching violation_fd like the supervisor does); kill
    it if it overstays, so no test leaves a process behind."""

    deadline = time.monotonic() + timeout
    killed = False
    try:
        while True:
            if child.violation_fd is not None:
                child.read_violation()
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                return child.decode_status(status)
            if time.monotonic() > deadline and not killed:
                child.kill(signal.SIGKILL)
                killed = True
            time.sleep(0.002)
    finally:
        child.close()


def run_in_jail(config: JailConfig, fn: Callable[[], Any], timeout: float = 10.0,
                on_spawn: Callable[[JailedChild], Any] | None = None) -> tuple[Any, ExitReason, Any]:
    """spawn(config) running fn(); returns (fn's result, exit reason, on_spawn's result).

    The child sends fn's result as one JSON line, then waits until on_spawn
    (run in the parent, e.g. auditing the child from /proc) has finished.
    """

    r, w = os.pipe()
    hold_r, hold_w = os.pipe()
    config.keep_fds = list(config.keep_fds) + [w, hold_r]

    def target() -> int:
        result = fn()
        os.write(w, json.dumps(result).encode() + b"\n")
        os.read(hold_r, 1)  # until the parent is done looking at us
        return 0

    try:
        child = spawn(config, target)
    finally:
        os.close(w)
        os.close(hold_r)
    seen = None
    try:
        buf = b""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(r, select.POLLIN)
        poller.register(child.pidfd, select.POLLIN)
        if child.violation_fd is not None:
            poller.register(child.violation_fd, select.POLLIN)
        while not buf.endswith(b"\n") and time.monotonic() < deadline:
            ready = dict(poller.poll(100))
            if child.violation_fd in ready:
                child.read_violation()
                break
            if r in ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                buf += chunk
            elif child.pidfd in ready:
                break
        if on_spawn is not None and buf:
            seen = on_spawn(child)
    finally:
        os.close(hold_w)
        reason = wait(child, timeout)
        os.close(r)
    return (json.loads(buf) if buf.strip() else None), reason, seen


def policy_file(tmp_path, body: str, name: str = "test.policy") -> str:
    """A policy in tmp_path that can @include the real ones by absolute path."""

    path = tmp_path / name
    path.write_text(body.replace("@COMMON", f"@include {POLICY_DIR}/common.policy")
                    .replace("@VHOST", f"@include {POLICY_DIR}/vhost_user.policy"))
    return str(path)
