"""Target: the control protocol (supervisor/control.py ``ControlServer`` with
the supervisor's real ``handle_request``).

The input is the byte stream a local client writes to the control socket
(JSON lines: well-formed requests, broken JSON, non-objects, odd ``cmd`` and
``name`` types, a line at or just over ``MAX_LINE``), served over a real
socketpair on an event loop by ``ControlServer._serve`` for a supervisor
with no devices (so no request forks).  Checked: every reply is one JSON
object per line with a boolean ``ok`` (an error string when false), and the
connection ends when the client's stream does.  A bug: an exception out of
``_serve``, a reply that is not such an object, a hang.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import socket
import tempfile

import uvloop

from supervisor.config import SupervisorConfig
from supervisor.control import MAX_LINE, ControlServer, bind_control_socket
from supervisor.supervision import Supervisor

from ..data import Data
from ..harness import FuzzBug

_state: tuple[asyncio.AbstractEventLoop, ControlServer] | None = None
TIMEOUT = 5.0


def _setup() -> tuple[asyncio.AbstractEventLoop, ControlServer]:
    global _state
    if _state is None:
        loop = uvloop.new_event_loop()
        work = tempfile.mkdtemp(prefix="fuzz-ctl-")
        atexit.register(shutil.rmtree, work, True)
        path = os.path.join(work, "control.sock")
        sup = Supervisor(SupervisorConfig(control_socket=path), {})
        _state = loop, ControlServer(bind_control_socket(path), sup.handle_request)
    return _state


async def _session(server: ControlServer, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        reader, writer = await asyncio.open_unix_connection(sock=b, limit=MAX_LINE)
        task = loop.create_task(server._serve(reader, writer))
        out = bytearray()

        async def send() -> None:
            await loop.sock_sendall(a, data)
            a.shutdown(socket.SHUT_WR)

        sender = loop.create_task(send())   # replies are read meanwhile: no deadlock on full buffers
        try:
            while chunk := await loop.sock_recv(a, 65536):
                out += chunk
            await sender
        except (ConnectionResetError, BrokenPipeError):
            sender.cancel()
            # The server hangs up on a line over MAX_LINE with our data unread:
            # the reset is expected then, and only then.
            if max(map(len, data.split(b"\n"))) <= MAX_LINE:
                raise
        await task
        return bytes(out)
    finally:
        a.close()


def one_input(buf: bytes) -> None:
    loop, server = _setup()
    d = Data(buf)
    shape = d.below(8)
    piece = d.rest()
    if shape == 7:   # one line just over (or at) the limit, then the rest
        filler = piece.replace(b"\n", b"") or b"a"
        n = MAX_LINE - 2 + len(piece) % 4
        data = (filler * (n // len(filler) + 1))[:n] + b"\n" + piece
    else:
        data = piece * (1 + shape % 3)
    asyncio.set_event_loop(loop)
    out = loop.run_until_complete(asyncio.wait_for(_session(server, data), TIMEOUT))
    lines = out.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        try:
            reply = json.loads(line)
        except ValueError:
            raise FuzzBug(f"reply is not JSON: {line[:200]!r}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise FuzzBug(f"reply is not an object with a boolean 'ok': {line[:200]!r}")
        if reply["ok"] is False and not isinstance(reply.get("error"), str):
            raise FuzzBug(f"failure reply without an error string: {line[:200]!r}")
    if out and not out.endswith(b"\n"):
        raise FuzzBug(f"reply stream ends mid-line: {out[-100:]!r}")
