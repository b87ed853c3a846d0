"""The jail when the supervisor is an ordinary user (needs a kernel that
allows unprivileged user namespaces): the maps then cover only that user."""

from __future__ import annotations

import json
import os

from sandbox import JailConfig, audit

from .helpers import POLICY_DIR, run_in_jail

USER = 12345


def _userns_allowed() -> str | None:
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "user.max_user_namespaces is 0"
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/unprivileged_userns_clone") as f:
            if f.read().strip() == "0":
                return "kernel.unprivileged_userns_clone is 0"
    except OSError:
        pass
    return None


def test_jail_as_ordinary_user():
    reason_off = _userns_allowed()
    assert reason_off is None, f"cannot test the unprivileged jail here: {reason_off}"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(USER, USER, USER)
            os.setresuid(USER, USER, USER)
            config = JailConfig(name="unpriv", log_fd=2, seccomp_policy=os.path.join(POLICY_DIR, "rng.policy"))
            inside, reason, seen = run_in_jail(
                config, lambda: {"pid": os.getpid(), "uid": os.getuid()},
                on_spawn=lambda c: audit(c.device_pid))
            os.write(w, json.dumps({"inside": inside, "reason": str(reason), "audit": seen}).encode())
            code = 0
        except BaseException as e:  # report instead of unwinding into pytest
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    out = json.loads(data)
    assert "error" not in out, out.get("error")
    assert out["reason"] == "exited with status 0"
    assert out["inside"] == {"pid": 1, "uid": USER}
    assert a_root_is_private(out["audit"])
    a = out["audit"]
    assert a["uid_map"] == [{"inside": USER, "outside": USER, "count": 1}]
    assert a["gid_map"] == [{"inside": USER, "outside": USER, "count": 1}]
    assert a["capabilities"]["effective"] == 0 and a["capabilities"]["bounding"] == 0
    assert a["seccomp_mode"] == 2 and a["no_new_privs"] is True
    # (namespace links of a non-dumpable process are unreadable to an ordinary user: None)
    assert all(v["separate"] is not False for v in a["namespaces"].values())


def a_root_is_private(a: dict) -> bool:
    # an ordinary user cannot look into a non-dumpable process's root: None
    return a["root"]["same_as_caller"] in (False, None)
