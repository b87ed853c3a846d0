"""Log mode for writing policies: the forbidden syscall runs and is reported."""

from __future__ import annotations

import os
import socket

from sandbox import JailConfig
from sandbox.learn import learn

from .helpers import POLICY_DIR


def test_learn_reports_what_the_policy_lacks():
    def target() -> int:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()  # runs: log mode
        return 0

    config = JailConfig(name="learner", log_fd=2, seccomp_policy=os.path.join(POLICY_DIR, "rng.policy"))
    seen = learn(config, target, timeout=10)
    assert seen["socket"] >= 1, seen
    assert "read" not in seen and "epoll_ctl" not in seen  # allowed by the policy: not logged
