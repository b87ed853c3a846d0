"""The control socket: JSON lines over a Unix stream socket, mode 0600.

One request per line (``{"cmd": "status"}``, ``{"cmd": "restart", "name":
"block-0"}``, ``stop``, ``start``), one reply per line (``{"ok": true, ...}``
or ``{"ok": false, "error": "..."}``).  Only root (the socket's owner) can
connect; the supervisor serves it on its own event loop, no thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from typing import Any, Awaitable, Callable

from connection.unixsock import bind_unix_listener

MAX_LINE = 64 * 1024
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(RuntimeError):
    """The control socket cannot be reached or answered with an error."""


def socket_in_use(path: str) -> bool:
    """True if something accepts connections on ``path`` (a live supervisor)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def bind_control_socket(path: str) -> socket.socket:
    """Bind and listen on ``path`` with mode 0600 from the first instant (umask),
    removing a stale socket left by a supervisor that was killed."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISSOCK(st.st_mode) and socket_in_use(path):
            raise ControlError(f"control-socket: {path!r} is in use (is another supervisor running?)")
    try:
        sock, _ = bind_unix_listener(path, mode=0o600, backlog=16)
    except FileExistsError:
        raise ControlError(f"control-socket: {path!r} exists and is not a socket") from None
    sock.setblocking(False)
    return sock


class ControlServer:
    """Serves requests on an already-bound socket until ``close``."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self.sock = sock
        self.path: str = sock.getsockname()
        self.inode = os.stat(self.path).st_ino
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, sock=self.sock, limit=MAX_LINE)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "request line too long"}\n')
                    break
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError("a request is a JSON object with a string 'cmd'")
                    reply = await self.handler(req)
                except ValueError as e:
                    reply = {"ok": False, "error": f"bad request: {e}"}
                except Exception as e:  # noqa: BLE001 - a control bug must not kill the supervisor
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
            self.server = None
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass


def request(path: str, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One blocking request/reply (the CLI, tests, the demo)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise ControlError(f"cannot connect to the control socket {path}: {e.strerror or e}") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ControlError(f"control socket {path} closed without a reply")
            buf += chunk
        return json.loads(buf)
    finally:
        s.close()
