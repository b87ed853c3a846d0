"""Live changes: add, remove and reload devices while the others serve.

Why: on a VM host disks come and go all day; changing one must not restart
every device.  Each change touches only the devices it names: their child,
socket, parent resources and counters page.  Every other slot keeps its
child, its listener and its front-end's connection.

Each operation has a check phase and an apply phase.  Everything that can be
found wrong before acting (syntax, unknown keys, two devices on one socket,
an image that cannot be opened, a front-end still connected) is found in the
check phase, and then nothing has changed.  ``reload`` re-opens a changed
device's resources only after its old child is gone (its image lock would
refuse a second open); if that fails, the old configuration is opened again
and the error is reported.

Live operations run one at a time (``Supervisor.live_lock``); an operation
on one device also holds that device's lock (so a ``restart NAME`` waits).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import devices

from . import logs
from .config import ConfigError, DeviceSpec, SupervisorConfig, add_cli_devices, build_config, open_builders, \
    validate
from .slot import DeviceSlot, State

if TYPE_CHECKING:
    from .supervision import Supervisor

#: Fields whose change needs a fresh child (and, for ``socket``, a new listener);
#: the others (restart policy, watchdog, crash-loop policy) apply in place.
RESTART_FIELDS = ("type", "socket", "options", "jail_user")
IN_PLACE_FIELDS = ("restart", "watchdog_sec", "crash_loop")
#: Supervisor settings a reload reports but cannot apply to a running supervisor.
FIXED_SETTINGS = ("control_socket", "disable_sandbox", "jail", "log_format", "uid_range", "metrics_listen")
SETTLE = 15.0   # seconds an operation waits for a new child to be built before replying


def _lock(sup: "Supervisor") -> asyncio.Lock:
    lock = getattr(sup, "live_lock", None)
    if lock is None:
        lock = sup.live_lock = asyncio.Lock()  # type: ignore[attr-defined]
    return lock


@contextmanager
def _in_dir(cwd: Any) -> Iterator[None]:
    """Resolve the client's relative paths from the client's directory.  The
    supervisor is single-threaded and nothing awaits inside, so nothing else
    runs while it is changed."""
    if not cwd:
        yield
        return
    if not isinstance(cwd, str) or not os.path.isabs(cwd) or not os.path.isdir(cwd):
        raise ConfigError("not an existing absolute directory", "cwd", value=cwd)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old)


# ------------------------------------------------------------------ helpers


def _connected(sup: "Supervisor", slot: DeviceSlot) -> bool:
    """A front-end is connected or waiting in the accept queue (the kernel's view)."""
    if slot.listener is None:
        return False
    fe = sup.refresh_frontends().get(slot.spec.socket)
    return slot.state is State.SERVING or (fe is not None and fe.connected)


def assign_id(sup: "Supervisor", slot: DeviceSlot) -> None:
    """A host uid/gid for a device added at run time: ``jail-user``, or the next
    id of ``uid-range`` no device has (nor had, in this supervisor's life)."""
    from sandbox.privileges import can_map_ids
    if sup.cfg.disable_sandbox or not can_map_ids():
        return
    if slot.spec.jail_user is not None:
        slot.uid, slot.gid = slot.spec.jail_user
        return
    from sandbox.idrange import IdRange, check_unused
    start, count = sup.uid_range
    taken = set(sup.retired_ids)
    for s in sup.slots.values():
        taken.update(i for i in (s.uid, s.gid) if i is not None)
    for ident in range(start, start + count):
        if ident not in taken:
            try:
                check_unused(IdRange(ident, 1), skip_pids=frozenset({os.getpid()}))
            except ValueError as e:
                raise ConfigError(f"{e}; is another supervisor using it?", "uid-range") from None
            slot.uid = slot.gid = ident
            logs.event(slot.name, "identity", uid=ident, gid=ident, source="uid-range")
            return
    raise ConfigError(f"no free id left in {start}-{start + count - 1}", "uid-range", slot.name)


def _check_policy(sup: "Supervisor", spec: DeviceSpec) -> None:
    if sup.cfg.disable_sandbox:
        return
    dtype = devices.DEVICE_TYPES[spec.type]
    policy = os.path.join(sup.cfg.jail.seccomp_policy_dir, dtype.seccomp_policy)
    if not os.path.isfile(policy):
        raise ConfigError(f"{policy!r} does not exist", "seccomp-policy-dir", spec.name)


def _open(sup: "Supervisor", specs: list[DeviceSpec]) -> dict[str, Any]:
    """Open the parent resources of ``specs`` (all or nothing)."""
    cfg = SupervisorConfig(devices=specs, disable_sandbox=sup.cfg.disable_sandbox, jail=sup.cfg.jail)
    return open_builders(cfg)


def _check_socket_free(sup: "Supervisor", spec: DeviceSpec) -> None:
    from .control import socket_in_use
    if os.path.exists(spec.socket) and socket_in_use(spec.socket):
        raise ConfigError(f"{spec.socket!r} is in use by a running process", "vhost", spec.name)


def _install(sup: "Supervisor", spec: DeviceSpec, builder: Any, runtime: bool) -> DeviceSlot:
    """A new slot, bound and registered (not started)."""
    import time
    slot = DeviceSlot(spec=spec, builder=builder, runtime=runtime, added_wall=time.time())
    assign_id(sup, slot)
    try:
        sup.bind_slot(slot)
    except BaseException:
        sup.close_slot(slot, builder=False)
        raise
    sup.slots[spec.name] = slot
    return slot


async def _settle(sup: "Supervisor", slots: list[DeviceSlot]) -> None:
    """Wait (bounded) until each new child has built its device or ended."""
    await sup.wait_for(lambda: all(s.state is not State.STARTING for s in slots), SETTLE)


async def _remove(sup: "Supervisor", slot: DeviceSlot, by: str) -> str | None:
    """Stop the child, unlink the socket, release the parent resources, forget the slot."""
    err = await sup._stop(slot)
    if err:
        return err
    sup.close_slot(slot)
    sup.retired_ids.update(i for i in (slot.uid, slot.gid) if i is not None)
    if sup.slots.get(slot.name) is slot:
        del sup.slots[slot.name]
    logs.event(slot.name, "removed", by=by, socket=slot.spec.socket)
    sup._changed_now()
    sup._maybe_ready()
    return None


# ------------------------------------------------------------------ add


def parse_add(sup: "Supervisor", flags: Any, cwd: Any = None) -> list[DeviceSpec]:
    """``[[flag, "vhost=...,path=..."], ...]`` -> new specs, checked as ``run``
    checks them and against the devices already there (names, sockets)."""
    known = {t.flag for t in devices.DEVICE_TYPES.values()}
    if not isinstance(flags, list) or not flags:
        raise ConfigError(f"give at least one device ({', '.join('--' + f for f in sorted(known))})", "devices")
    pairs: list[tuple[str, str]] = []
    for item in flags:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise ConfigError("each device is [FLAG, \"key=value,...\"]", "devices", value=item)
        if item[0] not in known:
            raise ConfigError(f"not a device flag ({', '.join(sorted(known))})", "devices", value=item[0])
        pairs.append((item[0], item[1]))
    existing = [copy.copy(s.spec) for s in sup.slots.values()]
    cfg = SupervisorConfig(devices=list(existing), control_socket=sup.cfg.control_socket)
    with _in_dir(cwd):
        add_cli_devices(cfg, pairs)
    new = cfg.devices[len(existing):]
    # An automatic name (TYPE-N) skips the names in use (a removed device's number is free again).
    taken = {s.name for s in existing}
    from .config import parse_keyvalues
    for spec, (_, text) in zip(new, pairs):
        if "name" not in parse_keyvalues(text, "devices"):
            n = 0
            while f"{spec.type}-{n}" in taken:
                n += 1
            spec.name = f"{spec.type}-{n}"
        taken.add(spec.name)
    validate(cfg)
    for spec in new:
        _check_socket_free(sup, spec)
        _check_policy(sup, spec)
    return new


async def request_add(sup: "Supervisor", req: dict[str, Any]) -> dict[str, Any]:
    async with _lock(sup):
        try:
            specs = parse_add(sup, req.get("devices"), req.get("cwd"))
            with _in_dir(req.get("cwd")):
                builders = _open(sup, specs)
        except ConfigError as e:
            logs.event(None, "add-failed", logging.ERROR, error=str(e))
            return {"ok": False, "error": f"config error: {e}"}
        added: list[DeviceSlot] = []
        try:
            for spec in specs:
                added.append(_install(sup, spec, builders[spec.name], runtime=True))
        except ConfigError as e:
            for slot in added:
                sup.close_slot(slot, builder=False)
                sup.slots.pop(slot.name, None)
            for b in builders.values():
                b.close()
            logs.event(None, "add-failed", logging.ERROR, error=str(e))
            return {"ok": False, "error": f"config error: {e}"}
        for slot in added:
            logs.event(slot.name, "added", by="control", type=slot.spec.type, socket=slot.spec.socket)
            sup._start(slot)
        await _settle(sup, added)
        st = {d["name"]: d for d in sup.status()["devices"]}
        return {"ok": True, "devices": [st[s.name] for s in added if s.name in st]}


# ------------------------------------------------------------------ remove


async def request_remove(sup: "Supervisor", req: dict[str, Any]) -> dict[str, Any]:
    name = req.get("name")
    force = req.get("force", False) is True
    async with _lock(sup):
        slot = sup.slots.get(name) if isinstance(name, str) else None
        if slot is None:
            return {"ok": False, "error": f"no device named {name!r} (known: {', '.join(sup.slots)})"}
        async with slot.lock:
            if not force and _connected(sup, slot):
                return {"ok": False, "error": f"device {slot.name}: a front-end is connected to {slot.spec.socket} "
                                              f"(detach it from the VM first, or give --force)"}
            err = await _remove(sup, slot, "control")
        if err:
            return {"ok": False, "error": err}
        return {"ok": True, "removed": slot.name}


# ------------------------------------------------------------------ reload


@dataclass
class Diff:
    """What a reload changes, by device name."""

    added: list[DeviceSpec] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[DeviceSpec, DeviceSpec, list[str]]] = field(default_factory=list)  # old, new, fields
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)        # added at run time, not in the file: left alone
    settings: list[str] = field(default_factory=list)    # supervisor settings that need a restart

    def as_dict(self) -> dict[str, Any]:
        return {"added": [s.name for s in self.added], "removed": list(self.removed),
                "changed": {new.name: fields for _, new, fields in self.changed},
                "unchanged": list(self.unchanged), "kept": list(self.kept), "not_applied": list(self.settings)}

    def describe(self) -> str:
        d = self.as_dict()
        parts = [f"added: {', '.join(d['added']) or '-'}", f"removed: {', '.join(d['removed']) or '-'}",
                 "changed: " + (", ".join(f"{n} ({'/'.join(f)})" for n, f in d["changed"].items()) or "-"),
                 f"unchanged: {', '.join(d['unchanged']) or '-'}"]
        if d["kept"]:
            parts.append(f"kept (added at run time): {', '.join(d['kept'])}")
        if d["not_applied"]:
            parts.append(f"not applied (restart the supervisor): {', '.join(d['not_applied'])}")
        return "; ".join(parts)


def _fields(old: DeviceSpec, new: DeviceSpec) -> list[str]:
    return [f for f in RESTART_FIELDS + IN_PLACE_FIELDS if getattr(old, f) != getattr(new, f)]


def compute_diff(sup: "Supervisor", new_cfg: SupervisorConfig) -> Diff:
    diff = Diff()
    wanted = {d.name: d for d in new_cfg.devices}
    for name, slot in sup.slots.items():
        new = wanted.get(name)
        if new is None:
            (diff.kept if slot.runtime else diff.removed).append(name)
        elif _fields(slot.spec, new):
            diff.changed.append((slot.spec, new, _fields(slot.spec, new)))
        else:
            diff.unchanged.append(name)
    diff.added = [d for n, d in wanted.items() if n not in sup.slots]
    for key in FIXED_SETTINGS:
        if getattr(sup.cfg, key) != getattr(new_cfg, key):
            diff.settings.append(key.replace("_", "-"))
    return diff


def _check_reload(sup: "Supervisor", new_cfg: SupervisorConfig, diff: Diff, force: bool) -> None:
    """Everything a reload can be refused for, before anything changes."""
    # devices added at run time stay: the file must not collide with them
    merged = list(new_cfg.devices) + [copy.copy(sup.slots[n].spec) for n in diff.kept]
    validate(SupervisorConfig(devices=merged, control_socket=sup.cfg.control_socket))
    released = _released(sup, diff)
    for old, new, fields in diff.changed:
        if set(fields) & set(RESTART_FIELDS):
            devices.DEVICE_TYPES[new.type].parse(new.name, dict(new.options))
            _check_policy(sup, new)
            if new.socket != old.socket and new.socket not in released:
                _check_socket_free(sup, new)
    for spec in diff.added:
        if spec.socket not in released:
            _check_socket_free(sup, spec)
        _check_policy(sup, spec)
    if not force:
        busy = [n for n in diff.removed if _connected(sup, sup.slots[n])]
        busy += [new.name for _, new, f in diff.changed
                 if set(f) & set(RESTART_FIELDS) and _connected(sup, sup.slots[new.name])]
        if busy:
            raise ConfigError(f"a front-end is connected to {', '.join(busy)}, which the reload would remove or "
                              f"restart (detach it first, or reload --force)", "reload")


def _released(sup: "Supervisor", diff: Diff) -> set[str]:
    """Sockets and image paths the reload frees before it adds (removed devices,
    restarted ones): a renamed device may reuse them."""
    out: set[str] = set()
    olds = [sup.slots[n].spec for n in diff.removed] + \
        [old for old, _, f in diff.changed if set(f) & set(RESTART_FIELDS)]
    for spec in olds:
        out.add(spec.socket)
        if spec.options.get("path"):
            out.add(os.path.abspath(spec.options["path"]))
    return out


def _open_added(sup: "Supervisor", diff: Diff) -> tuple[dict[str, Any], list[DeviceSpec]]:
    """Open the added devices' resources now (all or nothing), except those on a
    socket or image a removed or restarted device still holds (a rename): those
    are opened after it is gone (``deferred``)."""
    released = _released(sup, diff)
    deferred = [d for d in diff.added if d.socket in released or
                (d.options.get("path") and os.path.abspath(d.options["path"]) in released)]
    for d in deferred:
        devices.DEVICE_TYPES[d.type].parse(d.name, dict(d.options))
    return _open(sup, [d for d in diff.added if d not in deferred]), deferred


async def _change(sup: "Supervisor", slot: DeviceSlot, new: DeviceSpec, fields: list[str]) -> str | None:
    """Apply one changed device: in place, or a fresh child on new resources."""
    if not set(fields) & set(RESTART_FIELDS):
        slot.spec = new
        logs.event(slot.name, "changed", by="reload", fields=",".join(fields), restarted=False)
        return None
    err = await sup._stop(slot)
    if err:
        return err
    old = slot.spec
    slot.builder.close()
    try:
        builder = _open(sup, [new])[new.name]
    except ConfigError as e:
        # Put the old device back as it was: its resources opened before.
        error = f"device {new.name}: {e}; kept the old configuration"
        try:
            slot.builder = _open(sup, [old])[old.name]
        except ConfigError as e2:
            error += f", which cannot be opened again either ({e2}): the device stays stopped"
            return error
        sup._start(slot)
        return error
    if new.socket != old.socket:
        sup.close_slot(slot, builder=False)
        slot.spec = new
        try:
            sup.bind_slot(slot)
        except ConfigError as e:
            builder.close()
            sup.slots.pop(slot.name, None)
            return f"device {new.name}: {e}; the device is removed"
    if new.jail_user != old.jail_user:
        sup.retired_ids.update(i for i in (slot.uid, slot.gid) if i is not None)
        slot.uid = slot.gid = None
        slot.spec = new
        assign_id(sup, slot)
    slot.spec = new
    slot.builder = builder
    slot.tracker.reset()
    logs.event(slot.name, "changed", by="reload", fields=",".join(fields), restarted=True)
    sup._start(slot)
    return None


async def request_reload(sup: "Supervisor", req: dict[str, Any]) -> dict[str, Any]:
    """Re-read the configuration the supervisor was started with and apply the difference."""
    by = req.get("by", "control") if isinstance(req.get("by"), str) else "control"
    force = req.get("force", False) is True
    async with _lock(sup):
        source = dict(sup.cfg.source)
        if not source.get("config_file"):
            sup.reload_counts["error"] = sup.reload_counts.get("error", 0) + 1
            msg = "the supervisor was started without --config: there is no file to reload"
            logs.event(None, "reload-failed", logging.ERROR, by=by, error=msg)
            return {"ok": False, "error": msg}
        builders: dict[str, Any] = {}
        try:
            new_cfg = build_config(**source)
            diff = compute_diff(sup, new_cfg)
            _check_reload(sup, new_cfg, diff, force)
            builders, deferred = _open_added(sup, diff)
        except ConfigError as e:
            sup.reload_counts["error"] = sup.reload_counts.get("error", 0) + 1
            logs.event(None, "reload-failed", logging.ERROR, by=by, error=str(e), msg="nothing changed")
            return {"ok": False, "error": f"config error: {e} (nothing changed)"}
        d = diff.as_dict()
        logs.event(None, "reload", by=by, added=",".join(d["added"]) or "-", removed=",".join(d["removed"]) or "-",
                   changed=",".join(d["changed"]) or "-", unchanged=",".join(d["unchanged"]) or "-",
                   not_applied=",".join(d["not_applied"]) or "-")
        errors: list[str] = []
        started: list[DeviceSlot] = []
        for name in diff.unchanged:
            sup.slots[name].runtime = False     # the file declares it now
        for name in diff.removed:
            slot = sup.slots[name]
            async with slot.lock:
                err = await _remove(sup, slot, "reload")
            if err:
                errors.append(err)
        for _, new, fields in diff.changed:
            slot = sup.slots[new.name]
            async with slot.lock:
                err = await _change(sup, slot, new, fields)
            if err:
                errors.append(err)
            elif set(fields) & set(RESTART_FIELDS):
                started.append(slot)
            slot.runtime = False
        for spec in diff.added:
            builder = None
            try:
                builder = builders.pop(spec.name) if spec not in deferred else _open(sup, [spec])[spec.name]
                slot = _install(sup, spec, builder, runtime=False)
            except ConfigError as e:
                if builder is not None:
                    builder.close()
                errors.append(f"device {spec.name}: {e}")
                continue
            logs.event(slot.name, "added", by="reload", type=spec.type, socket=spec.socket)
            sup._start(slot)
            started.append(slot)
        for b in builders.values():
            b.close()
        sup.cfg.grace_period = new_cfg.grace_period     # the one setting applied live
        sup.cfg.devices = [s.spec for s in sup.slots.values()]
        await _settle(sup, started)
        sup.reload_counts["applied"] = sup.reload_counts.get("applied", 0) + 1
        for e in errors:
            logs.event(None, "reload-error", logging.ERROR, by=by, error=e)
        reply: dict[str, Any] = {"ok": not errors, "diff": diff.as_dict(), "summary": diff.describe()}
        if errors:
            reply["error"] = "; ".join(errors)
        return reply


__all__ = ["Diff", "compute_diff", "parse_add", "request_add", "request_reload", "request_remove"]
