"""Framing of vhost-user messages on a Unix stream socket, with SCM_RIGHTS.

The header and the fds travel on one ``sendmsg``; the payload may follow in
further reads.  ``MessageSocket`` is blocking (the front-end driver, tests);
``AsyncMessageSocket`` reads on an asyncio loop (the back-end), so a slow or
silent front-end never blocks the device's queues.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import stat
from collections.abc import Sequence

from .errors import ConnectionClosed, ProtocolError
from .executor import wait_readable
from .protocol import (FLAG_REPLY, HEADER, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD, VERSION,
                       VERSION_MASK, Message, check_payload_size, request_name)

_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
#: Longest a back-end reply may wait for room in the socket buffer.
SEND_TIMEOUT = 5.0


def check_unix_stream(sock: socket.socket) -> None:
    """Raise ProtocolError unless ``sock`` is a Unix stream socket."""
    st = os.fstat(sock.fileno())
    if not stat.S_ISSOCK(st.st_mode):
        raise ProtocolError(f"fd {sock.fileno()} is not a socket")
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ProtocolError(f"fd {sock.fileno()} is {sock.family!r}/{sock.type!r}, expected AF_UNIX stream")


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    """Close and forget ``fds`` (emptied in place, so a second call on the
    same list can never close a number the process has reused since)."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def _parse_header(data: bytes, fds: list[int], expect_reply: bool | None) -> tuple[int, int, int]:
    """Validate a header; on any error close ``fds`` and raise ProtocolError."""
    request, flags, size = HEADER.unpack(data)
    try:
        if flags & VERSION_MASK != VERSION:
            raise ProtocolError(f"{request_name(request)}: header version {flags & VERSION_MASK}, expected {VERSION}")
        if expect_reply is not None and bool(flags & FLAG_REPLY) != expect_reply:
            raise ProtocolError(f"{request_name(request)}: REPLY flag is {bool(flags & FLAG_REPLY)}, "
                                f"expected {expect_reply}")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"{request_name(request)}: payload size {size} exceeds cap {MAX_PAYLOAD}")
        if expect_reply is False:   # None: a request or a reply, not size-checked as a request
            check_payload_size(request, size)
    except ProtocolError:
        _close_all(fds)
        raise
    return request, flags, size


def encode_message(request: int, flags: int, payload: bytes = b"") -> bytes:
    """The bytes of one message (header and payload)."""
    return HEADER.pack(request, flags, len(payload)) + payload


def _ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


class MessageSocket:
    """Blocking message I/O on a connected Unix stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        check_unix_stream(sock)
        self.sock = sock

    def send(self, request: int, flags: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        data = encode_message(request, flags, payload)
        sent = self.sock.sendmsg([data], _ancillary(fds))
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def recv(self, expect_reply: bool | None = None) -> Message:
        """Read one message.  ``expect_reply`` checks the REPLY flag (None: don't);
        requests (``expect_reply`` false) also get their payload size checked."""
        data, ancdata, msg_flags, _ = self.sock.recvmsg(HEADER_SIZE, _ANCILLARY_SPACE, _RECV_FLAGS)
        fds = _fds_from_ancillary(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise ProtocolError(f"more than {MAX_FDS} file descriptors attached to one message")
        if not data:
            _close_all(fds)
            raise ConnectionClosed("peer closed the connection")
        try:
            while len(data) < HEADER_SIZE:
                more = self.sock.recv(HEADER_SIZE - len(data))
                if not more:
                    raise ConnectionClosed("peer closed the connection inside a header")
                data += more
            request, flags, size = _parse_header(data, fds, expect_reply)
            payload = b""
            while len(payload) < size:
                more = self.sock.recv(size - len(payload))
                if not more:
                    raise ConnectionClosed(f"{request_name(request)}: peer closed the connection inside the payload")
                payload += more
        except BaseException:   # also a socket error or timeout: the fds are ours to close
            _close_all(fds)
            raise
        return Message(request, flags, payload, fds)

    def close(self) -> None:
        self.sock.close()


class AsyncMessageSocket:
    """Message I/O on an asyncio loop; the socket is put in non-blocking mode."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        check_unix_stream(sock)
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop

    async def _readable(self) -> None:
        await wait_readable(self.loop, self.sock.fileno())

    async def _recv_exact(self, count: int, what: str) -> bytes:
        buf = b""
        while len(buf) < count:
            try:
                more = self.sock.recv(count - len(buf))
            except BlockingIOError:
                await self._readable()
                continue
            if not more:
                raise ConnectionClosed(f"peer closed the connection inside {what}")
            buf += more
        return buf

    async def recv(self) -> Message:
        """Read one front-end request (REPLY must be clear, size checked)."""
        while True:
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(HEADER_SIZE, _ANCILLARY_SPACE, _RECV_FLAGS)
                break
            except BlockingIOError:
                await self._readable()
        fds = _fds_from_ancillary(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise ProtocolError(f"more than {MAX_FDS} file descriptors attached to one message")
        if not data:
            _close_all(fds)
            raise ConnectionClosed("peer closed the connection")
        try:
            if len(data) < HEADER_SIZE:
                data += await self._recv_exact(HEADER_SIZE - len(data), "a header")
            request, flags, size = _parse_header(data, fds, expect_reply=False)
            payload = await self._recv_exact(size, f"the {request_name(request)} payload") if size else b""
        except BaseException:   # EOF, a reset, or cancellation mid-message: fds are ours
            _close_all(fds)
            raise
        return Message(request, flags, payload, fds)

    def send(self, request: int, flags: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send one reply.  Replies are small, so a full socket buffer means a
        front-end that stopped reading; we block briefly rather than queue,
        and give up after ``SEND_TIMEOUT`` seconds with ConnectionClosed
        (blocking forever would freeze every queue and signal of the device)."""
        data = encode_message(request, flags, payload)
        self.sock.settimeout(SEND_TIMEOUT)
        try:
            sent = self.sock.sendmsg([data], _ancillary(fds))
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except TimeoutError:
            raise ConnectionClosed(f"{request_name(request)}: front-end stopped reading replies "
                                   f"for {SEND_TIMEOUT}s") from None
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()
