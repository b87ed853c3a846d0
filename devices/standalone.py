"""``vhost-supervisor device block|console|rng``: one device, no supervisor.

Follows the vhost-user spec's back-end program conventions: ``--socket-path``
or ``--fd`` (exclusive), ``--print-capabilities`` prints the JSON
capabilities and exits 0, no daemonizing, exit 0 when the front-end
disconnects, non-zero when initialisation fails, quick clean exit on
SIGTERM: status 0 in every state, also while waiting for the first
connection and in the last milliseconds after the front-end left.  The device is built through the same ``Builder.from_options`` the
supervisor uses, so the flags are only a different spelling of the options.

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

from connection.connection import VhostUserConnection, VhostUserListener, VhostUserStream
from connection.executor import Executor, wait_readable
from connection.handler import Backend

from . import BUILDERS
from .base import ConfigError

log = logging.getLogger("devices.standalone")

#: --print-capabilities "features" (vhost-user.json names where the spec has them).
CAPABILITIES = {
    "block": ["read-only", "blk-file"],
    "console": [],
    "rng": [],
}


def _bool_arg(value: str) -> str:
    v = value.strip().lower()
    if v not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a boolean")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhost-supervisor device",
                                description="Run one vhost-user device back-end without the supervisor.")
    sub = p.add_subparsers(dest="kind", required=True, metavar="{block,console,rng}")

    def common(sp: argparse.ArgumentParser) -> None:
        where = sp.add_mutually_exclusive_group()
        where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket path")
        where.add_argument("--fd", type=int, metavar="N",
                           help="serve an inherited socket fd (connected, or listening: one client accepted)")
        sp.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end's capabilities as JSON and exit")
        sp.add_argument("--name", help="device name in log lines (default: the device type)")
        sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    b = sub.add_parser("block", help="virtio-blk on a raw image file or block device")
    common(b)
    b.add_argument("--file", "--blk-file", dest="file", metavar="PATH", help="image file or block device")
    b.add_argument("--read-only", action="store_true", help="export read-only (VIRTIO_BLK_F_RO)")
    b.add_argument("--num-queues", type=int, default=1, metavar="N", help="request queues (1..16)")
    b.add_argument("--poll-us", type=int, default=None, metavar="US",
                   help="bound of the adaptive ring polling before sleeping (0..1000, default 200)")
    b.add_argument("--direct", action="store_true", help="open with O_DIRECT")
    b.add_argument("--sparse", type=_bool_arg, nargs="?", const="true", default="true", metavar="BOOL",
                   help="offer DISCARD and WRITE_ZEROES (default true)")
    b.add_argument("--no-sparse", dest="sparse", action="store_const", const="false")
    b.add_argument("--id", metavar="SERIAL", help="GET_ID answer (at most 20 bytes)")
    b.add_argument("--block-size", type=int, default=512, metavar="BYTES", help="logical block size")
    b.add_argument("--no-lock", action="store_true", help="do not take the advisory image lock")
    b.add_argument("--max-discard-segments", type=int, default=None, metavar="N",
                   help="ranges per DISCARD/WRITE_ZEROES request (1..256, default 1 as QEMU)")

    c = sub.add_parser("console", help="virtio-console, one port")
    common(c)
    c.add_argument("--type", default="sink", choices=("file", "stdout", "sink", "unix", "unix-stream"),
                   help="where guest output goes (default sink)")
    c.add_argument("--path", help="output file, or the Unix socket for type=unix/unix-stream")
    c.add_argument("--input", metavar="PATH", help="guest input from a file, FIFO or socket")
    c.add_argument("--stdin", action="store_true", help="guest input from stdin")
    c.add_argument("--input-unix-stream", action="store_true", help="with type=unix-stream: read input too")
    c.add_argument("--cols", type=int, help="config space columns")
    c.add_argument("--rows", type=int, help="config space rows")

    r = sub.add_parser("rng", help="virtio-rng from getrandom(2)")
    common(r)
    return p


def options_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The flags as the option dict ``Builder.from_options`` takes."""
    opts: dict[str, str] = {}
    if args.kind == "block":
        if args.file:
            opts["path"] = args.file
        opts["ro"] = str(args.read_only).lower()
        opts["num-queues"] = str(args.num_queues)
        if args.poll_us is not None:
            opts["poll-us"] = str(args.poll_us)
        opts["direct"] = str(args.direct).lower()
        opts["sparse"] = args.sparse
        opts["lock"] = str(not args.no_lock).lower()
        opts["block-size"] = str(args.block_size)
        if args.id is not None:
            opts["id"] = args.id
        if args.max_discard_segments is not None:
            opts["max-discard-segments"] = str(args.max_discard_segments)
    elif args.kind == "console":
        opts["type"] = args.type
        if args.path:
            opts["path"] = args.path
        if args.input:
            opts["input"] = args.input
        if args.stdin:
            opts["stdin"] = "true"
        if args.input_unix_stream:
            opts["input-unix-stream"] = "true"
        if args.cols is not None:
            opts["cols"] = str(args.cols)
        if args.rows is not None:
            opts["rows"] = str(args.rows)
    return opts


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
    if args.print_capabilities:
        print(json.dumps({"type": args.kind, "features": CAPABILITIES[args.kind]}))
        return 0
    if not args.socket_path and args.fd is None:
        print(f"vhost-supervisor device {args.kind}: one of --socket-path or --fd is required",
              file=sys.stderr)
        return 2
    if args.kind == "block" and not args.file:
        print("vhost-supervisor device block: --file PATH is required", file=sys.stderr)
        return 2
    name = args.name or args.kind
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format=f"device={name} %(levelname)s %(name)s: %(message)s")
    # Signals first: once the socket exists, a SIGTERM must find the handler.
    ex = Executor()
    stops = _StopSignals(ex)
    try:
        builder = BUILDERS[args.kind].from_options(name, options_from_args(args))
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
