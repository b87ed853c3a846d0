"""Forking one device child: jailed through ``sandbox.spawn`` or, with
``--disable-sandbox``, a plain fork that still does the fd hygiene and
parent-death signal, so both modes have the same life cycle.

The child's target builds the device on a fresh ``Executor`` and serves one
front-end (``conn.run_device``).  It tells the parent "built, waiting for a
front-end" by writing ``R`` on a status pipe: that is the ``ready`` state.
Its stderr is a pipe the parent reads and re-logs with ``device=NAME``.
From then on it answers the parent's heartbeat pings on its event loop (a
socketpair): a child whose loop is stuck, or that was SIGSTOPped, stops
answering, and the supervisor's watchdog kills it.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from connection.device import VhostUserDeviceBuilder

from sandbox.exits import decode_wait_status

from .slot import ExitInfo

READY_BYTE = b"R"
FRONTEND_BYTE = b"F"       # on the heartbeat channel, with the accepted connection's fd

_PARENT_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGCHLD)


_fork_reset_enabled = False


def enable_fork_signal_reset() -> None:
    """Turn on ``_reset_signals_in_child`` for every later fork of this process
    (the supervisor calls it before installing its signal handlers; other
    programs that merely import this module are left alone)."""
    global _fork_reset_enabled
    _fork_reset_enabled = True


def _reset_signals_in_child() -> None:
    """Runs right after every fork of the supervisor, in the child.

    The parent's loop routes signals through ``signal.set_wakeup_fd`` into a
    socket it shares with the child after fork: a SIGTERM to the child would
    otherwise be read as a SIGTERM by the *parent's* loop.  Default
    dispositions also make SIGTERM kill the child, as the shutdown expects.
    SIGINT is ignored: a Ctrl-C on the supervisor's terminal reaches the whole
    process group, and the supervisor stops its children itself.
    """
    if not _fork_reset_enabled:
        return
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for sig in _PARENT_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (ValueError, OSError):
            pass
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):
        pass


os.register_at_fork(after_in_child=_reset_signals_in_child)


class ReadyBuilder(VhostUserDeviceBuilder):
    """Wraps the device's builder in the child: after ``build`` succeeds, one
    byte on the status pipe tells the parent the device waits for a front-end."""

    def __init__(self, inner: Any, status_fd: int, heartbeat_fd: int | None = None, counters: Any = None) -> None:
        self._inner = inner
        self._status_fd = status_fd
        self._hb_fd = heartbeat_fd
        self._counters = counters
        self._publish: Any = None

    def build(self, ex: Any) -> Any:
        device = self._inner.build(ex)
        attach = getattr(device, "attach_counters", None)
        if self._counters is not None and attach is not None:
            # the parent's page (connection.counters), inherited across fork
            attach(self._counters.for_device(int(getattr(device, "max_queue_num", lambda: 1)())))
            self._publish = getattr(device, "publish_counters", None)
        if self._hb_fd is not None:
            os.set_blocking(self._hb_fd, False)
            ex.loop.add_reader(self._hb_fd, self._answer, ex.loop)
        try:
            os.write(self._status_fd, READY_BYTE)
            os.close(self._status_fd)
        except OSError:
            pass
        return device

    def _answer(self, loop: Any) -> None:
        """A ping from the supervisor: echo it, from the loop that serves the device."""
        fd = self._hb_fd
        assert fd is not None
        try:
            data = os.read(fd, 64)
            if data:
                os.write(fd, data)
                if self._publish is not None:
                    self._publish()   # the device's counters, about once per heartbeat
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(fd)   # the parent is gone: PDEATHSIG will follow

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def show_frontend(heartbeat_fd: int, conn: socket.socket) -> None:
    """Hand the supervisor a duplicate of the accepted front-end connection
    (FRONTEND_BYTE with the fd, on the heartbeat channel).

    The supervisor watches it for the front-end's hang-up to tell ``ready``
    from ``serving``.  It cannot look into our fd table itself: a jailed
    device is not dumpable, and the systemd unit gives the supervisor no
    CAP_SYS_PTRACE.  What it is shown it checks (supervision._take_frontend);
    a device that shows nothing only makes its own status read "no".
    """
    ch = socket.socket(fileno=heartbeat_fd)
    try:
        socket.send_fds(ch, [FRONTEND_BYTE], [conn.fileno()])
    except BlockingIOError:
        pass     # the supervisor's end is full: a status hint lost, nothing else
    finally:
        ch.detach()


def device_target(name: str, conn: Any, builder: Any, status_fd: int,
                  heartbeat_fd: int | None = None, counters: Any = None) -> Callable[[], int]:
    """The function a child runs after jailing: serve one front-end, then exit."""

    def target() -> int:
        from connection.executor import Executor

        from .logs import setup_child_logging
        try:
            setup_child_logging()
            if heartbeat_fd is not None and hasattr(conn, "on_accept"):
                conn.on_accept = functools.partial(show_frontend, heartbeat_fd)
            ex = Executor()
            conn.run_device(ex, ReadyBuilder(builder, status_fd, heartbeat_fd, counters))
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - the child reports and exits non-zero
            try:
                sys.stderr.write(f"error while running device {name}:\n{traceback.format_exc()}")
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            return 1
        return 0

    return target


@dataclass
class ChildProcess:
    """A running device child as the parent sees it."""

    pid: int
    pidfd: int
    log_fd: int                   # read end of the child's stderr pipe
    status_fd: int                # read end of the status pipe
    jailed: Any = None            # sandbox.JailedChild, or None for a plain fork
    reaped: bool = False
    heartbeat_fd: int = -1        # our end of the heartbeat socketpair (non-blocking)
    frontend_fds: list[int] = field(default_factory=list)   # what show_frontend handed us

    device_pid: int = 0           # the process that runs the device (jailed: the forwarder's child)

    def __post_init__(self) -> None:
        if not self.device_pid:
            self.device_pid = int(getattr(self.jailed, "device_pid", None) or self.pid)

    def exit_info(self, status: int) -> ExitInfo:
        """Classify a wait status of ``pid`` (the jail knows about seccomp and set-up failures)."""
        if self.jailed is not None:
            return ExitInfo.from_reason(self.jailed.decode_status(status))
        return classify(status)

    @property
    def violation_fd(self) -> int | None:
        return getattr(self.jailed, "violation_fd", None) if self.jailed is not None else None

    def read_violation(self) -> str | None:
        """Answer a pending seccomp notification (this kills the child); its syscall."""
        if self.jailed is None:
            return None
        try:
            return self.jailed.read_violation()
        except Exception:  # noqa: BLE001
            return None

    def signal(self, sig: int) -> bool:
        """Signal through the pidfd: never hits a recycled pid."""
        if self.reaped:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
            return True
        except ProcessLookupError:
            return False
        except OSError:
            return False

    def reap(self) -> int:
        """Collect the exit status (the pidfd said the child exited)."""
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        return status

    def close(self) -> None:
        """Close our fds; the jailed child's own (pidfd, violation fd) are closed by it."""
        fds = [self.log_fd, self.status_fd, self.heartbeat_fd, *self.frontend_fds] + \
            ([self.pidfd] if self.jailed is None else [])
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.log_fd = self.status_fd = self.heartbeat_fd = -1
        self.frontend_fds = []
        if self.jailed is not None:
            try:
                self.jailed.close()
            except Exception:  # noqa: BLE001
                pass
            self.jailed = None
        self.pidfd = -1


def classify(status: int) -> ExitInfo:
    """Waitstatus of a plain-forked child -> ExitInfo (the jail's decoder, no jail facts)."""
    return ExitInfo.from_reason(decode_wait_status(status))


def _open_fds() -> list[int]:
    return [int(n) for n in os.listdir("/proc/self/fd")]


def _plain_child(target: Callable[[], int], keep: set[int], log_w: int, parent: int, name: str) -> None:
    """In the plain-forked child: what the jail would do minus the confinement."""
    rc = 1
    try:
        import prctl
        prctl.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        try:
            prctl.set_name(name[:15])
        except Exception:  # noqa: BLE001
            pass
        os.dup2(log_w, 2)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            if fd not in keep:
                os.dup2(devnull, fd)
        keep_all = keep | {0, 1, 2}
        for fd in _open_fds():
            if fd not in keep_all:
                try:
                    os.close(fd)
                except OSError:
                    pass
        rc = target()
    except BaseException:  # noqa: BLE001
        try:
            traceback.print_exc()
        except Exception:  # noqa: BLE001
            pass
        rc = 1
    finally:
        try:
            sys.stderr.flush()
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(rc if isinstance(rc, int) else 1)


def _user_threads() -> int:
    """Threads of this process, not counting io_uring's kernel workers (``iou-*``),
    which libuv's io_uring backend may own and which fork does not copy."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("iou-"):
                    continue
        except OSError:
            continue
        n += 1
    return n


def _check_single_threaded() -> None:
    """fork() copies only the calling thread: a lock held by another would stay
    locked forever in the child.  Refuse rather than risk it."""
    if threading.active_count() != 1 or _user_threads() != 1:
        raise RuntimeError("refusing to fork a device child: the supervisor is not single-threaded")


def spawn_child(*, name: str, conn: Any, builder: Any, keep_fds: list[int], sandboxed: bool,
                jail_kwargs: dict[str, Any] | None = None, counters: Any = None) -> ChildProcess:
    """Fork one device child.  Returns after the fork; the child runs on its own.
    ``counters`` (a ``connection.counters.CountersPage``) is mapped before the
    fork, so the child inherits it; the device counts into it."""
    _check_single_threaded()
    log_r, log_w = os.pipe2(os.O_CLOEXEC)
    st_r, st_w = os.pipe2(os.O_CLOEXEC)
    hb_parent, hb_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    hb_r = hb_parent.detach()
    hb_w = hb_child.detach()
    os.set_blocking(log_r, False)
    os.set_blocking(st_r, False)
    os.set_blocking(hb_r, False)
    keep = sorted(set(keep_fds) | {st_w, hb_w})
    target = device_target(name, conn, builder, st_w, hb_w, counters)
    try:
        if sandboxed:
            import sandbox
            cfg = sandbox.JailConfig(name=name, keep_fds=keep, log_fd=log_w, **(jail_kwargs or {}))
            jailed = sandbox.spawn(cfg, target)
            child = ChildProcess(pid=jailed.pid, pidfd=jailed.pidfd, log_fd=log_r, status_fd=st_r,
                                 jailed=jailed, heartbeat_fd=hb_r)
        else:
            parent = os.getpid()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _plain_child(target, set(keep), log_w, parent, name)
            child = ChildProcess(pid=pid, pidfd=os.pidfd_open(pid), log_fd=log_r, status_fd=st_r,
                                 heartbeat_fd=hb_r)
    except BaseException:
        for fd in (log_r, st_r, hb_r):
            os.close(fd)
        raise
    finally:
        os.close(log_w)
        os.close(st_w)
        os.close(hb_w)
    return child
