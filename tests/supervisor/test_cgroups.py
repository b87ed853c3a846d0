"""Budgets: parsing, detection of a delegated subtree (read-only), and the
once-at-start report when budgets cannot be enforced.

Enforcement itself (a device OOM-killed by its own cgroup, reported as
``oom``) needs a delegated cgroup v2 subtree under a real systemd: that is
check 4 of ``make host-test``.  Nothing here writes to this host's cgroups.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor import cgroups
from supervisor.config import ConfigError, build_config

from .conftest import SupervisorProc


def test_parse_budget_values() -> None:
    opts = {"memory-max": "64M", "memory-swap-max": "0", "pids-max": "max", "cpu-weight": "200", "path": "x"}
    assert cgroups.parse_budget(opts) == {"memory.max": str(64 << 20), "memory.swap.max": "0",
                                          "pids.max": "max", "cpu.weight": "200"}
    assert opts == {"path": "x"}   # the device's own keys are left for its builder


@pytest.mark.parametrize("key,value", [("memory-max", "lots"), ("memory-max", "-1"), ("pids-max", "0"),
                                       ("cpu-weight", "0"), ("cpu-weight", "10001"), ("memory-swap-max", "1P")])
def test_bad_budget_is_a_config_error_naming_key_and_device(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(ordered_flags=[("rng", f"vhost={tmp_path}/r.sock,name=rng0,{key}={value}")])
    assert key in str(e.value) and value in str(e.value) and "rng0" in str(e.value)


def test_detection_reasons(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "system.slice" / "x.service").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    pc = tmp_path / "cgroup"
    pc.write_text("12:pids:/\n0::/\n")
    assert "unified" in cgroups.find_delegated(str(pc), str(root))[1]
    pc.write_text("0::/\n")
    assert "root cgroup" in cgroups.find_delegated(str(pc), str(root))[1]
    pc.write_text("0::/system.slice/x.service\n")
    path, why = cgroups.find_delegated(str(pc), str(root))
    assert path is None and "not delegated" in why and "Delegate=yes" in why
    os.setxattr(root / "system.slice" / "x.service", "user.delegate", b"1")
    assert cgroups.find_delegated(str(pc), str(root)) == (str(root / "system.slice" / "x.service"), "")


def test_undelegated_budgets_reported_once_at_start(sup: SupervisorProc) -> None:
    """This host is not a delegated cgroup v2 subtree: the supervisor says what it cannot enforce, once."""
    assert cgroups.find_delegated()[0] is None, "this test must not run inside a delegated subtree"
    sup.start("--disable-sandbox", "--rng", f"vhost={sup.path('r.sock')},name=rng0,memory-max=32M,pids-max=16")
    log = sup.read_log()
    assert log.count("event=cgroup-budgets-unenforced") == 1, log
    assert "rng0:memory.max=33554432" in log and "rng0:pids.max=16" in log
    assert sup.terminate() == 0
