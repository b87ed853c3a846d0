"""The net device with the real front-end driver and a real tap, inside a
network namespace each test creates.

The "guest" is ``VhostUserFrontend`` driving receiveq0/transmitq0; the
host side is an AF_PACKET socket on the tap (exact bytes both ways) and
the namespace's own IP stack (ICMP echo to the tap's address).
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from frontend.vhost_user import DRIVER_PROTOCOL_FEATURES, VhostUserFrontend
from connection.protocol import ProtocolFeature, VirtioFeature
from devices import net as netdev
from devices import tap as taplib
from devices import ConfigError
from devices.net import NetBuilder
from frontend.netns import HDR, NetDriver, NetNs, icmp_echo_frame, packet_socket, udp_frame

MiB = 1 << 20
TAP = "vhtap0"
HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
GUEST_MAC = "52:54:00:12:34:56"
RING = (int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_INDIRECT_DESC
            | VirtioFeature.PROTOCOL_FEATURES))
ALL = (RING | netdev.F_MRG_RXBUF | netdev.F_CSUM | netdev.F_GUEST_CSUM | netdev.F_HOST_TSO4
       | netdev.F_HOST_TSO6 | netdev.F_GUEST_TSO4 | netdev.F_GUEST_TSO6 | netdev.F_STATUS | netdev.F_MTU)


@pytest.fixture
def ns():
    space = NetNs()
    try:
        with space.entered():
            yield space
    finally:
        space.close()


def start(ns, run_device, options=None, features=ALL, size=256):
    opts = {"tap-name": TAP, "mtu": "1500"}
    opts.update(options or {})
    builder = NetBuilder.from_options("net0", opts)
    ns.ip("addr", "add", f"{HOST_IP}/24", "dev", builder.tap.name)
    ns.ip("neigh", "add", GUEST_IP, "lladdr", GUEST_MAC, "dev", builder.tap.name)
    dev = run_device(builder)
    fe = VhostUserFrontend.connect(dev.path)
    fe.negotiate(features, int(DRIVER_PROTOCOL_FEATURES | ProtocolFeature.MTU | ProtocolFeature.STATUS))
    fe.setup_memory(32 * MiB)
    drv = NetDriver(fe, size)
    for _ in range(100):
        if builder.device is not None:
            break
        time.sleep(0.01)
    return builder, fe, drv


def tap_mac(ns) -> str:
    import json
    return json.loads(ns.ip("-j", "link", "show", TAP).stdout)[0]["address"]


def wait_for(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------

def test_options_name_the_bad_key(ns):
    bad = [({}, "tap-name= and tap-fd="),
           ({"tap-name": TAP, "tap-fd": "5"}, "exactly one"),
           ({"tap-name": TAP, "mac": "52:54:00:zz:00:01"}, "key 'mac'"),
           ({"tap-name": TAP, "mac": "01:00:5e:00:00:01"}, "multicast"),
           ({"tap-name": TAP, "mtu": "20"}, "key 'mtu'"),
           ({"tap-name": TAP, "num-queues": "17"}, "key 'num-queues'"),
           ({"tap-name": TAP, "bogus": "1"}, "key 'bogus'"),
           ({"tap-name": "x" * 16}, "not a valid interface name"),
           ({"tap-fd": "abc"}, "key 'tap-fd'"),
           ({"tap-fd": "0"}, "key 'tap-fd'")]
    for opts, text in bad:
        with pytest.raises(ConfigError, match=text):
            NetBuilder.from_options("net0", opts)
    r, w = os.pipe()
    try:
        with pytest.raises(ConfigError, match=f"key 'tap-fd', value '{r}'"):
            NetBuilder.from_options("net0", {"tap-fd": str(r)})
    finally:
        os.close(r)
        os.close(w)


def test_tap_opened_as_specified(ns):
    b = NetBuilder.from_options("net0", {"tap-name": "vht%d", "mtu": "1400", "num-queues": "2"})
    try:
        assert b.tap.name.startswith("vht") and len(b.tap.fds) == 2
        for fd in b.tap.fds:
            name, flags = taplib.tap_flags(fd)
            assert name == b.tap.name
            want = taplib.IFF_TAP | taplib.IFF_NO_PI | taplib.IFF_VNET_HDR | taplib.IFF_MULTI_QUEUE
            assert flags & want == want
            assert taplib.vnet_hdr_size(fd) == 12
            assert not os.get_blocking(fd)
        assert taplib.link_mtu(b.tap.name) == 1400
        # tap-fd=: the same fds adopted by a second builder
        dup = [os.dup(fd) for fd in b.tap.fds]
        b2 = NetBuilder.from_options("net1", {"tap-fd": ":".join(map(str, dup))})
        assert b2.tap.name == b.tap.name and b2.keep_fds() == dup
        b2.close()
        dev = b.build(None)  # type: ignore[arg-type]  # no loop needed to read features
        assert dev.max_queue_num() == 4 and dev.features() & netdev.F_MQ and dev.features() & netdev.F_MTU
    finally:
        b.close()


def test_frames_both_ways(ns, run_device):
    builder, fe, drv = start(ns, run_device)
    dev = builder.device
    assert fe.acked_features & netdev.F_MRG_RXBUF and dev.offloads == 7
    drv.post(64)
    sock = packet_socket(TAP)
    try:
        # guest -> host, exact bytes (AF_PACKET on the tap sees what the device wrote)
        frame, _, _ = udp_frame(GUEST_MAC, "ff:ff:ff:ff:ff:ff", GUEST_IP, "10.77.0.255", 4000, 4001, b"x" * 300)
        assert drv.send(frame) == 0
        while True:
            got = sock.recv(4096)
            if got == frame:
                break
        # ... with the header split over two buffers, and inside one
        assert drv.send(frame, split_at=5) == 0
        assert drv.send(frame, split_at=12) == 0
        seen = 0
        while seen < 2:
            if sock.recv(4096) == frame:
                seen += 1
        # host -> guest, exact bytes (num_buffers 1, flags clean)
        inject, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, HOST_IP, GUEST_IP, 5000, 5001, b"y" * 1000)
        sock.send(inject)
        [(hdr, data)] = drv.frames(1, match=lambda f: f == inject)
        assert hdr[6] == 1 and hdr[1] == 0
        # through the namespace's IP stack: ICMP echo to the tap's address
        mac = tap_mac(ns)
        for seq in range(1, 4):
            drv.send(icmp_echo_frame(GUEST_MAC, mac, GUEST_IP, HOST_IP, 0x1234, seq))
            [(hdr, reply)] = drv.frames(1, match=lambda f: f[12:14] == b"\x08\x00" and f[23] == 1)
            assert reply[34] == 0 and struct.unpack("!HH", reply[38:42]) == (0x1234, seq)
    finally:
        sock.close()
        fe.close()
    assert dev.stats["tx_packets"] == 6 and dev.stats["rx_packets"] >= 4
    assert not any(k.startswith(("tx_dropped", "rx_dropped")) for k in dev.stats)


def test_rx_merges_small_buffers(ns, run_device):
    builder, fe, drv = start(ns, run_device)
    drv.post(128, size=256)
    sock = packet_socket(TAP)
    try:
        inject, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, HOST_IP, GUEST_IP, 5000, 5001,
                                 bytes(range(256)) * 5)
        sock.send(inject)
        [(hdr, data)] = drv.frames(1, match=lambda f: f == inject)
        assert hdr[6] == -(-(12 + len(inject)) // 256)   # every buffer but the last filled
    finally:
        sock.close()
        fe.close()


def test_rx_without_mergeable_buffers(ns, run_device):
    builder, fe, drv = start(ns, run_device, features=ALL & ~netdev.F_MRG_RXBUF)
    dev = builder.device
    drv.post(8, size=256)   # too small for the frame below: dropped, buffers kept
    sock = packet_socket(TAP)
    try:
        big, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, HOST_IP, GUEST_IP, 1, 2, b"z" * 600)
        sock.send(big)
        wait_for(lambda: dev.stats["rx_dropped_too_big"] >= 1, "the too-big frame to be counted")
        small, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, HOST_IP, GUEST_IP, 1, 2, b"s" * 100)
        sock.send(small)
        [(hdr, data)] = drv.frames(1, match=lambda f: f == small)
        assert hdr[6] == 1
    finally:
        sock.close()
        fe.close()


def test_rx_without_buffers_stalls_counts_and_resumes(ns, run_device):
    """No guest buffer: the device stops reading the tap (one stall, no
    spinning), the kernel queues and then drops (counted on the tap), and
    everything queued arrives once the guest posts buffers."""
    builder, fe, drv = start(ns, run_device)
    dev = builder.device
    ns.ip("link", "set", TAP, "txqueuelen", "100")
    sock = packet_socket(TAP)
    sent = 300
    try:
        before = ns.link_stats(TAP)["tx_dropped"]
        for i in range(sent):
            f, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, HOST_IP, GUEST_IP, 7, 7, struct.pack("!I", i))
            sock.send(f)
        wait_for(lambda: dev.stats["rx_no_buffers"] >= 1, "the rx stall")
        wait_for(lambda: ns.link_stats(TAP)["tx_dropped"] - before > 0, "the kernel to drop")
        time.sleep(0.1)
        stalls = dev.stats["rx_no_buffers"]
        time.sleep(0.3)
        # (a kick left over from the ring's start may cost one more look)
        assert dev.stats["rx_no_buffers"] == stalls <= 2, "the rx task woke up without guest buffers"
        dropped = ns.link_stats(TAP)["tx_dropped"] - before
        drv.post(256)
        got = drv.frames(sent - dropped, match=lambda f: f[-4:] != b"" and f[36:38] == b"\x00\x07")
        seqs = [struct.unpack("!I", f[-4:])[0] for _, f in got]
        assert seqs == sorted(seqs) and len(seqs) == sent - dropped
    finally:
        sock.close()
        fe.close()


def test_hostile_tx_headers_are_counted_drops(ns, run_device):
    builder, fe, drv = start(ns, run_device)
    dev = builder.device
    sock = packet_socket(TAP)
    good, cs, co = udp_frame(GUEST_MAC, "ff:ff:ff:ff:ff:ff", GUEST_IP, "10.77.0.255", 1, 2, b"g" * 100)
    n = len(good)
    cases = [
        ("tx_dropped_bad_header", HDR.pack(0, 1, 0, 0, cs, co, 0), good),          # TSO with gso_size 0
        ("tx_dropped_bad_header", HDR.pack(1, 1, 0, 65535, cs, co, 0), good),      # absurd gso_size
        ("tx_dropped_bad_header", HDR.pack(1, 4, 54, 60000, cs, co, 0), good),     # ditto, v6
        ("tx_dropped_bad_header", HDR.pack(1, 3, 0, 100, cs, co, 0), good),        # UFO: not negotiated
        ("tx_dropped_bad_header", HDR.pack(1, 0x81, 0, 100, cs, co, 0), good),     # ECN: not negotiated
        ("tx_dropped_bad_header", HDR.pack(1, 0, 0, 0, n, 0, 0), good),            # csum_start past the end
        ("tx_dropped_bad_header", HDR.pack(1, 0, 0, 0, cs, 0xFFF0, 0), good),      # csum_offset past the end
        ("tx_dropped_bad_header", HDR.pack(0, 1, 0, 100, cs, co, 0), good),        # GSO without NEEDS_CSUM
        ("tx_dropped_short", bytes(12), b"\x01" * 5),                              # no Ethernet header
        ("tx_dropped_short", b"", b"\x00" * 7),                                    # not even a vnet header
        ("tx_dropped_over_mtu", bytes(12), good + b"\0" * 1500),                   # over MTU, no GSO
        ("tx_dropped_oversize", bytes(12), b"\0" * 70000),                         # over any frame
    ]
    try:
        for counter, hdr, frame in cases:
            before = dev.stats[counter]
            assert drv.send(frame, hdr) == 0
            assert dev.stats[counter] == before + 1, (counter, hdr)
        assert drv.send(good, writable=16) == 0
        assert dev.stats["tx_dropped_bad_chain"] == 1
        # the queue is alive and the good frame goes out
        drv.send(good, HDR.pack(2, 0, 9999, 0, 0, 0, 77))   # DATA_VALID, silly hdr_len: sanitised
        drv.send(good)
        seen = 0
        while seen < 2:
            if sock.recv(4096) == good:
                seen += 1
        assert not drv.tx.broken()
        assert dev.stats["tx_packets"] == 2
    finally:
        sock.close()
        fe.close()


def test_tx_partial_checksum_is_completed_by_the_tap(ns, run_device):
    """NEEDS_CSUM with CSUM negotiated: the tap computes the checksum."""
    builder, fe, drv = start(ns, run_device)
    frame, cs, co = udp_frame(GUEST_MAC, "ff:ff:ff:ff:ff:ff", GUEST_IP, "10.77.0.255", 9, 9, b"c" * 64,
                              partial_csum=True)
    full, _, _ = udp_frame(GUEST_MAC, "ff:ff:ff:ff:ff:ff", GUEST_IP, "10.77.0.255", 9, 9, b"c" * 64)
    rcv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rcv.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    rcv.bind(("10.77.0.255", 9))
    rcv.settimeout(5)
    try:
        drv.send(frame, HDR.pack(1, 0, 0, 0, cs, co, 0))
        drv.send(full)
        # both pass the stack's UDP checksum check (a bad one would be dropped)
        assert rcv.recv(100) == b"c" * 64
        assert rcv.recv(100) == b"c" * 64
    finally:
        rcv.close()
        fe.close()


def test_tap_errors_are_counted_and_the_queue_lives(ns, run_device):
    builder, fe, drv = start(ns, run_device)
    dev = builder.device
    frame, _, _ = udp_frame(GUEST_MAC, "ff:ff:ff:ff:ff:ff", GUEST_IP, "10.77.0.255", 1, 2, b"e" * 10)
    try:
        ns.ip("link", "set", TAP, "down")
        assert drv.send(frame) == 0
        assert dev.stats["tx_tap_errors"] == 1       # EIO while the link is down
        ns.ip("link", "set", TAP, "up")
        sock = packet_socket(TAP)
        try:
            drv.send(frame)
            while sock.recv(4096) != frame:
                pass
        finally:
            sock.close()
    finally:
        fe.close()


def test_guest_without_offloads_gets_none(ns, run_device):
    """The tap's offloads follow the guest's GUEST_* acks (TUNSETOFFLOAD
    from the child): a guest without GUEST_CSUM never sees partial
    checksums or GSO frames, even from a local TCP sender."""
    feats = ALL & ~(netdev.F_GUEST_CSUM | netdev.F_GUEST_TSO4 | netdev.F_GUEST_TSO6)
    builder, fe, drv = start(ns, run_device, features=feats)
    assert builder.device.offloads == 0
    drv.post(128)
    sock = packet_socket(TAP)
    try:
        inject, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, HOST_IP, GUEST_IP, 5, 6, b"q")
        sock.send(inject)
        [(hdr, _)] = drv.frames(1, match=lambda f: f == inject)
        assert hdr[0] == 0 and hdr[1] == 0
    finally:
        sock.close()
        fe.close()


def test_net_set_mtu(ns, run_device):
    from connection.protocol import FrontendReq, encode_u64
    builder, fe, drv = start(ns, run_device)
    assert fe.acked_protocol_features & ProtocolFeature.REPLY_ACK
    fe.request(FrontendReq.NET_SET_MTU, encode_u64(1400))
    assert builder.device.max_frame == 1400 + 18
    with pytest.raises(Exception, match="NET_SET_MTU|failure|refused"):
        fe.request(FrontendReq.NET_SET_MTU, encode_u64(9000))
    fe.close()


def test_qemu_init_order_enable_before_set_features(ns, run_device):
    """QEMU's net device sends SET_VRING_ENABLE for every pair at init,
    before SET_FEATURES; the rx ring then serves only once enabled."""
    from connection.protocol import FrontendReq, encode_u64, encode_vring_state
    builder = NetBuilder.from_options("net0", {"tap-name": TAP, "mtu": "1500"})
    dev = run_device(builder)
    fe = VhostUserFrontend.connect(dev.path)
    fe.negotiate(ALL, int(DRIVER_PROTOCOL_FEATURES | ProtocolFeature.MTU), set_features=False)
    fe.request(FrontendReq.SET_VRING_ENABLE, encode_vring_state(0, 0))
    fe.request(FrontendReq.SET_VRING_ENABLE, encode_vring_state(1, 1))
    fe.request(FrontendReq.SET_FEATURES, encode_u64(ALL))
    fe.acked_features = ALL
    fe.setup_memory(16 * MiB)
    drv = NetDriver(fe, 64)     # setup_queue enables both rings at the end
    drv.post(16)
    sock = packet_socket(TAP)
    try:
        inject, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, HOST_IP, GUEST_IP, 5, 6, b"order")
        sock.send(inject)
        drv.frames(1, match=lambda f: f == inject)
        fe.enable_queue(0, False)   # disabled: the tap is no longer read
        time.sleep(0.2)
        sock.send(inject)
        time.sleep(0.3)
        assert not drv.rx.poll_used()
        fe.enable_queue(0, True)
        drv.frames(1, match=lambda f: f == inject)
    finally:
        sock.close()
        fe.close()


def test_multiqueue_disabled_pair_is_detached_from_the_tap(ns, run_device):
    """Two pairs, the second disabled (as QEMU does until VQ_PAIRS_SET): its
    tap queue is detached, so every flow arrives on pair 0; enabled again,
    the kernel spreads flows over both."""
    builder, fe, drv = start(ns, run_device, {"num-queues": "2"},
                             features=ALL | netdev.F_MQ)
    assert fe.acked_features & netdev.F_MQ
    rx1 = fe.setup_queue(2, 64)
    fe.setup_queue(3, 64)
    bufs1 = {}
    for _ in range(64):
        gpa, view = rx1.alloc(2048)
        bufs1[rx1.submit([], [(gpa, 2048)])] = view
    rx1.kick()
    drv.post(128)
    sock = packet_socket(TAP)

    def flows(n: int) -> list[bytes]:
        return [udp_frame("02:00:00:00:00:01", GUEST_MAC, HOST_IP, GUEST_IP, 10000 + i, 7, b"mq")[0]
                for i in range(n)]
    try:
        fe.enable_queue(2, False)
        fe.enable_queue(3, False)
        for f in flows(40):
            sock.send(f)
        drv.frames(40, match=lambda f: f[36:38] == b"\x00\x07")
        assert not rx1.poll_used(), "a frame was steered to the disabled pair"
        fe.enable_queue(2, True)
        fe.enable_queue(3, True)
        for f in flows(40):
            sock.send(f)
        time.sleep(0.5)
        on1 = len(rx1.poll_used())
        on0 = 0
        while on0 + on1 < 40:
            on0 += len(drv.frames(1, match=lambda f: f[36:38] == b"\x00\x07"))
        assert on1 > 0 and on0 > 0, (on0, on1)
    finally:
        sock.close()
        fe.close()
