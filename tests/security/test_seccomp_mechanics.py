"""How the seccomp layer behaves (threads allowed, log mode, errno rules,
the supervisor-style watch, stand-alone SIGSYS, the listener hand-over).

The attacks themselves (each forbidden system call under each device
policy, host files, the inherited socket) are cases of the security-check
catalog (securitycheck/attacks/jail.py), run by tests/security/test_catalog.py."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import signal
import socket

import uvloop

from sandbox import JailConfig, spawn

from tests.sandbox.helpers import POLICY_DIR, policy_file, run_in_jail, wait

BLOCK_POLICY = os.path.join(POLICY_DIR, "block.policy")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _config(name: str = "attack", **kw) -> JailConfig:
    return JailConfig(name=name, seccomp_policy=kw.pop("policy", BLOCK_POLICY), log_fd=2, **kw)


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
