"""The net device through the supervisor, jailed: the parent opens the tap
inside a namespace the test creates, the child (empty net namespace,
seccomp/net.policy) moves frames, survives SIGKILL with the same tap."""

from __future__ import annotations

import json
import os
import signal

import pytest

from frontend.vhost_user import DRIVER_PROTOCOL_FEATURES, VhostUserFrontend
from connection.protocol import ProtocolFeature
from supervisor import cli
from frontend.netns import NetDriver, NetNs, packet_socket, udp_frame

from .conftest import SupervisorProc

TAP = "vhjail0"
GUEST_MAC = "52:54:00:12:34:56"
MiB = 1 << 20


@pytest.fixture
def ns():
    space = NetNs()
    try:
        with space.entered():   # the supervisor (a subprocess) starts in here
            yield space
    finally:
        space.close()


def _ping_pong(fe_path: str, sock, fe=None) -> tuple[VhostUserFrontend, NetDriver]:
    fe = VhostUserFrontend.connect(fe_path)
    fe.negotiate(None, int(DRIVER_PROTOCOL_FEATURES | ProtocolFeature.MTU))
    fe.setup_memory(16 * MiB)
    drv = NetDriver(fe, 64)
    drv.post(32)
    out, _, _ = udp_frame(GUEST_MAC, "ff:ff:ff:ff:ff:ff", "10.78.0.2", "10.78.0.255", 1, 2, b"jailed-tx")
    drv.send(out)
    while sock.recv(4096) != out:
        pass
    back, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, "10.78.0.1", "10.78.0.2", 3, 4, b"jailed-rx")
    sock.send(back)
    drv.frames(1, match=lambda f: f == back)
    return fe, drv


def test_jailed_net_device_moves_frames_and_survives_sigkill(ns, sup: SupervisorProc, capsys) -> None:
    path = sup.path("net.sock")
    sup.start("--net", f"vhost={path},tap-name={TAP},mtu=1500")
    d = sup.status()["net-0"]
    ns.ip("addr", "add", "10.78.0.1/24", "dev", TAP)
    sock = packet_socket(TAP)
    try:
        # DRIVER_FEATURES lacks MRG_RXBUF, GUEST_CSUM & co: the device serves a minimal driver too
        fe, _ = _ping_pong(path, sock)
        fe.close()
        sup.wait_state("net-0", "ready", pred=lambda x: x["restarts"] >= 1)   # one front-end per child
        d = sup.status()["net-0"]
        # the child sees no interface and is confined like the others
        assert cli.main(["audit", "--json", "-s", sup.control]) == 0
        audit = json.loads(capsys.readouterr().out)["net-0"]
        assert "error" not in audit, audit
        assert audit["namespaces"]["net"]["separate"] is True, audit["namespaces"]
        assert audit["seccomp_mode"] == 2 and audit["no_new_privs"], audit
        tap_fds = [t for t in (audit["fds"] or {}).values() if "tun" in t]
        assert tap_fds, audit["fds"]
        # SIGKILL: the parent still holds the tap; a new child serves it
        os.kill(d["supervised_pid"], signal.SIGKILL)
        new = sup.wait_state("net-0", "ready", pred=lambda x: x["pid"] not in (None, d["pid"]))
        assert new["last_exit"]["signal"] == "SIGKILL"
        assert ns.ip("link", "show", TAP).returncode == 0
        fe, _ = _ping_pong(path, sock)
        fe.close()
    finally:
        sock.close()
    assert sup.terminate() == 0
    log = sup.read_log()
    assert "seccomp-violation" not in log, log


def test_jailed_net_child_survives_a_hostile_guest(ns, sup: SupervisorProc) -> None:
    """Absurd vnet headers, short and over-sized chains, rx chains without a
    writable byte: each is a counted drop in the jailed child, which stays
    up (same pid, no seccomp kill) and keeps moving frames."""
    from frontend.netns import HDR
    path = sup.path("net.sock")
    sup.start("--net", f"vhost={path},tap-name={TAP},mtu=1500")
    pid = sup.status()["net-0"]["pid"]
    ns.ip("addr", "add", "10.78.0.1/24", "dev", TAP)
    sock = packet_socket(TAP)
    fe = VhostUserFrontend.connect(path)
    try:
        fe.negotiate(None, int(DRIVER_PROTOCOL_FEATURES | ProtocolFeature.MTU))
        fe.setup_memory(16 * MiB)
        drv = NetDriver(fe, 64)
        good, cs, co = udp_frame(GUEST_MAC, "ff:ff:ff:ff:ff:ff", "10.78.0.2", "10.78.0.255", 1, 2, b"ok")
        for hdr, frame in [(HDR.pack(1, 1, 0, 0, cs, co, 0), good), (HDR.pack(1, 4, 0, 65535, cs, co, 0), good),
                           (HDR.pack(1, 0, 0, 0, 60000, 60000, 0), good), (HDR.pack(0xFF, 0xFF, 0xFFFF, 0xFFFF, 0xFFFF,
                                                                                 0xFFFF, 0xFFFF), good),
                           (bytes(3), b""), (bytes(12), b"\0" * 69000), (bytes(12), good + bytes(3000))]:
            assert drv.send(frame, hdr) == 0
        gpa, _ = drv.rx.alloc(64)
        bad = drv.rx.submit([(gpa, 64)], [])    # an rx chain with nothing writable
        drv.rx.kick()
        back, _, _ = udp_frame("02:00:00:00:00:01", GUEST_MAC, "10.78.0.1", "10.78.0.2", 3, 4, b"still-here")
        sock.send(back)                          # the device takes the bad chain for it
        assert drv.rx.wait_used(5) == [(bad, 0)]  # ... and gives it back empty
        drv.post(16)
        drv.frames(1, match=lambda f: f == back)
        drv.send(good)
        while sock.recv(4096) != good:
            pass
        assert not drv.tx.broken() and not drv.rx.broken()
    finally:
        sock.close()
        fe.close()
    d = sup.wait_state("net-0", "ready", pred=lambda x: x["restarts"] >= 1)
    assert d["last_exit"]["kind"] == "disconnected", d["last_exit"]   # ended with the front-end, not a crash
    assert pid not in (d["pid"],)
    log = sup.read_log()
    assert "tx_dropped_bad_header" in log and "rx_bad_buffers" in log, log
    assert "seccomp-violation" not in log and "Traceback" not in log, log
    assert sup.terminate() == 0


def test_net_config_forms(ns, sup_dir: str) -> None:
    """--net and the TOML form give the same device; the builder opens the
    tap (in the test's namespace) and names a bad key."""
    from supervisor.config import ConfigError, build_config, open_builders
    toml = os.path.join(sup_dir, "net.toml")
    with open(toml, "w") as f:
        f.write(f"""
[[device]]
type = "net"
name = "lan"
vhost = "{sup_dir}/lan.sock"
tap-name = "vhcfg0"
mtu = 1400
num-queues = 2
""")
    cfg = build_config(config_file=toml, control_socket=f"{sup_dir}/ctl.sock",
                       ordered_flags=[("net", f"vhost={sup_dir}/n.sock,tap-name=vhcfg1,mac=52:54:00:00:00:01")])
    assert [(d.name, d.type) for d in cfg.devices] == [("lan", "net"), ("net-1", "net")]
    assert cfg.devices[0].options == {"tap-name": "vhcfg0", "mtu": "1400", "num-queues": "2"}
    builders = open_builders(cfg)
    try:
        assert len(builders["lan"].keep_fds()) == 2 and builders["lan"].tap.mtu == 1400
        assert builders["net-1"].mac == bytes.fromhex("525400000001")
    finally:
        for b in builders.values():
            b.close()
    bad = build_config(control_socket=f"{sup_dir}/ctl.sock",
                       ordered_flags=[("net", f"vhost={sup_dir}/n.sock,tap-name=vhcfg1,mtu=9")])
    with pytest.raises(ConfigError, match="device 'net-0', key 'mtu', value '9': outside"):
        open_builders(bad)
