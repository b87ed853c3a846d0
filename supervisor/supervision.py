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
import socket
import time
from typing import Any

import psutil

import devices

from . import logs
from .child import FRONTEND_BYTE, READY_BYTE, ChildProcess, enable_fork_signal_reset, spawn_child
from .config import DEFAULT_UID_RANGE, ConfigError, SupervisorConfig
from .control import ControlError, ControlServer, bind_control_socket, socket_in_use
from .metrics import MAX_FRONTEND_FDS, FrontendState, frontend_state, is_accepted_connection, process_metrics
from .cgroups import CgroupBudgets
from .notify import Notifier
from .slot import CLEAN_BURST, CLEAN_RATE, CLEAN_SUMMARY_EVERY, DeviceSlot, ExitInfo, ExitKind, Request, State, \
    should_restart

#: Imported before the first fork: after pivot_root a child can import nothing.
#: The device types' own modules come from their declarations.
CHILD_MODULES = (
    "connection.connection", "connection.handler", "connection.memory", "connection.virtqueue",
    "connection.inflight", "connection.transport", "connection.protocol", "connection.executor",
    "traceback", "linecache", "tokenize", "concurrent.futures", "concurrent.futures.thread",
    "asyncio.unix_events", "uvloop", "mmap", "fcntl", "struct", "array", "selectors",
    "encodings.idna", "encodings.ascii", "encodings.latin_1", "connection.counters",
) + devices.child_modules()
#: uid-range unset (auto): each supervisor takes a slice of this many ids of
#: the default pool, locked under UID_LOCK_DIR for its life.
UID_SLICE = 1024
UID_LOCK_DIR = "/run/vhost-supervisor/uid-slices"
COMMANDS = ("status", "ping", "restart", "stop", "start", "add", "remove", "reload")
TICK = 1.0     # seconds between heartbeat rounds (less for a watchdog-sec under 4 s)
MAX_LOG_LINE = 4096        # a child's stderr line is cut here (a hostile child cannot bloat us)
LOG_READ = 1 << 20         # one read takes whatever the pipe holds
LOG_PAUSE = 0.5            # over budget: stop reading this long (the child blocks on its own full pipe)


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
        self.slots: dict[str, DeviceSlot] = {d.name: DeviceSlot(spec=d, builder=builders[d.name],
                                                                added_wall=time.time())
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
        from .activation import Activation
        self.activation = Activation({})   # bind_all: the sockets systemd passed, if any
        #: the ids devices get: the configured uid-range, or the slice assign_ids claimed
        self.uid_range: tuple[int, int] = cfg.uid_range or DEFAULT_UID_RANGE
        self.metrics: Any = None                     # prometheus.MetricsServer with --metrics-listen
        self.control_counts: dict[tuple[str, str], int] = {}   # (command, ok|error) -> requests
        self.reload_counts: dict[str, int] = {}      # applied|error -> reloads
        self.retired_ids: set[int] = set()           # uids of removed devices: never handed out again
        self._reload_task: asyncio.Task[Any] | None = None

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
        self.loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
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
            if self.metrics is not None:
                await self.metrics.start()
                logs.event(None, "metrics", listen=self.metrics.address.text)
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

    def _on_sighup(self) -> None:
        """SIGHUP: reload the configuration file (as ``vhost-supervisor reload``)."""
        from . import live
        if self.stopping or self.loop is None:
            return
        if self._reload_task is not None and not self._reload_task.done():
            logs.event(None, "reload-skipped", logging.WARNING, reason="a reload is in progress")
            return
        self._reload_task = self.loop.create_task(live.request_reload(self, {"cmd": "reload", "by": "SIGHUP"}))

    def assign_ids(self) -> None:
        """One host uid/gid per jailed device: ``jail-user`` if given, else the next
        id of ``uid-range``, which must be unused (passwd, group, processes)."""
        if self.cfg.disable_sandbox:
            return
        from sandbox.idrange import IdRange, IdRangeError, allocate, check_unused, claim_block
        from sandbox.privileges import can_map_ids
        if not can_map_ids():
            if os.geteuid() == 0:
                # its own id would be root: never run a device as root by omission
                raise ConfigError("running as root without CAP_SETUID/CAP_SETGID: devices cannot get ids of "
                                  "their own and will not run as root; grant both capabilities, or run as "
                                  "another user", "uid-range")
            # Without CAP_SETUID/CAP_SETGID a supervisor can map only its own id into the jail.
            logs.event(None, "identity", logging.WARNING, uid=os.geteuid(),
                       note="no CAP_SETUID/CAP_SETGID: every device runs as the supervisor's own uid")
            return
        fixed = {n: s.spec.jail_user for n, s in self.slots.items() if s.spec.jail_user is not None}
        try:
            if self.cfg.uid_range is None:
                # auto: a slice of the default pool that nothing uses and no
                # other supervisor holds (the lock fd lives as long as we do)
                rng, self._uid_lock = claim_block(IdRange(*DEFAULT_UID_RANGE), UID_SLICE, len(self.slots),
                                                  UID_LOCK_DIR, skip_pids=frozenset({os.getpid()}))
            else:
                rng = IdRange(*self.cfg.uid_range)
                if len(fixed) < len(self.slots):
                    check_unused(rng, skip_pids=frozenset({os.getpid()}))
            ids = allocate(rng, list(self.slots), fixed)
            self.uid_range = (rng.start, rng.count)
        except IdRangeError as e:
            hint = ("; is another supervisor using it? give each its own uid-range, or leave uid-range "
                    "unset (auto)" if "process" in str(e) else "")
            raise ConfigError(f"{e}{hint}", "uid-range") from None
        for name, (uid, gid) in ids.items():
            slot = self.slots[name]
            slot.uid, slot.gid = uid, gid
            logs.event(name, "identity", uid=uid, gid=gid, source="jail-user" if name in fixed else "uid-range")

    def bind_all(self) -> None:
        """Listen on every device socket (and the control socket) before any fork."""
        from .activation import Activation
        self.assign_ids()
        self.activation = Activation.from_environ()   # sockets systemd passes (LISTEN_FDS), kept across restarts
        for slot in self.slots.values():
            path = slot.spec.socket
            if not self.activation.has(path) and os.path.exists(path) and socket_in_use(path):
                raise ConfigError(f"{path!r} is in use by a running process", "vhost", slot.name)
        try:
            sock = bind_control_socket(self.cfg.control_socket)
        except ControlError as e:
            raise ConfigError(str(e).split(": ", 1)[-1], "control-socket") from None
        self.control = ControlServer(sock, self.handle_request)
        if self.cfg.metrics_listen:
            from .prometheus import MetricsServer, parse_listen
            self.metrics = MetricsServer(self, parse_listen(self.cfg.metrics_listen))
            self.metrics.bind()
        for slot in self.slots.values():
            self.bind_slot(slot)
        self.activation.close_unused()

    def bind_slot(self, slot: DeviceSlot) -> None:
        """Listen on one device's socket, keep its parent resources, map its
        counters page: everything a child of it will inherit (before its fork)."""
        from connection.counters import CountersPage
        path = slot.spec.socket
        activation = self.activation
        if not activation.has(path) and os.path.exists(path) and socket_in_use(path):
            raise ConfigError(f"{path!r} is in use by a running process", "vhost", slot.name)
        try:
            slot.listener = activation.listener(path)   # the inherited socket, else a fresh listener
        except OSError as e:
            raise ConfigError(f"{path!r}: cannot listen: {e.strerror or e}", "vhost", slot.name) from None
        slot.socket_inode = os.stat(path).st_ino
        slot.listener_inode = os.fstat(slot.listener.fileno()).st_ino
        slot.resources = slot.listener.take_parent_process_resources()
        slot.counters = CountersPage(slot.name)
        logs.event(slot.name, "listen", socket=path, type=slot.spec.type,
                   inherited=getattr(slot.listener, "fd_name", None))

    def close_slot(self, slot: DeviceSlot, builder: bool = True) -> None:
        """Close what the parent holds for one device (its child is gone):
        ParentResources.close() unlinks the socket file."""
        objs = [slot.resources, slot.listener, slot.counters] + ([slot.builder] if builder else [])
        for obj in objs:
            close = getattr(obj, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as e:  # noqa: BLE001
                logs.event(slot.name, "close-failed", logging.WARNING, error=f"{type(e).__name__}: {e}")
        slot.resources = slot.listener = slot.counters = None

    # ------------------------------------------------------------ children

    def _jail_kwargs(self, slot: DeviceSlot) -> dict[str, Any]:
        builder = slot.builder
        mounts = list(builder.bind_mounts() or [])
        if mounts:
            import sandbox
            mounts = [m if isinstance(m, sandbox.BindMount) else sandbox.BindMount(*m) for m in mounts]
        from sandbox.privileges import jails_take_configured_ids
        if slot.uid is None and jails_take_configured_ids():
            # Never a root device by omission: ids come from assign_ids().
            raise RuntimeError(f"device {slot.name}: no jail uid assigned (assign_ids() not called)")
        uid, gid = (slot.uid, slot.gid) if slot.uid is not None else (os.geteuid(), os.getegid())
        return {
            "uid": uid, "gid": gid, "root": self.cfg.jail.pivot_root, "bind_mounts": mounts,
            "seccomp_policy": os.path.join(self.cfg.jail.seccomp_policy_dir, builder.seccomp_policy),
            "seccomp_log": self.cfg.jail.seccomp_log_failures,
            "data_limit": builder.memory_limit,   # memory-limit=: the device's own heap
        }

    def _start(self, slot: DeviceSlot) -> None:
        """Fork a fresh child for ``slot``; a fork/jail error counts as a crash."""
        assert self.loop is not None
        slot.cancel_restart_timer()
        slot.want_running = True
        keep = list(slot.builder.keep_fds()) + [slot.listener.fileno()]
        t0 = time.monotonic()
        try:
            with self.cgroups.placing(slot.name):   # the child joins its budget's cgroup at fork
                child = spawn_child(name=slot.name, conn=slot.listener, builder=slot.builder, keep_fds=keep,
                                    sandboxed=not self.cfg.disable_sandbox,
                                    jail_kwargs=None if self.cfg.disable_sandbox else self._jail_kwargs(slot),
                                    counters=slot.counters)
        except Exception as e:  # noqa: BLE001
            logs.event(slot.name, "spawn-failed", logging.ERROR, error=f"{type(e).__name__}: {e}")
            self._after_exit(slot, ExitInfo(ExitKind.JAIL_FAILED, code=None), 0.0)
            return
        try:
            proc: psutil.Process | None = psutil.Process(child.device_pid)
            proc.cpu_percent(None)  # type: ignore[union-attr]
        except psutil.Error:
            proc = None
        slot.spawned(child, proc, time.monotonic(), time.time())
        self.loop.add_reader(child.pidfd, self._on_exit, slot, child)
        self.loop.add_reader(child.log_fd, self._on_log, slot, child)
        self.loop.add_reader(child.status_fd, self._on_status, slot, child)
        self.loop.add_reader(child.heartbeat_fd, self._on_heartbeat, slot, child)
        vfd = child.violation_fd
        if vfd is not None and vfd >= 0:
            self.loop.add_reader(vfd, self._on_violation, slot, child)
        child.violation = None  # type: ignore[attr-defined]
        logs.event(slot.name, "spawn", logging.DEBUG if slot.quiet else logging.INFO, pid=child.device_pid,
                   restarts=slot.restarts, spawn_ms=round((time.monotonic() - t0) * 1000, 1),
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
        if READY_BYTE in data and slot.built(child):
            slot.heartbeat(time.monotonic())
            logs.event(slot.name, "ready", logging.DEBUG if slot.quiet else logging.INFO, pid=child.device_pid,
                       startup_ms=round((time.monotonic() - (slot.started_at or 0)) * 1000, 1))
            self._changed_now()
            self._maybe_ready()

    def _on_heartbeat(self, slot: DeviceSlot, child: ChildProcess) -> None:
        """The child echoed a ping from its event loop."""
        assert self.loop is not None
        ch = socket.socket(fileno=child.heartbeat_fd)
        try:
            data, fds, _flags, _addr = socket.recv_fds(ch, 64, 1, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        finally:
            ch.detach()
        if data == FRONTEND_BYTE and fds:
            self._take_frontend(slot, child, fds[0])
            return
        for fd in fds:      # fds with anything else: not asked for
            os.close(fd)
        if not data:
            self.loop.remove_reader(child.heartbeat_fd)   # the child is going; the pidfd says the rest
            return
        if slot.child is child:
            slot.heartbeat(time.monotonic())

    def _take_frontend(self, slot: DeviceSlot, child: ChildProcess, fd: int) -> None:
        """Keep the connection the child says it accepted if it is one (metrics.py)."""
        if (slot.child is not child or slot.listener is None or len(child.frontend_fds) >= MAX_FRONTEND_FDS
                or not is_accepted_connection(fd, slot.spec.socket, slot.listener_inode)):
            os.close(fd)
            return
        child.frontend_fds.append(fd)
        self.refresh_frontends()

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

    # ------------------------------------------------------------ child stderr

    def _on_log(self, slot: DeviceSlot, child: ChildProcess, final: bool = False) -> None:
        """Read what the child wrote on stderr, within the device's budget.

        One read takes what the pipe holds (up to 1 MiB).  Lines within the
        budget are re-emitted; the rest are counted with one ``bytes.count``
        and dropped, never split or decoded.  Over budget, reading pauses
        for LOG_PAUSE: the child then blocks on its own full pipe."""
        assert self.loop is not None
        fd = child.log_fd
        if fd < 0:
            return
        buf = self._log_bufs.setdefault(fd, bytearray())
        budget = slot.log_budget
        eof = False
        hint = False
        while True:
            try:
                data = os.read(fd, LOG_READ)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            hint = self._take_log(slot, child, buf, data) or hint
            if not final:
                break
        now = time.monotonic()
        due = budget.report_due(now, final=final or eof)
        if due:
            logs.event(slot.name, "log-dropped", logging.WARNING, pid=child.device_pid, lines=due[0],
                       bytes=due[1], msg=f"device={slot.name} dropped {due[0]} log lines")
        if hint and not final:
            # The child says it accepted; the connection it shows us (_take_frontend) is what we believe.
            self.refresh_frontends()
        if eof:
            if buf and budget.admit(bytes(buf)):
                logs.child_line(slot.name, child.device_pid, bytes(buf[:MAX_LOG_LINE]).decode("utf-8", "replace"))
            self._log_bufs.pop(fd, None)
            self.loop.remove_reader(fd)
        elif not final and budget.exhausted:
            self.loop.remove_reader(fd)
            self.loop.call_later(LOG_PAUSE, self._resume_log, slot, child)

    def _resume_log(self, slot: DeviceSlot, child: ChildProcess) -> None:
        if self.loop is not None and slot.child is child and child.log_fd >= 0:
            self.loop.add_reader(child.log_fd, self._on_log, slot, child)

    def _take_log(self, slot: DeviceSlot, child: ChildProcess, buf: bytearray, data: bytes) -> bool:
        """Emit the lines of ``buf + data`` the budget allows; keep the unfinished
        tail in ``buf``.  True if a line says a front-end connected."""
        budget = slot.log_budget
        budget.refill()
        allowed = int(budget.tokens)
        hint = False
        if allowed <= 0 or budget.byte_tokens < 1.0:
            # Over budget: count the lines, keep only the start of the unfinished one.
            last = data.rfind(b"\n")
            if last < 0:
                if len(buf) < MAX_LOG_LINE:
                    buf += data[:MAX_LOG_LINE - len(buf)]
                else:
                    budget.drop(0, len(data))
                return False
            budget.drop(data.count(b"\n", 0, last + 1), last + 1 + len(buf))
            buf[:] = data[last + 1:last + 1 + MAX_LOG_LINE]
            return False
        parts = (bytes(buf) + data).split(b"\n", allowed)
        if len(parts) > allowed:      # more lines than tokens: the rest is dropped
            rest = parts.pop()
            last = rest.rfind(b"\n")
            if last >= 0:
                budget.drop(rest.count(b"\n", 0, last + 1), last + 1)
                tail = rest[last + 1:]
            else:
                tail = rest
        else:
            tail = parts.pop()
        for line in parts:
            line = line[:MAX_LOG_LINE].rstrip(b"\r")
            if not line or not budget.admit(line):
                continue
            text = line.decode("utf-8", "replace")
            logs.child_line(slot.name, child.device_pid, text)
            hint = hint or "front-end connected" in text
        if len(tail) > MAX_LOG_LINE:   # an endless line: emit its start, drop the rest
            if budget.admit(tail[:MAX_LOG_LINE]):
                logs.child_line(slot.name, child.device_pid, tail[:MAX_LOG_LINE].decode("utf-8", "replace"))
            budget.drop(0, len(tail) - MAX_LOG_LINE)
            tail = b""
        buf[:] = tail
        return hint

    # ------------------------------------------------------------ exits

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
        for fd in (child.status_fd, child.heartbeat_fd):
            if fd >= 0:
                self.loop.remove_reader(fd)
        try:
            status = child.reap()
        except ChildProcessError:
            status = 0
        info = child.exit_info(status)
        if slot.hung_for is not None and slot.child is child:
            info = ExitInfo(ExitKind.HUNG, signal="SIGKILL", message=f"{slot.hung_for:.1f}s")
        elif info.kind is not ExitKind.DISCONNECTED and self.cgroups.oom_killed(slot.name):
            info = dataclasses.replace(info, kind=ExitKind.OOM)
        requested = self.stopping or slot.pending is not None
        if requested:
            info = dataclasses.replace(info, requested=True)
        uptime = time.monotonic() - (slot.started_at or time.monotonic())
        child.close()
        clean = info.kind is ExitKind.DISCONNECTED and not requested
        level = logging.INFO if (clean or requested) else logging.WARNING
        if clean and slot.quiet:
            level = logging.DEBUG   # counted in the clean-exit summary instead
        logs.event(slot.name, "exit", level, pid=child.device_pid, reason=info.describe(), kind=info.kind.value,
                   code=info.code, signal=info.signal, syscall=info.syscall, uptime=round(uptime, 3))
        self._after_exit(slot, info, uptime)

    def _after_exit(self, slot: DeviceSlot, info: ExitInfo, uptime: float) -> None:
        """The child is gone (or never forked): decide the slot's next state."""
        assert self.loop is not None
        pending = slot.child_gone(info, time.time())
        slot.account_exit(info)
        now = time.monotonic()
        slot.quiet = False
        if self.stopping or pending is Request.STOP or not slot.want_running:
            slot.stop()
        elif pending is Request.RESTART:
            self._start(slot)
        elif not should_restart(slot.spec.restart, info):
            slot.tracker.record_exit(info, now, uptime)
            if info.is_crash:
                slot.fail()
            else:
                slot.stop()
            logs.event(slot.name, "not-restarting", policy=slot.spec.restart, state=slot.state.value)
        elif not info.is_crash:
            # A clean exit (the front-end went away): at once within the burst, then 1/s.
            slot.tracker.record_exit(info, now, uptime)
            delay = slot.clean_exits.delay(now)
            if delay <= 0:
                self._start(slot)
            else:
                slot.quiet = True
                slot.back_off(now + delay, self.loop.call_later(delay, self._backoff_done, slot))
        else:
            tripped, delay = slot.tracker.record_exit(info, now, uptime)
            if tripped:
                slot.crash_loops += 1
                fail = getattr(slot.spec, "crash_loop", "backoff") == "fail"
                logs.event(slot.name, "crash-loop", logging.ERROR, crashes=len(slot.tracker.crashes),
                           policy="fail" if fail else "backoff",
                           retry_in=None if fail else round(delay, 3), hint=f"vhost-supervisor restart {slot.name}")
                if fail:
                    slot.fail()
                else:
                    slot.back_off(now + delay, self.loop.call_later(delay, self._backoff_done, slot),
                                  crash_looping=True)
            elif delay <= 0:
                self._start(slot)
            else:
                slot.back_off(now + delay, self.loop.call_later(delay, self._backoff_done, slot))
                logs.event(slot.name, "backoff", delay=round(delay, 3))
        self._changed_now()
        self._maybe_ready()

    def _backoff_done(self, slot: DeviceSlot) -> None:
        slot.restart_timer = None
        if slot.state in (State.BACKOFF, State.CRASH_LOOPING) and not self.stopping and slot.want_running:
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

    def _tick_interval(self) -> float:
        """1 s, or a quarter of the smallest watchdog-sec, so a hang is seen in time."""
        wds = [float(getattr(s.spec, "watchdog_sec", 0) or 0) for s in self.slots.values()]
        wds = [w for w in wds if w > 0]
        return min([TICK] + [w / 4 for w in wds])

    def _schedule_refresh(self) -> None:
        assert self.loop is not None
        self._refresh_handle = self.loop.call_later(self._tick_interval(), self._refresh_tick)

    def _refresh_tick(self) -> None:
        """The supervisor's one periodic job: heartbeats and summary lines.

        Front-ends are not polled: a child serves one front-end and exits
        when it leaves, so ``serving`` begins when the child says it accepted
        (its log line, checked against the kernel) or when status is asked,
        and ends with the child.  An idle supervisor asks the kernel nothing."""
        if self.stopping:
            return
        self.check_heartbeats()
        now = time.monotonic()
        for s in self.slots.values():
            due = s.clean_exits.summary_due(now)
            if due:
                logs.event(s.name, "clean-exits", count=due[0], throttled=due[1],
                           interval=f"{CLEAN_SUMMARY_EVERY:g}s", rate_limit=f"{CLEAN_BURST} then {CLEAN_RATE:g}/s")
        self._schedule_refresh()

    def check_heartbeats(self) -> None:
        """Ping every built child that has no ping outstanding; SIGKILL one whose
        last answer is older than its ``watchdog-sec`` (exit kind ``hung``)."""
        now = time.monotonic()
        for s in self.slots.values():
            child = s.child
            if child is None or s.hung_for is not None:
                continue
            age = s.heartbeat_overdue(now)
            if age is not None:
                s.hung_for = age
                logs.event(s.name, "hung", logging.WARNING, pid=child.device_pid, heartbeat_age=round(age, 3),
                           watchdog_sec=s.spec.watchdog_sec, state=s.state.value)
                child.signal(signal.SIGKILL)
                continue
            if s.state in (State.READY, State.SERVING) and s.ping_sent is None and child.heartbeat_fd >= 0:
                try:
                    os.write(child.heartbeat_fd, b"p")
                    s.ping_sent = now
                except (BlockingIOError, BrokenPipeError, ConnectionError):
                    pass   # a full or closed channel: the age tells

    def refresh_frontends(self) -> dict[str, FrontendState]:
        """Move children between ``ready`` and ``serving`` (see metrics.frontend_state)."""
        out: dict[str, FrontendState] = {}
        for s in self.slots.values():
            if s.listener is None:
                continue
            live = s.child is not None and s.state in (State.READY, State.SERVING)
            pid = s.child.device_pid if live else None
            try:
                st = frontend_state(s.listener.fileno(), s.child.frontend_fds if live else [])
            except OSError as e:
                logs.event(s.name, "frontend-query-failed", logging.WARNING, error=str(e))
                continue
            out[s.spec.socket] = st
            if pid and s.frontend(st.accepted > 0):
                if s.state is State.SERVING:
                    logs.event(s.name, "serving", logging.DEBUG if s.quiet else logging.INFO, pid=pid)
                self._changed_now()
        return out

    def _watchdog(self) -> None:
        assert self.loop is not None
        self.notifier.watchdog()
        interval = self.notifier.watchdog_interval
        if interval and not self.stopping:
            self._watchdog_handle = self.loop.call_later(interval, self._watchdog)

    # ------------------------------------------------------------ control

    def status(self) -> dict[str, Any]:
        conns = self.refresh_frontends()
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
                "uid": s.uid, "gid": s.gid,
                "heartbeat_age": round(now - s.last_heartbeat, 3) if s.child and s.last_heartbeat else None,
                "watchdog_sec": getattr(s.spec, "watchdog_sec", None),
                "crash_loops": s.crash_loops,
                "crash_loop_policy": getattr(s.spec, "crash_loop", "backoff"),
                "log_dropped_lines": s.log_budget.total_dropped,
                "reconnects": s.reconnects, "crashes": dict(s.crashes), "crashes_total": sum(s.crashes.values()),
                "requested_exits": s.requested_exits, "runtime": s.runtime,
            }
            d.update(process_metrics(s.proc))
            devices.append(d)
        return {"ok": True, "supervisor": {"pid": os.getpid(), "uptime": round(now - self.started_mono, 3),
                                           "sandbox": not self.cfg.disable_sandbox,
                                           "summary": self.summary(), "stopping": self.stopping},
                "devices": devices}

    async def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        reply = await self._handle_request(req)
        key = (cmd if cmd in COMMANDS else "unknown", "ok" if reply.get("ok") else "error")
        self.control_counts[key] = self.control_counts.get(key, 0) + 1
        return reply

    async def _handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        from . import live
        cmd = req["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "ping":
            return {"ok": True}
        if cmd in ("add", "remove", "reload"):
            if self.stopping:
                return {"ok": False, "error": "the supervisor is shutting down"}
            return await getattr(live, f"request_{cmd}")(self, req)
        if cmd not in ("restart", "stop", "start"):
            return {"ok": False, "error": f"unknown command {cmd!r} ({', '.join(COMMANDS)})"}
        name = req.get("name")
        slot = self.slots.get(name) if isinstance(name, str) else None
        if slot is None:
            return {"ok": False, "error": f"no device named {name!r} (known: {', '.join(self.slots)})"}
        if self.stopping:
            return {"ok": False, "error": "the supervisor is shutting down"}
        async with slot.lock:   # one operation per device at a time, in arrival order
            if self.stopping:
                return {"ok": False, "error": "the supervisor is shutting down"}
            error = await (self._stop(slot) if cmd == "stop" else self._restart(slot, cmd))
        if error:
            logs.event(slot.name, f"{cmd}-failed", logging.ERROR, by="control", error=error)
            return {"ok": False, "error": error, "device": self._device_status(slot)}
        return {"ok": True, "device": self._device_status(slot)}

    async def _wait_gone(self, slot: DeviceSlot, child: ChildProcess) -> bool:
        """Until ``child`` was reaped: SIGTERM, SIGKILL after the grace period, then 5 s more."""
        self._terminate(slot)
        return await self.wait_for(lambda: slot.child is not child, self.cfg.grace_period + 5.0)

    async def _stop(self, slot: DeviceSlot) -> str | None:
        """Stop the child and keep the device stopped; an error text if the child would not go."""
        slot.want_running = False
        slot.cancel_restart_timer()
        child = slot.child
        if child is not None:
            slot.request(Request.STOP)
            logs.event(slot.name, "stopping", by="control", pid=child.device_pid)
            self._changed_now()
            if not await self._wait_gone(slot, child):
                return (f"device {slot.name}: child pid {child.device_pid} did not exit "
                        f"{self.cfg.grace_period + 5.0:g}s after SIGTERM and SIGKILL; it is still 'stopping'")
        elif slot.state is not State.STOPPED:
            slot.stop()
        logs.event(slot.name, "stopped", by="control")
        self._changed_now()
        return None

    async def _restart(self, slot: DeviceSlot, cmd: str) -> str | None:
        """``restart`` (or ``start``): a fresh child, clearing the crash-loop breaker."""
        if cmd == "start" and (slot.child is not None or slot.state in (State.BACKOFF, State.CRASH_LOOPING)):
            return None
        slot.tracker.reset()
        slot.want_running = True
        slot.cancel_restart_timer()
        child = slot.child
        if child is not None:
            slot.request(Request.RESTART)
            if not await self._wait_gone(slot, child):
                return (f"device {slot.name}: child pid {child.device_pid} did not exit "
                        f"{self.cfg.grace_period + 5.0:g}s after SIGTERM and SIGKILL")
            # the exit handler forked the new child (or scheduled it after a failed fork)
        else:
            self._start(slot)
        logs.event(slot.name, cmd, by="control")
        return None

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
            s.cancel_restart_timer()
            if s.state in (State.BACKOFF, State.CRASH_LOOPING):
                s.stop()
            due = s.clean_exits.summary_due(time.monotonic(), final=True)
            if due:
                logs.event(s.name, "clean-exits", count=due[0], throttled=due[1])
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
        if self.metrics is not None:
            await self.metrics.close()
        self.close_resources()
        logs.event(None, "stopped", summary=self.summary())
        self.notifier.close()

    def close_resources(self) -> None:
        """Close what the parent holds; ParentResources.close() unlinks the socket files."""
        for s in self.slots.values():
            self.close_slot(s)
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
