"""DPDK's testpmd as an independent vhost-user net front-end (its net_virtio_user
vdev, ``--no-huge``), for the e2e test and ``benchmarks/net.py``."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from frontend.guest import procs

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
