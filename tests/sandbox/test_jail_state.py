"""Each property of a jailed child, checked from inside and from /proc outside."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import socket
import struct

import prctl
import pytest

from sandbox import BindMount, JailConfig, audit
from sandbox import libc
from sandbox.config import JailError

from .helpers import run_in_jail

SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
FULL_CAPS = (1 << 41) - 1


def _fds() -> list[int]:
    out = []
    for fd in range(256):
        try:
            os.fstat(fd)
            out.append(fd)
        except OSError:
            pass
    return out


def _inside() -> dict:
    """What the device sees of itself (no /proc needed)."""

    res: dict = {
        "pid": os.getpid(),
        "resuid": list(os.getresuid()),
        "resgid": list(os.getresgid()),
        "groups": os.getgroups(),
        "root": sorted(os.listdir("/")),
        "hostname": os.uname().nodename,
        "nnp": prctl.get_no_new_privs(),
        "dumpable": prctl.get_dumpable(),
        "pdeathsig": prctl.get_pdeathsig(),
        "name": prctl.get_name(),
        "securebits": prctl.get_securebits(),
        "caps": [any(getattr(s, c) for c in ("sys_admin", "setuid", "net_admin", "dac_override"))
                 for s in (prctl.cap_effective, prctl.cap_permitted, prctl.cap_inheritable)],
        "bounding_sys_admin": prctl.capbset_read(prctl.CAP_SYS_ADMIN),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
        "nproc": list(resource.getrlimit(resource.RLIMIT_NPROC)),
        "as": list(resource.getrlimit(resource.RLIMIT_AS)),
        "memlock": list(resource.getrlimit(resource.RLIMIT_MEMLOCK)),
        "fds": _fds(),
    }
    try:
        os.stat("/etc/passwd")
        res["host_file"] = "visible"
    except OSError as e:
        res["host_file"] = e.errno
    # network: only lo, and it is down
    names = [n for _, n in socket.if_nameindex()]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0)), 16)[0]
    finally:
        s.close()
    res["ifaces"] = names
    res["lo_up"] = bool(flags & IFF_UP)
    for what, call in (("setuid0", lambda: os.setuid(0)), ("setgid0", lambda: os.setgid(0)),
                       ("setgroups", lambda: os.setgroups([0])),
                       ("mount", lambda: libc.mount("tmpfs", "/", "tmpfs", 0, None)),
                       ("unshare", lambda: libc.unshare(libc.CLONE_NEWUSER))):
        try:
            call()
            res[what] = "allowed"
        except (OSError, JailError) as e:
            res[what] = e.errno
    try:
        with open("/proc/self/status") as f:
            res["proc_status"] = f.read()
    except OSError as e:
        res["proc_status"] = e.errno
    return res


def _lo_flags() -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0)), 16)[0]
    finally:
        s.close()
    return {"ifaces": [n for _, n in socket.if_nameindex()], "lo_up": bool(flags & IFF_UP)}


def _net_from_outside(pid: int) -> dict:
    """Join the jail's network namespace in a throw-away child and look."""

    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            if ctypes.CDLL(None, use_errno=True).setns(fd, libc.CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.write(w, json.dumps(_lo_flags()).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 4096)
    os.close(r)
    os.waitpid(helper, 0)
    return json.loads(data) if data else {}


@pytest.fixture(scope="module")
def jailed():
    """One jail (no seccomp: the checks need syscalls a policy forbids)."""

    config = JailConfig(name="state-dev", nproc=64, address_space=1 << 34, memlock=1 << 16,
                        keep_fds=[], log_fd=2)
    inside, reason, outside = run_in_jail(
        config, _inside,
        on_spawn=lambda c: (c.pid, c.device_pid, audit(c.device_pid), audit(c.pid, follow=False),
                            _net_from_outside(c.device_pid)))
    assert reason.kind == "disconnected" and reason.code == 0, str(reason)
    return inside, outside


def test_runs_as_pid1_of_new_pid_namespace(jailed):
    inside, (fwd_pid, dev_pid, a, fa, _net) = jailed
    assert inside["pid"] == 1
    assert a["nspid"] == [dev_pid, 1]
    assert a["ppid"] == fwd_pid                         # under the forwarder
    assert fa["namespaces"]["pid"]["separate"] is False  # the forwarder stays outside it


def test_every_namespace_is_new(jailed):
    _inside, (_f, _d, a, _fa, _net) = jailed
    for name in ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup"):
        assert a["namespaces"][name]["separate"] is True, name


def test_uid_gid_maps_and_setgroups(jailed):
    inside, (_f, _d, a, _fa, _net) = jailed
    assert a["uid_map"] == [{"inside": 65534, "outside": 65534, "count": 1}]
    assert a["gid_map"] == [{"inside": 65534, "outside": 65534, "count": 1}]
    assert a["setgroups"] == "deny"
    assert inside["resuid"] == [65534] * 3 and inside["resgid"] == [65534] * 3
    assert set(a["uid"]) == {65534} and set(a["gid"]) == {65534}   # host view: not 0
    assert a["groups"] == [] and inside["groups"] in ([], [65534])
    assert inside["setuid0"] in (errno.EPERM, errno.EINVAL)
    assert inside["setgid0"] in (errno.EPERM, errno.EINVAL)
    assert inside["setgroups"] == errno.EPERM


def test_capabilities_empty_and_securebits_locked(jailed):
    inside, (_f, _d, a, fa, _net) = jailed
    assert a["capabilities"] == {"inheritable": 0, "permitted": 0, "effective": 0, "bounding": 0, "ambient": 0}
    assert fa["capabilities"]["bounding"] == 0 and fa["capabilities"]["effective"] == 0
    assert inside["caps"] == [False, False, False]
    assert inside["bounding_sys_admin"] is False
    # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE, each locked
    assert inside["securebits"] & 0xEF == 0xEF
    assert inside["mount"] == errno.EPERM
    assert inside["unshare"] in (errno.EPERM, errno.EUSERS, errno.ENOSPC)


def test_prctl_flags(jailed):
    inside, (_f, _d, a, _fa, _net) = jailed
    assert inside["nnp"] == 1 and a["no_new_privs"] is True
    assert inside["dumpable"] == 0 and a["dumpable"] is False
    assert inside["pdeathsig"] == 9
    assert inside["name"] == "state-dev" and a["name"] == "state-dev"


def test_rlimits(jailed):
    inside, (_f, _d, a, _fa, _net) = jailed
    assert inside["nofile"] == [1024, 1024]
    assert inside["core"] == [0, 0]
    assert inside["nproc"] == [64, 64]
    assert inside["as"] == [1 << 34, 1 << 34]
    assert inside["memlock"] == [1 << 16, 1 << 16]
    assert a["rlimits"]["Max open files"] == {"soft": "1024", "hard": "1024"}
    assert a["rlimits"]["Max core file size"] == {"soft": "0", "hard": "0"}


def test_fds_closed_except_keep_list(jailed):
    inside, (_f, _d, a, _fa, _net) = jailed
    # stdio + the two pipe ends the helper keeps; nothing else from pytest's process
    assert len(inside["fds"]) == 5, inside["fds"]
    assert inside["fds"][:3] == [0, 1, 2]
    assert a["fds"]["0"] == "/dev/null" and a["fds"]["1"] == "/dev/null"
    assert sorted(int(k) for k in a["fds"]) == inside["fds"]


def test_root_is_empty_readonly_tmpfs_without_proc_or_dev(jailed):
    inside, (_f, _d, a, _fa, _net) = jailed
    assert inside["root"] == []
    assert inside["host_file"] == errno.ENOENT
    assert inside["proc_status"] == errno.ENOENT
    assert a["root"]["same_as_caller"] is False and a["root"]["entries"] == []


def test_network_has_no_interface_up(jailed):
    inside, (_f, _d, _a, _fa, net) = jailed
    assert inside["ifaces"] == ["lo"]
    assert inside["lo_up"] is False
    assert net == {"ifaces": ["lo"], "lo_up": False}   # seen by joining its netns from outside


def test_hostname_is_the_device_name(jailed):
    inside, _ = jailed
    assert inside["hostname"] == "state-dev"


def _mounts_view() -> dict:
    res = {"root": sorted(os.listdir("/"))}
    with open("/proc/self/mountinfo") as f:
        res["mountinfo"] = f.read()
    res["proc_pids"] = sorted(p for p in os.listdir("/proc") if p.isdigit())
    with open("/data/hello.txt") as f:
        res["data"] = f.read()
    for name, path in (("write_ro", "/data/new.txt"), ("write_rw", "/rw/new.txt"), ("write_root", "/x"),
                       ("write_proc", "/proc/sys/kernel/hostname")):
        try:
            with open(path, "w") as f:
                f.write("x")
            res[name] = "allowed"
        except OSError as e:
            res[name] = e.errno
    with open("/dev/null", "w") as f:
        res["devnull_written"] = f.write("ok")
    res["dev"] = sorted(os.listdir("/dev"))
    return res


def test_bind_mounts_proc_and_dev_nodes(tmp_path):
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    os.chmod(rw, 0o777)
    (ro / "hello.txt").write_text("hi")
    config = JailConfig(name="mounts", mount_proc=True, dev_nodes=["/dev/null"], log_fd=2,
                        bind_mounts=[BindMount(str(ro), "/data"), BindMount(str(rw), "/rw", writable=True)])
    inside, reason, _ = run_in_jail(config, _mounts_view)
    assert reason.kind == "disconnected" and reason.code == 0, str(reason)
    assert inside["root"] == ["data", "dev", "proc", "rw"]
    assert inside["data"] == "hi"
    assert inside["write_ro"] == errno.EROFS
    assert inside["write_rw"] == "allowed" and (rw / "new.txt").read_text() == "x"
    assert inside["write_root"] == errno.EROFS
    assert inside["write_proc"] in (errno.EROFS, errno.EACCES)
    assert inside["proc_pids"] == ["1"]          # its own pid namespace only
    assert inside["dev"] == ["null"] and inside["devnull_written"] == 2
    proc_line = next(l for l in inside["mountinfo"].splitlines() if " /proc " in l)
    assert " ro," in proc_line or " ro " in proc_line
    assert "hidepid=2" in proc_line or "hidepid=invisible" in proc_line


def test_log_fd_becomes_stderr(tmp_path):
    r, w = os.pipe()
    config = JailConfig(name="logger", log_fd=w)

    def say() -> int:
        os.write(2, b"device says hi\n")
        return 0

    inside, reason, _ = run_in_jail(config, say)
    os.close(w)
    assert reason.kind == "disconnected" and reason.code == 0
    assert os.read(r, 100) == b"device says hi\n"
    os.close(r)


def test_namespaces_false_still_drops_privileges():
    config = JailConfig(name="nons", namespaces=False, log_fd=2)
    inside, reason, seen = run_in_jail(config, lambda: {"uid": os.getresuid(), "nnp": prctl.get_no_new_privs(),
                                                        "caps": prctl.cap_effective.sys_admin},
                                       on_spawn=lambda c: audit(c.pid))
    assert reason.kind == "disconnected" and reason.code == 0, str(reason)
    assert inside == {"uid": [65534] * 3, "nnp": 1, "caps": False}
    assert seen["namespaces"]["user"]["separate"] is False
    assert seen["capabilities"]["bounding"] == 0


def test_root_directory_is_pivoted_into_read_only(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello").write_text("from the host")
    os.chmod(tmp_path, 0o755)

    def look() -> dict:
        out = {"root": sorted(os.listdir("/")), "hello": open("/hello").read()}
        try:
            open("/new", "w")
            out["write"] = "allowed"
        except OSError as e:
            out["write"] = e.errno
        return out

    inside, reason, _ = run_in_jail(JailConfig(name="rooted", root=str(root), log_fd=2), look)
    assert reason.kind == "disconnected" and reason.code == 0, str(reason)
    assert inside == {"root": ["hello"], "hello": "from the host", "write": errno.EROFS}
