"""Command-line flags and TOML files -> one validated ``SupervisorConfig``.

Everything that can be wrong with a configuration is found here, before a
socket is bound or a child forked: an unknown key, a bad value, two devices
on one socket, a socket directory that does not exist, and (in
``open_builders``) an image or output file that cannot be opened.  Each
error names the offending key, and the CLI exits with status 2.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Device types and the CLI flag that declares each (crosvm's names).
FLAG_TYPES = {"block": "block", "serial": "console", "rng": "rng"}
TYPE_ALIASES = {"block": "block", "console": "console", "serial": "console", "rng": "rng"}
RESTART_POLICIES = ("always", "on-failure", "never")
#: Keys the supervisor consumes; every other key is the device's (checked by its builder).
SUPERVISOR_DEVICE_KEYS = ("vhost", "name", "restart", "jail-user",
                          "memory-max", "memory-swap-max", "pids-max", "cpu-weight")
JAIL_KEYS = ("pivot-root", "seccomp-policy-dir", "seccomp-log-failures")
SUPERVISOR_KEYS = ("control-socket", "disable-sandbox", "log-format", "grace-period") + JAIL_KEYS
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUN_PATH_MAX = 107
DEFAULT_GRACE = 5.0


class ConfigError(ValueError):
    """A configuration error; the message names the key (and device) at fault."""

    def __init__(self, message: str, key: str | None = None, device: str | None = None) -> None:
        self.key = key
        self.device = device
        where = []
        if device:
            where.append(f"device {device!r}")
        if key:
            where.append(f"key {key!r}")
        super().__init__((", ".join(where) + ": " if where else "") + message)


@dataclass
class JailOptions:
    """crosvm's ``--jail``: where the children pivot_root and which policies they load."""

    pivot_root: str | None = None
    seccomp_policy_dir: str = field(default_factory=lambda: str(default_policy_dir()))
    seccomp_log_failures: bool = False


@dataclass
class DeviceSpec:
    """One device as configured: what the supervisor needs to (re)start it."""

    name: str
    type: str                      # "block" | "console" | "rng"
    socket: str                    # absolute path of the vhost-user socket
    options: dict[str, str]        # device keys, handed to Builder.from_options
    restart: str = "always"
    jail_user: tuple[int, int] = (65534, 65534)
    origin: str = ""               # "--block #1" or "FILE device #2", for messages
    budget: dict[str, str] = field(default_factory=dict)   # cgroup file -> value (supervisor.cgroups)


@dataclass
class SupervisorConfig:
    devices: list[DeviceSpec] = field(default_factory=list)
    control_socket: str = ""
    disable_sandbox: bool = False
    jail: JailOptions = field(default_factory=JailOptions)
    log_format: str = "text"
    grace_period: float = DEFAULT_GRACE


def default_policy_dir() -> Path:
    """The seccomp policies shipped with the package (``sandbox.data``)."""
    from sandbox.data import policy_dir
    return Path(policy_dir())


def default_control_socket() -> str:
    """``/run/vhost-supervisor/control.sock`` for root, else under ``$XDG_RUNTIME_DIR``."""
    if os.geteuid() == 0:
        return "/run/vhost-supervisor/control.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vhost-supervisor-{os.getuid()}"
    return os.path.join(runtime, "vhost-supervisor", "control.sock")


def parse_bool(key: str, value: Any, device: str | None = None) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{value!r} is not a boolean (true/false)", key, device)


def parse_keyvalues(text: str, flag: str) -> dict[str, str]:
    """``a=1,b=2`` -> dict (crosvm's serde_keyvalue, minus nesting); a bare key means ``true``."""
    out: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"empty key in {text!r}", flag)
        if key in out:
            raise ConfigError(f"given twice in {text!r}", key)
        out[key] = value.strip() if sep else "true"
    return out


def parse_jail_user(value: Any, device: str | None = None) -> tuple[int, int]:
    """``nobody``, ``65534``, ``1000:1000`` or ``user:group`` -> (uid, gid)."""
    text = str(value).strip()
    user, _, group = text.partition(":")
    try:
        if user.isdigit():
            uid = int(user)
            gid = uid
        else:
            pw = pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{text!r}: no such user or group", "jail-user", device) from None
    if uid == 0 or gid == 0:
        raise ConfigError(f"{text!r}: a device child must not run as root", "jail-user", device)
    return uid, gid


def _stringify(key: str, value: Any, device: str | None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigError(f"{value!r} must be a string, number or boolean", key, device)


def _check_socket_path(path: str, key: str, device: str | None) -> str:
    if not path:
        raise ConfigError("is required (the vhost-user socket path)", key, device)
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"{path!r} is longer than {SUN_PATH_MAX} bytes (sun_path)", key, device)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"{path!r}: directory {parent!r} does not exist", key, device)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path!r} exists and is not a socket (refusing to replace it)", key, device)
    return path


def _device_from_options(dtype: str, opts: dict[str, Any], origin: str, index: int) -> DeviceSpec:
    name = str(opts.pop("name", "") or f"{dtype}-{index}")
    if not NAME_RE.match(name):
        raise ConfigError(f"{name!r} is not a valid name ([A-Za-z0-9_.-], at most 64)", "name", origin)
    restart = str(opts.pop("restart", "always"))
    if restart not in RESTART_POLICIES:
        raise ConfigError(f"{restart!r} is not one of {', '.join(RESTART_POLICIES)}", "restart", name)
    jail_user = parse_jail_user(opts.pop("jail-user"), name) if "jail-user" in opts else (65534, 65534)
    if "vhost" not in opts:
        raise ConfigError("is required (the vhost-user socket path)", "vhost", name)
    sock = _check_socket_path(str(opts.pop("vhost")), "vhost", name)
    options = {str(k): _stringify(str(k), v, name) for k, v in opts.items()}
    from .cgroups import BudgetError, parse_budget
    try:
        budget = parse_budget(options)
    except BudgetError as e:
        raise ConfigError(str(e), None, name) from None
    return DeviceSpec(name=name, type=dtype, socket=sock, options=options, restart=restart,
                      jail_user=jail_user, origin=origin, budget=budget)


def _apply_supervisor_keys(cfg: SupervisorConfig, table: dict[str, Any], where: str) -> None:
    for key, value in table.items():
        if key == "jail":  # jail = {pivot-root = "..."} or jail = "pivot-root=...,..." (as --jail)
            items = value.items() if isinstance(value, dict) else parse_keyvalues(str(value), "jail").items()
            for k, v in items:
                _apply_jail_key(cfg.jail, k, v)
            continue
        if key not in SUPERVISOR_KEYS:
            raise ConfigError(f"unknown key in {where} (known: {', '.join(SUPERVISOR_KEYS)})", key)
        if key == "control-socket":
            cfg.control_socket = str(value)
        elif key == "disable-sandbox":
            cfg.disable_sandbox = parse_bool(key, value)
        elif key == "log-format":
            if value not in ("text", "json"):
                raise ConfigError(f"{value!r} is not one of text, json", key)
            cfg.log_format = str(value)
        elif key == "grace-period":
            try:
                cfg.grace_period = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{value!r} is not a number of seconds", key) from None
            if not 0 <= cfg.grace_period <= 3600:
                raise ConfigError(f"{value!r} is out of range 0..3600", key)
        else:
            _apply_jail_key(cfg.jail, key, value)


def _apply_jail_key(jail: JailOptions, key: str, value: Any) -> None:
    if key == "pivot-root":
        path = str(value)
        if not os.path.isdir(path):
            raise ConfigError(f"{path!r} is not a directory", key)
        jail.pivot_root = os.path.abspath(path)
    elif key == "seccomp-policy-dir":
        path = str(value)
        if not os.path.isdir(path):
            raise ConfigError(f"{path!r} is not a directory", key)
        jail.seccomp_policy_dir = os.path.abspath(path)
    elif key == "seccomp-log-failures":
        jail.seccomp_log_failures = parse_bool(key, value)
    else:
        raise ConfigError(f"unknown --jail key (known: {', '.join(JAIL_KEYS)})", key)


def load_toml(path: str, cfg: SupervisorConfig | None = None) -> SupervisorConfig:
    """Read a TOML file: a ``[supervisor]`` table, an optional ``[jail]`` table, ``[[device]]`` entries."""
    cfg = cfg or SupervisorConfig()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}", "--config") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}", "--config") from None
    for key in data:
        if key not in ("supervisor", "jail", "device"):
            raise ConfigError(f"unknown top-level key in {path} (known: supervisor, jail, device)", key)
    sup = data.get("supervisor", {})
    if not isinstance(sup, dict):
        raise ConfigError("must be a table", "supervisor")
    _apply_supervisor_keys(cfg, sup, f"[supervisor] of {path}")
    jail = data.get("jail", {})
    if not isinstance(jail, dict):
        raise ConfigError("must be a table", "jail")
    for key, value in jail.items():
        _apply_jail_key(cfg.jail, key, value)
    devices = data.get("device", [])
    if not isinstance(devices, list):
        raise ConfigError("must be an array of tables ([[device]])", "device")
    counters: dict[str, int] = {}
    for i, entry in enumerate(devices, 1):
        origin = f"{os.path.basename(path)} device #{i}"
        if not isinstance(entry, dict):
            raise ConfigError("must be a table", "device", origin)
        opts = dict(entry)
        dtype_raw = opts.pop("type", None)
        if dtype_raw is None:
            raise ConfigError("is required (block, console or rng)", "type", str(opts.get("name") or origin))
        dtype = TYPE_ALIASES.get(str(dtype_raw))
        if dtype is None:
            raise ConfigError(f"{dtype_raw!r} is not one of block, console, rng", "type", str(opts.get("name") or origin))
        idx = counters.get(dtype, 0)
        counters[dtype] = idx + 1
        cfg.devices.append(_device_from_options(dtype, opts, origin, idx))
    return cfg


def add_cli_devices(cfg: SupervisorConfig, flags: list[tuple[str, str]]) -> None:
    """``[("block", "vhost=..,path=..."), ("serial", ...)]`` in command-line order."""
    counters: dict[str, int] = {}
    for d in cfg.devices:
        counters[d.type] = counters.get(d.type, 0) + 1
    per_flag: dict[str, int] = {}
    for flag, text in flags:
        dtype = FLAG_TYPES[flag]
        per_flag[flag] = per_flag.get(flag, 0) + 1
        origin = f"--{flag} #{per_flag[flag]}"
        try:
            opts: dict[str, Any] = parse_keyvalues(text, f"--{flag}")
        except ConfigError as e:
            raise ConfigError(str(e), None, origin) from None
        idx = counters.get(dtype, 0)
        counters[dtype] = idx + 1
        cfg.devices.append(_device_from_options(dtype, opts, origin, idx))


def apply_jail_flags(cfg: SupervisorConfig, flags: list[str]) -> None:
    for text in flags:
        for key, value in parse_keyvalues(text, "--jail").items():
            _apply_jail_key(cfg.jail, key, value)


def validate(cfg: SupervisorConfig) -> None:
    """Cross-device checks: unique names, one device per socket, control socket apart."""
    if not cfg.control_socket:
        cfg.control_socket = default_control_socket()
    cfg.control_socket = os.path.abspath(cfg.control_socket)
    if len(os.fsencode(cfg.control_socket)) > SUN_PATH_MAX:
        raise ConfigError(f"{cfg.control_socket!r} is longer than {SUN_PATH_MAX} bytes", "control-socket")
    names: dict[str, DeviceSpec] = {}
    sockets: dict[str, DeviceSpec] = {}
    for d in cfg.devices:
        if d.name in names:
            raise ConfigError(f"{d.name!r} is used by two devices ({names[d.name].origin} and {d.origin})",
                              "name", d.name)
        names[d.name] = d
        real = os.path.join(os.path.realpath(os.path.dirname(d.socket)), os.path.basename(d.socket))
        if real in sockets:
            raise ConfigError(f"{d.socket!r} is already the socket of device {sockets[real].name!r}",
                              "vhost", d.name)
        sockets[real] = d
        if real == os.path.join(os.path.realpath(os.path.dirname(cfg.control_socket)),
                                os.path.basename(cfg.control_socket)):
            raise ConfigError(f"{d.socket!r} is the control socket", "vhost", d.name)


def open_builders(cfg: SupervisorConfig) -> dict[str, Any]:
    """Open every device's resources in the parent (``Builder.from_options``).

    All or nothing: on the first error every builder opened so far is closed
    and a ``ConfigError`` naming the device and key is raised.
    """
    import devices
    from devices.base import ConfigError as DeviceConfigError

    builders: dict[str, Any] = {}
    checked: set[str] = set()
    if not cfg.disable_sandbox:
        import sandbox
    try:
        for d in cfg.devices:
            cls = devices.BUILDERS.get(d.type)
            if cls is None:
                raise ConfigError(f"{d.type!r} is not one of {', '.join(sorted(devices.BUILDERS))}", "type", d.name)
            try:
                builder = cls.from_options(d.name, dict(d.options))
            except DeviceConfigError as e:
                msg = str(e)
                if msg.startswith(f"{d.name}: "):
                    msg = msg[len(d.name) + 2:]
                raise ConfigError(msg, None, d.name) from None
            builders[d.name] = builder
            if not cfg.disable_sandbox:
                policy = os.path.join(cfg.jail.seccomp_policy_dir, builder.seccomp_policy)
                if not os.path.isfile(policy):
                    raise ConfigError(f"{policy!r} does not exist (policy {builder.seccomp_policy!r})",
                                      "seccomp-policy-dir", d.name)
                if policy not in checked:
                    checked.add(policy)
                    try:   # a policy that does not compile is a config error, not a crash loop
                        sandbox.compile_policy(policy)
                    except sandbox.PolicyError as e:
                        raise ConfigError(f"policy {policy}: {e}", "seccomp-policy-dir", d.name) from None
    except BaseException:
        for b in builders.values():
            try:
                b.close()
            except Exception:
                pass
        raise
    return builders


def build_config(*, config_file: str | None = None, block: list[str] | None = None,
                 serial: list[str] | None = None, rng: list[str] | None = None,
                 ordered_flags: list[tuple[str, str]] | None = None, jail: list[str] | None = None,
                 disable_sandbox: bool | None = None, control_socket: str | None = None,
                 log_format: str | None = None, grace_period: float | None = None) -> SupervisorConfig:
    """The whole configuration: file first, then command-line flags on top."""
    cfg = SupervisorConfig()
    if config_file:
        load_toml(config_file, cfg)
    if jail:
        apply_jail_flags(cfg, jail)
    if disable_sandbox:
        cfg.disable_sandbox = True
    if control_socket:
        cfg.control_socket = control_socket
    if log_format:
        if log_format not in ("text", "json"):
            raise ConfigError(f"{log_format!r} is not one of text, json", "log-format")
        cfg.log_format = log_format
    if grace_period is not None:
        _apply_supervisor_keys(cfg, {"grace-period": grace_period}, "--grace-period")
    flags = list(ordered_flags or [])
    if ordered_flags is None:
        flags = [("block", t) for t in block or []] + [("serial", t) for t in serial or []] + \
                [("rng", t) for t in rng or []]
    add_cli_devices(cfg, flags)
    validate(cfg)
    return cfg
