"""``vhost-supervisor device TYPE``: one device, no supervisor.

Follows the vhost-user spec's back-end program conventions: ``--socket-path``
or ``--fd`` (exclusive), ``--print-capabilities`` prints the JSON
capabilities and exits 0, no daemonizing, exit 0 when the front-end
disconnects, non-zero when initialisation fails, quick clean exit on
SIGTERM.  The device is built through the same ``Builder.from_options`` the
supervisor uses, and the flags are made from the type's declared options
(``add_option_flags``), so they are only a different spelling of its keys.

Also runnable as ``python -m devices.standalone block ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from connection.connection import VhostUserConnection, VhostUserListener, VhostUserStream
from connection.executor import Executor

from . import DEVICE_TYPES
from .devtype import DeviceType
from .options import ConfigError, Option

log = logging.getLogger("devices.standalone")


def _flags(opt: Option) -> tuple[str, ...]:
    return opt.flags or (f"--{opt.name}",)


def _checked(opt: Option) -> Callable[[str], str]:
    """Validate a flag's value with the option's own parser (a bad one is
    a usage error, exit 2) and hand it on as the string the builder takes."""
    def check(value: str) -> str:
        try:
            opt.parse(value, key=_flags(opt)[0])
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(f"{value!r}: {exc.message}") from None
        return value
    check.__name__ = opt.type.__name__
    return check


def add_option_flags(sp: argparse.ArgumentParser, dtype: DeviceType) -> None:
    """One flag per declared option (its ``flags``, default ``--NAME``); a
    boolean takes an optional value (``--sparse``, ``--sparse=false``) and
    has a ``--no-`` form.  Unset flags are left out, so the declaration's
    default applies exactly as for the supervisor."""
    for opt in dtype.options:
        if not opt.cli:
            continue
        flags = _flags(opt)
        if opt.type is bool:
            sp.add_argument(*flags, dest=opt.name, type=_checked(opt), nargs="?", const="true",
                            default=None, metavar="BOOL", help=opt.describe())
            sp.add_argument(f"--no-{flags[0][2:]}", dest=opt.name, action="store_const", const="false",
                            help=f"same as {flags[0]}=false")
        else:
            sp.add_argument(*flags, dest=opt.name, type=_checked(opt), default=None,
                            metavar=opt.metavar or opt.name.upper(),
                            help=opt.describe())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhost-supervisor device",
                                description="Run one vhost-user device back-end without the supervisor.")
    sub = p.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(DEVICE_TYPES) + "}")
    for dtype in DEVICE_TYPES.values():
        sp = sub.add_parser(dtype.name, help=dtype.summary)
        where = sp.add_mutually_exclusive_group()
        where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket path")
        where.add_argument("--fd", type=int, metavar="N",
                           help="serve an inherited socket fd (connected, or listening: one client accepted)")
        sp.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end's capabilities as JSON and exit")
        sp.add_argument("--name", help="device name in log lines (default: the device type)")
        sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
        add_option_flags(sp, dtype)
    return p


def options_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The flags as the option dict ``Builder.from_options`` takes: the
    options given, under their declared names."""
    dtype = DEVICE_TYPES[args.kind]
    return {opt.name: getattr(args, opt.name) for opt in dtype.options
            if opt.cli and getattr(args, opt.name) is not None}


def _connection(args: argparse.Namespace) -> VhostUserConnection:
    if args.socket_path:
        return VhostUserListener(args.socket_path)
    sock = socket.socket(fileno=args.fd)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        try:  # a listening socket (socket activation): serve its first client
            conn, _ = sock.accept()
        finally:
            sock.close()
        return VhostUserStream(conn)
    return VhostUserStream(sock)


def _install_signals(ex: Executor) -> None:
    """SIGTERM/SIGINT cancel every task: the connection's clean-up runs
    (queues stopped, socket closed) and ``run_device`` returns.  A plain
    handler that only queues a callback works whether or not the loop is
    running yet (a signal can arrive between bind and the loop's start).
    A second signal exits at once."""
    loop = ex.loop
    received: list[int] = []

    def stop() -> None:
        for task in asyncio.all_tasks(loop):
            task.cancel()

    def handler(signum: int, frame: object) -> None:
        if received:
            os._exit(0)
        received.append(signum)
        log.info("%s received; exiting", signal.Signals(signum).name)
        loop.call_soon_threadsafe(stop)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the device named by ``argv[0]``; returns the exit status."""
    args = _parser().parse_args(argv)
    dtype = DEVICE_TYPES[args.kind]
    if args.print_capabilities:
        print(json.dumps(dtype.capabilities_json()))
        return 0
    if not args.socket_path and args.fd is None:
        print(f"vhost-supervisor device {args.kind}: one of --socket-path or --fd is required",
              file=sys.stderr)
        return 2
    for opt in dtype.options:
        if opt.required and opt.cli and not getattr(args, opt.name):
            print(f"vhost-supervisor device {args.kind}: {_flags(opt)[0]} {opt.metavar or 'VALUE'} is required",
                  file=sys.stderr)
            return 2
    name = args.name or args.kind
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format=f"device={name} %(levelname)s %(name)s: %(message)s")
    # Signals first: once the socket exists, a SIGTERM must find the handler.
    ex = Executor()
    _install_signals(ex)
    try:
        builder = dtype.builder.from_options(name, options_from_args(args))
    except ConfigError as exc:
        print(f"vhost-supervisor device {args.kind}: {exc}", file=sys.stderr)
        ex.close()
        return 1
    try:
        conn = _connection(args)
    except OSError as exc:
        print(f"vhost-supervisor device {args.kind}: cannot set up the socket: {exc}", file=sys.stderr)
        builder.close()
        ex.close()
        return 1
    resources = conn.take_parent_process_resources()
    status = 0
    try:
        conn.run_device(ex, builder)
    except asyncio.CancelledError:
        pass  # SIGTERM/SIGINT
    except Exception as exc:  # noqa: BLE001 - report and exit non-zero
        log.error("device failed: %s: %s", type(exc).__name__, exc)
        status = 1
    finally:
        ex.close()
        close = getattr(conn, "close", None)
        if close is not None:
            close()
        if resources is not None:
            resources.close()
        builder.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
