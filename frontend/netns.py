"""Network namespaces a test creates, and the frames it sends through them.

Every address a net test uses lives in a namespace made here (``ip netns
add``) and deleted afterwards; the test thread enters it with setns(2) so
the taps the device builder creates, and the sockets the test opens, are
inside it, never in the host's namespace.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from frontend.vhost_user import VhostUserFrontend

CLONE_NEWNET = 0x40000000
#: virtio_net_hdr_v1
HDR = struct.Struct("<BBHHHHH")
#: VIRTIO_NET_F_MRG_RXBUF
F_MRG_RXBUF = 1 << 15
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run iproute2's ``ip`` (in whatever namespace ``-n`` names)."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class NetNs:
    """A named network namespace, deleted by ``close``."""

    def __init__(self, prefix: str = "vhnet") -> None:
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        ip("netns", "add", self.name)
        self.path = f"/run/netns/{self.name}"
        ip("-n", self.name, "link", "set", "lo", "up")
        # No IPv6 autoconfiguration chatter (router solicitations, MLD) on
        # the taps made in here: tests count the frames they see.
        subprocess.run(["ip", "netns", "exec", self.name, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                       check=True, capture_output=True)

    @contextmanager
    def entered(self) -> Iterator["NetNs"]:
        """Run the calling thread inside the namespace (threads started
        meanwhile inherit it); back to the original one afterwards."""
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(orig)
        finally:
            os.close(target)
            os.close(orig)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return ip("-n", self.name, *args, check=check)

    def exec(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def link_stats(self, dev: str) -> dict:
        """``ip -s -j link show DEV``'s stats64, flattened: rx_packets,
        tx_dropped, tx_errors, ..."""
        out = self.ip("-s", "-j", "link", "show", dev).stdout
        stats = json.loads(out)[0]["stats64"]
        return {f"{d}_{k}": v for d in ("rx", "tx") for k, v in stats[d].items()}

    def close(self) -> None:
        ip("netns", "del", self.name, check=False)


# --------------------------------------------------------------------------
# frames

def csum(data: bytes) -> int:
    """The Internet checksum (ones' complement of the ones' complement sum)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac_bytes(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def ipv4_header(src: str, dst: str, proto: int, payload_len: int, ident: int = 1) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]


def icmp_echo_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, ident: int, seq: int,
                    payload: bytes = b"vhost-net-test") -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    return (mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_IP)
            + ipv4_header(src_ip, dst_ip, 1, len(icmp)) + icmp)


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int,
              payload: bytes, *, partial_csum: bool = False) -> tuple[bytes, int, int]:
    """A UDP/IPv4 frame; returns (frame, csum_start, csum_offset).  With
    ``partial_csum`` the UDP checksum field holds the pseudo-header sum, as
    a driver leaves it for NEEDS_CSUM."""
    ulen = 8 + len(payload)
    pseudo = socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    if partial_csum:
        s = sum(struct.unpack("!6H", pseudo))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        c = s
    else:
        c = csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    frame = (mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_IP)
             + ipv4_header(src_ip, dst_ip, 17, ulen) + udp)
    return frame, 14 + 20, 6


def packet_socket(ifname: str) -> socket.socket:
    """An AF_PACKET socket bound to ``ifname`` (in the current namespace):
    what it sends, the tap's reader (the device's rx) gets; what the device
    writes to the tap, it receives."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.settimeout(5.0)
    return s


# --------------------------------------------------------------------------
# the guest side, with the real front-end driver

class NetDriver:
    """receiveq0/transmitq0 of a connected front-end."""

    def __init__(self, fe: VhostUserFrontend, size: int = 256) -> None:
        self.fe = fe
        self.rx = fe.setup_queue(0, size)
        self.tx = fe.setup_queue(1, size)
        self.mrg = bool(fe.acked_features & F_MRG_RXBUF)
        self.bufs: dict[int, tuple[int, memoryview]] = {}
        self.pending: list[bytes] = []

    def post(self, n: int, size: int = 2048) -> None:
        for _ in range(n):
            gpa, view = self.rx.alloc(size)
            head = self.rx.submit([], [(gpa, size)])
            self.bufs[head] = (gpa, view)
        self.rx.kick()

    def repost(self, head: int) -> None:
        gpa, view = self.bufs.pop(head)
        new = self.rx.submit([], [(gpa, len(view))])
        self.bufs[new] = (gpa, view)

    def _next(self, deadline: float) -> bytes:
        """The next used rx buffer's bytes.  A whole batch is copied out
        before any buffer is reposted: a reposted chain may take the
        descriptor (and so the head number) of a completion not yet read."""
        if not self.pending:
            batch = self.rx.wait_used(max(0.01, deadline - time.monotonic()))
            self.pending.extend(bytes(self.bufs[h][1][:n]) for h, n in batch)
            for h, _ in batch:
                self.repost(h)
            self.rx.kick()
        return self.pending.pop(0)

    def frames(self, count: int, timeout: float = 5.0, match=lambda f: True) -> list[tuple[tuple, bytes]]:
        """``count`` received frames as (header fields, frame); frames
        ``match`` rejects are skipped."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            data = self._next(deadline)
            hdr = HDR.unpack_from(data)
            for _ in range(hdr[6] - 1 if self.mrg else 0):
                data += self._next(deadline)
            if match(data[12:]):
                out.append((hdr, data[12:]))
        return out

    def send(self, frame: bytes, hdr: bytes | None = None, *, split_at: int | None = None,
             writable: int = 0) -> int:
        """One tx chain; returns its used length (0 for every tx chain)."""
        data = (hdr if hdr is not None else bytes(12)) + frame
        readable = []
        if split_at is None:
            gpa, view = self.tx.alloc(len(data))
            view[:] = data
            readable.append((gpa, len(data)))
        else:
            for part in (data[:split_at], data[split_at:]):
                gpa, view = self.tx.alloc(len(part))
                view[:] = part
                readable.append((gpa, len(part)))
        w = []
        if writable:
            gpa, _ = self.tx.alloc(writable)
            w.append((gpa, writable))
        self.tx.submit(readable, w)
        self.tx.kick()
        done = self.tx.wait_used(5)
        assert len(done) == 1
        return done[0][1]
