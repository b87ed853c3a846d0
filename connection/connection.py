"""Where a device's front-end comes from: crosvm's ``VhostUserConnectionTrait``.

``VhostUserListener`` binds a socket path in the privileged parent and
accepts one front-end in the (jailed) child; ``VhostUserStream`` serves an
already-connected socket (``--fd N``).  The parent keeps the listening
socket open across children, so a reconnecting VMM always finds it, and it
keeps a ``ParentResources`` that removes the socket file when the device is
finally removed: the jailed child could not unlink it, and must not.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from types import TracebackType

from .device import VhostUserDevice, VhostUserDeviceBuilder
from .errors import ConnectionClosed, ProtocolError, VhostUserError
from .executor import Executor, wait_readable
from .handler import REQUESTS_WITH_REPLY, Backend, DeviceRequestHandler, RequestRefused
from .protocol import FLAG_REPLY, VERSION, Message, encode_u64
from .transport import AsyncMessageSocket, check_unix_stream
from .unixsock import bind_unix_listener, unlink_if_same

log = logging.getLogger("vhost.connection")

_DISCONNECT_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ConnectionClosed)


# ----------------------------------------------------------------------
# Serving one connected front-end

async def serve_connection(sock: socket.socket, handler: Backend, ex: Executor) -> None:
    """Answer requests on ``sock`` until the front-end leaves or misbehaves.

    Returns normally on disconnect and on any protocol error (logged with
    its reason); only errors of the socket itself (other than a reset by
    the peer) propagate.  ``handler.on_disconnect()`` always runs and the
    socket is closed.
    """
    msock = AsyncMessageSocket(sock, ex.loop)
    try:
        while True:
            try:
                msg = await msock.recv()
            except ProtocolError as e:
                log.warning("connection ended: malformed message: %s", e)
                return
            except _DISCONNECT_ERRORS as e:
                log.info("front-end disconnected: %s", e)
                return
            try:
                if not await _serve_one(msock, handler, msg):
                    return
            except _DISCONNECT_ERRORS as e:
                log.info("front-end disconnected while answering %s: %s", msg.name, e)
                return
            finally:
                msg.close_fds()
    finally:
        try:
            handler.on_disconnect()
        except Exception:
            log.exception("cleanup after disconnect failed")
        try:
            # The end of the connection for every holder of the socket (the
            # supervisor keeps a duplicate to watch the front-end), not just ours.
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        msock.close()


async def _serve_one(msock: AsyncMessageSocket, handler: Backend, msg: Message) -> bool:
    """Handle one request and send its reply or ack; False ends the connection."""
    asks_ack = msg.need_reply and msg.request not in REQUESTS_WITH_REPLY
    try:
        try:
            reply = await handler.handle(msg)
        finally:
            msg.close_fds()   # before any answer: the front-end may count fds
    except RequestRefused as e:
        log.warning("%s refused: %s", msg.name, e)
        if asks_ack and handler.reply_ack_enabled:
            msock.send(msg.request, VERSION | FLAG_REPLY, encode_u64(1))
        return True
    except VhostUserError as e:
        if asks_ack and handler.reply_ack_enabled:
            log.warning("%s failed (acked as failure): %s", msg.name, e)
            msock.send(msg.request, VERSION | FLAG_REPLY, encode_u64(1))
            return True
        log.warning("connection ended: %s: %s", type(e).__name__, e)
        return False
    except Exception:
        log.exception("connection ended: internal error while handling %s", msg.name)
        return False
    if reply is not None:
        payload, fds = reply
        msock.send(msg.request, VERSION | FLAG_REPLY, payload, fds)
    elif asks_ack and handler.reply_ack_enabled:
        msock.send(msg.request, VERSION | FLAG_REPLY, encode_u64(0))
    return True


# ----------------------------------------------------------------------
# Parent resources

class ParentResources:
    """The socket file of a listener, removed by ``close()`` in the parent.

    It unlinks only if the path still names the very socket that was bound
    (same st_dev/st_ino), so a socket or file someone else put there since
    is left alone, and only in the process that created it: a forked child
    that drops or closes its copy never unlinks.
    """

    def __init__(self, path: str, st_dev: int, st_ino: int) -> None:
        self.path = path
        self._ident = (st_dev, st_ino)
        self._pid = os.getpid()
        self._closed = False

    def close(self) -> None:
        """Unlink the socket file if it is still ours (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return
        unlink_if_same(self.path, self._ident)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "ParentResources":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ParentResources({self.path!r}, closed={self._closed})"


# ----------------------------------------------------------------------
# Connections

class VhostUserConnection(abc.ABC):
    """A source of one front-end connection (crosvm's VhostUserConnectionTrait)."""

    @abc.abstractmethod
    def run_req_handler(self, handler: Backend, ex: Executor) -> Awaitable[None]:
        """Serve ``handler`` to one front-end; finishes when it disconnects
        or on error (logged; only socket errors propagate)."""

    def take_parent_process_resources(self) -> ParentResources | None:
        """Resources only the parent can release (the socket file); after a
        fork the parent keeps them and the child's copy never releases them.
        None when there are none."""
        return None

    def run_backend(self, backend: VhostUserDevice, ex: Executor) -> Awaitable[None]:
        """Legacy: wrap ``backend`` in a ``DeviceRequestHandler`` and serve it."""
        return self.run_req_handler(DeviceRequestHandler(backend, ex), ex)

    def run_device(self, ex: Executor, builder: VhostUserDeviceBuilder) -> None:
        """Build the device on ``ex`` (in the jailed child) and serve it
        until the front-end leaves.  Returns normally then, also after a
        protocol error (logged); a failure to build or a socket error is
        logged and raised."""

        async def main() -> None:
            try:
                device = builder.build(ex)
            except Exception as e:
                log.error("device build failed: %s: %s", type(e).__name__, e)
                raise
            try:
                await self.run_backend(device, ex)
            except Exception as e:
                log.error("device connection failed: %s: %s", type(e).__name__, e)
                raise

        ex.run_until_complete(main())


class VhostUserListener(VhostUserConnection):
    """A listening Unix socket at ``path``, bound in the constructor.

    ``on_accept``, if set, sees each accepted connection before it is served
    (the supervised child shows it to the supervisor: supervisor/child.py).
    """

    on_accept: Callable[[socket.socket], None] | None = None

    def __init__(self, path: str, *, mode: int = 0o600) -> None:
        self.path = os.fspath(path)
        sock, st = bind_unix_listener(self.path, mode=mode, backlog=8)
        self._sock: socket.socket | None = sock
        self._ident = (st.st_dev, st.st_ino)
        self._pid = os.getpid()
        self._resources_taken = False
        log.info("listening on %s", self.path)

    def fileno(self) -> int:
        """The listening socket; the supervisor keeps it across children."""
        if self._sock is None:
            raise ValueError(f"listener {self.path} is closed")
        return self._sock.fileno()

    def take_parent_process_resources(self) -> ParentResources | None:
        if self._resources_taken:
            return None
        self._resources_taken = True
        return ParentResources(self.path, *self._ident)

    async def run_req_handler(self, handler: Backend, ex: Executor) -> None:
        """Accept one front-end (without blocking the loop) and serve it.
        The listening socket stays open; it may be served again later."""
        if self._sock is None:
            raise ConnectionClosed(f"listener {self.path} is closed")
        conn = await self._accept(ex.loop)
        log.info("front-end connected on %s", self.path)
        if self.on_accept is not None:
            try:
                self.on_accept(conn)
            except Exception as e:  # noqa: BLE001 - a status hint, never a reason to drop the front-end
                log.warning("on_accept hook failed: %s: %s", type(e).__name__, e)
        await serve_connection(conn, handler, ex)

    async def _accept(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        assert self._sock is not None
        sock = self._sock
        sock.setblocking(False)
        while True:
            try:
                conn, _ = sock.accept()
                return conn
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                pass
            await wait_readable(loop, sock.fileno())

    def close(self) -> None:
        """Close the listening socket; unlink the socket file too unless the
        parent resources were taken (same inode check, creating process only)."""
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        if not self._resources_taken and os.getpid() == self._pid:
            unlink_if_same(self.path, self._ident)

    def __enter__(self) -> "VhostUserListener":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VhostUserListener({self.path!r})"


class VhostUserStream(VhostUserConnection):
    """An already-connected Unix stream socket (a socket object or an fd
    number, whose ownership is taken once the check passes)."""

    def __init__(self, sock: socket.socket | int) -> None:
        if isinstance(sock, int):
            fd = sock
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise ProtocolError(f"fd {fd} is not a socket")
            sock = socket.socket(fileno=fd)
            try:
                check_unix_stream(sock)
            except BaseException:
                sock.detach()   # not accepted: the caller keeps its fd
                raise
        else:
            check_unix_stream(sock)
        self._sock: socket.socket | None = sock

    def fileno(self) -> int:
        if self._sock is None:
            raise ValueError("stream already served")
        return self._sock.fileno()

    async def run_req_handler(self, handler: Backend, ex: Executor) -> None:
        """Serve the one front-end on the other end; the socket is closed after."""
        if self._sock is None:
            raise ConnectionClosed("stream already served")
        sock, self._sock = self._sock, None
        await serve_connection(sock, handler, ex)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
