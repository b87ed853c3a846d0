"""What ``status`` shows about a child beyond the supervisor's own state.

Memory and CPU come from psutil.  "Front-end connected" comes from the
kernel, at a cost that follows our own sockets, never the host's:

* queued: the parent's own listening socket polls readable while a
  connection waits in its accept queue;
* accepted: the device child hands the parent a duplicate of each
  connection it accepts (``child.show_frontend``, on the heartbeat
  channel).  The parent keeps it only if it is a connected Unix stream
  socket named with the device's path (an accepted socket is named after
  its listener) other than the listener itself, and counts it while its
  peer has not hung up.

The parent does not read the child's fd table (``/proc/PID/fd``,
``pidfd_getfd``): a jailed device is not dumpable, so that takes
CAP_SYS_PTRACE, which the systemd unit does not grant.  A hostile child can
therefore hide its front-end (its own status then reads "no") but not
invent one.  Neither /proc/net/unix nor sock_diag is used: both cost one
step per Unix socket in the network namespace (an exact UNIX_DIAG request
by inode still walks the kernel's socket table: 1-7 ms per request with
50,000 sockets, tens of µs with none; benchmarks/README.md).
"""

from __future__ import annotations

import os
import select
import socket
from dataclasses import dataclass
from typing import Any

import psutil

_HANGUP = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL
#: Connections of one child the parent keeps watching; a device serves one.
MAX_FRONTEND_FDS = 2


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


def _events(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLRDHUP)
    events = p.poll(0)
    return events[0][1] if events else 0


def is_accepted_connection(fd: int, path: str, listener_inode: int | None) -> bool:
    """True if ``fd`` is a live connection accepted on the listener bound at ``path``."""
    try:
        st = os.fstat(fd)
        s = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return (s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM and st.st_ino != listener_inode
                and s.getsockname() == os.fspath(path) and not _events(fd) & _HANGUP)
    except OSError:
        return False
    finally:
        s.detach()


def live_connections(fds: list[int]) -> int:
    """Close and drop (in place) the connections whose peer hung up; how many are left."""
    for fd in list(fds):
        if _events(fd) & _HANGUP:
            fds.remove(fd)
            os.close(fd)
    return len(fds)


def frontend_state(listener_fd: int, frontend_fds: list[int]) -> FrontendState:
    """Queued (our listener) and accepted (shown by the child) front-ends of one device socket."""
    st = FrontendState()
    if listener_fd >= 0 and _events(listener_fd) & select.POLLIN:
        st.queued = 1
    st.accepted = live_connections(frontend_fds)
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
