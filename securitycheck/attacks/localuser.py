"""Class 5, local unprivileged user: another account on the host (a forked
process that drops to an ordinary uid with setuid) goes after the devices,
the supervisor and the paths the supervisor writes.

Two users play it: a stranger (uid 54321: no account, no process) and the
host's "nobody" (65534), which today is also the device children's uid.
Every attempt must fail with a permission error, and what the supervisor
opens must never follow a link or take over a file another user planted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import stat
from collections.abc import Callable
from typing import Any

from ..catalog import Case, CaseFailed, check, register
from ..inchild import NOBODY_UID, UNPRIVILEGED_UID, in_fork, outcome

USERS = {"stranger": UNPRIVILEGED_UID, "nobody": NOBODY_UID}
DENIED = ("EPERM", "EACCES")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _err(fn: Callable[[], Any]) -> Any:
    try:
        fn()
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))


def _raw(nr: int, *args: int) -> int:
    res = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


def _pid_of(env: Any, type_name: str, which: str = "pid") -> int:
    """The device child (``pid``), its jail forwarder (``supervised_pid``) or the supervisor."""
    if which == "supervisor":
        return env.sup.proc.pid
    return env.wait_ready(env.instance(type_name).name)[which]


def _as(uid: int, fn: Callable[[], Any]) -> Any:
    return outcome(in_fork(fn, uid=uid, timeout=10.0))


def _case(id: str, dev: str, tries: str, expected: str, fn: Callable[[Any], str]) -> None:
    register(Case(f"localuser.{id}", "localuser", dev, tries, expected, fn))


# ---------------------------------------------------------------------------
# Signals and process access

def _signal_case(user: str, type_name: str, which: str) -> Callable[[Any], str]:
    def run(env: Any) -> str:
        pid = _pid_of(env, type_name, which)
        got = _as(USERS[user], lambda: _err(lambda: os.kill(pid, signal.SIGSTOP)))
        if got == "allowed":
            os.kill(pid, signal.SIGCONT)
            raise CaseFailed(f"{user} (uid {USERS[user]}) stopped pid {pid} with SIGSTOP (continued again)")
        check(got in DENIED + ("ESRCH",), f"kill returned {got}")
        return f"kill(SIGSTOP) -> {got}"
    return run


def _pidfd_case(user: str, type_name: str) -> Callable[[Any], str]:
    def run(env: Any) -> str:
        pid = _pid_of(env, type_name)

        def attempt() -> Any:
            fd = os.pidfd_open(pid)
            try:
                return _err(lambda: signal.pidfd_send_signal(fd, signal.SIGSTOP))
            finally:
                os.close(fd)
        got = _as(USERS[user], attempt)
        if got == "allowed":
            os.kill(pid, signal.SIGCONT)
            raise CaseFailed(f"{user} stopped pid {pid} through a pidfd (continued again)")
        check(got in DENIED or str(got).startswith("raised"), f"pidfd_send_signal returned {got}")
        return f"pidfd_send_signal(SIGSTOP) -> {got}"
    return run


def _ptrace_case(user: str, type_name: str) -> Callable[[Any], str]:
    def run(env: Any) -> str:
        pid = _pid_of(env, type_name)
        got = _as(USERS[user], lambda: _err(lambda: _raw(101, 16, pid, 0, 0)))   # PTRACE_ATTACH
        if got == "allowed":
            _raw(101, 17, pid, 0, 0)   # PTRACE_DETACH (we are root; best effort)
            raise CaseFailed(f"{user} attached to pid {pid} with ptrace")
        check(got in DENIED, f"ptrace returned {got}")
        return f"PTRACE_ATTACH -> {got}"
    return run


def _vm_read_case(user: str, type_name: str) -> Callable[[Any], str]:
    def run(env: Any) -> str:
        pid = _pid_of(env, type_name)

        def attempt() -> Any:
            buf = ctypes.create_string_buffer(16)
            local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 16)
            remote = (ctypes.c_void_p * 2)(0x400000, 16)
            return _err(lambda: _raw(310, pid, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0))
        got = _as(USERS[user], attempt)
        check(got in DENIED + ("ESRCH",), f"process_vm_readv returned {got}")
        return f"process_vm_readv -> {got}"
    return run


PROC_FILES = {
    "environ": lambda p: open(f"/proc/{p}/environ", "rb").read(),
    "mem": lambda p: os.close(os.open(f"/proc/{p}/mem", os.O_RDONLY)),
    "maps": lambda p: open(f"/proc/{p}/maps").read(),
    "fd": lambda p: os.listdir(f"/proc/{p}/fd"),
    "root": lambda p: os.listdir(f"/proc/{p}/root/"),
    "auxv": lambda p: open(f"/proc/{p}/auxv", "rb").read(),
    "pagemap": lambda p: open(f"/proc/{p}/pagemap", "rb").read(8),
    "ns-net": lambda p: os.readlink(f"/proc/{p}/ns/net"),
}


def _proc_case(user: str, type_name: str, what: str, which: str = "pid") -> Callable[[Any], str]:
    def run(env: Any) -> str:
        pid = _pid_of(env, type_name, which)
        got = _as(USERS[user], lambda: _err(lambda: PROC_FILES[what](pid)))
        check(got in DENIED, f"{user} read /proc/{pid}/{what.replace('ns-', 'ns/')}: {got}")
        return f"/proc/<pid>/{what.replace('ns-', 'ns/')} -> {got}"
    return run


# ---------------------------------------------------------------------------
# Sockets

def _connect_case(user: str, path_of: Callable[[Any], str]) -> Callable[[Any], str]:
    def run(env: Any) -> str:
        path = path_of(env)

        def attempt() -> Any:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                return _err(lambda: s.connect(path))
            finally:
                s.close()
        got = _as(USERS[user], attempt)
        check(got in DENIED, f"{user} connected to {os.path.basename(path)}: {got}")
        return f"connect -> {got}"
    return run


# ---------------------------------------------------------------------------
# Planting files where the supervisor writes

def _plant_in(sub: str) -> Callable[[Any], str]:
    def run(env: Any) -> str:
        d = env.path(sub)

        def attempt() -> Any:
            return [_err(lambda: os.symlink("/etc/shadow", os.path.join(d, "planted-link"))),
                    _err(lambda: os.close(os.open(os.path.join(d, "planted"), os.O_CREAT | os.O_WRONLY, 0o666)))]
        got = _as(UNPRIVILEGED_UID, attempt)
        check(all(g in DENIED for g in got), f"planting in the {sub} directory: {got}")
        return f"symlink -> {got[0]}, create -> {got[1]}"
    return run


def _shared_dir(env: Any) -> tuple[str, str]:
    """A world-writable sticky directory (like /tmp) and a root-only victim file."""
    d = env.path("shared")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o1777)
    victim = env.path("victim")
    if not os.path.exists(victim):
        with open(victim, "w") as f:
            f.write("root-only secret\n")
        os.chmod(victim, 0o600)
    return d, victim


def _open_console(env: Any, opts: str) -> Any:
    """What the supervisor does at start for one console device: build the
    config and open the builder (in a fork: a planted FIFO would block)."""
    def attempt() -> Any:
        from supervisor.config import ConfigError, build_config, open_builders
        cfg = build_config(ordered_flags=[("serial", f"vhost={env.path('shared-unused.sock')},name=planted,{opts}")],
                           control_socket=env.path("shared-unused-control.sock"))
        try:
            builders = open_builders(cfg)
        except ConfigError as e:
            return {"refused": str(e)}
        b = builders["planted"]
        out = {}
        for attr in ("out_fd", "in_fd"):
            fd = getattr(b, attr)
            if fd >= 0:
                st = os.fstat(fd)
                out[attr] = [st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)]
        b.close()
        return {"opened": out}
    try:
        return outcome(in_fork(attempt, timeout=3.0))
    except TimeoutError:
        return {"hung": "opening the planted path blocked for 3 s"}


def _planted(kind: str, key: str) -> Callable[[Any], str]:
    def run(env: Any) -> str:
        d, victim = _shared_dir(env)
        path = os.path.join(d, f"{kind}-{key}")
        for p in (path,):
            if os.path.lexists(p):
                os.unlink(p)

        def plant() -> Any:
            if kind == "symlink":
                os.symlink(victim, path)
            elif kind == "file":
                with open(path, "w") as f:
                    f.write("planted by another user\n")
            elif kind == "fifo":
                os.mkfifo(path, 0o666)
            return "planted"
        got = _as(UNPRIVILEGED_UID, plant)
        if got != "planted":
            raise CaseFailed(f"could not plant the {kind}: {got}")
        opts = f"type=file,path={path}" if key == "output" else f"type=sink,input={path}"
        res = _open_console(env, opts)
        vst = os.stat(victim)
        if isinstance(res, dict) and "refused" in res:
            return f"refused: {res['refused'][:120]}"
        if isinstance(res, dict) and "opened" in res:
            opened = res["opened"]
            for attr, (dev, ino, _fmt) in opened.items():
                if (dev, ino) == (vst.st_dev, vst.st_ino):
                    raise CaseFailed(f"the supervisor opened the root-only file the planted link points at ({attr})")
            raise CaseFailed(f"the supervisor opened the {kind} another user planted at {key}= ({opened})")
        raise CaseFailed(f"{res}")
    return run


def _planted_socket(kind: str) -> Callable[[Any], str]:
    def run(env: Any) -> str:
        d, victim = _shared_dir(env)
        path = os.path.join(d, f"{kind}.sock")
        if os.path.lexists(path):
            os.unlink(path)
        _as(UNPRIVILEGED_UID, lambda: os.symlink(victim, path))
        before = open(victim).read()

        def attempt() -> Any:
            if kind == "control":
                from supervisor.control import ControlError, bind_control_socket
                try:
                    bind_control_socket(path).close()
                    return "bound"
                except ControlError as e:
                    return f"refused: {e}"
            from connection.connection import VhostUserListener
            try:
                VhostUserListener(path).close()
                return "bound"
            except OSError as e:
                return f"refused: {e}"
        res = outcome(in_fork(attempt, timeout=5.0))
        after = open(victim).read() if os.path.exists(victim) else None
        check(after == before, f"the victim file the link points at changed or vanished ({res})")
        check(str(res).startswith("refused") or os.path.islink(path),
              f"{res}, and the planted link was replaced")
        return f"{res}; the link and its target untouched"
    return run


# ---------------------------------------------------------------------------


for _t in ("block", "console", "rng"):
    for _user in ("stranger", "nobody"):
        _case(f"signal-device.{_user}.{_t}", _t, f"{_user} sends SIGSTOP to the {_t} device child",
              "EPERM", _signal_case(_user, _t, "pid"))
        _case(f"proc-environ.{_user}.{_t}", _t, f"{_user} reads /proc/<{_t} child>/environ", "EACCES/EPERM",
              _proc_case(_user, _t, "environ"))
    _case(f"signal-forwarder.nobody.{_t}", _t, f"nobody sends SIGSTOP to the {_t} jail's forwarder",
          "EPERM", _signal_case("nobody", _t, "supervised_pid"))
    _case(f"ptrace-device.nobody.{_t}", _t, f"nobody PTRACE_ATTACHes the {_t} device child", "EPERM",
          _ptrace_case("nobody", _t))
    _case(f"connect-device.stranger.{_t}", _t, f"stranger connects to the {_t} vhost-user socket", "EACCES",
          _connect_case("stranger", lambda env, t=_t: env.instance(t).socket))
    _case(f"connect-device.nobody.{_t}", _t, f"nobody connects to the {_t} vhost-user socket", "EACCES",
          _connect_case("nobody", lambda env, t=_t: env.instance(t).socket))

_case("pidfd-signal.nobody.block", "block", "nobody signals the block child through pidfd_open", "EPERM",
      _pidfd_case("nobody", "block"))
_case("vm-read.nobody.block", "block", "nobody reads the block child's memory (process_vm_readv)", "EPERM",
      _vm_read_case("nobody", "block"))
for _what in ("mem", "maps", "fd", "root", "auxv", "pagemap", "ns-net"):
    _case(f"proc-{_what}.nobody.block", "block", f"nobody opens /proc/<block child>/{_what.replace('ns-', 'ns/')}",
          "EACCES/EPERM", _proc_case("nobody", "block", _what))
for _what in ("environ", "mem", "fd"):
    _case(f"proc-{_what}.stranger.supervisor", "-", f"stranger opens /proc/<supervisor>/{_what}", "EACCES/EPERM",
          _proc_case("stranger", "rng", _what, "supervisor"))
_case("signal-supervisor.stranger", "-", "stranger sends SIGSTOP to the supervisor", "EPERM",
      _signal_case("stranger", "rng", "supervisor"))
_case("connect-control.stranger", "-", "stranger connects to the control socket", "EACCES",
      _connect_case("stranger", lambda env: env.control))
_case("connect-control.nobody", "-", "nobody connects to the control socket", "EACCES",
      _connect_case("nobody", lambda env: env.control))
for _sub in ("sock", "ctl", "out"):
    _case(f"plant-in-{_sub}-dir", "-", f"stranger plants a symlink and a file in the supervisor's {_sub} directory",
          "EACCES", _plant_in(_sub))
for _kind in ("symlink", "file", "fifo"):
    _case(f"planted-{_kind}-console-output", "console",
          f"stranger plants a {_kind} at a type=file console's path in a shared (1777) directory",
          "the supervisor refuses the path (config error naming it)", _planted(_kind, "output"))
_case("planted-symlink-console-input", "console",
      "stranger plants a symlink to a root-only file at a console's input= path",
      "the supervisor refuses the path (config error naming it)", _planted("symlink", "input"))
_case("planted-symlink-device-socket", "-", "stranger plants a symlink at a vhost-user socket path",
      "refused; the link and its target untouched", _planted_socket("device"))
_case("planted-symlink-control-socket", "-", "stranger plants a symlink at the control socket path",
      "refused; the link and its target untouched", _planted_socket("control"))
