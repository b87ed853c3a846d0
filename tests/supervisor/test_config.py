"""Configuration: every error names its key and stops everything before start.

Why: a supervisor that binds half its sockets and then fails on the third
device leaves a VMM host in a worse state than one that refused to start.
The CLI tests check exit status 2, the key in the message, and that no
socket file or control socket was created.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervisor import config as C
from supervisor.config import ConfigError, build_config, open_builders

from .conftest import REPO


def _img(d: str, name: str = "disk.img") -> str:
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return p


def test_cli_flags_names_and_keys(sup_dir: str) -> None:
    img = _img(sup_dir)
    cfg = build_config(ordered_flags=[
        ("block", f"vhost={sup_dir}/b0.sock,path={img},ro=true"),
        ("rng", f"vhost={sup_dir}/r.sock,restart=on-failure,jail-user=1000:1001"),
        ("block", f"vhost={sup_dir}/b1.sock,path={img},name=data"),
        ("serial", f"vhost={sup_dir}/c.sock,type=sink"),
    ], control_socket=f"{sup_dir}/ctl.sock", jail=["seccomp-log-failures=true"])
    assert [d.name for d in cfg.devices] == ["block-0", "rng-0", "data", "console-0"]
    b0, r, _, c = cfg.devices
    assert b0.options == {"path": img, "ro": "true"} and b0.socket == f"{sup_dir}/b0.sock"
    assert r.restart == "on-failure" and r.jail_user == (1000, 1001) and r.options == {}
    assert c.type == "console" and c.options == {"type": "sink"}
    assert cfg.jail.seccomp_log_failures is True
    assert cfg.jail.seccomp_policy_dir == str(C.default_policy_dir())


def test_toml_jail_inline_forms(sup_dir: str) -> None:
    path = os.path.join(sup_dir, "s.toml")
    for form in ('jail = {seccomp-log-failures = true}', 'jail = "seccomp-log-failures=true"'):
        with open(path, "w") as f:
            f.write(f"[supervisor]\n{form}\n")
        assert build_config(config_file=path, control_socket=f"{sup_dir}/c.sock").jail.seccomp_log_failures


def test_toml(sup_dir: str) -> None:
    img = _img(sup_dir)
    path = os.path.join(sup_dir, "s.toml")
    with open(path, "w") as f:
        f.write(f"""
[supervisor]
control-socket = "{sup_dir}/ctl.sock"
log-format = "json"
grace-period = 2.5

[jail]
seccomp-log-failures = true

[[device]]
type = "block"
name = "root"
vhost = "{sup_dir}/root.sock"
path = "{img}"
ro = true
num-queues = 2

[[device]]
type = "serial"
vhost = "{sup_dir}/con.sock"
type_ = "x"
""".replace('type_ = "x"\n', ""))
    cfg = build_config(config_file=path)
    assert cfg.log_format == "json" and cfg.grace_period == 2.5 and cfg.jail.seccomp_log_failures
    root, con = cfg.devices
    assert root.name == "root" and root.options == {"path": img, "ro": "true", "num-queues": "2"}
    assert con.name == "console-0" and con.type == "console"


@pytest.mark.parametrize("flags,key,where", [
    ([("rng", "path=/x")], "vhost", "rng-0"),
    ([("rng", "vhost=/nonexistent-dir-xyz/r.sock")], "vhost", "rng-0"),
    ([("rng", "vhost={d}/a.sock"), ("rng", "vhost={d}/a.sock")], "vhost", "rng-1"),
    ([("rng", "vhost={d}/a.sock,name=x"), ("rng", "vhost={d}/b.sock,name=x")], "name", "x"),
    ([("rng", "vhost={d}/a.sock,restart=sometimes")], "restart", "rng-0"),
    ([("rng", "vhost={d}/a.sock,jail-user=no-such-user-xyz")], "jail-user", "rng-0"),
    ([("rng", "vhost={d}/a.sock,jail-user=0")], "jail-user", "rng-0"),
    ([("rng", "vhost={d}/" + "x" * 120 + ".sock")], "vhost", "rng-0"),
    ([("rng", "vhost={d}/ctl.sock")], "vhost", "rng-0"),
    ([("rng", "vhost={d}/file")], "vhost", "rng-0"),
])
def test_config_errors_name_the_key(sup_dir: str, flags, key: str, where: str) -> None:
    open(os.path.join(sup_dir, "file"), "w").close()
    flags = [(f, t.format(d=sup_dir)) for f, t in flags]
    with pytest.raises(ConfigError) as ei:
        build_config(ordered_flags=flags, control_socket=f"{sup_dir}/ctl.sock")
    assert ei.value.key == key and ei.value.device == where, str(ei.value)
    assert repr(key) in str(ei.value) and where in str(ei.value)


@pytest.mark.parametrize("text,key", [
    ("[supervisor]\nbogus = 1\n", "bogus"),
    ("[nonsense]\n", "nonsense"),
    ("[[device]]\nvhost = '/tmp/x.sock'\n", "type"),
    ("[[device]]\ntype = 'gpu'\nvhost = '/tmp/x.sock'\n", "type"),
    ("[supervisor]\nlog-format = 'xml'\n", "log-format"),
    ("[supervisor]\ngrace-period = 'soon'\n", "grace-period"),
    ("[jail]\npivot-root = '/nonexistent-xyz'\n", "pivot-root"),
    ("[jail]\nfoo = 1\n", "foo"),
    ("[[device]]\ntype = 'rng'\nvhost = '/tmp/x.sock'\nnested = {a = 1}\n", "nested"),
    ("this is = not toml [", "--config"),
])
def test_toml_errors(sup_dir: str, text: str, key: str) -> None:
    path = os.path.join(sup_dir, "bad.toml")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(ConfigError) as ei:
        build_config(config_file=path, control_socket=f"{sup_dir}/ctl.sock")
    assert ei.value.key == key, str(ei.value)


def test_open_builders_reports_device_errors_and_closes(sup_dir: str) -> None:
    img = _img(sup_dir)
    cfg = build_config(ordered_flags=[("block", f"vhost={sup_dir}/a.sock,path={img}"),
                                      ("block", f"vhost={sup_dir}/b.sock,path={sup_dir}/missing.img")],
                       control_socket=f"{sup_dir}/ctl.sock")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError) as ei:
        open_builders(cfg)
    assert ei.value.device == "block-1" and "path" in str(ei.value) and "missing.img" in str(ei.value)
    assert set(os.listdir("/proc/self/fd")) == before, "the first device's image fd leaked"
    cfg = build_config(ordered_flags=[("rng", f"vhost={sup_dir}/a.sock,colour=blue")],
                       control_socket=f"{sup_dir}/ctl.sock")
    with pytest.raises(ConfigError) as ei:
        open_builders(cfg)
    assert "colour" in str(ei.value) and ei.value.device == "rng-0"


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", "run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("case", ["unknown-key", "missing-image", "same-socket", "no-dir", "no-devices",
                                  "bad-jail", "policy-dir", "bad-policy"])
def test_cli_config_errors_exit_2_and_start_nothing(sup_dir: str, case: str) -> None:
    img = _img(sup_dir)
    ctl = f"{sup_dir}/ctl.sock"
    a, b = f"{sup_dir}/a.sock", f"{sup_dir}/b.sock"
    with open(f"{sup_dir}/rng.policy", "w") as f:
        f.write("read: 1\nnot_a_syscall_xyz: 1\n")
    os.mkdir(f"{sup_dir}/empty")
    args, needle = {
        "unknown-key": (["--block", f"vhost={a},path={img},readonly=true"], "readonly"),
        "missing-image": (["--rng", f"vhost={b}", "--block", f"vhost={a},path={sup_dir}/nope.img"], "nope.img"),
        "same-socket": (["--rng", f"vhost={a}", "--block", f"vhost={a},path={img}"], "'vhost'"),
        "no-dir": (["--rng", f"vhost={sup_dir}/missing/a.sock"], "does not exist"),
        "no-devices": ([], "no devices"),
        "bad-jail": (["--jail", "pivot-root=/nonexistent-xyz", "--rng", f"vhost={a}"], "'pivot-root'"),
        "policy-dir": (["--jail", f"seccomp-policy-dir={sup_dir}/empty", "--rng", f"vhost={a}"], "rng.policy"),
        "bad-policy": (["--jail", f"seccomp-policy-dir={sup_dir}", "--rng", f"vhost={a}"], "not_a_syscall_xyz"),
    }[case]
    r = _run_cli("-s", ctl, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "config error" in r.stderr and needle in r.stderr, r.stderr
    assert not os.path.exists(a) and not os.path.exists(b) and not os.path.exists(ctl)


def test_cli_socket_in_use_exit_2(sup_dir: str) -> None:
    import socket
    a = f"{sup_dir}/a.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(a)
    s.listen()
    try:
        r = _run_cli("--disable-sandbox", "-s", f"{sup_dir}/ctl.sock", "--rng", f"vhost={a}")
        assert r.returncode == 2 and "in use" in r.stderr, r.stderr
        assert os.path.exists(a), "a live socket was removed"
        assert not os.path.exists(f"{sup_dir}/ctl.sock")
    finally:
        s.close()
