"""qemu-storage-daemon's command line, served by our standalone block device.

QEMU-style test harnesses (QEMU's own tests/qtest/vhost-user-blk-test.c,
which finds its back-end through ``QTEST_QEMU_STORAGE_DAEMON_BINARY``) start
their vhost-user-blk back-end as::

    qemu-storage-daemon \\
        --blockdev driver=file,node-name=disk0,filename=IMG \\
        --export type=vhost-user-blk,id=disk0,addr.type=fd,addr.str=FD,\\
                 node-name=disk0,writable=on,num-queues=N [--blockdev ... --export ...]

This shim maps each export onto ``vhost-supervisor device block --fd FD
--file IMG --num-queues N`` (or ``--socket-path`` for ``addr.type=unix``),
one device process per export, so such a harness runs unmodified against
us.  Anything it cannot map faithfully is refused with an error naming the
option and value, never silently dropped; ``iothread`` is accepted and has
no effect (each of our devices is its own process with its own loop).

Process model: the shim forks one child per export, each running
``devices.standalone.main``; the shim waits for them and forwards SIGTERM /
SIGINT.  Its exit status is 0 when every device exited 0, which includes a
SIGTERM in any state, as a harness expects of qemu-storage-daemon.  The stop
signals are blocked from the first instruction on (and waited for with
sigwaitinfo), so none is lost or turned into death by signal while starting
or exiting; each device unblocks them once its handler is installed.

Entry points: ``python -m devices.qsd_shim``, the console script
``vhost-supervisor-qsd-shim`` and the executable ``conformance/qsd-shim``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass

import prctl

from . import standalone

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WAITED = {*STOP_SIGNALS, signal.SIGCHLD}

#: ``VHOST_SUPERVISOR_SHIM_LOG_LEVEL``: the devices' log level (default
#: warning: qemu-storage-daemon is silent when all goes well).
LOG_LEVEL_ENV = "VHOST_SUPERVISOR_SHIM_LOG_LEVEL"

_ON = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


class ShimError(ValueError):
    """A command line the shim cannot serve faithfully (names option and value)."""


# --------------------------------------------------------------------------
# QEMU's option syntax

def parse_keyval(text: str, implied_key: str) -> dict[str, str]:
    """``key=value,key=value`` with ``,,`` for a literal comma and an implied
    first key (QEMU's keyval), or a JSON object; values as strings."""
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ShimError(f"{text!r} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ShimError(f"{text!r} is not a JSON object")
        return {k: v for k, v in _flatten(obj, "")}
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    out: dict[str, str] = {}
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if n != 0:
                raise ShimError(f"{text!r}: {item!r} has no '=' (only the first item may imply {implied_key}=)")
            key, value = implied_key, item
        if not key:
            raise ShimError(f"{text!r}: empty key in {item!r}")
        if key in out:
            raise ShimError(f"{text!r}: {key} given twice")
        out[key] = value
    return out


def _flatten(obj: dict, prefix: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in obj.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, bool):
            out.append((f"{prefix}{k}", "on" if v else "off"))
        else:
            out.append((f"{prefix}{k}", str(v)))
    return out


def _bool(where: str, key: str, value: str) -> bool:
    try:
        return _ON[value.lower()]
    except KeyError:
        raise ShimError(f"{where}: {key}={value!r} is not on/off") from None


# --------------------------------------------------------------------------
# The command line

@dataclass
class Blockdev:
    node_name: str
    filename: str
    read_only: bool = False
    direct: bool = False
    lock: bool = True


@dataclass
class Export:
    id: str
    blockdev: Blockdev
    fd: int | None = None
    socket_path: str | None = None
    writable: bool = False
    num_queues: int | None = None
    block_size: int | None = None

    def device_argv(self, log_level: str) -> list[str]:
        """``vhost-supervisor device`` arguments for this export."""
        argv = ["block", "--name", self.id, "--log-level", log_level, "--file", self.blockdev.filename]
        argv += ["--fd", str(self.fd)] if self.fd is not None else ["--socket-path", str(self.socket_path)]
        if not self.writable or self.blockdev.read_only:
            argv.append("--read-only")
        if self.num_queues is not None:
            argv += ["--num-queues", str(self.num_queues)]
        if self.block_size is not None:
            argv += ["--block-size", str(self.block_size)]
        if self.blockdev.direct:
            argv.append("--direct")
        if not self.blockdev.lock:
            argv.append("--no-lock")
        return argv


def _blockdev(opts: dict[str, str]) -> Blockdev:
    where = f"--blockdev {opts.get('node-name', '?')}"
    driver = opts.pop("driver", None)
    if driver not in ("file", "host_device"):
        raise ShimError(f"{where}: driver={driver!r} is not supported (file, host_device)")
    try:
        bd = Blockdev(node_name=opts.pop("node-name"), filename=opts.pop("filename"))
    except KeyError as exc:
        raise ShimError(f"{where}: {exc.args[0]}= is required") from None
    if "read-only" in opts:
        bd.read_only = _bool(where, "read-only", opts.pop("read-only"))
    if "cache.direct" in opts:
        bd.direct = _bool(where, "cache.direct", opts.pop("cache.direct"))
    if "locking" in opts:
        value = opts.pop("locking")
        if value not in ("on", "off", "auto"):
            raise ShimError(f"{where}: locking={value!r} is not on/off/auto")
        bd.lock = value != "off"
    _no_more(where, opts)
    return bd


def _export(opts: dict[str, str], blockdevs: dict[str, Blockdev]) -> Export:
    where = f"--export {opts.get('id', '?')}"
    etype = opts.pop("type", None)
    if etype != "vhost-user-blk":
        raise ShimError(f"{where}: type={etype!r} is not supported (vhost-user-blk)")
    try:
        ident, node = opts.pop("id"), opts.pop("node-name")
    except KeyError as exc:
        raise ShimError(f"{where}: {exc.args[0]}= is required") from None
    if node not in blockdevs:
        raise ShimError(f"{where}: node-name={node!r} names no --blockdev")
    ex = Export(id=ident, blockdev=blockdevs[node])
    addr = opts.pop("addr.type", None)
    if addr == "fd":
        value = opts.pop("addr.str", "")
        if not value.isdigit():
            raise ShimError(f"{where}: addr.str={value!r} is not a file descriptor number")
        ex.fd = int(value)
    elif addr == "unix":
        ex.socket_path = opts.pop("addr.path", None)
        if not ex.socket_path:
            raise ShimError(f"{where}: addr.type=unix needs addr.path=")
    else:
        raise ShimError(f"{where}: addr.type={addr!r} is not supported (fd, unix)")
    if "writable" in opts:
        ex.writable = _bool(where, "writable", opts.pop("writable"))
    for key, attr in (("num-queues", "num_queues"), ("logical-block-size", "block_size")):
        if key in opts:
            value = opts.pop(key)
            if not value.isdigit():
                raise ShimError(f"{where}: {key}={value!r} is not a number")
            setattr(ex, attr, int(value))   # the device checks the range
    opts.pop("iothread", None)   # no effect: every device has its own process and loop
    _no_more(where, opts)
    return ex


def _no_more(where: str, opts: dict[str, str]) -> None:
    if opts:
        key, value = next(iter(opts.items()))
        raise ShimError(f"{where}: option {key}={value!r} is not supported by the shim")


def parse_command_line(argv: list[str]) -> list[Export]:
    """The exports of a qemu-storage-daemon command line, in order."""
    blockdevs: dict[str, Blockdev] = {}
    exports: list[Export] = []
    ids: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if not name.startswith("--"):
            raise ShimError(f"unexpected argument {arg!r}")
        if not eq:
            if i + 1 >= len(argv):
                raise ShimError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "--blockdev":
            bd = _blockdev(parse_keyval(value, "driver"))
            if bd.node_name in blockdevs:
                raise ShimError(f"--blockdev: node-name={bd.node_name!r} given twice")
            blockdevs[bd.node_name] = bd
        elif name == "--export":
            ex = _export(parse_keyval(value, "type"), blockdevs)
            if ex.id in ids:
                raise ShimError(f"--export: id={ex.id!r} given twice")
            ids.add(ex.id)
            exports.append(ex)
        elif name == "--object":
            obj = parse_keyval(value, "qom-type")
            if obj.get("qom-type") != "iothread":
                raise ShimError(f"--object qom-type={obj.get('qom-type')!r} is not supported (iothread)")
        else:
            raise ShimError(f"option {name}={value!r} is not supported by the shim")
    if not exports:
        raise ShimError("no --export given")
    return exports


# --------------------------------------------------------------------------
# Running

def _run_device(argv: list[str], close_fds: list[int], shim: int) -> int:
    """In the forked child: one device, as ``vhost-supervisor device``.
    It gets SIGTERM if the shim dies (even by SIGKILL), so the exports end
    together as qemu-storage-daemon's, never left orphaned in accept()."""
    prctl.set_pdeathsig(signal.SIGTERM)
    if os.getppid() != shim:   # the shim died before that
        return 0
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    for fd in set(close_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        return standalone.main(argv)
    except SystemExit as exc:  # its argparse
        return exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the shim
        print(f"vhost-supervisor-qsd-shim: device failed: {exc!r}", file=sys.stderr)
        return 1


def _status(exitcode: int) -> int:
    """waitstatus_to_exitcode() as a shell reports it (signal N -> 128+N)."""
    return 128 - exitcode if exitcode < 0 else exitcode


def serve(exports: list[Export], log_level: str) -> int:
    """Fork one device per export; wait, forwarding stop signals.  Returns
    0 if all exited 0, else the first failure's status.  A device that
    fails stops the others (qemu-storage-daemon is one process)."""
    children: dict[int, Export] = {}
    export_fds = [e.fd for e in exports if e.fd is not None]
    shim = os.getpid()
    for export in exports:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                others = [fd for fd in export_fds if fd != export.fd]
                status = _run_device(export.device_argv(log_level), others, shim)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        children[pid] = export
    for fd in set(export_fds):   # each child has its own; a closed one must not linger here
        try:
            os.close(fd)
        except OSError:
            pass
    failure = 0
    while children:
        info = signal.sigwaitinfo(_WAITED)
        if info.si_signo in STOP_SIGNALS:
            _signal_all(children, info.si_signo)
            continue
        while children:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            export = children.pop(pid, None)
            status = _status(os.waitstatus_to_exitcode(wstatus))
            if status and not failure:
                name = export.id if export else pid
                print(f"vhost-supervisor-qsd-shim: export {name} exited with status {status}",
                      file=sys.stderr)
                failure = status
                _signal_all(children, signal.SIGTERM)
    return failure


def _signal_all(children: dict[int, Export], signum: int) -> None:
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    """The shim's entry point; returns the exit status."""
    # First of all: a stop signal from now on waits for sigwaitinfo (here)
    # or for a device's handler (children inherit the mask).
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] in ("-V", "--version"):
        print("vhost-supervisor-qsd-shim (qemu-storage-daemon command line, vhost-user-blk exports)")
        return 0
    try:
        exports = parse_command_line(argv)
    except ShimError as exc:
        print(f"vhost-supervisor-qsd-shim: {exc}", file=sys.stderr)
        return 1
    return serve(exports, os.environ.get(LOG_LEVEL_ENV, "warning"))


if __name__ == "__main__":
    sys.exit(main())
