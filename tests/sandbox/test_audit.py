"""audit(pid) read back from /proc, and its text form for `vhost-supervisor audit`."""

from __future__ import annotations

import json
import os

import pytest

from sandbox import JailConfig, audit
from sandbox.cli import format_audit

from .helpers import POLICY_DIR, run_in_jail


def test_audit_of_self_is_unconfined():
    a = audit(os.getpid())
    assert a["seccomp_mode"] == 0 and a["no_new_privs"] is False
    assert not any(v["separate"] for v in a["namespaces"].values())
    assert a["root"]["same_as_caller"] is True
    json.dumps(a)  # --json needs it serialisable


def test_audit_of_a_jailed_device_and_its_text_form():
    config = JailConfig(name="audited", log_fd=2, seccomp_policy=os.path.join(POLICY_DIR, "rng.policy"))
    _, reason, (a, text) = run_in_jail(config, lambda: 0, on_spawn=lambda c: (audit(c.device_pid),
                                                                               format_audit(audit(c.device_pid))))
    assert reason.kind == "disconnected", str(reason)
    assert a["seccomp_mode"] == 2 and a["seccomp_filters"] == 1
    assert a["no_new_privs"] is True and a["capabilities"]["bounding"] == 0
    assert a["nspid"][-1] == 1
    assert "seccomp filter (1 filter(s))" in text
    assert "capabilities effective=none permitted=none inheritable=none bounding=none ambient=none" in text
    assert "uid_map 65534->65534 x1" in text and "setgroups deny" in text
    assert "namespaces user=own pid=own mnt=own net=own ipc=own uts=own cgroup=own" in text
    assert "rlimits nofile=1024/1024 core=0/0" in text
    assert "root own: []" in text
    assert text.startswith("process pid ")


def test_audit_of_the_forwarder_includes_the_device():
    config = JailConfig(name="fwd", log_fd=2)
    _, reason, (a, dev_pid, text) = run_in_jail(
        config, lambda: 0, on_spawn=lambda c: (audit(c.pid), c.device_pid, format_audit(audit(c.pid))))
    assert reason.kind == "disconnected", str(reason)
    assert a["name"] == "i:fwd" and a["device"]["pid"] == dev_pid and a["device"]["name"] == "fwd"
    assert a["capabilities"]["bounding"] == 0 and a["no_new_privs"] is True   # the forwarder is jailed too
    assert text.startswith("forwarder pid ") and f"\ndevice pid {dev_pid} (fwd)" in text


def test_audit_of_a_missing_pid():
    with pytest.raises(ProcessLookupError):
        audit(2 ** 22 + 12345)
