"""How a supervised child ended: one enum and one decoder for every path.

The jailed path (``JailedChild.decode_status``) and the plain fork of
``--disable-sandbox`` (supervisor/child.py) both turn a wait status into an
``ExitReason`` here, so the two can never classify the same status
differently.  Pure functions: no system call, testable with made-up statuses.
"""

from __future__ import annotations

import enum
import os
import signal as _signal
from dataclasses import dataclass

from .config import JAIL_SETUP_FAILED

#: A jailed device is pid 1 of its pid namespace, where default signal actions
#: do not apply: its handlers turn these into exit(128 + signal).  Decoded as
#: the signal they were.
PID1_EXIT_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)


class ExitKind(str, enum.Enum):
    """The words operators read in ``status`` and in the log (``kind=``)."""

    DISCONNECTED = "disconnected"   # exit status 0 (a device: its front-end went away)
    ERROR = "error"                 # exit status != 0
    SIGNALED = "signaled"           # killed by a signal
    SECCOMP = "seccomp"             # killed by seccomp (SIGSYS or the notify listener), with the syscall
    JAIL_FAILED = "jail_failed"     # the jail could not be set up
    SHM_TRUNCATED = "shm_truncated"  # SIGBUS: a shared mapping lost its backing file's pages
    HUNG = "hung"                   # killed by its supervisor: it stopped answering the heartbeat
    OOM = "oom"                     # killed by the OOM killer of its cgroup (memory budget)


def signame(sig: int | None) -> str:
    """``SIGKILL`` for 9; ``signal 77`` for a number with no name."""
    if sig is None:
        return "?"
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@dataclass(frozen=True)
class ExitReason:
    """Why a child ended, as decoded from its wait status."""

    kind: ExitKind
    code: int | None = None
    signal: int | None = None
    syscall: str | None = None
    message: str | None = None

    def __str__(self) -> str:
        if self.kind in (ExitKind.DISCONNECTED, ExitKind.ERROR):
            return f"exited with status {self.code}"
        if self.kind is ExitKind.SIGNALED:
            return f"killed by signal {signame(self.signal)}"
        if self.kind is ExitKind.SECCOMP:
            return f"killed by seccomp: {self.syscall}"
        if self.kind is ExitKind.SHM_TRUNCATED:
            return "killed by SIGBUS: shared memory truncated"
        if self.kind is ExitKind.HUNG:
            return "killed: stopped answering its heartbeat"
        return f"jail set-up failed: {self.message}"


def decode_wait_status(status: int, *, violation: str | None = None, jail_error: str | None = None,
                       pid1: bool = False) -> ExitReason:
    """A wait status -> ExitReason.

    ``violation``: the syscall a seccomp notification named (the kill came from
    us); ``jail_error``: the set-up failure the handshake reported (an exit 125
    without it is an ordinary exit); ``pid1``: the process ran as pid 1 of a
    pid namespace, so exit(128 + SIGTERM) means SIGTERM.
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if violation is not None:
            return ExitReason(ExitKind.SECCOMP, signal=sig, syscall=violation)
        if sig == _signal.SIGSYS:  # kill-process filter (forwarder, or no listener)
            return ExitReason(ExitKind.SECCOMP, signal=sig, syscall="unknown (SIGSYS)")
        if sig == _signal.SIGBUS:
            # Nothing in a device maps a file but the memfds its front-end sent
            # (guest RAM, the inflight region): a SIGBUS means the front-end
            # shrank one after handing it over.
            return ExitReason(ExitKind.SHM_TRUNCATED, signal=sig)
        return ExitReason(ExitKind.SIGNALED, signal=sig)
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else -1
    if violation is not None:
        return ExitReason(ExitKind.SECCOMP, code=code, syscall=violation)
    if code == JAIL_SETUP_FAILED and jail_error is not None:
        return ExitReason(ExitKind.JAIL_FAILED, code=code, message=jail_error)
    if code == 0:
        return ExitReason(ExitKind.DISCONNECTED, code=0)
    if pid1 and code > 128 and (code - 128) in PID1_EXIT_SIGNALS:
        return ExitReason(ExitKind.SIGNALED, code=code, signal=code - 128)
    return ExitReason(ExitKind.ERROR, code=code)
