"""Read a process's confinement back from /proc, to check rather than trust.

Everything here is a plain read of /proc/<pid>/...; fields the caller may not
read (an unprivileged supervisor looking at a non-dumpable child) come back as
None instead of failing the whole audit.
"""

from __future__ import annotations

import os
from typing import Any

NAMESPACES = ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup")
CAP_SETS = {"CapInh": "inheritable", "CapPrm": "permitted", "CapEff": "effective",
            "CapBnd": "bounding", "CapAmb": "ambient"}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _idmap(text: str | None) -> list[dict[str, int]] | None:
    if text is None:
        return None
    rows = []
    for line in text.splitlines():
        inner, outer, count = (int(x) for x in line.split())
        rows.append({"inside": inner, "outside": outer, "count": count})
    return rows


def _limits(pid: int) -> dict[str, dict[str, str]] | None:
    text = _read(f"/proc/{pid}/limits")
    if text is None:
        return None
    out = {}
    for line in text.splitlines()[1:]:
        name = line[:26].strip()
        parts = line[26:].split()
        if len(parts) >= 2:
            out[name] = {"soft": parts[0], "hard": parts[1]}
    return out


def _fds(pid: int) -> dict[str, str] | None:
    base = f"/proc/{pid}/fd"
    try:
        names = sorted(os.listdir(base), key=int)
    except OSError:
        return None
    out = {}
    for n in names:
        try:
            out[n] = os.readlink(f"{base}/{n}")
        except OSError:
            out[n] = "?"
    return out


def _root(pid: int) -> dict[str, Any]:
    try:
        st = os.stat(f"/proc/{pid}/root")
        mine = os.stat("/")
        entries = sorted(os.listdir(f"/proc/{pid}/root"))
    except OSError:
        return {"same_as_caller": None, "entries": None}
    return {"same_as_caller": (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino), "entries": entries}


def _dumpable(pid: int, st: dict[str, str]) -> bool | None:
    """/proc/<pid>/* belongs to the process's euid only while it is dumpable;
    a non-dumpable one (PR_SET_DUMPABLE 0) shows root as the owner."""

    try:
        owner = os.stat(f"/proc/{pid}/status").st_uid
        euid = int(st["Uid"].split()[1])
    except (OSError, KeyError, IndexError, ValueError):
        return None
    if euid == 0:
        return None  # cannot tell: both cases show root
    return owner == euid


def _children(pid: int) -> list[int]:
    text = _read(f"/proc/{pid}/task/{pid}/children") or ""
    return [int(x) for x in text.split()]


def audit(pid: int, follow: bool = True) -> dict[str, Any]:
    """Confinement of `pid`: id maps, capability sets, no_new_privs, seccomp,
    namespaces (compared with the caller's), root, rlimits, open fds.

    When `pid` is a jail's forwarder (JailedChild.pid: its only child is pid 1
    of another pid namespace) the device is audited too, under "device", so a
    supervisor that only knows the pid it waits on still sees the device.
    """

    st = _status(pid)
    if not st:
        raise ProcessLookupError(pid)
    ns = {}
    for name in NAMESPACES:
        try:
            theirs = os.readlink(f"/proc/{pid}/ns/{name}")
        except OSError:
            theirs = None
        try:
            mine = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            mine = None
        ns[name] = {"id": theirs, "separate": None if theirs is None else theirs != mine}
    caps = {label: int(st[key], 16) for key, label in CAP_SETS.items() if key in st}
    result: dict[str, Any] = {
        "pid": pid,
        "name": st.get("Name"),
        "ppid": int(st.get("PPid", "0")),
        "nspid": [int(x) for x in st.get("NSpid", "").split()],
        "uid": [int(x) for x in st.get("Uid", "").split()],
        "gid": [int(x) for x in st.get("Gid", "").split()],
        "groups": [int(x) for x in st.get("Groups", "").split()],
        "uid_map": _idmap(_read(f"/proc/{pid}/uid_map")),
        "gid_map": _idmap(_read(f"/proc/{pid}/gid_map")),
        "setgroups": (_read(f"/proc/{pid}/setgroups") or "").strip() or None,
        "capabilities": caps,
        "no_new_privs": st.get("NoNewPrivs") == "1",
        "seccomp_mode": int(st["Seccomp"]) if "Seccomp" in st else None,
        "seccomp_filters": int(st["Seccomp_filters"]) if "Seccomp_filters" in st else None,
        "namespaces": ns,
        "root": _root(pid),
        "rlimits": _limits(pid),
        "fds": _fds(pid),
        "threads": int(st.get("Threads", "0")),
        "dumpable": _dumpable(pid, st),
    }
    if follow:
        kids = _children(pid)
        if len(kids) == 1:
            try:
                dev = audit(kids[0], follow=False)
            except ProcessLookupError:
                dev = None
            if dev is not None and len(dev["nspid"]) > 1 and dev["nspid"][-1] == 1 \
                    and dev["namespaces"]["pid"]["separate"] is not False:
                result["device"] = dev
    return result
