"""What ``status`` shows about a child beyond the supervisor's own state.

Memory and CPU come from psutil.  "Front-end connected" comes from
``/proc/net/unix``: the child accepts in its own process, out of the parent's
sight, but every socket the kernel creates for a connection to our listening
path carries that path.  An entry with our path that is not the listener
(no ``__SO_ACCEPTCON``) is a front-end: state 02 (connecting) while it waits
in the accept queue, 03 (connected) once the child accepted it.  This needs
no cooperation from the (jailed, possibly hostile) child.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil

SO_ACCEPTCON = 0x10000
SS_CONNECTING = 2
SS_CONNECTED = 3


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


def unix_connections(paths: set[str]) -> dict[str, FrontendState]:
    """One read of /proc/net/unix for all our device sockets."""
    out = {p: FrontendState() for p in paths}
    if not paths:
        return out
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                if len(fields) < 8:
                    continue
                path = fields[7].rstrip("\n")
                st = out.get(path)
                if st is None:
                    continue
                flags = int(fields[3], 16)
                if flags & SO_ACCEPTCON:
                    continue
                state = int(fields[5], 16)
                if state == SS_CONNECTED:
                    st.accepted += 1
                elif state == SS_CONNECTING:
                    st.queued += 1
    except OSError:
        pass
    return out


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


def child_memory(pid: int) -> dict[str, int]:
    """USS and PSS of one process (the memory-per-device benchmark)."""
    mem = psutil.Process(pid).memory_full_info()
    return {"rss": mem.rss, "uss": mem.uss, "pss": getattr(mem, "pss", 0)}
