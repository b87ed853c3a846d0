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

import devices
# The project's one configuration error and boolean parser (devices/options.py).
from devices import ConfigError, parse_bool

RESTART_POLICIES = ("always", "on-failure", "never")
# --- containment options (issue 9): kept together so they merge apart from the rest ---
#: Per device: seconds a child may go without answering its heartbeat, and
#: what a crash loop does (``backoff``: keep retrying, doubling up to 5 min;
#: ``fail``: stay failed until an operator acts).
CONTAINMENT_DEVICE_KEYS = ("watchdog-sec", "crash-loop")
CRASH_LOOP_POLICIES = ("backoff", "fail")
DEFAULT_WATCHDOG_SEC = 5.0
#: [supervisor]: host uids/gids handed to device children, one per device.
CONTAINMENT_SUPERVISOR_KEYS = ("uid-range",)
#: 0x70000000 + 64 Ki: above systemd's container range (524288..1879048191),
#: below 2^31 (ids tools mistake for negative); checked unused at start.
DEFAULT_UID_RANGE = (1879048192, 65536)


def parse_uid_range(value: Any) -> tuple[int, int]:
    """``START-END`` (inclusive) -> (start, count)."""
    text = str(value).strip()
    a, sep, b = text.partition("-")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit():
        raise ConfigError("not START-END (e.g. 1879048192-1879113727)", "uid-range", value=text)
    start, end = int(a), int(b)
    if not 0 < start <= end < 2**32 - 1:
        raise ConfigError("need 0 < START <= END < 4294967295", "uid-range", value=text)
    if start < 1000:
        raise ConfigError("starts among the system ids (< 1000)", "uid-range", value=text)
    return start, end - start + 1


def _containment_device_keys(opts: dict[str, Any], name: str) -> dict[str, Any]:
    """Pop ``watchdog-sec`` and ``crash-loop`` from a device's options."""
    out: dict[str, Any] = {}
    if "watchdog-sec" in opts:
        raw = opts.pop("watchdog-sec")
        try:
            sec = float(raw)
        except (TypeError, ValueError):
            raise ConfigError("not a number of seconds", "watchdog-sec", name, raw) from None
        if not (sec == 0 or 0.2 <= sec <= 3600):
            raise ConfigError("out of range (0 = off, or 0.2..3600)", "watchdog-sec", name, raw)
        out["watchdog_sec"] = sec
    if "crash-loop" in opts:
        raw = str(opts.pop("crash-loop"))
        if raw not in CRASH_LOOP_POLICIES:
            raise ConfigError(f"not one of {', '.join(CRASH_LOOP_POLICIES)}", "crash-loop", name, raw)
        out["crash_loop"] = raw
    return out
# --- end of containment options ---

#: Keys the supervisor consumes; every other key is the device's (checked by its builder).
#: cgroup v2 budget keys per device (supervisor.cgroups; applied where the supervisor runs in a delegated subtree).
BUDGET_DEVICE_KEYS = ("memory-max", "memory-swap-max", "pids-max", "cpu-weight")
SUPERVISOR_DEVICE_KEYS = ("vhost", "name", "restart", "jail-user") + CONTAINMENT_DEVICE_KEYS + BUDGET_DEVICE_KEYS
JAIL_KEYS = ("pivot-root", "seccomp-policy-dir", "seccomp-log-failures")
#: [supervisor] keys of the live life cycle (issue 12): where metrics are served.
LIFECYCLE_SUPERVISOR_KEYS = ("metrics-listen",)
SUPERVISOR_KEYS = ("control-socket", "disable-sandbox", "log-format", "grace-period") + JAIL_KEYS + \
    CONTAINMENT_SUPERVISOR_KEYS + LIFECYCLE_SUPERVISOR_KEYS
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUN_PATH_MAX = 107
#: Largest uid/gid a jail can switch to ((uid_t)-1 means "unchanged" to setresuid).
MAX_ID = 0xFFFF_FFFE
DEFAULT_GRACE = 5.0


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
    type: str                      # a name in devices.DEVICE_TYPES
    socket: str                    # absolute path of the vhost-user socket
    options: dict[str, str]        # device keys, handed to Builder.from_options
    restart: str = "always"
    jail_user: tuple[int, int] | None = None   # None: one allocated from uid-range
    origin: str = ""               # "--block #1" or "FILE device #2", for messages
    watchdog_sec: float = DEFAULT_WATCHDOG_SEC  # 0: no heartbeat
    crash_loop: str = "backoff"
    budget: dict[str, str] = field(default_factory=dict)   # cgroup file -> value (supervisor.cgroups)


@dataclass
class SupervisorConfig:
    devices: list[DeviceSpec] = field(default_factory=list)
    control_socket: str = ""
    disable_sandbox: bool = False
    jail: JailOptions = field(default_factory=JailOptions)
    log_format: str = "text"
    grace_period: float = DEFAULT_GRACE
    uid_range: tuple[int, int] | None = None   # (start, count); None: a free slice of DEFAULT_UID_RANGE
    metrics_listen: str | None = None     # a Unix socket path or a loopback HOST:PORT (off: None)
    #: How this configuration was built (``build_config``'s arguments), so
    #: ``reload`` can build it again from the same file and flags.
    source: dict[str, Any] = field(default_factory=dict)


def default_policy_dir() -> Path:
    """The seccomp policies shipped with the package (``sandbox.data``)."""
    from sandbox.data import policy_dir
    return Path(policy_dir())


def default_control_socket() -> str:
    """``control.sock`` in systemd's ``$RUNTIME_DIRECTORY`` (the shipped unit runs
    as a service user: /run/vhost-supervisor), in /run/vhost-supervisor for root
    (the operator's shell), else under ``$XDG_RUNTIME_DIR``."""
    runtime_directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime_directory:
        return os.path.join(runtime_directory, "control.sock")
    if os.geteuid() == 0:
        return "/run/vhost-supervisor/control.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vhost-supervisor-{os.getuid()}"
    return os.path.join(runtime, "vhost-supervisor", "control.sock")


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
    if "\0" in text:
        raise ConfigError("contains a NUL byte", "jail-user", device, text)
    user, _, group = text.partition(":")
    try:
        if _is_id(user):
            uid = int(user)
            gid = uid
        else:
            pw = pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
        if group:
            gid = int(group) if _is_id(group) else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError("no such user or group", "jail-user", device, text) from None
    if uid == 0 or gid == 0:
        raise ConfigError("a device child must not run as root", "jail-user", device, text)
    if uid > MAX_ID or gid > MAX_ID:
        raise ConfigError(f"uid/gid outside 1..{MAX_ID}", "jail-user", device, text)
    return uid, gid


def _is_id(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


def _stringify(key: str, value: Any, device: str | None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigError("must be a string, number or boolean", key, device, value)


def _check_socket_path(path: str, key: str, device: str | None) -> str:
    if not path:
        raise ConfigError("is required (the vhost-user socket path)", key, device)
    if "\0" in path:
        raise ConfigError("contains a NUL byte", key, device, path)
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"longer than {SUN_PATH_MAX} bytes (sun_path)", key, device, path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"directory {parent!r} does not exist", key, device, path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError("exists and is not a socket (refusing to replace it)", key, device, path)
    return path


def _device_from_options(dtype: str, opts: dict[str, Any], origin: str, index: int) -> DeviceSpec:
    name = str(opts.pop("name", "") or f"{dtype}-{index}")
    if not NAME_RE.match(name):
        raise ConfigError("not a valid name ([A-Za-z0-9_.-], at most 64)", "name", origin, name)
    restart = str(opts.pop("restart", "always"))
    if restart not in RESTART_POLICIES:
        raise ConfigError(f"not one of {', '.join(RESTART_POLICIES)}", "restart", name, restart)
    jail_user = parse_jail_user(opts.pop("jail-user"), name) if "jail-user" in opts else None
    containment = _containment_device_keys(opts, name)
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
                      jail_user=jail_user, origin=origin, budget=budget, **containment)


def _apply_supervisor_keys(cfg: SupervisorConfig, table: dict[str, Any], where: str) -> None:
    for key, value in table.items():
        if key == "jail":  # jail = {pivot-root = "..."} or jail = "pivot-root=...,..." (as --jail)
            items = value.items() if isinstance(value, dict) else parse_keyvalues(str(value), "jail").items()
            for k, v in items:
                _apply_jail_key(cfg.jail, k, v)
            continue
        if key not in SUPERVISOR_KEYS:
            raise ConfigError(f"unknown key in {where} (known: {', '.join(SUPERVISOR_KEYS)})", key, value=value)
        if key == "control-socket":
            cfg.control_socket = str(value)
        elif key == "disable-sandbox":
            cfg.disable_sandbox = parse_bool(value, key)
        elif key == "log-format":
            if value not in ("text", "json"):
                raise ConfigError("not one of text, json", key, value=value)
            cfg.log_format = str(value)
        elif key == "uid-range":
            cfg.uid_range = parse_uid_range(value)
        elif key == "metrics-listen":
            from .prometheus import parse_listen
            cfg.metrics_listen = parse_listen(value).text
        elif key == "grace-period":
            try:
                cfg.grace_period = float(value)
            except (TypeError, ValueError):
                raise ConfigError("not a number of seconds", key, value=value) from None
            if not 0 <= cfg.grace_period <= 3600:
                raise ConfigError("out of range 0..3600", key, value=value)
        else:
            _apply_jail_key(cfg.jail, key, value)


def _apply_jail_key(jail: JailOptions, key: str, value: Any) -> None:
    if key == "pivot-root":
        path = str(value)
        if not os.path.isdir(path):
            raise ConfigError("not a directory", key, value=path)
        jail.pivot_root = os.path.abspath(path)
    elif key == "seccomp-policy-dir":
        path = str(value)
        if not os.path.isdir(path):
            raise ConfigError("not a directory", key, value=path)
        jail.seccomp_policy_dir = os.path.abspath(path)
    elif key == "seccomp-log-failures":
        jail.seccomp_log_failures = parse_bool(value, key)
    else:
        raise ConfigError(f"unknown --jail key (known: {', '.join(JAIL_KEYS)})", key, value=value)


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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})",
                          "--config") from None
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
    entries = data.get("device", [])
    if not isinstance(entries, list):
        raise ConfigError("must be an array of tables ([[device]])", "device")
    counters: dict[str, int] = {}
    for i, entry in enumerate(entries, 1):
        origin = f"{os.path.basename(path)} device #{i}"
        if not isinstance(entry, dict):
            raise ConfigError("must be a table", "device", origin)
        opts = dict(entry)
        dtype_raw = opts.pop("type", None)
        known = ", ".join(devices.type_names())
        if dtype_raw is None:
            raise ConfigError(f"is required (one of {known})", "type", str(opts.get("name") or origin))
        found = devices.lookup(str(dtype_raw))
        if found is None:
            raise ConfigError(f"not one of {known}", "type", str(opts.get("name") or origin), dtype_raw)
        dtype = found.name
        idx = counters.get(dtype, 0)
        counters[dtype] = idx + 1
        cfg.devices.append(_device_from_options(dtype, opts, origin, idx))
    return cfg


def add_cli_devices(cfg: SupervisorConfig, flags: list[tuple[str, str]]) -> None:
    """``[("block", "vhost=..,path=..."), ("serial", ...)]`` in command-line order;
    a flag is a device type's ``flag`` (``devices.by_flag``)."""
    counters: dict[str, int] = {}
    for d in cfg.devices:
        counters[d.type] = counters.get(d.type, 0) + 1
    per_flag: dict[str, int] = {}
    for flag, text in flags:
        dtype = devices.by_flag(flag).name
        per_flag[flag] = per_flag.get(flag, 0) + 1
        origin = f"--{flag} #{per_flag[flag]}"
        try:
            opts: dict[str, Any] = parse_keyvalues(text, f"--{flag}")
        except ConfigError as e:
            raise ConfigError(e.message, e.key, origin, e.value) from None
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
    if "\0" in cfg.control_socket:
        raise ConfigError("contains a NUL byte", "control-socket", value=cfg.control_socket)
    cfg.control_socket = os.path.abspath(cfg.control_socket)
    if len(os.fsencode(cfg.control_socket)) > SUN_PATH_MAX:
        raise ConfigError(f"longer than {SUN_PATH_MAX} bytes (sun_path)", "control-socket",
                          value=cfg.control_socket)
    names: dict[str, DeviceSpec] = {}
    sockets: dict[str, DeviceSpec] = {}
    for d in cfg.devices:
        if d.name in names:
            raise ConfigError(f"{d.name!r} is used by two devices ({names[d.name].origin} and {d.origin})",
                              "name", d.name)
        names[d.name] = d
        real = os.path.join(os.path.realpath(os.path.dirname(d.socket)), os.path.basename(d.socket))
        if real in sockets:
            raise ConfigError(f"already the socket of device {sockets[real].name!r}", "vhost", d.name,
                              d.socket)
        sockets[real] = d
        if real == os.path.join(os.path.realpath(os.path.dirname(cfg.control_socket)),
                                os.path.basename(cfg.control_socket)):
            raise ConfigError("is the control socket", "vhost", d.name, d.socket)


def open_builders(cfg: SupervisorConfig) -> dict[str, Any]:
    """Open every device's resources in the parent (``Builder.from_options``).

    All or nothing: on the first error every builder opened so far is closed
    and a ``ConfigError`` naming the device and key is raised.
    """
    builders: dict[str, Any] = {}
    checked: set[str] = set()
    if not cfg.disable_sandbox:
        import sandbox
    try:
        for d in cfg.devices:
            dtype = devices.DEVICE_TYPES.get(d.type)
            if dtype is None:
                raise ConfigError(f"not one of {', '.join(devices.DEVICE_TYPES)}", "type", d.name, d.type)
            builders[d.name] = dtype.builder.from_options(d.name, dict(d.options))
            if not cfg.disable_sandbox:
                policy = os.path.join(cfg.jail.seccomp_policy_dir, dtype.seccomp_policy)
                if not os.path.isfile(policy):
                    raise ConfigError(f"{policy!r} does not exist (policy {dtype.seccomp_policy!r})",
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


def build_config(*, config_file: str | None = None,
                 ordered_flags: list[tuple[str, str]] | None = None, jail: list[str] | None = None,
                 disable_sandbox: bool | None = None, control_socket: str | None = None,
                 log_format: str | None = None, grace_period: float | None = None,
                 metrics_listen: str | None = None) -> SupervisorConfig:
    """The whole configuration: file first, then command-line flags on top."""
    cfg = SupervisorConfig()
    if config_file:
        config_file = os.path.abspath(config_file)
    cfg.source = {"config_file": config_file, "ordered_flags": list(ordered_flags or []), "jail": list(jail or []),
                  "disable_sandbox": disable_sandbox, "control_socket": control_socket, "log_format": log_format,
                  "grace_period": grace_period, "metrics_listen": metrics_listen}
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
            raise ConfigError("not one of text, json", "log-format", value=log_format)
        cfg.log_format = log_format
    if grace_period is not None:
        _apply_supervisor_keys(cfg, {"grace-period": grace_period}, "--grace-period")
    if metrics_listen:
        _apply_supervisor_keys(cfg, {"metrics-listen": metrics_listen}, "--metrics-listen")
    add_cli_devices(cfg, list(ordered_flags or []))
    validate(cfg)
    return cfg
