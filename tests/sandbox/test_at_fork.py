"""An embedding program's at-fork hooks (the supervisor resets signal
dispositions in every forked child) must not make the device deaf to SIGTERM."""

from __future__ import annotations

import os
import signal
import time

from sandbox import JailConfig, spawn

from .helpers import wait

_active = False


def _reset_like_the_supervisor() -> None:
    if _active:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_reset_like_the_supervisor)


def test_sigterm_reaches_the_device_despite_at_fork_hooks():
    global _active
    _active = True
    try:
        child = spawn(JailConfig(name="atfork", log_fd=2), lambda: time.sleep(30) or 0)
    finally:
        _active = False
    time.sleep(0.05)
    os.kill(child.pid, signal.SIGTERM)
    reason = wait(child, timeout=5)
    assert (reason.kind, reason.signal, reason.code) == ("signaled", signal.SIGTERM, 128 + signal.SIGTERM), str(reason)
