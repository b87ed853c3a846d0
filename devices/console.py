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
from typing import Any

from connection.executor import Executor, wait_readable
from connection.protocol import ProtocolFeature, VirtioFeature
from connection.unixsock import bind_unix_listener, unlink_if_same

from . import safe_open
from .base import DeviceBuilder, QueueTaskDevice
from .devtype import DeviceType
from .options import ConfigError, Option

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


def write_views(fd: int, views: list[memoryview]) -> int:
    """Write every byte of ``views`` to a blocking fd: ``writev`` on at most
    IOV_MAX views at a time, a short write resumed where it stopped.  Nothing
    is joined, so a chain of thousands of buffers that all alias one guest
    page costs no memory.  Returns the bytes written."""
    views = [v for v in views if len(v)]
    written = 0
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        written += n
        while n:
            v = views[i]
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                n = 0
    return written


class FdOutput(Output):
    """stdout (or any fd the supervisor does not size)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self._failed = False

    def write(self, views: list[memoryview]) -> None:
        if self._failed or not views:
            return
        try:
            write_views(self.fd, views)
        except OSError as exc:
            self._failed = True
            log.warning("console output to %s failed: %s; further output dropped", self.name, exc)


class FileOutput(Output):
    """``type=file`` with a disk budget: the file never grows past
    ``max_size``; when the next byte would not fit, it is rotated the way
    logrotate's ``copytruncate`` does (``path.N-1`` copied over ``path.N``,
    ..., ``path`` over ``path.1``, then ``path`` truncated), on fds the parent
    opened.  The jailed child cannot open or rename anything, and needs
    nothing but those fds and ``copy_file_range``/``ftruncate``; a guest
    flood costs at most ``max_size * (keep + 1)`` bytes of disk.

    ``fds[0]`` is ``path`` (opened O_APPEND), ``fds[k]`` is ``path.k``."""

    def __init__(self, fds: list[int], name: str, max_size: int) -> None:
        self.fds = fds
        self.name = name
        self.max_size = max_size
        self.size = os.fstat(fds[0]).st_size
        self.rotations = 0
        self._failed = False

    def write(self, views: list[memoryview]) -> None:
        if self._failed or not views:
            return
        try:
            batch: list[memoryview] = []
            room = self.max_size - self.size
            for v in views:
                while len(v):
                    if room <= 0:
                        self._flush(batch)
                        batch = []
                        self._rotate()
                        room = self.max_size - self.size
                        continue
                    if len(v) <= room:
                        batch.append(v)
                        room -= len(v)
                        break
                    batch.append(v[:room])
                    v = v[room:]
                    room = 0
            self._flush(batch)
        except OSError as exc:
            self._failed = True
            log.warning("console output to %s failed: %s; further output dropped", self.name, exc)

    def _flush(self, batch: list[memoryview]) -> None:
        if batch:
            self.size += write_views(self.fds[0], batch)

    def _rotate(self) -> None:
        fds = self.fds
        for k in range(len(fds) - 1, 0, -1):
            _copy_tail(fds[k - 1], fds[k], self.max_size)
        os.ftruncate(fds[0], 0)   # O_APPEND: the next write lands at 0
        self.size = 0
        self.rotations += 1
        if self.rotations == 1:  # not once per rotation: the guest sets the pace
            log.info("console output %s reached max-size=%d; rotating (keeping %d old files)",
                     self.name, self.max_size, len(fds) - 1)


def _copy_tail(src: int, dst: int, limit: int) -> None:
    """Make ``dst`` a copy of the last ``limit`` bytes of ``src``, in the
    kernel (copy_file_range), so a rotation costs no memory whatever the
    file size; a file system without it gets bounded pread/pwrite."""
    size = os.fstat(src).st_size
    start = max(0, size - limit)
    os.ftruncate(dst, 0)
    off = start
    try:
        while off < size:
            n = os.copy_file_range(src, dst, size - off, off, off - start)
            if n <= 0:
                break
            off += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while off < size:
        chunk = os.pread(src, min(READ_CHUNK * 16, size - off), off)
        if not chunk:
            break
        os.pwrite(dst, chunk, off - start)
        off += len(chunk)


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
            for i in range(0, len(views), IOV_MAX):  # sendmsg takes at most IOV_MAX
                group = views[i:i + IOV_MAX]
                if client.sendmsg(group, [], socket.MSG_NOSIGNAL) < sum(map(len, group)):
                    raise BlockingIOError  # the client's buffer is full: drop the rest
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

def _bind_unix(name: str, path: str) -> socket.socket:
    """Bind a listening stream socket at ``path``, replacing a stale socket
    (never another kind of file)."""
    try:
        sock, _ = bind_unix_listener(path, mode=0o600, backlog=4)
    except FileExistsError:
        raise ConfigError("exists and is not a socket", "path", name, path) from None
    except OSError as exc:
        raise ConfigError(f"cannot bind: {exc.strerror or exc}", "path", name, path) from None
    return sock


#: ``type=file`` disk budget defaults: at most max-size x (keep + 1) bytes.
DEFAULT_MAX_SIZE = 16 << 20
DEFAULT_KEEP = 2
MAX_KEEP = 9


class ConsoleBuilder(DeviceBuilder):
    """Opens the output and input ends in the parent (paths through
    ``safe_open``: never through another user's symbolic link)."""

    def __init__(self, name: str, kind: str, *, out_fd: int = -1, in_fd: int = -1,
                 sock: socket.socket | None = None, sock_input: bool = False,
                 socket_path: str | None = None, cols: int = 0, rows: int = 0,
                 rotate_fds: list[int] | None = None, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.name = name
        self.kind = kind
        self.out_fd = out_fd
        self.in_fd = in_fd
        #: type=file: fds of path.1 .. path.keep, for rotation.
        self.rotate_fds = list(rotate_fds or [])
        self.max_size = max_size
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
        """Check the options (``OPTIONS``) and how they combine; open, bind or
        connect both ends."""
        o = cls.declaration.parse(name, options)
        kind: str = o["type"]
        path: str | None = o["path"]
        input_path: str | None = o["input"]
        use_stdin: bool = o["stdin"]
        unix_input: bool = o["input-unix-stream"]
        cols: int = o["cols"]
        rows: int = o["rows"]
        max_size: int = o["max-size"]
        keep: int = o["keep"]
        rotation_given = any(k in options for k in ("max-size", "max_size", "keep"))
        if kind in ("file", "unix", "unix-stream") and not path:
            raise ConfigError(f"type={kind} needs path=", "path", name)
        if kind in ("stdout", "sink") and path:
            raise ConfigError(f"given with type={kind}, which takes no path", "path", name, path)
        if rotation_given and kind != "file":
            raise ConfigError(f"applies to type=file only, not type={kind}", "max-size/keep", name)
        if input_path and use_stdin:
            raise ConfigError(f"input={input_path!r} and stdin=true are mutually exclusive", "stdin", name,
                              "true")
        if unix_input and kind != "unix-stream":
            raise ConfigError(f"needs type=unix-stream, not type={kind}", "input-unix-stream", name, "true")
        if kind == "unix" and (input_path or use_stdin):
            raise ConfigError("type=unix already reads input from its socket; drop input=/stdin=",
                              "input" if input_path else "stdin", name, input_path or "true")

        opened: list[int] = []
        sock: socket.socket | None = None
        try:
            out_fd = -1
            in_fd = -1
            rotate_fds: list[int] = []
            socket_path = None
            if kind == "file":
                assert path is not None
                out_fd = _open_output(name, "path", path)
                opened.append(out_fd)
                for k in range(1, keep + 1):
                    rotate_fds.append(_open_output(name, "path", f"{path}.{k}", append=False))
                    opened.append(rotate_fds[-1])
            elif kind == "stdout":
                out_fd = os.dup(1)
                opened.append(out_fd)
            elif kind == "unix":
                assert path is not None
                sock = _bind_unix(name, path)
                socket_path = path
            elif kind == "unix-stream":
                assert path is not None
                sock = _connect(name, "path", path)
            if input_path:
                in_fd = _open_input(name, input_path)
                opened.append(in_fd)
            elif use_stdin:
                in_fd = os.dup(0)
                opened.append(in_fd)
            builder = cls(name, kind, out_fd=out_fd, in_fd=in_fd, sock=sock,
                          sock_input=(kind == "unix" or unix_input), socket_path=socket_path,
                          cols=cols, rows=rows, rotate_fds=rotate_fds, max_size=max_size)
            builder.memory_limit = o["memory-limit"]
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
        fds = [fd for fd in (self.out_fd, self.in_fd, *self.rotate_fds) if fd >= 0]
        if self.sock is not None and self.sock.fileno() >= 0:
            fds.append(self.sock.fileno())
        return fds

    def build(self, ex: Executor) -> ConsoleDevice:
        output: Output = Output()
        input_: Input = Input()
        if self.out_fd >= 0:
            if self.kind == "file":
                output = FileOutput([self.out_fd, *self.rotate_fds], self.name, self.max_size)
            else:
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
        fds, self.rotate_fds = self.rotate_fds, []
        for fd in fds:
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


def _open_output(name: str, key: str, path: str, append: bool = True) -> int:
    try:
        return safe_open.open_output(name, key, path, append=append)
    except OSError as exc:
        raise ConfigError(f"cannot open for output: {exc.strerror or exc}", key, name, path) from None


def _connect(name: str, key: str, path: str) -> socket.socket:
    """Connect to the Unix socket at ``path`` (reached through safe_open)."""
    try:
        opath, _resolved = safe_open.open_path(name, key, path)
    except OSError as exc:
        raise ConfigError(f"cannot connect: {exc.strerror or exc}", key, name, path) from None
    try:
        if not stat.S_ISSOCK(os.fstat(opath).st_mode):
            raise ConfigError("cannot connect: not a socket", key, name, path)
        return safe_open.connect_unix(opath)
    except OSError as exc:
        raise ConfigError(f"cannot connect: {exc.strerror or exc}", key, name, path) from None
    finally:
        os.close(opath)


def _open_input(name: str, path: str) -> int:
    """A regular file is read to its end; a FIFO is opened read-write so it
    never reports end-of-file while its writers come and go; a socket path
    is connected to.  The path is reached through safe_open (no other
    user's symbolic link) and the file opened through the resulting fd."""
    try:
        opath, resolved = safe_open.open_path(name, "input", path)
    except FileNotFoundError:
        raise ConfigError("does not exist", "input", name, path) from None
    except OSError as exc:
        raise ConfigError(f"cannot open: {exc.strerror or exc}", "input", name, path) from None
    try:
        mode = os.fstat(opath).st_mode
        if stat.S_ISSOCK(mode):
            return safe_open.connect_unix(opath).detach()
        if stat.S_ISFIFO(mode):
            return safe_open.reopen(opath, os.O_RDWR | os.O_NONBLOCK)
        if stat.S_ISDIR(mode):
            raise ConfigError("is a directory", "input", name, path)
        if stat.S_ISREG(mode) and os.fstat(opath).st_nlink != 1:
            # A second name for someone else's file (where the kernel's
            # protected_hardlinks is off) would hand its contents to the guest.
            raise ConfigError(f"refused: {resolved} has {os.fstat(opath).st_nlink} hard links", "input", name, path)
        return safe_open.reopen(opath, os.O_RDONLY | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"cannot open: {exc.strerror or exc}", "input", name, path) from None
    finally:
        os.close(opath)


# --------------------------------------------------------------------------
# Declaration: the one place the rest of the project learns about "console"

#: crosvm ``--serial`` keys, plus ``cols``/``rows`` for the config space.
OPTIONS = (
    Option("type", str, "sink", "where guest output goes",
           choices=("file", "stdout", "sink", "unix", "unix-stream")),
    Option("path", str, help="output file, or the Unix socket for type=unix/unix-stream", metavar="PATH"),
    Option("input", str, help="guest input from a file, FIFO or socket", metavar="PATH"),
    Option("stdin", bool, False, "guest input from stdin"),
    Option("input-unix-stream", bool, False, "with type=unix-stream: read input from the socket too",
           aliases=("input_unix_stream",)),
    Option("cols", int, 0, "config space columns (0 = not offered)", lo=0, hi=0xFFFF, metavar="N"),
    Option("rows", int, 0, "config space rows (0 = not offered)", lo=0, hi=0xFFFF, metavar="N"),
    Option("max-size", int, DEFAULT_MAX_SIZE, "type=file: rotate when the output reaches this size "
           "(bytes or K/M/G); a flood costs at most max-size x (keep + 1)", aliases=("max_size",),
           lo=4096, hi=1 << 40, size=True, metavar="BYTES"),
    Option("keep", int, DEFAULT_KEEP, f"type=file: rotated files kept, path.1..path.N (0..{MAX_KEEP})",
           lo=0, hi=MAX_KEEP, metavar="N"),
)

DEVICE = DeviceType(
    name="console",
    builder=ConsoleBuilder,
    summary="virtio-console, one port",
    options=OPTIONS,
    seccomp_policy="console.policy",
    flag="serial",
    child_modules=("socket",),
    # crosvm --serial keys that concern the VMM side, accepted and ignored.
    ignored=("hardware", "name", "num", "console", "earlycon", "out-timestamp", "debugcon-port"),
)
