"""What ``status`` shows about a child beyond the supervisor's own state.

Memory and CPU come from psutil.  "Front-end connected" comes from the
kernel, at a cost that follows our own sockets, never the host's:

* queued: the parent's own listening socket polls readable while a
  connection waits in its accept queue;
* accepted: among the sockets in the device child's fd table (a handful),
  one that carries our path (an accepted socket is named after its
  listener) and whose peer has not hung up.  The parent looks at each
  through ``pidfd_getfd(2)``: a duplicate of the child's descriptor, read
  with ``getsockname`` and ``poll``, then closed.

No cooperation from the (jailed, possibly hostile) child is needed: it
cannot fake its fd table.  Neither /proc/net/unix nor sock_diag is used:
both cost one step per Unix socket in the network namespace (an exact
UNIX_DIAG request by inode still walks the kernel's socket table: 1-7 ms
per request with 50,000 sockets, tens of µs with none; benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
from dataclasses import dataclass
from typing import Any

import psutil

SYS_pidfd_getfd = 438          # x86_64 and aarch64 (the generic syscall table) alike
_libc = ctypes.CDLL(None, use_errno=True)
_HANGUP = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


@dataclass
class FrontendState:
    accepted: int = 0    # connections the child accepted
    queued: int = 0      # 1 while connections wait in the accept queue

    @property
    def connected(self) -> bool:
        return self.accepted > 0 or self.queued > 0

    def describe(self) -> str:
        if self.accepted:
            return "yes"
        if self.queued:
            return "queued"
        return "no"


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A duplicate (close-on-exec) of descriptor ``fd`` of the process behind ``pidfd``."""
    r = _libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({fd}): {os.strerror(err)}")
    return int(r)


def _readable(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLRDHUP)
    events = p.poll(0)
    return events[0][1] if events else 0


def _socket_fds(pid: int) -> list[tuple[int, int]]:
    """(fd, inode) of the sockets in ``pid``'s fd table (cost: that process's fds only)."""
    out = []
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for fd in names:
        try:
            link = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.append((int(fd), int(link[8:-1])))
    return out


def accepted_connections(pid: int, pidfd: int, path: str, listener_inode: int | None) -> int:
    """Sockets of the process (``pid``, ``pidfd``) named ``path`` whose peer is still there."""
    n = 0
    want = os.fspath(path)
    for fd, inode in _socket_fds(pid):
        if inode == listener_inode:
            continue
        try:
            dup = pidfd_getfd(pidfd, fd)
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.EBADF):
                continue        # gone, or closed since the listing
            raise
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if s.family == socket.AF_UNIX and s.getsockname() == want and not _readable(dup) & _HANGUP:
                n += 1
        except OSError:
            pass
        finally:
            s.close()
    return n


def frontend_state(path: str, listener_fd: int, listener_inode: int | None,
                   pid: int | None = None, pidfd: int | None = None) -> FrontendState:
    """Queued (our listener) and accepted (the child's sockets) front-ends of one device socket."""
    st = FrontendState()
    if listener_fd >= 0 and _readable(listener_fd) & select.POLLIN:
        st.queued = 1
    if pid and pidfd is not None and pidfd >= 0:
        st.accepted = accepted_connections(pid, pidfd, path, listener_inode)
    return st


def process_metrics(proc: psutil.Process | None, full: bool = False) -> dict[str, Any]:
    """RSS, CPU seconds and CPU % (since the previous call on ``proc``); USS/PSS if ``full``."""
    if proc is None:
        return {}
    try:
        with proc.oneshot():
            mem = proc.memory_full_info() if full else proc.memory_info()
            cpu = proc.cpu_times()
            out: dict[str, Any] = {
                "rss": mem.rss,
                "cpu_seconds": round(cpu.user + cpu.system, 3),
                "cpu_percent": proc.cpu_percent(None),
            }
            if full:
                out["uss"] = getattr(mem, "uss", None)
                out["pss"] = getattr(mem, "pss", None)
            return out
    except (psutil.Error, OSError):
        return {}
