"""The standalone program: conventions of the vhost-user spec, exit
statuses, SIGTERM, and crash recovery through the inflight region."""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import subprocess
import time

import pytest

from frontend.vhost_user import VhostUserFrontend
from devices.virtio_blk import HEADER, T_OUT
from devices import standalone

from .conftest import REPO, standalone as run_standalone, standalone_cmd, wait_for_path

MiB = 1 << 20


@pytest.mark.parametrize("kind,features", [("block", ["read-only", "blk-file"]), ("console", []), ("rng", [])])
def test_print_capabilities(kind, features):
    out = subprocess.run(standalone_cmd(kind, "--print-capabilities"), cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"type": kind, "features": features}


def test_usage_errors(tmp_path, capsys):
    assert standalone.main(["block", "--file", str(tmp_path / "x")]) == 2      # no socket
    assert "--socket-path" in capsys.readouterr().err
    assert standalone.main(["block", "--socket-path", str(tmp_path / "s")]) == 2   # no file
    assert "--file" in capsys.readouterr().err
    assert standalone.main(["block", "--socket-path", str(tmp_path / "s"),
                            "--file", str(tmp_path / "missing.img")]) == 1
    assert "key 'path'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        standalone.main(["block", "--socket-path", "a", "--fd", "3"])


def test_exit_zero_on_disconnect_and_sigterm(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    sock = str(tmp_path / "blk.sock")
    with run_standalone("block", "--socket-path", sock, "--file", str(img), log=tmp_path / "log") as proc:
        wait_for_path(sock, proc)
        fe = VhostUserFrontend.connect(sock)
        fe.negotiate()
        fe.close()
        assert proc.wait(10) == 0
    assert not os.path.exists(sock)
    with run_standalone("rng", "--socket-path", sock, log=tmp_path / "log2") as proc:
        wait_for_path(sock, proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - t0 < 2
    assert not os.path.exists(sock)
    # SIGTERM while serving a front-end
    with run_standalone("block", "--socket-path", sock, "--file", str(img), log=tmp_path / "log3") as proc:
        wait_for_path(sock, proc)
        fe = VhostUserFrontend.connect(sock)
        fe.negotiate()
        fe.setup_memory(16 * MiB)
        fe.setup_queue(0, 64)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        fe.close()


def test_fd_argument(tmp_path):
    import socket as pysocket
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    a, b = pysocket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    proc = subprocess.Popen(standalone_cmd("block", "--fd", str(b.fileno()), "--file", str(img)),
                            cwd=REPO, pass_fds=[b.fileno()])
    b.close()
    try:
        fe = VhostUserFrontend(a)
        fe.negotiate()
        fe.setup_memory(16 * MiB)
        fe.setup_queue(0, 64)
        fe.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _submit_writes(q, rnd, expected, count, size, chunk):
    """``count`` writes of ``chunk`` bytes at random distinct chunk offsets;
    returns {head: (status view)} and records the data in ``expected``."""
    slots = list(range(size // chunk))
    rnd.shuffle(slots)
    status = {}
    for k in range(count):
        off = slots[k] * chunk
        data = rnd.randbytes(chunk)
        hdr_gpa, hdr = q.alloc(16)
        data_gpa, buf = q.alloc(chunk, 4096)
        st_gpa, st = q.alloc(1)
        HEADER.pack_into(hdr, 0, T_OUT, 0, off // 512)
        buf[:] = data
        st[0] = 0xFF
        head = q.submit([(hdr_gpa, 16), (data_gpa, chunk)], [(st_gpa, 1)])
        status[head] = st
        expected[off:off + chunk] = data
    return status


def _frozen(pid: int) -> None:
    """Wait until a SIGSTOPped process is stopped."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
    raise AssertionError(f"pid {pid} did not stop")


@pytest.mark.parametrize("chunk", [128 << 10, 4096, 512])
def test_kill9_with_writes_in_flight(tmp_path, chunk):
    """Freeze the device at random moments until the inflight region shows
    writes it fetched and has not completed, then kill -9 it there; restart
    it on the same socket and reconnect with the inflight fd: every write
    completes OK and the file holds exactly what the driver wrote."""
    size = 32 * MiB
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(size))
    expected = bytearray(size)
    sock = str(tmp_path / "blk.sock")
    rnd = random.Random(chunk)
    args = ("block", "--socket-path", sock, "--file", str(img))
    with run_standalone(*args, log=tmp_path / "dev.log") as proc:
        wait_for_path(sock, proc)
        fe = VhostUserFrontend.connect(sock)
        fe.negotiate()
        fe.setup_memory(128 * MiB)
        fe.get_inflight(1, 1024)
        q = fe.setup_queue(0, 1024)
        region = mmap.mmap(fe.inflight_fd, fe.inflight_info.mmap_size, prot=mmap.PROT_READ)
        flags = memoryview(region)[16:16 + 16 * 1024:16]
        in_flight = 0
        for attempt in range(300):
            pending = _submit_writes(q, rnd, expected, 100, size, chunk)
            q.kick()
            time.sleep(rnd.uniform(0, 0.003))
            os.kill(proc.pid, signal.SIGSTOP)
            _frozen(proc.pid)
            in_flight = sum(flags)
            if in_flight:
                proc.kill()
                proc.wait(5)
                break
            os.kill(proc.pid, signal.SIGCONT)
            while q.outstanding:
                q.wait_used(10)
            assert all(st[0] == 0 for st in pending.values())
        flags.release()
        region.close()
        assert in_flight >= 1, "never caught the device with writes in flight"
        q.poll_used()
    assert q.outstanding > 0
    # restart on the same socket (stale socket file left by the crash)
    with run_standalone(*args, log=tmp_path / "dev2.log") as proc:
        wait_for_path(sock, proc)
        fe.reconnect()
        while q.outstanding:
            q.wait_used(10)
        assert all(st[0] == 0 for st in pending.values()), "a write did not complete OK"
        fe.close()
        assert proc.wait(10) == 0
    assert img.read_bytes() == bytes(expected)
