"""Run attack code where an attacker would be.

``JailProber.run(type, fn)``: inside a device child spawned exactly as the
supervisor spawns one (``supervisor.child.spawn_child`` with the jail
arguments the supervisor computes for that device, the device's real
resources and its real seccomp policy); ``fn`` runs where the device would
be built, i.e. as a compromised device.  ``in_fork(fn, uid=...)``: in a
forked process of the check, optionally as an unprivileged uid (the local
user class).  Both return ``fn``'s JSON-able result and never leave a
process behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

UNPRIVILEGED_UID = 54321       # no account, no process: a stranger on the host
NOBODY_UID = 65534             # the host's shared "nobody"


@dataclass
class ProbeResult:
    result: Any                # fn's return value (None if it never returned)
    exit_kind: str             # ExitKind value: disconnected/error/signaled/seccomp/jail_failed
    exit_text: str             # ExitInfo.describe()
    syscall: str | None        # the syscall seccomp stopped, if any
    device_pid: int


class _ProbeBuilder:
    """Stands in for the device's builder in the child: runs the attack where
    ``build`` would run, reports, and ends the child."""

    def __init__(self, inner: Any, fn: Callable[[], Any], out_fd: int) -> None:
        self._inner = inner
        self._fn = fn
        self._out = out_fd

    def build(self, ex: Any) -> Any:
        try:
            result = {"ok": self._fn()}
        except BaseException as e:  # noqa: BLE001 - report, the parent judges
            result = {"raised": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
        os.write(self._out, json.dumps(result, default=str).encode() + b"\n")
        raise SystemExit(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


#: Host ids for the prober's children: just above the default uid-range.
PROBER_UID_RANGE = 1879048192 + 65536


class JailProber:
    """Device children of each type, jailed by the supervisor's own code path."""

    def __init__(self, workdir: str, types: list[str], policy_dir: str) -> None:
        from supervisor.config import build_config, open_builders
        from supervisor.supervision import Supervisor, preimport_child_modules

        from .devtypes import TYPES
        preimport_child_modules()
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        self.dir = workdir
        flags = []
        for name in types:
            t = TYPES[name]
            opts = t.options(workdir, f"probe-{name}", "")
            sock = os.path.join(workdir, f"{name}.sock")
            flags.append((t.flag, ",".join(x for x in (f"vhost={sock}", f"name=probe-{name}", opts) if x)))
        self.cfg = build_config(ordered_flags=flags, control_socket=os.path.join(workdir, "unused.sock"),
                                jail=[f"seccomp-policy-dir={policy_dir}"])
        self.builders = open_builders(self.cfg)
        # Ids of their own, beside the check's supervisor (which uses the default range).
        self.cfg.uid_range = (PROBER_UID_RANGE, 256)
        self.sup = Supervisor(self.cfg, self.builders)   # never run: computes the jail arguments
        self.sup.assign_ids()
        self.listeners: dict[str, Any] = {}
        from connection.connection import VhostUserListener
        for spec in self.cfg.devices:
            self.listeners[spec.type] = (spec.name, VhostUserListener(spec.socket))

    def run(self, type_name: str, fn: Callable[[], Any], timeout: float = 10.0,
            extra_fds: list[int] | None = None, seccomp: bool = True) -> ProbeResult:
        """``fn()`` inside a fresh child of ``type_name``; ``seccomp=False``
        takes the filter away (to attack the other layers on their own)."""
        from supervisor.child import spawn_child
        name, listener = self.listeners[type_name]
        slot = self.sup.slots[name]
        r, w = os.pipe2(os.O_CLOEXEC)
        builder = _ProbeBuilder(slot.builder, fn, w)
        keep = list(slot.builder.keep_fds()) + [listener.fileno(), w] + list(extra_fds or [])
        try:
            child = spawn_child(name=name, conn=listener, builder=builder, keep_fds=keep, sandboxed=True,
                                jail_kwargs=self.jail_kwargs(slot, seccomp))
        finally:
            os.close(w)
        buf = b""
        syscall = None
        try:
            poller = select.poll()
            poller.register(r, select.POLLIN)
            poller.register(child.pidfd, select.POLLIN)
            vfd = child.violation_fd
            if vfd is not None:
                poller.register(vfd, select.POLLIN)
            deadline = time.monotonic() + timeout
            exited = False
            while not exited and time.monotonic() < deadline:
                for fd, _ev in poller.poll(50):
                    if fd == vfd:
                        syscall = child.read_violation() or syscall
                        poller.unregister(vfd)
                    elif fd == r:
                        chunk = os.read(r, 65536)
                        if chunk:
                            buf += chunk
                        else:
                            poller.unregister(r)
                    elif fd == child.pidfd:
                        exited = True
            if not exited:
                child.signal(signal.SIGKILL)
            status = child.reap()
            info = child.exit_info(status)
            if syscall and not info.syscall:
                info = dataclasses.replace(info, syscall=syscall)
        finally:
            child.close()
            os.close(r)
        line = buf.split(b"\n", 1)[0]
        result = json.loads(line) if line.strip() else None
        return ProbeResult(result, info.kind.value, info.describe(), info.syscall, child.device_pid)

    def jail_kwargs(self, slot: Any, seccomp: bool = True) -> dict[str, Any]:
        kw = dict(self.sup._jail_kwargs(slot))
        if not seccomp:
            kw["seccomp_policy"] = None
        return kw

    def close(self) -> None:
        for _name, listener in self.listeners.values():
            listener.close()
        for b in self.builders.values():
            try:
                b.close()
            except Exception:  # noqa: BLE001
                pass
        self.listeners.clear()


def drop_to(uid: int, gid: int | None = None) -> None:
    """Become an ordinary user for good (the calling process only)."""
    gid = uid if gid is None else gid
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def in_fork(fn: Callable[[], Any], *, uid: int | None = None, timeout: float = 10.0,
            before_drop: Callable[[], None] | None = None) -> Any:
    """``fn()`` in a forked process (as ``uid`` if given); its JSON result.
    An exception in ``fn`` comes back as ``{"raised": ..., "errno": ...}``;
    a process that overstays is killed and ``TimeoutError`` raised."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            if before_drop is not None:
                before_drop()
            if uid is not None:
                drop_to(uid)
            try:
                out = {"ok": fn()}
            except BaseException as e:  # noqa: BLE001
                out = {"raised": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
            os.write(w, json.dumps(out, default=str).encode())
        except BaseException:  # noqa: BLE001
            try:
                os.write(w, json.dumps({"raised": traceback.format_exc(limit=3)}).encode())
            except OSError:
                pass
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"the attacking process did not finish within {timeout}s")
            ready, _, _ = select.select([r], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(data) if data else {"raised": "no result"}


def outcome(res: dict[str, Any]) -> Any:
    """The value of an ``in_fork``/probe result, or a readable 'raised ...'."""
    if res is None:
        return None
    if "ok" in res:
        return res["ok"]
    return f"raised {res.get('raised')}"
