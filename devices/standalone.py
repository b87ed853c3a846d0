"""``vhost-supervisor device TYPE``: one device, no supervisor.

Follows the vhost-user spec's back-end program conventions: ``--socket-path``
or ``--fd`` (exclusive), ``--print-capabilities`` prints the JSON
capabilities and exits 0, no daemonizing, exit 0 when the front-end
disconnects, non-zero when initialisation fails, quick clean exit on
SIGTERM: status 0 in every state, also while waiting for the first
connection and in the last milliseconds after the front-end left.  The device
is built through the same ``Builder.from_options`` the supervisor uses, and the
flags are made from the type's declared options (``add_option_flags``), so they
are only a different spelling of its keys.

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
from connection.executor import Executor, wait_readable
from connection.handler import Backend

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


class ListeningFd(VhostUserConnection):
    """An inherited listening socket (socket activation, QEMU's test
    harness): its first front-end is accepted inside the event loop, so a
    SIGTERM while waiting cancels the wait like any other (a blocking
    accept() would only run the handler and go back to waiting).  The
    listening socket is closed once a front-end is accepted."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    async def run_req_handler(self, handler: Backend, ex: Executor) -> None:
        if self._sock is None:
            raise ValueError("listening fd already served")
        sock = self._sock
        sock.setblocking(False)
        while True:
            try:
                conn, _ = sock.accept()
                break
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                pass
            await wait_readable(ex.loop, sock.fileno())
        self.close()
        await VhostUserStream(conn).run_req_handler(handler, ex)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _connection(args: argparse.Namespace) -> VhostUserConnection:
    if args.socket_path:
        return VhostUserListener(args.socket_path)
    sock = socket.socket(fileno=args.fd)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return ListeningFd(sock)
    return VhostUserStream(sock)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopSignals:
    """SIGTERM/SIGINT cancel every task: the connection's clean-up runs
    (queues stopped, socket closed) and ``run_device`` returns, status 0.

    The handler only records the signal and queues a callback, which works
    whether the loop is not running yet (a signal between bind and the
    loop's start), running, or already closed (the device is exiting by
    itself after the front-end left: nothing left to stop).  It logs
    nothing itself: a signal that lands inside a write to stderr would make
    the handler's own write a reentrant call.  A second signal exits at
    once.  ``exiting()`` then ignores both signals for the rest of the
    process: Python's finalization would otherwise restore their default
    action, and a SIGTERM in the last milliseconds would turn exit 0 into
    death by signal (143)."""

    def __init__(self, ex: Executor) -> None:
        self.loop = ex.loop
        self.received: int | None = None
        self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        # A launcher may start us with them blocked (devices.qsd_shim does,
        # so that none is lost before this point); pending ones arrive now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _stop(self) -> None:
        if self.received is not None:
            log.info("%s received; exiting", signal.Signals(self.received).name)
        for task in asyncio.all_tasks(self.loop):
            task.cancel()

    def _handler(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(0)
        self.received = signum
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self._stop)
        except RuntimeError:  # closed meanwhile: nothing left to stop
            pass

    def exiting(self) -> None:
        """The program is exiting on its own: ignore further stop signals."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        """Back to the dispositions found at start (error paths before
        serving, which in-process callers such as tests also take)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


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
    stops = _StopSignals(ex)
    try:
        builder = dtype.builder.from_options(name, options_from_args(args))
    except ConfigError as exc:
        print(f"vhost-supervisor device {args.kind}: {exc}", file=sys.stderr)
        ex.close()
        stops.restore()
        return 1
    try:
        conn = _connection(args)
    except OSError as exc:
        print(f"vhost-supervisor device {args.kind}: cannot set up the socket: {exc}", file=sys.stderr)
        builder.close()
        ex.close()
        stops.restore()
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
        try:
            ex.close()
        except asyncio.CancelledError:  # a stop signal while the clean-up ran the loop
            ex.close()
        close = getattr(conn, "close", None)
        if close is not None:
            close()
        if resources is not None:
            resources.close()
        builder.close()
        stops.exiting()
    return status


if __name__ == "__main__":
    sys.exit(main())
