"""``vhost-supervisor``: run the supervisor, talk to it, and reach the other
packages' tools (policy, device, probe) under one command.

Exit status: 0 success, 1 runtime failure (e.g. no supervisor answers),
2 configuration or usage error (nothing was started).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from .config import ConfigError, build_config, default_control_socket

EXIT_CONFIG = 2
#: subcommands that are another package's command line
DELEGATED = {"device": "devices.standalone", "probe": "frontend.probe", "security-check": "securitycheck.cli",
             "demo": "supervisor.demo"}


class _DeviceFlag(argparse.Action):
    """Keeps ``--block/--serial/--rng`` in command-line order (names are ``TYPE-N``)."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = list(getattr(ns, "devices", None) or [])
        items.append((self.dest, values))
        ns.devices = items


def _add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--control-socket", metavar="PATH", default=None,
                   help=f"control socket (default {default_control_socket()})")


def _add_device_flags(run: argparse.ArgumentParser) -> None:
    """One repeatable flag per registered device type (its declared ``flag``:
    crosvm's ``--block``, ``--serial``, ``--rng``), with its keys listed."""
    import devices
    for t in devices.DEVICE_TYPES.values():
        required = "".join(f",{o.name}={o.metavar or o.name.upper()}" for o in t.options if o.required)
        keys = ", ".join(f"{o.name}=" for o in t.options if o.cli and not o.required)
        run.add_argument(f"--{t.flag}", dest=t.flag, action=_DeviceFlag,
                         metavar=f"vhost=PATH{required}[,...]",
                         help=f"{t.name}: {t.summary}" + (f" ({keys} ...)" if keys else "")
                         + "; repeatable")


def _device_flag_names() -> str:
    import devices
    return ", ".join(f"--{t.flag}" for t in devices.DEVICE_TYPES.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhost-supervisor",
                                     description="A sandboxed supervisor for vhost-user device back-ends.")
    from vhost_supervisor import version
    parser.add_argument("-V", "--version", action="version", version=f"vhost-supervisor {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="start the devices and supervise them",
                         description="Start one jailed child per device (crosvm's device syntax), restart "
                                     "them per policy, serve the control socket; stop on SIGTERM/SIGINT.")
    _add_device_flags(run)
    run.add_argument("--jail", action="append", default=[],
                     metavar="pivot-root=DIR,seccomp-policy-dir=DIR,seccomp-log-failures=BOOL")
    run.add_argument("--disable-sandbox", action="store_true", default=None,
                     help="fork children without a jail (development only)")
    run.add_argument("--config", metavar="FILE", help="TOML file: [supervisor], [jail], [[device]]")
    run.add_argument("--log-format", choices=("text", "json"), default=None)
    run.add_argument("--grace-period", type=float, default=None, metavar="SEC",
                     help="SIGKILL children this long after SIGTERM (default 5)")
    run.add_argument("--metrics-listen", metavar="PATH|HOST:PORT", default=None,
                     help="serve Prometheus metrics on a Unix socket or a loopback TCP address (default: off)")
    _add_control(run)

    add = sub.add_parser("add", help="add devices to a running supervisor (the syntax and checks of run)",
                         description="Start new devices without touching the others.")
    _add_device_flags(add)
    _add_control(add)
    rm = sub.add_parser("remove", help="stop a device and remove its socket",
                        description="Refused while a front-end is connected, unless --force.")
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="remove even with a front-end connected")
    _add_control(rm)
    rl = sub.add_parser("reload", help="re-read the --config file and apply the difference (as SIGHUP)",
                        description="Added devices start, removed ones stop, changed ones restart; unchanged "
                                    "devices keep their children and connections.  A config error changes nothing.")
    rl.add_argument("--force", action="store_true",
                    help="also remove or restart devices whose front-end is connected")
    rl.add_argument("--json", action="store_true")
    _add_control(rl)

    st = sub.add_parser("status", help="show every device's state")
    st.add_argument("--json", action="store_true")
    _add_control(st)
    for name, text in (("restart", "restart a device (clears the crash-loop breaker)"),
                       ("stop", "stop a device (its socket stays)"), ("start", "start a stopped device")):
        p = sub.add_parser(name, help=text)
        p.add_argument("name")
        _add_control(p)

    au = sub.add_parser("audit", help="read each device child's confinement back from /proc")
    au.add_argument("--json", action="store_true")
    _add_control(au)

    pol = sub.add_parser("policy", help="check or show a seccomp policy file")
    pol.add_argument("action", choices=("check", "show"))
    pol.add_argument("file")

    un = sub.add_parser("systemd-units", help="print the shipped systemd units (or install them)",
                        description="vhost-supervisor.service and vhost-supervisor@.socket (one per device), "
                                    "with ExecStart= pointing at this installation.")
    un.add_argument("--install", metavar="DIR", help="write the units into DIR (e.g. /etc/systemd/system)")
    un.add_argument("--bindir", metavar="DIR", help="directory of the vhost-supervisor command in ExecStart=")
    un.add_argument("--sysusers-dir", metavar="DIR", default="/etc/sysusers.d",
                    help="with --install: where the service user's sysusers.d entry goes (default %(default)s)")

    dev = sub.add_parser("device", help="run one device unjailed (crosvm device ...)", add_help=False)
    dev.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("demo", help="start a jailed supervisor with block, console and rng devices and drive them",
                   add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    pr = sub.add_parser("probe", help="connect to a vhost-user socket and describe the device", add_help=False)
    pr.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("security-check", help="attack a temporary supervisor on this host and report",
                   add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _err(msg: str) -> None:
    print(f"vhost-supervisor: {msg}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from . import logs
    from .config import open_builders
    from .supervision import Supervisor
    try:
        cfg = build_config(config_file=args.config, ordered_flags=list(getattr(args, "devices", None) or []),
                           jail=args.jail, disable_sandbox=args.disable_sandbox,
                           control_socket=args.control_socket, log_format=args.log_format,
                           grace_period=args.grace_period, metrics_listen=args.metrics_listen)
        if not cfg.devices:
            raise ConfigError(f"no devices configured (give {_device_flag_names()} or --config)")
        logs.setup_logging(cfg.log_format)
        builders = open_builders(cfg)
    except ConfigError as e:
        _err(f"config error: {e}")
        return EXIT_CONFIG
    import faulthandler
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2` dumps the stacks into the log
    try:
        return Supervisor(cfg, builders).run()
    except ConfigError as e:
        _err(f"config error: {e}")
        return EXIT_CONFIG


def _control(args: argparse.Namespace, req: dict[str, Any]) -> dict[str, Any] | None:
    from .control import ControlError, request
    path = args.control_socket or default_control_socket()
    try:
        reply = request(path, req)
    except ControlError as e:
        _err(str(e))
        return None
    if not reply.get("ok"):
        _err(reply.get("error", "request failed"))
        return None
    return reply


def cmd_status(args: argparse.Namespace) -> int:
    from .status import format_table
    reply = _control(args, {"cmd": "status"})
    if reply is None:
        return 1
    print(json.dumps(reply, indent=2) if args.json else format_table(reply))
    return 0


def cmd_device_action(args: argparse.Namespace) -> int:
    from .status import format_table
    reply = _control(args, {"cmd": args.command, "name": args.name})
    if reply is None:
        return 1
    d = reply.get("device") or {}
    print(format_table({"devices": [d]}) if d else "ok")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    """Checked here first (the same parser as ``run``: a typo exits 2 before
    the supervisor is asked), then by the supervisor against its devices."""
    import os

    from .config import SupervisorConfig, add_cli_devices
    from .status import format_table
    flags = list(getattr(args, "devices", None) or [])
    if not flags:
        _err(f"config error: give a device ({_device_flag_names()})")
        return EXIT_CONFIG
    import devices
    from .control import ControlError, request
    try:
        cfg = SupervisorConfig()
        add_cli_devices(cfg, flags)
        for spec in cfg.devices:   # the device's own keys, without opening anything
            devices.DEVICE_TYPES[spec.type].parse(spec.name, dict(spec.options))
    except ConfigError as e:
        _err(f"config error: {e}")
        return EXIT_CONFIG
    try:
        reply = request(args.control_socket or default_control_socket(),
                        {"cmd": "add", "devices": [list(f) for f in flags], "cwd": os.getcwd()})
    except ControlError as e:
        _err(str(e))
        return 1
    if not reply.get("ok"):
        error = str(reply.get("error", "request failed"))
        _err(error)
        return EXIT_CONFIG if error.startswith("config error") else 1
    print(format_table({"devices": reply.get("devices", [])}))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    reply = _control(args, {"cmd": "remove", "name": args.name, "force": bool(args.force)})
    if reply is None:
        return 1
    print(f"removed {reply.get('removed', args.name)}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from .control import ControlError, request
    path = args.control_socket or default_control_socket()
    try:
        reply = request(path, {"cmd": "reload", "force": bool(args.force)}, timeout=120.0)
    except ControlError as e:
        _err(str(e))
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply.get("summary"):
        print(reply["summary"].replace("; ", "\n"))
    if not reply.get("ok"):
        _err(reply.get("error", "reload failed"))
        return EXIT_CONFIG if str(reply.get("error", "")).startswith("config error") else 1
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import sandbox
    from sandbox.cli import format_audit
    reply = _control(args, {"cmd": "status"})
    if reply is None:
        return 1
    results: dict[str, Any] = {}
    for d in reply.get("devices", []):
        if not d.get("pid"):
            results[d["name"]] = None
            continue
        try:
            results[d["name"]] = sandbox.audit(d["pid"])
        except Exception as e:  # noqa: BLE001 - the child may exit between status and audit
            results[d["name"]] = {"error": f"{type(e).__name__}: {e}"}
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return 0
    for name, audit in results.items():
        print(f"== {name}")
        if audit is None:
            print("   (not running)")
        elif "error" in audit and len(audit) == 1:
            print(f"   {audit['error']}")
        else:
            print(format_audit(audit))
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    from sandbox import cli as scli
    return scli.policy_check(args.file) if args.action == "check" else scli.policy_show(args.file)


def cmd_systemd_units(args: argparse.Namespace) -> int:
    from . import units
    if args.install:
        try:
            for path in units.install(args.install, args.bindir, args.sysusers_dir):
                print(path)
        except OSError as e:
            _err(f"--install: {e}")
            return EXIT_CONFIG
        print(f"then: systemd-sysusers (creates user {units.SERVICE_USER}); chown {units.SERVICE_USER}: the images; "
              "systemctl daemon-reload; systemctl enable --now vhost-supervisor@NAME.socket ... "
              "vhost-supervisor.service", file=sys.stderr)
        return 0
    for name, text in units.render(args.bindir).items():
        print(f"# ---- {name}")
        print(text)
    print("# ---- sysusers.d/vhost-supervisor.conf")
    print(units.sysusers_entry())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # "device", "probe", "demo" and "security-check" hand everything after them to the other packages' CLIs.
    if argv and argv[0] in DELEGATED:
        import importlib
        tool = importlib.import_module(DELEGATED[argv[0]]).main
        try:
            return int(tool(argv[1:]) or 0)
        except SystemExit as e:  # their argparse: --help, usage errors
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_CONFIG)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_CONFIG
    if args.command == "run":
        return cmd_run(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command in ("restart", "stop", "start"):
        return cmd_device_action(args)
    if args.command == "audit":
        return cmd_audit(args)
    if args.command == "add":
        return cmd_add(args)
    if args.command == "remove":
        return cmd_remove(args)
    if args.command == "reload":
        return cmd_reload(args)
    if args.command == "policy":
        return cmd_policy(args)
    if args.command == "systemd-units":
        return cmd_systemd_units(args)
    parser.print_help()
    return EXIT_CONFIG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
