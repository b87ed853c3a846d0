"""virtio-console (device ID 3), single port: receiveq0 / transmitq0.

Output (what the guest transmits) goes to a file, stdout, a sink, or a Unix
socket; input (what the guest receives) comes from a file, a FIFO, stdin or
the Unix socket.  Everything is opened, connected or bound by the builder in
the parent, because the jailed child can open nothing; the child only
reads, writes and (for ``type=unix``) accepts on the socket it was given.

Keys follow crosvm's ``--serial``: ``type=file|stdout|sink|unix|unix-stream``,
``path=``, ``input=``, ``stdin``, ``input-unix-stream``; plus ``cols``/``rows``
for the config space.  ``type=unix`` differs from crosvm on purpose: crosvm
sends datagrams to a socket someone else bound; here the device binds a
stream socket at ``path`` and serves one client at a time (a newer client
replaces the older), both ways, like QEMU's ``-chardev socket,server=on``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import struct
from typing import Any, ClassVar

from connection.executor import Executor, wait_readable
from connection.protocol import ProtocolFeature, VirtioFeature
from connection.unixsock import bind_unix_listener, unlink_if_same

from .base import ConfigError, DeviceBuilder, Options, QueueTaskDevice

log = logging.getLogger("devices.console")

F_SIZE = 1 << 0
F_EMERG_WRITE = 1 << 2
RX_QUEUE = 0
TX_QUEUE = 1
CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
READ_CHUNK = 4096
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


# --------------------------------------------------------------------------
# Host side of the port

class Output:
    """Where guest output goes.  ``write`` never raises and never blocks the
    loop for long (files and stdout are written synchronously, like crosvm)."""

    def write(self, views: list[memoryview]) -> None:  # sink
        pass

    def close(self) -> None:
        pass


class FdOutput(Output):
    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self._failed = False

    def write(self, views: list[memoryview]) -> None:
        if self._failed or not views:
            return
        try:
            total = sum(len(v) for v in views)
            if len(views) > IOV_MAX:  # writev would refuse it (EINVAL)
                views = [memoryview(b"".join(views))]
            done = os.writev(self.fd, views)
            if done < total:
                data = b"".join(bytes(v) for v in views)
                while done < total:
                    done += os.write(self.fd, data[done:])
        except OSError as exc:
            self._failed = True
            log.warning("console output to %s failed: %s; further output dropped", self.name, exc)


class Input:
    """Where guest input comes from: ``read`` returns the next bytes, or
    b"" once there will never be more."""

    async def read(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class FdInput(Input):
    """A file, FIFO, tty or pipe.  Regular files cannot be polled (epoll
    refuses them), and are always readable anyway: read them directly."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        self.loop = loop
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)

    async def read(self) -> bytes:
        while True:
            if not self.regular:
                await wait_readable(self.loop, self.fd)
            try:
                return os.read(self.fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                log.warning("console input read failed: %s; input ends", exc)
                return b""


class SocketPort(Output, Input):
    """A stream socket client, bidirectional.  With a listening socket
    (``type=unix``) it accepts clients itself, a newer one replacing the
    older; without one (``unix-stream``) the one connection is all there is.
    Writes are non-blocking: output nobody reads in time is dropped rather
    than stalling the guest."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: socket.socket | None,
                 client: socket.socket | None, read_input: bool) -> None:
        self.loop = loop
        self.listener = listener
        self.client: socket.socket | None = None
        self.read_input = read_input
        self._client_ready: asyncio.Future[None] | None = None
        self._dropped_logged = False
        if client is not None:
            self._set_client(client)
        if listener is not None:
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._accept)

    def _set_client(self, client: socket.socket) -> None:
        client.setblocking(False)
        old, self.client = self.client, client
        if old is not None:
            old.close()
        if self._client_ready is not None and not self._client_ready.done():
            self._client_ready.set_result(None)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            log.warning("console socket accept failed: %s", exc)
            return
        self._set_client(client)

    def _drop(self, client: socket.socket) -> None:
        if self.client is client:
            self.client = None
        client.close()

    def write(self, views: list[memoryview]) -> None:
        client = self.client
        if client is None or not views:
            return
        try:
            client.sendmsg(views, [], socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            if not self._dropped_logged:
                self._dropped_logged = True
                log.warning("console socket client is not reading; output dropped")
        except OSError:
            self._drop(client)

    async def read(self) -> bytes:
        if not self.read_input:
            return b""
        while True:
            client = self.client
            if client is None:
                if self.listener is None:
                    return b""  # the one connection is gone
                self._client_ready = self.loop.create_future()
                await self._client_ready
                continue
            await wait_readable(self.loop, client.fileno())
            if client is not self.client:
                continue
            try:
                data = client.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                return data
            self._drop(client)

    def close(self) -> None:
        if self.listener is not None:
            try:
                self.loop.remove_reader(self.listener.fileno())
            except Exception:  # noqa: BLE001 - loop may be closed
                pass
        if self.client is not None:
            self.client.close()
            self.client = None


# --------------------------------------------------------------------------
# Device

class ConsoleDevice(QueueTaskDevice):
    """One port without MULTIPORT: queue 0 receives, queue 1 transmits."""

    def __init__(self, ex: Executor, name: str, output: Output, input: Input,
                 cols: int = 0, rows: int = 0) -> None:
        super().__init__(ex, name)
        self.output = output
        self.input = input
        self.cols = cols
        self.rows = rows
        # Input read but not yet delivered survives an rx queue restart.
        self._pending = b""
        self._pos = 0

    def max_queue_num(self) -> int:
        return 2

    def features(self) -> int:
        f = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                | VirtioFeature.RING_EVENT_IDX) | F_EMERG_WRITE
        if self.cols or self.rows:
            f |= F_SIZE
        return f

    def protocol_features(self) -> int:
        return int(ProtocolFeature.CONFIG)

    def read_config(self, offset: int, size: int) -> bytes:
        config = CONFIG.pack(self.cols, self.rows, 1, 0)
        if offset < 0 or size < 0 or offset + size > len(config):
            raise ValueError(f"config read offset {offset} size {size} outside [0, {len(config)})")
        return config[offset:offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Only emerg_wr (offset 8) is writable: its low byte is output."""
        if offset == 8 and len(data) in (1, 4):
            self.output.write([memoryview(data[:1])])
            return
        raise ValueError(f"config write offset {offset} size {len(data)}: only emerg_wr (8) is writable")

    def start_queue(self, index: int, queue: Any, mem: Any) -> None:
        serve = self._rx(queue) if index == RX_QUEUE else self._tx(index, queue)
        self._spawn(index, queue, serve)

    async def _tx(self, qi: int, queue: Any) -> None:
        pop = queue.pop
        add_used = queue.add_used
        write = self.output.write
        while await queue.wait_kick():
            while (chain := pop()) is not None:
                write(chain.readable)
                add_used(chain.head, 0)
            queue.flush()

    async def _rx(self, queue: Any) -> None:
        while True:
            if self._pos >= len(self._pending):
                data = await self.input.read()
                if not data:
                    return  # input ended for good; guest output still flows
                self._pending, self._pos = data, 0
            pending = memoryview(self._pending)
            end = len(pending)
            delivered = False
            while self._pos < end:
                chain = queue.pop()
                if chain is None:
                    break
                written = 0
                for view in chain.writable:
                    n = min(len(view), end - self._pos)
                    view[:n] = pending[self._pos:self._pos + n]
                    self._pos += n
                    written += n
                    if self._pos >= end:
                        break
                queue.add_used(chain.head, written)
                delivered = True
            if delivered:
                queue.flush()
            if self._pos < end and not await queue.wait_kick():
                return

    def close(self) -> None:
        self.output.close()
        self.input.close()


# --------------------------------------------------------------------------
# Builder

_IGNORED = ("vhost", "hardware", "name", "num", "pci-address", "console", "earlycon",
            "out-timestamp", "debugcon-port")
_TYPES = ("file", "stdout", "sink", "unix", "unix-stream")


def _bind_unix(name: str, path: str) -> socket.socket:
    """Bind a listening stream socket at ``path``, replacing a stale socket
    (never another kind of file)."""
    try:
        sock, _ = bind_unix_listener(path, mode=0o600, backlog=4)
    except FileExistsError:
        raise ConfigError(f"{name}: path={path!r} exists and is not a socket") from None
    except OSError as exc:
        raise ConfigError(f"{name}: path={path!r}: cannot bind: {exc.strerror or exc}") from None
    return sock


class ConsoleBuilder(DeviceBuilder):
    """Opens the output and input ends in the parent."""

    device_type: ClassVar[str] = "console"
    seccomp_policy: ClassVar[str] = "console.policy"

    def __init__(self, name: str, kind: str, *, out_fd: int = -1, in_fd: int = -1,
                 sock: socket.socket | None = None, sock_input: bool = False,
                 socket_path: str | None = None, cols: int = 0, rows: int = 0) -> None:
        self.name = name
        self.kind = kind
        self.out_fd = out_fd
        self.in_fd = in_fd
        self.sock = sock
        self.sock_input = sock_input
        self.socket_path = socket_path
        self._socket_ident: tuple[int, int] | None = None
        if socket_path is not None:
            st = os.lstat(socket_path)
            self._socket_ident = (st.st_dev, st.st_ino)
        self.cols = cols
        self.rows = rows

    @classmethod
    def from_options(cls, name: str, options: dict[str, str]) -> "ConsoleBuilder":
        """Keys: type (sink), path, input, stdin, input-unix-stream, cols, rows."""
        o = Options(name, options, ignored=_IGNORED)
        kind = (o.text("type", "sink") or "sink").lower()
        if kind not in _TYPES:
            raise ConfigError(f"{name}: type={kind!r} is not supported (one of {', '.join(_TYPES)})")
        path = o.text("path")
        input_path = o.text("input")
        use_stdin = o.flag("stdin", False)
        unix_input = o.flag("input-unix-stream", False, "input_unix_stream")
        cols = o.integer("cols", 0, 0, 0xFFFF)
        rows = o.integer("rows", 0, 0, 0xFFFF)
        memory_limit = o.memory_limit()
        o.check_unknown()
        if kind in ("file", "unix", "unix-stream") and not path:
            raise ConfigError(f"{name}: type={kind} needs path=")
        if kind in ("stdout", "sink") and path:
            raise ConfigError(f"{name}: path={path!r} given with type={kind}, which takes no path")
        if input_path and use_stdin:
            raise ConfigError(f"{name}: input={input_path!r} and stdin=true are mutually exclusive")
        if unix_input and kind != "unix-stream":
            raise ConfigError(f"{name}: input-unix-stream=true needs type=unix-stream, not type={kind}")
        if kind == "unix" and (input_path or use_stdin):
            raise ConfigError(f"{name}: type=unix already reads input from its socket; "
                              f"drop input=/stdin=")

        opened: list[int] = []
        sock: socket.socket | None = None
        try:
            out_fd = -1
            in_fd = -1
            socket_path = None
            if kind == "file":
                assert path is not None
                try:
                    out_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                except OSError as exc:
                    raise ConfigError(f"{name}: path={path!r}: cannot open for output: {exc.strerror}") from None
                opened.append(out_fd)
            elif kind == "stdout":
                out_fd = os.dup(1)
                opened.append(out_fd)
            elif kind == "unix":
                assert path is not None
                sock = _bind_unix(name, path)
                socket_path = path
            elif kind == "unix-stream":
                assert path is not None
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(path)
                except OSError as exc:
                    raise ConfigError(f"{name}: path={path!r}: cannot connect: {exc.strerror or exc}") from None
            if input_path:
                in_fd = _open_input(name, input_path)
                opened.append(in_fd)
            elif use_stdin:
                in_fd = os.dup(0)
                opened.append(in_fd)
            builder = cls(name, kind, out_fd=out_fd, in_fd=in_fd, sock=sock,
                          sock_input=(kind == "unix" or unix_input), socket_path=socket_path,
                          cols=cols, rows=rows)
            builder.memory_limit = memory_limit
            return builder
        except BaseException:
            for fd in opened:
                os.close(fd)
            if sock is not None:
                sock.close()
                if kind == "unix" and path:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
            raise

    def keep_fds(self) -> list[int]:
        fds = [fd for fd in (self.out_fd, self.in_fd) if fd >= 0]
        if self.sock is not None and self.sock.fileno() >= 0:
            fds.append(self.sock.fileno())
        return fds

    def build(self, ex: Executor) -> ConsoleDevice:
        output: Output = Output()
        input_: Input = Input()
        if self.out_fd >= 0:
            output = FdOutput(self.out_fd, self.kind)
        if self.sock is not None:
            listening = self.kind == "unix"
            port = SocketPort(ex.loop, self.sock if listening else None,
                              None if listening else self.sock, self.sock_input)
            output = port
            if self.sock_input:
                input_ = port
        if self.in_fd >= 0:
            input_ = FdInput(self.in_fd, ex.loop)
        return ConsoleDevice(ex, self.name, output, input_, self.cols, self.rows)

    def close(self) -> None:
        for attr in ("out_fd", "in_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.socket_path is not None and self._socket_ident is not None:
            try:
                unlink_if_same(self.socket_path, self._socket_ident)
            except OSError:
                pass
            self.socket_path = None


def _open_input(name: str, path: str) -> int:
    """A regular file is read to its end; a FIFO is opened read-write so it
    never reports end-of-file while its writers come and go; a socket path
    is connected to."""
    try:
        st = os.stat(path)
        if stat.S_ISSOCK(st.st_mode):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError:
                s.close()
                raise
            return s.detach()
        if stat.S_ISFIFO(st.st_mode):
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ConfigError(f"{name}: input={path!r} does not exist") from None
        raise ConfigError(f"{name}: input={path!r}: cannot open: {exc.strerror or exc}") from None
