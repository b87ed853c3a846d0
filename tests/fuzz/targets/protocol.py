"""Target: the vhost-user message decoder (connection/transport.py framing,
connection/protocol.py payload codecs).

The input is a raw byte stream plus a few fds of any kind; it is written
into a real Unix socketpair (fds as SCM_RIGHTS on the first chunk, more than
MAX_FDS to hit the truncation path) and read back with ``MessageSocket`` or
``AsyncMessageSocket`` until the stream ends or a message is refused; every
decoded payload also goes through its codec.  Fine: ProtocolError,
ConnectionClosed.  A bug: any other exception, a hang, an fd left open.
"""

from __future__ import annotations

import array
import asyncio
import socket

import uvloop

from connection import protocol as P
from connection.errors import ConnectionClosed, ProtocolError
from connection.transport import AsyncMessageSocket, MessageSocket

from ..data import Data
from ..harness import FD_KIND_NAMES, FD_KINDS, check_no_leak, close_all, open_fds

MAX_STREAM = 16 << 10
_loop: asyncio.AbstractEventLoop | None = None

_DECODERS = {
    P.FrontendReq.SET_MEM_TABLE: lambda m: P.decode_mem_table(m.payload),
    P.FrontendReq.ADD_MEM_REG: lambda m: P.decode_single_region(m.payload),
    P.FrontendReq.REM_MEM_REG: lambda m: P.decode_single_region(m.payload),
    P.FrontendReq.SET_VRING_ADDR: lambda m: P.decode_vring_addr(m.payload),
    P.FrontendReq.SET_VRING_NUM: lambda m: P.decode_vring_state(m.payload),
    P.FrontendReq.SET_VRING_BASE: lambda m: P.decode_vring_state(m.payload),
    P.FrontendReq.GET_VRING_BASE: lambda m: P.decode_vring_state(m.payload),
    P.FrontendReq.SET_VRING_ENABLE: lambda m: P.decode_vring_state(m.payload),
    P.FrontendReq.SET_VRING_KICK: lambda m: P.decode_vring_fd_payload(m.request, m.payload),
    P.FrontendReq.SET_VRING_CALL: lambda m: P.decode_vring_fd_payload(m.request, m.payload),
    P.FrontendReq.SET_VRING_ERR: lambda m: P.decode_vring_fd_payload(m.request, m.payload),
    P.FrontendReq.GET_CONFIG: lambda m: P.decode_config(m.request, m.payload),
    P.FrontendReq.SET_CONFIG: lambda m: P.decode_config(m.request, m.payload),
    P.FrontendReq.GET_INFLIGHT_FD: lambda m: P.decode_inflight(m.payload),
    P.FrontendReq.SET_INFLIGHT_FD: lambda m: P.decode_inflight(m.payload),
    P.FrontendReq.SET_FEATURES: lambda m: P.decode_u64(m.request, m.payload),
    P.FrontendReq.SET_PROTOCOL_FEATURES: lambda m: P.decode_u64(m.request, m.payload),
    P.FrontendReq.SET_STATUS: lambda m: P.decode_u64(m.request, m.payload),
}
_ALL_DECODERS = tuple(_DECODERS.values())


def _loop_() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None:
        _loop = uvloop.new_event_loop()
    return _loop


def _decode(msg: P.Message, extra: P.Message | None) -> None:
    _ = msg.name, msg.need_reply, msg.is_reply, repr(msg)
    try:
        P.check_payload_size(msg.request, len(msg.payload))
    except ProtocolError:
        pass
    for m, fn in ((msg, _DECODERS.get(msg.request)), *(((extra, f) for f in _ALL_DECODERS) if extra else ())):
        if fn is None:
            continue
        try:
            fn(m)
        except ProtocolError:
            pass


def one_input(buf: bytes) -> None:
    d = Data(buf)
    mode = d.u8()
    kinds = [d.pick(FD_KIND_NAMES) for _ in range(d.below(11))]
    split = d.u16()
    stream = d.rest()[:MAX_STREAM]
    _loop_()   # the loop's own fds are not the input's
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        fds = [FD_KINDS[k]() for k in kinds]
        first, later = stream[:split % (len(stream) + 1)], stream[split % (len(stream) + 1):]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        if first or anc:
            a.sendmsg([first or b"\0"], anc)
        a.sendall(later)
        close_all(fds)
        a.shutdown(socket.SHUT_WR)
        if mode & 1:
            _read_async(b)
        else:
            _read_blocking(b, (None, False, True)[(mode >> 1) % 3], bool(mode & 8))
    finally:
        close_all(fds)
        a.close()
        b.close()
    check_no_leak(before, "protocol")


def _read_blocking(b: socket.socket, expect_reply: bool | None, cross: bool) -> None:
    b.settimeout(5)
    ms = MessageSocket(b)
    prev: P.Message | None = None
    while True:
        try:
            msg = ms.recv(expect_reply)
        except (ProtocolError, ConnectionClosed):
            return
        try:
            _decode(msg, prev if cross else None)
        finally:
            msg.close_fds()
        prev = msg


def _read_async(b: socket.socket) -> None:
    loop = _loop_()

    async def drain() -> None:
        ms = AsyncMessageSocket(b, loop)
        while True:
            try:
                msg = await ms.recv()
            except (ProtocolError, ConnectionClosed):
                return
            try:
                _decode(msg, None)
            finally:
                msg.close_fds()

    loop.run_until_complete(asyncio.wait_for(drain(), 5))
