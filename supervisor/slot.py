"""Per-device state: the slot, its state machine, and the restart arithmetic.

Pure bookkeeping (no fork, no I/O), so the policy (systemd-like restart,
exponential backoff, crash-loop breaker) is unit-tested with a fake clock.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .logs import LineBudget

BACKOFF_INITIAL = 0.1      # seconds after the first crash
BACKOFF_MAX = 10.0         # the doubling stops here
BACKOFF_RESET_UPTIME = 60.0  # a child that ran this long resets the backoff
CRASH_WINDOW = 60.0        # the breaker counts crashes in this window ...
CRASH_LIMIT = 5            # ... and trips at this many


class State(str, enum.Enum):
    STARTING = "starting"   # forked, not yet built (jail + build in progress)
    READY = "ready"         # device built, waiting for a front-end
    SERVING = "serving"     # a front-end is connected
    BACKOFF = "backoff"     # crashed; restart scheduled
    FAILED = "failed"       # crash-loop breaker tripped (or restart=never after a crash)
    STOPPED = "stopped"     # not running by request, policy, or shutdown


class ExitKind(str, enum.Enum):
    DISCONNECTED = "disconnected"   # exit 0: the front-end went away
    ERROR = "error"                 # exit status != 0
    SIGNALED = "signaled"           # killed by a signal
    SECCOMP = "seccomp"             # killed by seccomp (SIGSYS), with the syscall
    JAIL_FAILED = "jail_failed"     # the jail could not be set up
    OOM = "oom"                     # killed by the OOM killer of its cgroup (memory budget)


@dataclass(frozen=True)
class ExitInfo:
    kind: ExitKind
    code: int | None = None
    signal: str | None = None
    syscall: str | None = None
    requested: bool = False         # the supervisor asked for it (stop/restart/shutdown)
    message: str | None = None      # the jail's own words for a set-up failure

    @property
    def is_crash(self) -> bool:
        return self.kind is not ExitKind.DISCONNECTED and not self.requested

    def describe(self) -> str:
        """One short phrase for the status table and the log."""
        if self.kind is ExitKind.DISCONNECTED:
            text = "front-end disconnected"
        elif self.kind is ExitKind.ERROR:
            text = f"error exit {self.code}"
        elif self.kind is ExitKind.SIGNALED:
            text = f"killed by {self.signal}"
        elif self.kind is ExitKind.SECCOMP:
            text = f"seccomp: {self.syscall or 'unknown syscall'}"
        elif self.kind is ExitKind.OOM:
            text = "out of memory: killed by its cgroup's OOM killer"
        else:
            text = f"jail set-up failed: {self.message or f'exit {self.code}'}"
        return text + (" (requested)" if self.requested else "")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "code": self.code, "signal": self.signal,
                "syscall": self.syscall, "requested": self.requested, "message": self.message,
                "text": self.describe()}


def should_restart(policy: str, info: ExitInfo) -> bool:
    """systemd's Restart= semantics for the exits a device child can have."""
    if policy == "always":
        return True
    if policy == "on-failure":
        return info.is_crash
    return False


@dataclass
class RestartTracker:
    """Backoff and crash-loop breaker for one device."""

    consecutive: int = 0
    crashes: deque[float] = field(default_factory=deque)

    def record_exit(self, info: ExitInfo, now: float, uptime: float) -> tuple[bool, float]:
        """Account one exit; returns (breaker_tripped, delay_before_restart)."""
        if uptime >= BACKOFF_RESET_UPTIME:
            self.consecutive = 0
        if not info.is_crash:
            # A disconnect (or a requested stop) is not a failure: next child at once.
            return False, 0.0
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > CRASH_WINDOW:
            self.crashes.popleft()
        self.consecutive += 1
        if len(self.crashes) >= CRASH_LIMIT:
            return True, 0.0
        return False, min(BACKOFF_INITIAL * 2 ** (self.consecutive - 1), BACKOFF_MAX)

    def reset(self) -> None:
        """``vhost-supervisor restart NAME`` on a failed device clears the breaker."""
        self.consecutive = 0
        self.crashes.clear()


@dataclass
class DeviceSlot:
    """What the supervisor holds per device across children.

    The listener, builder and parent resources live as long as the slot: the
    socket keeps listening while children come and go.
    """

    spec: Any                        # config.DeviceSpec
    listener: Any = None             # connection.VhostUserListener
    builder: Any = None              # devices.base.DeviceBuilder
    resources: Any = None            # connection.ParentResources (unlinks the socket)
    socket_inode: int | None = None
    state: State = State.STOPPED
    child: Any = None                # supervisor.child.ChildProcess or None
    started_at: float | None = None  # monotonic time the current child was spawned
    started_wall: float | None = None
    restarts: int = 0                # children spawned after the first
    spawns: int = 0
    last_exit: ExitInfo | None = None
    last_exit_time: float | None = None
    tracker: RestartTracker = field(default_factory=RestartTracker)
    want_running: bool = True        # False after `stop NAME` or at shutdown
    restart_timer: Any = None        # asyncio.TimerHandle while in backoff
    backoff_until: float | None = None
    pending_request: str | None = None  # "stop" / "restart" while a child is being stopped
    kill_timer: Any = None
    proc: Any = None                 # psutil.Process of the current child (CPU % between queries)
    first_attempt_done: bool = False
    log_budget: Any = field(default_factory=lambda: LineBudget())  # stderr lines per second, per device

    @property
    def name(self) -> str:
        return self.spec.name
