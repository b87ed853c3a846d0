"""spawn(): fork a jailed child and hand the parent what it needs to watch it.

The parent gets a JailedChild: `pid`/`pidfd` of the process whose exit status
is the device's (the forwarder, see jail.py), `violation_fd` (the seccomp
listener: readable when the device attempted a forbidden syscall) and
`decode_status()`, which turns a wait status into an ExitReason (exits.py).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable

from . import jail, notify, userns
from .compiler import syscall_name
from .config import JAIL_SETUP_FAILED, JailConfig, JailError
from .exits import ExitReason, decode_wait_status

HANDSHAKE_TIMEOUT = 10.0


class JailedChild:
    """What the parent holds for one jailed child."""

    def __init__(self, name: str, pid: int, pidfd: int) -> None:
        self.name = name
        self.pid = pid
        self.pidfd = pidfd
        self.violation_fd: int | None = None
        self.device_pid: int | None = None  # host pid of the device (pid 1 in its ns)
        self.jail_error: str | None = None
        self.violation: str | None = None

    def read_violation(self) -> str | None:
        """After violation_fd became readable: the forbidden syscall's name.

        Kills the child (the syscall never ran: it is blocked in the kernel
        until this answer).  Returns None when nothing is pending, e.g. the fd
        reports hang-up because the child is gone: stop watching it then.
        """

        if self.violation_fd is None:
            return self.violation
        notif = notify.receive(self.violation_fd)
        if notif is None:
            return None
        self.violation = syscall_name(notif.nr, notif.arch)
        # Kill the device itself (the forwarder then mirrors SIGKILL and reaps
        # it, leaving no orphan); ID_VALID first, so a recycled pid is never
        # hit.  If that check fails, kill the forwarder: the device follows by
        # PDEATHSIG.
        killed = False
        if notify.still_valid(self.violation_fd, notif.id):
            try:
                os.kill(notif.pid, signal.SIGKILL)
                killed = True
            except OSError:
                pass
        if not killed:
            self.kill()
        return self.violation

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child through its pidfd (no pid-reuse race)."""

        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except OSError:
            pass

    def decode_status(self, status: int) -> ExitReason:
        """Turn a wait status of `pid` into an ExitReason (exits.decode_wait_status;
        the device is pid 1 of its namespace, so exit(128 + SIGTERM) is SIGTERM)."""

        if self.violation is None and self.violation_fd is not None:
            self.read_violation()
        return decode_wait_status(status, violation=self.violation, jail_error=self.jail_error, pid1=True)

    def close(self) -> None:
        """Close the parent's fds (after the child was reaped)."""

        for attr in ("violation_fd", "pidfd"):
            fd = getattr(self, attr)
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, attr, None if attr == "violation_fd" else -1)

    def __repr__(self) -> str:
        return f"JailedChild(name={self.name!r}, pid={self.pid}, device_pid={self.device_pid})"


def _child(prep: jail.Prepared, ch: socket.socket, target: Callable[[], int]) -> None:
    """Runs in the forked child; never returns (os._exit)."""

    code = 1
    try:
        # Whatever sys.stdout/sys.stderr were in the parent (pytest replaces
        # them), the child's are fds 1 and 2, which the jail points at
        # /dev/null and the log fd.
        sys.stdout = open(1, "w", closefd=False, buffering=1, errors="replace")
        sys.stderr = open(2, "w", closefd=False, buffering=1, errors="replace")
        # Before the jail: rt_sigaction need not be in the device's policy.
        # (With namespaces the device, forked later, installs them again; the
        # forwarder replaces them with its forwarding handlers.)
        jail.install_device_signal_handlers()
        try:
            jail.run_jail(prep, ch)
        except JailError as e:
            jail.report_error(ch, e)
            sys.stderr.write(f"{prep.config.name}: {e}\n")
            code = JAIL_SETUP_FAILED
            return
        try:
            result = target()
            code = int(result) & 0xFF if result is not None else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    except BaseException:
        try:
            traceback.print_exc()
        finally:
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _late_device_pid(sock: socket.socket) -> int | None:
    """The forwarder sends the device's pid right after forking it and the
    device sends READY once jailed, on the same socket: under load READY can
    arrive first.  Read on until the pid or end of file (both close their
    ends right after sending; without namespaces there is no forwarder and
    the device's close ends it)."""
    try:
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
            for fd in fds:
                os.close(fd)
            if not msg and not fds:
                return None
            if msg.startswith(jail.MSG_DEVICE):
                return int(msg[len(jail.MSG_DEVICE):])
    except (TimeoutError, socket.timeout, OSError, ValueError):
        return None


def _handshake(child: JailedChild, sock: socket.socket, ids: userns.IdMap) -> None:
    sock.settimeout(HANDSHAKE_TIMEOUT)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
        except (TimeoutError, socket.timeout):
            child.jail_error = f"handshake timed out after {HANDSHAKE_TIMEOUT}s"
            child.kill()
            return
        if not msg and not fds:
            return  # EOF: the child died before it was ready; the status says why
        if msg == jail.MSG_UNSHARED:
            try:
                userns.write_maps(child.pid, ids)
            except JailError as e:
                sock.send(jail.MSG_ERROR + str(e).encode())
                child.jail_error = str(e)
                continue
            sock.send(jail.MSG_MAPPED)
        elif msg.startswith(jail.MSG_DEVICE):
            child.device_pid = int(msg[len(jail.MSG_DEVICE):])
        elif msg == jail.MSG_READY:
            if fds:
                child.violation_fd = fds[0]
            if child.device_pid is None:
                child.device_pid = _late_device_pid(sock) or child.pid
            return
        elif msg.startswith(jail.MSG_ERROR):
            child.jail_error = msg[len(jail.MSG_ERROR):].decode(errors="replace")
            for fd in fds:
                os.close(fd)
            return
        else:
            for fd in fds:
                os.close(fd)


def spawn(config: JailConfig, target: Callable[[], int]) -> JailedChild:
    """Fork a child that enters the jail, runs target() and exits with its value.

    The caller must be single-threaded.  Blocks for the set-up handshake (a few
    milliseconds); a set-up failure is not raised here but reported by
    decode_status() as jail_failed with the child's message.  Raises
    PolicyError for a bad policy (compiled before fork) and OSError if fork
    itself fails.
    """

    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    if child_sock.fileno() < 3:  # must not collide with the stdio the child sets up
        moved = fcntl.fcntl(child_sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
        child_sock.close()
        child_sock = socket.socket(fileno=moved)
    try:
        prep = jail.prepare(config, notify=True, channel_fd=child_sock.fileno())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    except BaseException:
        parent_sock.close()
        child_sock.close()
        raise
    if pid == 0:
        parent_sock.close()
        _child(prep, child_sock, target)
    child_sock.close()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        parent_sock.close()
        raise
    child = JailedChild(config.name, pid, pidfd)
    try:
        _handshake(child, parent_sock, prep.ids)
    finally:
        parent_sock.close()
    return child
