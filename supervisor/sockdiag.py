"""One Unix socket by inode, from the kernel: sock_diag (NETLINK_SOCK_DIAG, UNIX_DIAG).

Why not /proc/net/unix: reading it costs one text line per Unix socket on
the host, so any local user who opens 50,000 sockets makes every scan of the
supervisor 50,000 lines slower.  An exact request (no NLM_F_DUMP) names one
inode and gets one answer; the supervisor asks about its own listeners and
the few sockets a device child holds, so its cost follows the number of
devices, not the host.  (The kernel finds the inode with a walk of its own
hash table, in C, within our network namespace; that is microseconds even
with 50k sockets: see benchmarks/containment.py.)
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_PEER = 0x04
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_NAME = 0
UNIX_DIAG_PEER = 2
UNIX_DIAG_RQLEN = 4
TCP_ESTABLISHED = 1
TCP_LISTEN = 10
NO_COOKIE = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBHIIIII")      # unix_diag_req
_MSG = struct.Struct("=BBBBIII")       # unix_diag_msg
_RTA = struct.Struct("=HH")


@dataclass(frozen=True)
class UnixSocket:
    inode: int
    state: int                 # TCP_LISTEN, TCP_ESTABLISHED, ...
    name: bytes | None = None  # the bound path (an accepted socket carries its listener's)
    peer: int | None = None    # the peer's inode; 0 once the peer closed
    rqueue: int | None = None  # a listener: connections waiting in the accept queue

    @property
    def connected(self) -> bool:
        return self.state == TCP_ESTABLISHED and bool(self.peer)


class SockDiag:
    """A netlink socket for exact UNIX_DIAG requests; one per supervisor."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        self.sock.settimeout(1.0)   # the reply is queued during send; this never waits in practice
        self.seq = 0

    def query(self, inode: int, show: int = UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN
              ) -> UnixSocket | None:
        """The socket with ``inode`` in our network namespace, or None if there is none."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, show, NO_COOKIE, NO_COOKIE)
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                                      self.seq, 0) + req)
        while True:
            data = self.sock.recv(65536)
            length, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(data)
            if seq == self.seq:
                break
        if mtype == NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, _NLMSGHDR.size)[0]
            if err == errno.ENOENT:
                return None
            raise OSError(err, f"sock_diag inode {inode}: {errno.errorcode.get(err, err)}")
        _fam, _type, state, _pad, ino, _c0, _c1 = _MSG.unpack_from(data, _NLMSGHDR.size)
        name = peer = rqueue = None
        off = _NLMSGHDR.size + _MSG.size
        end = min(length, len(data))
        while off + _RTA.size <= end:
            alen, atype = _RTA.unpack_from(data, off)
            if alen < _RTA.size:
                break
            payload = data[off + _RTA.size:off + alen]
            if atype == UNIX_DIAG_NAME:
                name = payload.rstrip(b"\0")
            elif atype == UNIX_DIAG_PEER and len(payload) >= 4:
                peer = struct.unpack_from("=I", payload)[0]
            elif atype == UNIX_DIAG_RQLEN and len(payload) >= 8:
                rqueue = struct.unpack_from("=I", payload)[0]
            off += (alen + 3) & ~3
        return UnixSocket(inode=ino, state=state, name=name, peer=peer, rqueue=rqueue)

    def close(self) -> None:
        self.sock.close()
