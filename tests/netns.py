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
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
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
