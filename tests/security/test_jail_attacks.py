"""Attacks from inside a real jail with a real device policy: each forbidden
thing is denied, and a seccomp kill is reported with the syscall's name."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import signal
import socket
import struct

import pytest
import uvloop

from sandbox import JailConfig, spawn
from sandbox import libc

from tests.sandbox.helpers import POLICY_DIR, policy_file, run_in_jail, wait

BLOCK_POLICY = os.path.join(POLICY_DIR, "block.policy")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _config(name: str = "attack", **kw) -> JailConfig:
    return JailConfig(name=name, seccomp_policy=kw.pop("policy", BLOCK_POLICY), log_fd=2, **kw)


def _mprotect_exec() -> None:
    m = mmap.mmap(-1, 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    _libc.mprotect(addr, 4096, mmap.PROT_READ | mmap.PROT_EXEC)


ATTACKS = {
    "socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
    "execve": lambda: os.execv("/bin/sh", ["sh"]),
    "ptrace": lambda: _libc.syscall(101, 16, 1, 0, 0),           # PTRACE_ATTACH pid 1
    "mount": lambda: libc.mount("tmpfs", "/", "tmpfs", 0, None),
    "bpf": lambda: _libc.syscall(321, 0, 0, 0),
    "clone": lambda: os.fork(),                                  # a process, not a thread
    "mmap": lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC),
    "mprotect": _mprotect_exec,
    "setuid": lambda: os.setuid(0),
    "unshare": lambda: libc.unshare(libc.CLONE_NEWUSER),
    "ioctl": lambda: _libc.ioctl(2, 0x5412, ctypes.c_char_p(b"x")),  # TIOCSTI: type into a terminal
    "connect": None,  # filled below: needs an inherited socket
}


@pytest.mark.parametrize("syscall", [k for k in ATTACKS if k != "connect"])
def test_forbidden_syscall_kills_and_is_named(syscall):
    result, reason, _ = run_in_jail(_config(), ATTACKS[syscall])
    assert result is None  # never got past the syscall
    assert reason.kind == "seccomp", str(reason)
    assert reason.syscall == syscall
    assert str(reason) == f"killed by seccomp: {syscall}"


def test_connect_on_inherited_socket_kills():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def attack():
        addr = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(80), socket.inet_aton("127.0.0.1"))
        _libc.connect(b.fileno(), addr, len(addr))  # raw: Python would refuse an IP address on AF_UNIX

    try:
        _, reason, _ = run_in_jail(_config(keep_fds=[b.fileno()]), attack)
    finally:
        a.close()
        b.close()
    assert reason.kind == "seccomp" and reason.syscall == "connect"


def test_host_files_cannot_be_opened():
    def attack():
        out = {}
        for path in ("/etc/passwd", "/proc/self/status", "/dev/null", "/"):
            try:
                os.close(os.open(path, os.O_RDONLY))
                out[path] = "opened"
            except OSError as e:
                out[path] = e.errno
        return out

    result, reason, _ = run_in_jail(_config(), attack)
    assert reason.kind == "disconnected" and reason.code == 0, str(reason)
    assert result == {p: errno.ENOENT for p in ("/etc/passwd", "/proc/self/status", "/dev/null", "/")}


def test_threads_are_allowed():
    import threading

    def ok():
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        return "threaded"

    result, reason, _ = run_in_jail(_config(), ok)
    assert (result, reason.kind) == ("threaded", "disconnected"), str(reason)


def test_log_mode_allows_and_reports_nothing():
    def attack():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.close()
        return "socket created"

    config = _config(seccomp_log=True)
    result, reason, child_fd = run_in_jail(config, attack, on_spawn=lambda c: c.violation_fd)
    assert result == "socket created" and reason.kind == "disconnected"
    assert child_fd is None


def test_policy_errno_rule_returns_errno(tmp_path):
    policy = policy_file(tmp_path, "@COMMON\n@VHOST\nsocket: return EPERM\n")
    result, reason, _ = run_in_jail(_config(policy=policy), lambda: _try(lambda: socket.socket()))
    assert result == errno.EPERM and reason.kind == "disconnected"


def _try(fn):
    try:
        fn()
        return "allowed"
    except OSError as e:
        return e.errno


def test_supervisor_style_watch_on_uvloop():
    """What the supervisor does: add_reader on violation_fd and pidfd, then
    waitpid, and log `device blk0 killed by seccomp: socket`."""

    def device() -> int:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return 0

    child = spawn(_config("blk0"), device)
    loop = uvloop.new_event_loop()
    lines: list[str] = []
    try:
        done = loop.create_future()

        def on_violation() -> None:
            name = child.read_violation()
            if name is None:
                loop.remove_reader(child.violation_fd)

        def on_exit() -> None:
            loop.remove_reader(child.pidfd)
            if child.violation_fd is not None:
                loop.remove_reader(child.violation_fd)
            _pid, status = os.waitpid(child.pid, 0)
            lines.append(f"device {child.name} {child.decode_status(status)}")
            done.set_result(None)

        loop.add_reader(child.violation_fd, on_violation)
        loop.add_reader(child.pidfd, on_exit)
        loop.run_until_complete(asyncio.wait_for(done, 10))
    finally:
        loop.close()
        if not lines:
            wait(child, 1)
        else:
            child.close()
    assert lines == ["device blk0 killed by seccomp: socket"]


def test_standalone_enter_jail_kills_with_sigsys():
    """Without a listening parent the filter kills the process (SIGSYS); the
    forwarder (the caller of enter_jail) dies of the same signal."""

    from sandbox import enter_jail

    pid = os.fork()
    if pid == 0:
        try:
            enter_jail(_config("standalone"))
            socket.socket()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


MINIMAL = """
read: 1
write: 1
close: 1
exit_group: 1
brk: 1
mmap: arg2 in ~PROT_EXEC
munmap: 1
futex: 1
rt_sigreturn: 1
"""


def test_listener_handover_needs_no_sendmsg_in_the_policy(tmp_path):
    """The jail adds `sendmsg: arg0 == <handshake fd>` for the hand-over of the
    listener; sendmsg on any other fd is still a violation."""

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    policy = policy_file(tmp_path, MINIMAL)
    try:
        result, reason, _ = run_in_jail(_config(policy=policy), lambda: "ok")
        assert (result, reason.kind, reason.code) == ("ok", "disconnected", 0), str(reason)
        _, reason, _ = run_in_jail(_config(policy=policy, keep_fds=[b.fileno()]),
                                   lambda: _libc.syscall(46, b.fileno(), None, 0))  # raw sendmsg(2)
    finally:
        a.close()
        b.close()
    assert reason.kind == "seccomp" and reason.syscall == "sendmsg", str(reason)
