"""Case: DPDK's testpmd (net_virtio_user) as a second, independent front-end of
the jailed net device; packet counts are checked on the tap, in a namespace
the test creates.

testpmd runs interactively (`-i`) so each phase has a definite start and stop:
txonly (the device writes every frame testpmd queued to the tap), then rxonly
(frames the host injects on the tap reach testpmd, or the kernel counts what it
dropped)."""

from __future__ import annotations

import logging
import re
import time

import pytest

from frontend.guest.backends import Supervisor
from frontend.netns import NetNs, packet_socket, udp_frame
from frontend.testpmd import PmdSession

log = logging.getLogger("e2e")
TAP = "vhdp0"


def _stat(text: str, key: str) -> int:
    m = re.search(rf"{key}:\s+(\d+)", text)
    assert m, f"no {key} in testpmd output:\n{text}"
    return int(m.group(1))


@pytest.fixture
def ns():
    space = NetNs("vhdpdk")
    try:
        with space.entered():
            yield space
    finally:
        space.close()


@pytest.mark.e2e
def test_testpmd_frames_both_ways_counted_on_the_tap(ns, workdir):
    sock = workdir / "net.sock"
    sup = Supervisor(workdir, ["--net", f"vhost={sock},tap-name={TAP},name=net0"], workdir / "supervisor.log")
    sup.start([sock])
    pmd = None
    try:
        pmd = PmdSession(sock, workdir)
        # txonly: testpmd -> device -> tap
        before = ns.link_stats(TAP)
        pmd.cmd("set fwd txonly", "testpmd> ")
        pmd.cmd("start", "testpmd> ")
        time.sleep(3)
        out = pmd.cmd("stop", "Done.")
        sent = _stat(out, "TX-packets")
        assert sent > 1000, out
        deadline = time.monotonic() + 10
        while ns.link_stats(TAP)["rx_packets"] - before["rx_packets"] < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        after = ns.link_stats(TAP)
        assert after["rx_packets"] - before["rx_packets"] == sent, (sent, before, after)
        assert after["rx_bytes"] - before["rx_bytes"] == sent * 64
        assert after["rx_errors"] == before["rx_errors"]

        # rxonly: tap -> device -> testpmd
        pmd.cmd("set fwd rxonly", "testpmd> ")
        pmd.cmd("start", "testpmd> ")
        count = 2000
        before = ns.link_stats(TAP)
        s = packet_socket(TAP)
        try:
            for i in range(count):
                f, _, _ = udp_frame("02:00:00:00:00:01", "02:00:00:00:00:02", "10.80.0.1", "10.80.0.2",
                                    1000, 1001, i.to_bytes(4, "big") + bytes(60))
                s.send(f)
        finally:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            after = ns.link_stats(TAP)
            if after["tx_packets"] - before["tx_packets"] + after["tx_dropped"] - before["tx_dropped"] >= count:
                break
            assert time.monotonic() < deadline, (before, after)
            time.sleep(0.05)
        time.sleep(0.5)
        out = pmd.cmd("stop", "Done.")
        received = _stat(out, "RX-packets")
        dropped = after["tx_dropped"] - before["tx_dropped"]
        assert received + dropped == count, (received, dropped, out)
        assert received > count // 2, (received, dropped)
        log.warning("testpmd: txonly %d frames in 3 s to the tap; rxonly %d of %d (kernel dropped %d)",
                    sent, received, count, dropped)
    finally:
        if pmd is not None:
            pmd.quit()
        sup.stop()
    assert not sup.abnormal_exits(), sup.abnormal_exits()
    assert "seccomp" not in (workdir / "supervisor.log").read_text()
