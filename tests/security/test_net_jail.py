"""The net child's confinement with a real tap fd (in a namespace the test
creates): frames, TUNSETOFFLOAD and TUNSETQUEUE pass, every other tun ioctl kills, and no
network is reachable from inside."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

import pytest

from devices import tap as taplib
from sandbox import JailConfig
from frontend.netns import NetNs
from tests.sandbox.helpers import POLICY_DIR, run_in_jail

NET_POLICY = os.path.join(POLICY_DIR, "net.policy")


@pytest.fixture
def tap():
    ns = NetNs("vhsec")
    try:
        with ns.entered():
            t = taplib.open_tap("vhsec0", 1)
            try:
                yield t
            finally:
                t.close()
    finally:
        ns.close()


def _config(t) -> JailConfig:
    return JailConfig(name="net-attack", seccomp_policy=NET_POLICY, log_fd=2, keep_fds=list(t.fds))


def test_frames_and_offloads_allowed(tap):
    fd = tap.fds[0]

    def inside():
        taplib.set_offload(fd, 0)
        frame = bytes(12) + b"\xff" * 6 + b"\x02" + bytes(5) + b"\x88\xb5" + bytes(46)
        n = os.writev(fd, [frame[:12], frame[12:]])
        try:
            os.read(fd, 65536)
        except BlockingIOError:
            pass
        ifaces = os.listdir("/sys/class/net") if os.path.isdir("/sys/class/net") else []
        return [n, len(frame), ifaces]

    result, reason, _ = run_in_jail(_config(tap), inside)
    assert reason.kind == "disconnected" and result[0] == result[1], (str(reason), result)
    assert result[2] == [], "the child sees no interface"


@pytest.mark.parametrize("name,req,arg", [
    ("TUNSETPERSIST", 0x400454CB, 1),
    ("TUNSETOWNER", 0x400454CC, 0),
    ("TUNSETVNETHDRSZ", taplib.TUNSETVNETHDRSZ, struct.pack("i", 10)),
    ("TUNSETIFF", taplib.TUNSETIFF, struct.pack("16sH22x", b"evil0", taplib.IFF_TAP)),
])
def test_other_tun_ioctls_kill(tap, name, req, arg):
    fd = tap.fds[0]
    result, reason, _ = run_in_jail(_config(tap), lambda: fcntl.ioctl(fd, req, arg))
    assert result is None
    assert reason.kind == "seccomp" and reason.syscall == "ioctl", (name, str(reason))


def test_no_socket_from_the_net_child(tap):
    result, reason, _ = run_in_jail(_config(tap), lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    assert reason.kind == "seccomp" and reason.syscall == "socket", str(reason)
