"""The supervision loop: one uvloop loop, one pidfd per child, no polling.

The parent binds every listening socket and opens every device's resources
before the first fork, then forks one child per device (jailed unless
``--disable-sandbox``).  Each child's pidfd, stderr pipe and status pipe are
readers on the loop; a child's exit is classified, logged, and handled by
the device's restart policy (immediately after a disconnect, exponential
backoff after a crash, ``failed`` after a crash loop).  The listening socket
stays open in the parent across children, so a reconnecting VMM always
finds it; socket files are removed only at shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib
import logging
import os
import signal
import time
from typing import Any

import psutil

from . import logs
from .child import READY_BYTE, ChildProcess, enable_fork_signal_reset, spawn_child
from .config import ConfigError, SupervisorConfig
from .control import ControlError, ControlServer, bind_control_socket, socket_in_use
from .metrics import process_metrics, unix_connections
from .cgroups import CgroupBudgets
from .notify import Notifier
from .slot import DeviceSlot, ExitInfo, ExitKind, State, should_restart

#: Imported before the first fork: after pivot_root a child can import nothing.
CHILD_MODULES = (
    "connection.connection", "connection.handler", "connection.memory", "connection.virtqueue",
    "connection.inflight", "connection.transport", "connection.protocol", "connection.executor",
    "devices.base", "devices.block", "devices.console", "devices.rng",
    "traceback", "linecache", "tokenize", "concurrent.futures", "concurrent.futures.thread",
    "asyncio.unix_events", "uvloop", "mmap", "fcntl", "struct", "array", "selectors",
    "encodings.idna", "encodings.ascii", "encodings.latin_1",
)
FRONTEND_REFRESH = 1.0     # seconds between /proc/net/unix scans while a child is ready/serving
MAX_LOG_LINE = 4096        # a child's stderr line is cut here (a hostile child cannot bloat us)
LOG_READ = 65536


def preimport_child_modules() -> list[str]:
    """Import what a jailed child will need; returns the names that are missing."""
    missing = []
    for name in CHILD_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class Supervisor:
    """Owns the slots and the loop; ``run()`` returns the process exit status."""

    def __init__(self, cfg: SupervisorConfig, builders: dict[str, Any],
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.slots: dict[str, DeviceSlot] = {d.name: DeviceSlot(spec=d, builder=builders[d.name])
                                             for d in cfg.devices}
        self.notifier = notifier or Notifier()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.control: ControlServer | None = None
        self.stopping = False
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self.ready_sent = False
        self.all_started = False
        self._done: asyncio.Future[None] | None = None
        self._changed: asyncio.Event | None = None
        self._log_bufs: dict[int, bytearray] = {}
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._watchdog_handle: asyncio.TimerHandle | None = None
        self._force_kill = False
        self.cgroups = CgroupBudgets({})   # replaced in main() once the loop runs

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        """Bind, fork, supervise until SIGTERM/SIGINT, shut down; 0 on a clean stop."""
        import uvloop
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self.main())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def main(self) -> int:
        self.loop = asyncio.get_running_loop()
        self._done = self.loop.create_future()
        self._changed = asyncio.Event()
        # Handlers first: a SIGTERM from here on is a clean shutdown, never a
        # death that leaves socket files behind.  Children reset them at fork.
        enable_fork_signal_reset()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_shutdown, sig)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: None)
        missing = preimport_child_modules()
        if missing:
            logs.event(None, "preimport-missing", logging.DEBUG, modules=",".join(missing))
        try:
            self.bind_all()
        except BaseException:
            self.close_resources()
            raise
        # Into our own leaf cgroup (delegated subtree) before any fork and before READY=1.
        self.cgroups = CgroupBudgets.setup({s.name: s.spec.budget for s in self.slots.values()})
        try:
            await self.control.start()  # type: ignore[union-attr]
            logs.event(None, "start", devices=len(self.slots), control_socket=self.cfg.control_socket,
                       sandbox="off" if self.cfg.disable_sandbox else "on", pid=os.getpid())
            gc.collect()
            gc.freeze()  # children share the parent's heap copy-on-write: keep GC off those pages
            for slot in self.slots.values():
                if self.stopping:
                    break
                self._start(slot)
                await asyncio.sleep(0)   # let exits, signals and control requests in between forks
            self.all_started = True
            self._maybe_ready()
            self._schedule_refresh()
            if self.notifier.watchdog_interval:
                self._watchdog()
            await self._done
        finally:
            await self.shutdown()
        return 0

    def bind_all(self) -> None:
        """Listen on every device socket (and the control socket) before any fork."""
        from .activation import Activation
        activation = Activation.from_environ()   # sockets systemd passes (LISTEN_FDS), kept across restarts
        for slot in self.slots.values():
            path = slot.spec.socket
            if not activation.has(path) and os.path.exists(path) and socket_in_use(path):
                raise ConfigError(f"{path!r} is in use by a running process", "vhost", slot.name)
        try:
            sock = bind_control_socket(self.cfg.control_socket)
        except ControlError as e:
            raise ConfigError(str(e).split(": ", 1)[-1], "control-socket") from None
        self.control = ControlServer(sock, self.handle_request)
        for slot in self.slots.values():
            try:
                slot.listener = activation.listener(slot.spec.socket)
            except OSError as e:
                raise ConfigError(f"{slot.spec.socket!r}: cannot listen: {e.strerror or e}", "vhost",
                                  slot.name) from None
            slot.socket_inode = os.stat(slot.spec.socket).st_ino
            slot.resources = slot.listener.take_parent_process_resources()
            logs.event(slot.name, "listen", socket=slot.spec.socket, type=slot.spec.type,
                       inherited=getattr(slot.listener, "fd_name", None))
        activation.close_unused()

    # ------------------------------------------------------------ children

    def _jail_kwargs(self, slot: DeviceSlot) -> dict[str, Any]:
        builder = slot.builder
        mounts = list(builder.bind_mounts() or [])
        if mounts:
            import sandbox
            mounts = [m if isinstance(m, sandbox.BindMount) else sandbox.BindMount(*m) for m in mounts]
        uid, gid = slot.spec.jail_user
        return {
            "uid": uid, "gid": gid, "root": self.cfg.jail.pivot_root, "bind_mounts": mounts,
            "seccomp_policy": os.path.join(self.cfg.jail.seccomp_policy_dir, builder.seccomp_policy),
            "seccomp_log": self.cfg.jail.seccomp_log_failures,
        }

    def _start(self, slot: DeviceSlot) -> None:
        """Fork a fresh child for ``slot``; a fork/jail error counts as a crash."""
        assert self.loop is not None
        slot.restart_timer = None
        slot.backoff_until = None
        slot.want_running = True
        keep = list(slot.builder.keep_fds()) + [slot.listener.fileno()]
        t0 = time.monotonic()
        try:
            with self.cgroups.placing(slot.name):   # the child joins its budget's cgroup at fork
                child = spawn_child(name=slot.name, conn=slot.listener, builder=slot.builder, keep_fds=keep,
                                    sandboxed=not self.cfg.disable_sandbox,
                                    jail_kwargs=None if self.cfg.disable_sandbox else self._jail_kwargs(slot))
        except Exception as e:  # noqa: BLE001
            logs.event(slot.name, "spawn-failed", logging.ERROR, error=f"{type(e).__name__}: {e}")
            self._after_exit(slot, ExitInfo(ExitKind.JAIL_FAILED, code=None), 0.0)
            return
        slot.child = child
        slot.state = State.STARTING
        slot.started_at = time.monotonic()
        slot.started_wall = time.time()
        if slot.spawns:
            slot.restarts += 1
        slot.spawns += 1
        try:
            slot.proc = psutil.Process(child.device_pid)
            slot.proc.cpu_percent(None)
        except psutil.Error:
            slot.proc = None
        self.loop.add_reader(child.pidfd, self._on_exit, slot, child)
        self.loop.add_reader(child.log_fd, self._on_log, slot, child)
        self.loop.add_reader(child.status_fd, self._on_status, slot, child)
        vfd = child.violation_fd
        if vfd is not None and vfd >= 0:
            self.loop.add_reader(vfd, self._on_violation, slot, child)
        child.violation = None  # type: ignore[attr-defined]
        logs.event(slot.name, "spawn", pid=child.device_pid, restarts=slot.restarts,
                   spawn_ms=round((time.monotonic() - t0) * 1000, 1),
                   **({"forwarder": child.pid} if child.device_pid != child.pid else {}))
        self._changed_now()

    def _on_status(self, slot: DeviceSlot, child: ChildProcess) -> None:
        assert self.loop is not None
        try:
            data = os.read(child.status_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(child.status_fd)
            return
        if READY_BYTE in data and slot.child is child and slot.state is State.STARTING:
            slot.state = State.READY
            slot.first_attempt_done = True
            logs.event(slot.name, "ready", pid=child.device_pid,
                       startup_ms=round((time.monotonic() - (slot.started_at or 0)) * 1000, 1))
            self._changed_now()
            self._maybe_ready()

    def _on_violation(self, slot: DeviceSlot, child: ChildProcess) -> None:
        """The seccomp listener is readable: the device is blocked in a forbidden
        syscall.  Answering (read_violation) names the syscall and kills it."""
        assert self.loop is not None
        vfd = child.violation_fd
        name = child.read_violation()
        if name:
            child.violation = name  # type: ignore[attr-defined]
            logs.event(slot.name, "seccomp-violation", logging.WARNING, pid=child.device_pid, syscall=name)
        if vfd is not None and (name or _hung_up(vfd)):
            # one violation is fatal; a hang-up means the child is gone (the pidfd says the rest)
            self.loop.remove_reader(vfd)

    def _on_log(self, slot: DeviceSlot, child: ChildProcess, final: bool = False) -> None:
        assert self.loop is not None
        buf = self._log_bufs.setdefault(child.log_fd, bytearray())
        eof = False
        while True:
            try:
                data = os.read(child.log_fd, LOG_READ)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            buf += data
            if not final:
                break
        *lines, rest = bytes(buf).split(b"\n")
        if len(rest) > MAX_LOG_LINE:
            lines.append(rest[:MAX_LOG_LINE])
            rest = b""
        buf[:] = rest
        hint = False
        budget = slot.log_budget
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            if not text or not budget.allow():
                continue
            dropped = budget.take_suppressed()
            if dropped:
                logs.event(slot.name, "log-suppressed", logging.WARNING, pid=child.device_pid, lines=dropped)
            logs.child_line(slot.name, child.device_pid, text[:MAX_LOG_LINE])
            hint = hint or "front-end connected" in text
        if hint and not final:
            # The child says it accepted; /proc/net/unix is what we believe.
            self.refresh_frontends()
        if final and budget.suppressed:
            logs.event(slot.name, "log-suppressed", logging.WARNING, pid=child.device_pid,
                       lines=budget.take_suppressed())
        if eof:
            if buf:
                logs.child_line(slot.name, child.device_pid, bytes(buf).decode("utf-8", "replace"))
            self._log_bufs.pop(child.log_fd, None)
            self.loop.remove_reader(child.log_fd)

    def _on_exit(self, slot: DeviceSlot, child: ChildProcess) -> None:
        """The pidfd is readable: the child is gone.  Reap, classify, decide."""
        assert self.loop is not None
        self.loop.remove_reader(child.pidfd)
        vfd = child.violation_fd
        if vfd is not None and vfd >= 0:
            self.loop.remove_reader(vfd)
        if child.log_fd >= 0:
            self._on_log(slot, child, final=True)
            self.loop.remove_reader(child.log_fd)
            self._log_bufs.pop(child.log_fd, None)
        if child.status_fd >= 0:
            self.loop.remove_reader(child.status_fd)
        try:
            status = child.reap()
        except ChildProcessError:
            status = 0
        info = child.exit_info(status)
        if info.kind is not ExitKind.DISCONNECTED and self.cgroups.oom_killed(slot.name):
            info = dataclasses.replace(info, kind=ExitKind.OOM)
        requested = self.stopping or slot.pending_request is not None
        if requested:
            info = dataclasses.replace(info, requested=True)
        uptime = time.monotonic() - (slot.started_at or time.monotonic())
        child.close()
        if slot.kill_timer is not None:
            slot.kill_timer.cancel()
            slot.kill_timer = None
        slot.child = None
        slot.proc = None
        slot.first_attempt_done = True
        level = logging.INFO if (info.kind is ExitKind.DISCONNECTED or requested) else logging.WARNING
        logs.event(slot.name, "exit", level, pid=child.device_pid, reason=info.describe(), kind=info.kind.value,
                   code=info.code, signal=info.signal, syscall=info.syscall, uptime=round(uptime, 3))
        self._after_exit(slot, info, uptime)

    def _after_exit(self, slot: DeviceSlot, info: ExitInfo, uptime: float) -> None:
        assert self.loop is not None
        slot.last_exit = info
        slot.last_exit_time = time.time()
        pending, slot.pending_request = slot.pending_request, None
        if self.stopping or pending == "stop" or not slot.want_running:
            slot.state = State.STOPPED
        elif pending == "restart":
            self._start(slot)
        else:
            tripped, delay = slot.tracker.record_exit(info, time.monotonic(), uptime)
            if not should_restart(slot.spec.restart, info):
                slot.state = State.FAILED if info.is_crash else State.STOPPED
                logs.event(slot.name, "not-restarting", policy=slot.spec.restart, state=slot.state.value)
            elif tripped:
                slot.state = State.FAILED
                logs.event(slot.name, "crash-loop", logging.ERROR, crashes=len(slot.tracker.crashes),
                           hint=f"vhost-supervisor restart {slot.name}")
            elif delay <= 0:
                self._start(slot)
            else:
                slot.state = State.BACKOFF
                slot.backoff_until = time.monotonic() + delay
                slot.restart_timer = self.loop.call_later(delay, self._backoff_done, slot)
                logs.event(slot.name, "backoff", delay=round(delay, 3))
        self._changed_now()
        self._maybe_ready()
        if self.stopping and not any(s.child for s in self.slots.values()):
            self._changed_now()

    def _backoff_done(self, slot: DeviceSlot) -> None:
        slot.restart_timer = None
        if slot.state is State.BACKOFF and not self.stopping and slot.want_running:
            self._start(slot)

    def _terminate(self, slot: DeviceSlot, grace: float | None = None) -> None:
        """SIGTERM now, SIGKILL after the grace period."""
        assert self.loop is not None
        child = slot.child
        if child is None:
            return
        child.signal(signal.SIGTERM)
        if slot.kill_timer is None:
            g = self.cfg.grace_period if grace is None else grace
            slot.kill_timer = self.loop.call_later(g, self._kill, slot, child)

    def _kill(self, slot: DeviceSlot, child: ChildProcess) -> None:
        slot.kill_timer = None
        if slot.child is child and child.signal(signal.SIGKILL):
            logs.event(slot.name, "sigkill", logging.WARNING, pid=child.device_pid,
                       reason="did not exit within the grace period")

    # ------------------------------------------------------------ readiness

    def _changed_now(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate()`` holds (checked after every state change)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._changed is None:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return predicate()
        return True

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for s in self.slots.values():
            counts[s.state.value] = counts.get(s.state.value, 0) + 1
        parts = [f"{n} {k}" for k, n in sorted(counts.items())]
        return f"{len(self.slots)} devices: " + (", ".join(parts) if parts else "none")

    def _maybe_ready(self) -> None:
        """READY=1 once every socket listens and every first child has settled."""
        if not self.ready_sent and not self.stopping and self.all_started and \
                all(s.first_attempt_done or s.state is State.STOPPED for s in self.slots.values()):
            self.ready_sent = True
            logs.event(None, "ready", summary=self.summary(),
                       startup_ms=round((time.monotonic() - self.started_mono) * 1000, 1))
            self.notifier.ready(self.summary())
        elif self.ready_sent:
            self.notifier.status(self.summary())

    def _schedule_refresh(self) -> None:
        assert self.loop is not None
        self._refresh_handle = self.loop.call_later(FRONTEND_REFRESH, self._refresh_tick)

    def _refresh_tick(self) -> None:
        if self.stopping:
            return
        self.refresh_frontends()
        self._schedule_refresh()

    def refresh_frontends(self) -> dict[str, Any]:
        """Move children between ``ready`` and ``serving`` from /proc/net/unix."""
        live = [s for s in self.slots.values() if s.child is not None and s.state in (State.READY, State.SERVING)]
        conns = unix_connections({s.spec.socket for s in live}) if live else {}
        for s in live:
            st = conns.get(s.spec.socket)
            serving = st is not None and st.accepted > 0
            if serving and s.state is State.READY:
                s.state = State.SERVING
                logs.event(s.name, "serving", pid=s.child.device_pid)
                self._changed_now()
            elif not serving and s.state is State.SERVING:
                s.state = State.READY
                self._changed_now()
        return conns

    def _watchdog(self) -> None:
        assert self.loop is not None
        self.notifier.watchdog()
        interval = self.notifier.watchdog_interval
        if interval and not self.stopping:
            self._watchdog_handle = self.loop.call_later(interval, self._watchdog)

    # ------------------------------------------------------------ control

    def status(self) -> dict[str, Any]:
        conns = self.refresh_frontends()
        paths = {s.spec.socket for s in self.slots.values()}
        missing = paths - set(conns)
        if missing:
            conns.update(unix_connections(missing))
        now = time.monotonic()
        devices = []
        for s in self.slots.values():
            fe = conns.get(s.spec.socket)
            d: dict[str, Any] = {
                "name": s.name, "type": s.spec.type, "socket": s.spec.socket, "state": s.state.value,
                "pid": s.child.device_pid if s.child else None,
                "supervised_pid": s.child.pid if s.child else None, "restarts": s.restarts,
                "restart_policy": s.spec.restart,
                "last_exit": s.last_exit.as_dict() if s.last_exit else None,
                "uptime": round(now - s.started_at, 3) if s.child and s.started_at else None,
                "started": s.started_wall if s.child else None,
                "last_exit_time": s.last_exit_time,
                "frontend": fe.describe() if fe else "no",
                "socket_inode": s.socket_inode,
                "backoff_remaining": round(max(0.0, s.backoff_until - now), 3) if s.backoff_until else None,
            }
            d.update(process_metrics(s.proc))
            devices.append(d)
        return {"ok": True, "supervisor": {"pid": os.getpid(), "uptime": round(now - self.started_mono, 3),
                                           "sandbox": not self.cfg.disable_sandbox,
                                           "summary": self.summary(), "stopping": self.stopping},
                "devices": devices}

    async def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "ping":
            return {"ok": True}
        if cmd not in ("restart", "stop", "start"):
            return {"ok": False, "error": f"unknown command {cmd!r} (status, restart, stop, start)"}
        name = req.get("name")
        slot = self.slots.get(name) if isinstance(name, str) else None
        if slot is None:
            return {"ok": False, "error": f"no device named {name!r} (known: {', '.join(self.slots)})"}
        if self.stopping:
            return {"ok": False, "error": "the supervisor is shutting down"}
        timeout = self.cfg.grace_period + 5.0
        if cmd == "stop":
            slot.want_running = False
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
                slot.backoff_until = None
            if slot.child is not None:
                slot.pending_request = "stop"
                self._terminate(slot)
                await self.wait_for(lambda: slot.child is None, timeout)
            slot.state = State.STOPPED
            logs.event(slot.name, "stopped", by="control")
            self._changed_now()
        else:
            if cmd == "start" and (slot.child is not None or slot.state is State.BACKOFF):
                return {"ok": True, "device": self._device_status(slot), "note": "already running"}
            slot.tracker.reset()
            slot.want_running = True
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
            if slot.child is not None:
                slot.pending_request = "restart"
                self._terminate(slot)
                # the exit handler clears pending_request once the new child is forked
                await self.wait_for(lambda: slot.pending_request is None, timeout)
            else:
                self._start(slot)
            logs.event(slot.name, cmd, by="control")
        return {"ok": True, "device": self._device_status(slot)}

    def _device_status(self, slot: DeviceSlot) -> dict[str, Any]:
        return next(d for d in self.status()["devices"] if d["name"] == slot.name)

    # ------------------------------------------------------------ shutdown

    def request_shutdown(self, sig: int | None = None) -> None:
        if self.stopping:
            if not self._force_kill:
                self._force_kill = True
                logs.event(None, "shutdown-forced", logging.WARNING)
                for s in self.slots.values():
                    if s.child is not None:
                        s.child.signal(signal.SIGKILL)
            return
        logs.event(None, "shutdown", signal=signal.Signals(sig).name if sig else None)
        self.stopping = True
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def shutdown(self) -> None:
        """SIGTERM every child, SIGKILL after the grace period, close everything."""
        self.stopping = True
        self.notifier.stopping()
        for h in (self._refresh_handle, self._watchdog_handle):
            if h is not None:
                h.cancel()
        for s in self.slots.values():
            if s.restart_timer is not None:
                s.restart_timer.cancel()
                s.restart_timer = None
            if s.state is State.BACKOFF:
                s.state = State.STOPPED
        for s in self.slots.values():
            if s.child is not None:
                s.child.signal(signal.SIGTERM)
        alive = lambda: [s for s in self.slots.values() if s.child is not None]  # noqa: E731
        if not await self.wait_for(lambda: not alive(), self.cfg.grace_period):
            for s in alive():
                logs.event(s.name, "sigkill", logging.WARNING, pid=s.child.device_pid,
                           reason="did not exit within the grace period")
                s.child.signal(signal.SIGKILL)
            if not await self.wait_for(lambda: not alive(), 5.0):
                for s in alive():   # the pidfd never fired: reap synchronously
                    self._on_exit(s, s.child)
        if self.control is not None:
            await self.control.close()
        self.close_resources()
        logs.event(None, "stopped", summary=self.summary())
        self.notifier.close()

    def close_resources(self) -> None:
        """Close what the parent holds; ParentResources.close() unlinks the socket files."""
        for s in self.slots.values():
            for obj in (s.resources, s.listener, s.builder):
                close = getattr(obj, "close", None)
                if close is None:
                    continue
                try:
                    close()
                except Exception as e:  # noqa: BLE001
                    logs.event(s.name, "close-failed", logging.WARNING, error=f"{type(e).__name__}: {e}")
            s.resources = s.listener = None
        if self.control is not None:
            try:
                if os.stat(self.control.path).st_ino == self.control.inode:
                    os.unlink(self.control.path)
            except OSError:
                pass


def _hung_up(fd: int) -> bool:
    """POLLHUP on the seccomp listener: no task is left that could notify."""
    import select
    p = select.poll()
    p.register(fd, select.POLLIN)
    try:
        return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in p.poll(0))
    except OSError:
        return True
