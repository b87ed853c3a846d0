"""A few raw vhost-user requests, enough to ask a back-end what it offers.

Why not frontend.vhost_user: this must work against any back-end (qemu-storage-daemon
included) and must not depend on the code under test to judge that code.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

GET_FEATURES = 1
GET_PROTOCOL_FEATURES = 15
VERSION = 0x1
REPLY = 0x4
PROTOCOL_F_INFLIGHT_SHMFD = 12
F_PROTOCOL_FEATURES = 30


def _request_u64(sock: socket.socket, req: int) -> int:
    sock.sendall(struct.pack("<III", req, VERSION, 0))
    hdr = _recv_exact(sock, 12)
    rreq, flags, size = struct.unpack("<III", hdr)
    if rreq != req or not flags & REPLY or size != 8:
        raise RuntimeError(f"bad reply to request {req}: request={rreq} flags={flags:#x} size={size}")
    return struct.unpack("<Q", _recv_exact(sock, 8))[0]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("back-end closed the connection")
        buf += chunk
    return buf


def protocol_features(path: Path, timeout: float = 10.0) -> int:
    """GET_FEATURES then GET_PROTOCOL_FEATURES, as QEMU starts a session; 0 if not offered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        features = _request_u64(s, GET_FEATURES)
        if not features >> F_PROTOCOL_FEATURES & 1:
            return 0
        return _request_u64(s, GET_PROTOCOL_FEATURES)
