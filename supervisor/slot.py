"""Per-device state: the slot, its state machine, and the restart arithmetic.

Pure bookkeeping (no fork, no I/O), so the policy (systemd-like restart,
exponential backoff, crash-loop breaker) is unit-tested with a fake clock.
A slot's ``state`` changes only through its transition methods, checked
against ``TRANSITIONS``; the supervision loop decides, the slot records.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sandbox.exits import ExitKind, ExitReason, signame

from .logs import LogBudget

__all__ = ["State", "Request", "RUNNING", "TRANSITIONS", "CleanExitLimiter", "IllegalTransition", "ExitKind", "ExitInfo", "DeviceSlot",
           "RestartTracker", "should_restart"]

BACKOFF_INITIAL = 0.1      # seconds after the first crash
BACKOFF_MAX = 10.0         # the doubling stops here
BACKOFF_RESET_UPTIME = 60.0  # a child that ran this long resets the backoff
CRASH_WINDOW = 60.0        # the breaker counts crashes in this window ...
CRASH_LIMIT = 5            # ... and trips at this many
CRASH_LOOP_MAX = 300.0     # crash-loop=backoff: the doubling goes on up to 5 min (Kubernetes' CrashLoopBackOff)
CLEAN_BURST = 10           # clean exits (front-end gone) restarted at once ...
CLEAN_RATE = 1.0           # ... then at most this many per second
CLEAN_SUMMARY_EVERY = 10.0  # one log line per interval for the throttled ones
STARTUP_LIMIT = 30.0       # a child must report "built" within max(this, watchdog-sec)


class State(str, enum.Enum):
    """Where a device slot is in its life; ``TRANSITIONS`` says how it moves."""

    STARTING = "starting"   # forked, not yet built (jail + build in progress)
    READY = "ready"         # device built, waiting for a front-end
    SERVING = "serving"     # a front-end is connected
    STOPPING = "stopping"   # asked to stop; the child has not exited yet
    BACKOFF = "backoff"     # exited; the next child is scheduled (crash backoff or clean-exit rate limit)
    CRASH_LOOPING = "crash-looping"  # breaker tripped; retrying with a backoff capped at 5 min
    FAILED = "failed"       # breaker tripped with crash-loop=fail (or restart=never after a crash)
    STOPPED = "stopped"     # not running by request, policy, or shutdown


#: The states in which the slot has a child process, and no other: reported
#: state and the process table cannot disagree (checked on every transition).
RUNNING = frozenset({State.STARTING, State.READY, State.SERVING, State.STOPPING})


#: target state -> the states it may be entered from (None: from any state).
#: Only the child itself moves a slot to ``ready`` (it built its device) and
#: the kernel's view of the socket moves it between ``ready`` and
#: ``serving``; every other state is a decision the supervisor may take at
#: any point (a crash, a control request, shutdown).
TRANSITIONS: dict[State, frozenset[State] | None] = {
    State.STARTING: None,
    State.READY: frozenset({State.STARTING, State.SERVING}),
    State.SERVING: frozenset({State.READY}),
    State.STOPPING: RUNNING,
    State.BACKOFF: None,
    State.CRASH_LOOPING: None,
    State.FAILED: None,
    State.STOPPED: None,
}


class Request(str, enum.Enum):
    """What the control socket asked of a slot whose child is being stopped."""

    STOP = "stop"
    RESTART = "restart"


class IllegalTransition(RuntimeError):
    """A bookkeeping bug: a move that ``TRANSITIONS`` forbids."""


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
        elif self.kind is ExitKind.SHM_TRUNCATED:
            text = "front-end truncated shared memory (SIGBUS)"
        elif self.kind is ExitKind.HUNG:
            text = f"hung: no heartbeat for {self.message or '?'}"
        elif self.kind is ExitKind.OOM:
            text = "out of memory: killed by its cgroup's OOM killer"
        else:
            text = f"jail set-up failed: {self.message or f'exit {self.code}'}"
        return text + (" (requested)" if self.requested else "")

    @classmethod
    def from_reason(cls, reason: ExitReason) -> "ExitInfo":
        """The decoded wait status (sandbox.exits) as the supervisor reports it."""
        return cls(reason.kind, code=reason.code, signal=signame(reason.signal) if reason.signal else None,
                   syscall=reason.syscall, message=reason.message)

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
        """Account one exit; returns (breaker_tripped, delay_before_restart).
        Past the breaker the delay keeps doubling, up to CRASH_LOOP_MAX."""
        if uptime >= BACKOFF_RESET_UPTIME:
            self.consecutive = 0
        if not info.is_crash:
            # A disconnect (or a requested stop) is not a failure: next child at once.
            return False, 0.0
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > CRASH_WINDOW:
            self.crashes.popleft()
        self.consecutive += 1
        delay = BACKOFF_INITIAL * 2 ** min(self.consecutive - 1, 32)
        if len(self.crashes) >= CRASH_LIMIT:
            return True, min(delay, CRASH_LOOP_MAX)
        return False, min(delay, BACKOFF_MAX)

    def reset(self) -> None:
        """``vhost-supervisor restart NAME`` on a failed device clears the breaker."""
        self.consecutive = 0
        self.crashes.clear()


@dataclass
class CleanExitLimiter:
    """Clean exits (a front-end went away) restart at once up to a burst, then
    at most CLEAN_RATE per second; never counted as crashes.  A front-end that
    loops connect/garbage/close gets a fresh child a second, not a thousand."""

    tokens: float = CLEAN_BURST
    stamp: float | None = None
    throttled: int = 0          # since the last summary line
    total: int = 0              # since the last summary line
    summarized: float = 0.0

    def delay(self, now: float) -> float:
        """Account one clean exit; seconds to wait before the next child."""
        if self.stamp is not None:
            self.tokens = min(float(CLEAN_BURST), self.tokens + (now - self.stamp) * CLEAN_RATE)
        self.stamp = now
        self.total += 1
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        self.throttled += 1
        wait = (1.0 - self.tokens) / CLEAN_RATE
        self.tokens -= 1.0   # the restart at ``now + wait`` has spent it
        return wait

    def summary_due(self, now: float, final: bool = False) -> tuple[int, int] | None:
        """(clean exits, of which throttled) for one summary line, once per interval."""
        if not self.throttled or (not final and now - self.summarized < CLEAN_SUMMARY_EVERY):
            return None
        out = (self.total, self.throttled)
        self.total = self.throttled = 0
        self.summarized = now
        return out


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
    socket_inode: int | None = None  # the socket file's (status, tests)
    listener_inode: int | None = None  # the listening socket's own (told apart in the child's fds)
    state: State = State.STOPPED     # changed only through the transition methods below
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
    pending: Request | None = None   # why the current child is being stopped, if we asked
    kill_timer: Any = None
    proc: Any = None                 # psutil.Process of the current child (CPU % between queries)
    first_attempt_done: bool = False
    log_budget: LogBudget = field(default_factory=LogBudget)  # stderr lines and bytes per second
    clean_exits: CleanExitLimiter = field(default_factory=CleanExitLimiter)
    crash_loops: int = 0             # times the breaker tripped
    uid: int | None = None           # host uid/gid of every child of this device (jailed)
    gid: int | None = None
    last_heartbeat: float | None = None   # monotonic: last answer (or the spawn, before the first)
    ping_sent: float | None = None   # an unanswered ping, when it was sent
    hung_for: float | None = None    # set when the watchdog killed the child
    quiet: bool = False              # this child's spawn/exit lines are in the clean-exit summary
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one control operation at a time
    # --- restart accounting (what alerting reads: status and metrics) ---
    reconnects: int = 0              # clean exits: the front-end went away, a fresh child follows
    crashes: dict[str, int] = field(default_factory=dict)  # ExitKind value -> crashes of that kind
    requested_exits: int = 0         # stop/restart/remove/reload/shutdown asked for it
    counters: Any = None             # connection.counters.CountersPage (the device's own I/O counters)
    runtime: bool = False            # added with `add` (reload leaves it alone)
    added_wall: float | None = None  # when the slot was created (metrics: device age)

    @property
    def name(self) -> str:
        return self.spec.name

    # ------------------------------------------------------------ transitions

    def _enter(self, new: State) -> None:
        allowed = TRANSITIONS[new]
        if allowed is not None and self.state not in allowed:
            raise IllegalTransition(f"device {self.name}: {self.state.value} -> {new.value}")
        if (new in RUNNING) != (self.child is not None):
            raise IllegalTransition(f"device {self.name}: {new.value} "
                                    f"{'without' if self.child is None else 'with'} a child")
        self.state = new

    def cancel_restart_timer(self) -> None:
        if self.restart_timer is not None:
            self.restart_timer.cancel()
            self.restart_timer = None
        self.backoff_until = None

    def spawned(self, child: Any, proc: Any, now: float, wall: float) -> None:
        """A new child was forked: ``starting``."""
        self.cancel_restart_timer()
        self.want_running = True
        self.child = child
        self.proc = proc
        self.started_at = now
        self.started_wall = wall
        if self.spawns:
            self.restarts += 1
        self.spawns += 1
        self.last_heartbeat = now
        self.ping_sent = None
        self.hung_for = None
        self._enter(State.STARTING)

    def built(self, child: Any) -> bool:
        """The child says it built its device: ``starting`` -> ``ready``.
        False (nothing changes) for a stale child or a repeated message."""
        if child is not self.child or self.state is not State.STARTING:
            return False
        self._enter(State.READY)
        self.first_attempt_done = True
        return True

    def frontend(self, connected: bool) -> bool:
        """The kernel's view of the socket: ``ready`` <-> ``serving``; True if it moved."""
        if self.child is None:
            return False
        if connected and self.state is State.READY:
            self._enter(State.SERVING)
            return True
        if not connected and self.state is State.SERVING:
            self._enter(State.READY)
            return True
        return False

    def request(self, req: Request) -> None:
        """Remember why the current child is being stopped (its exit is then ``requested``);
        a stop shows as ``stopping`` until the child is gone."""
        self.pending = req
        if req is Request.STOP and self.child is not None:
            self._enter(State.STOPPING)

    def heartbeat(self, now: float) -> None:
        """The child answered a ping on its event loop."""
        self.last_heartbeat = now
        self.ping_sent = None

    def heartbeat_overdue(self, now: float) -> float | None:
        """Seconds without a heartbeat if past the limit (``watchdog-sec``; before
        the child is built, max(STARTUP_LIMIT, watchdog-sec)); None otherwise."""
        limit = float(getattr(self.spec, "watchdog_sec", 0) or 0)
        if self.child is None or not limit or self.last_heartbeat is None or self.state is State.STOPPING:
            return None
        if self.state is State.STARTING:
            limit = max(limit, STARTUP_LIMIT)
        age = now - self.last_heartbeat
        return age if age > limit else None

    def child_gone(self, info: ExitInfo, wall: float) -> Request | None:
        """The child was reaped (or never forked): forget it, record its exit,
        hand back the pending request.  The caller then decides the next state."""
        if self.kill_timer is not None:
            self.kill_timer.cancel()
            self.kill_timer = None
        self.child = None
        self.proc = None
        self.first_attempt_done = True
        self.last_exit = info
        self.last_exit_time = wall
        pending, self.pending = self.pending, None
        return pending

    def account_exit(self, info: ExitInfo) -> str:
        """Count one exit as a reconnect, a crash (by kind) or a requested exit; the bucket's name."""
        if info.requested:
            self.requested_exits += 1
            return "requested"
        if info.kind is ExitKind.DISCONNECTED:
            self.reconnects += 1
            return "reconnect"
        self.crashes[info.kind.value] = self.crashes.get(info.kind.value, 0) + 1
        return "crash"

    def back_off(self, until: float, timer: Any, crash_looping: bool = False) -> None:
        """Exited; the next child is forked when ``timer`` fires."""
        self.restart_timer = timer
        self.backoff_until = until
        self._enter(State.CRASH_LOOPING if crash_looping else State.BACKOFF)

    def fail(self) -> None:
        """No more children until an operator asks (crash loop, or a crash with restart=never)."""
        self._enter(State.FAILED)

    def stop(self) -> None:
        """Not running and not to be restarted: by request, by policy, or at shutdown."""
        self.cancel_restart_timer()
        self._enter(State.STOPPED)
