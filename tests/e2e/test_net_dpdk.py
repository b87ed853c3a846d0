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
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import procs
from tests.e2e.harness.backends import Supervisor
from tests.netns import NetNs, packet_socket, udp_frame

log = logging.getLogger("e2e")
TAP = "vhdp0"
TESTPMD = "dpdk-testpmd"


class PmdSession:
    """dpdk-testpmd -i on our socket; ``cmd`` waits for the next prompt."""

    def __init__(self, sock: Path, workdir: Path) -> None:
        if shutil.which(TESTPMD) is None:
            raise AssertionError(f"{TESTPMD} is not installed (Debian dpdk-dev, librte-net-virtio23, "
                                 "librte-mempool-ring23): run `make system-packages`")
        self.log = workdir / "testpmd.log"
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            # stdbuf: testpmd's stdout is a file here, block-buffered without it
            ["stdbuf", "-oL", TESTPMD, "-l", "0,1", "--no-huge", "-m", "256", "--no-pci", f"--file-prefix=vh{workdir.name}",
             "--vdev", f"net_virtio_user0,path={sock},queues=1,queue_size=256",
             "--", "-i", "--total-num-mbufs=8192", "--txpkts=64", "--nb-cores=1"],
            stdin=subprocess.PIPE, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        procs._LIVE.append(self.proc)
        self._wait_for("testpmd> ", 0, 60)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_for(self, marker: str, start: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            t = self.text()
            i = t.find(marker, start)
            if i >= 0:
                return t[start:i + len(marker)]
            if self.proc.poll() is not None:
                raise AssertionError(f"testpmd exited ({self.proc.returncode}):\n{t[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"testpmd did not print {marker!r} within {timeout}s:\n{t[-3000:]}")
            time.sleep(0.05)

    def cmd(self, line: str, marker: str, timeout: float = 30) -> str:
        """Send one command; the output up to ``marker`` (testpmd prints its
        prompt before a command's output when stdout is not a terminal)."""
        assert self.proc.stdin is not None
        start = len(self.text())
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._wait_for(marker, start, timeout)

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                procs.stop(self.proc)
        self.out.close()


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
