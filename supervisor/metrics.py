"""What ``status`` shows about a child beyond the supervisor's own state.

Memory and CPU come from psutil.  "Front-end connected" comes from the
kernel, asked through sock_diag about single inodes (supervisor/sockdiag.py),
never from a scan of every Unix socket on the host: the listener's accept
queue length says whether a front-end is waiting, and among the sockets the
device child holds (its fd table, a handful of entries) one that carries our
path and has a live peer is an accepted front-end.  This needs no
cooperation from the (jailed, possibly hostile) child: it cannot fake an fd
table entry, and an accepted socket's name is the listener's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psutil

from .sockdiag import SockDiag


@dataclass
class FrontendState:
    accepted: int = 0    # connections the child accepted
    queued: int = 0      # connections waiting in the accept queue

    @property
    def connected(self) -> bool:
        return self.accepted > 0 or self.queued > 0

    def describe(self) -> str:
        if self.accepted:
            return "yes"
        if self.queued:
            return "queued"
        return "no"


def socket_inodes(pid: int) -> list[int]:
    """Inodes of the sockets in ``pid``'s fd table (cost: that process's fds only)."""
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
            out.append(int(link[8:-1]))
    return out


def frontend_state(diag: SockDiag, path: str, listener_inode: int | None, pid: int | None) -> FrontendState:
    """Queued (the listener's accept queue) and accepted (sockets of ``pid``
    named ``path`` with a live peer) front-ends of one device socket."""
    st = FrontendState()
    want = os.fsencode(path)
    if listener_inode is not None:
        lst = diag.query(listener_inode)
        if lst is not None and lst.rqueue:
            st.queued = lst.rqueue
    if pid:
        for ino in socket_inodes(pid):
            if ino == listener_inode:
                continue
            s = diag.query(ino)
            if s is not None and s.name == want and s.connected:
                st.accepted += 1
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
