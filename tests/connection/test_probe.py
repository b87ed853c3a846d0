"""``vhost-supervisor probe`` against qemu-storage-daemon (a back-end we did not write).

Why: probe is what an operator runs to check a socket before pointing a VMM
at it; its output must name what a real back-end offers and decode the block
config correctly, and the back-end must still accept a VMM afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frontend import probe
from frontend.qsd import qsd_command
from frontend.vhost_user import VhostUserFrontend
from frontend.virtio_blk import BlockDriver

IMAGE_SIZE = 48 << 20


@pytest.fixture
def qsd(tmp_path: Path):
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        pytest.fail("qemu-storage-daemon not found in PATH: install qemu-system-common (Debian) to run these tests")
    image = tmp_path / "disk.img"
    sock = str(tmp_path / "qsd.sock")
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    log = open(tmp_path / "qsd.log", "wb")
    proc = subprocess.Popen(qsd_command(binary, image, sock, iothread=False),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 10
    while not os.path.exists(sock) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        if not os.path.exists(sock):
            pytest.fail(f"qemu-storage-daemon did not create its socket: {(tmp_path / 'qsd.log').read_text()}")
        yield sock
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.mark.qemu
def test_probe_text(qsd, capsys):
    assert probe.main([qsd]) == 0
    out = capsys.readouterr().out
    assert f"socket: {qsd}" in out
    assert "device type: block" in out
    features = next(line for line in out.splitlines() if line.startswith("features:"))
    for name in ("VERSION_1", "PROTOCOL_FEATURES", "RING_EVENT_IDX", "BLK_F_FLUSH", "BLK_F_BLK_SIZE"):
        assert name in features.split()
    proto = next(line for line in out.splitlines() if line.startswith("protocol features:"))
    for name in ("MQ", "CONFIG", "REPLY_ACK"):
        assert name in proto.split()
    assert "queues: 1" in out
    assert "config (60 bytes):" in out
    assert f"capacity {IMAGE_SIZE // 512} sectors ({IMAGE_SIZE} bytes, 48.0 MiB)" in out
    assert "blk_size=512" in out and "num_queues=1" in out


@pytest.mark.qemu
def test_probe_json(qsd, capsys):
    assert probe.main([qsd, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device_type"] == "block"
    assert info["queue_num"] == 1
    assert "VERSION_1" in info["feature_names"] and "BLK_F_DISCARD" in info["feature_names"]
    assert "CONFIG" in info["protocol_feature_names"]
    assert info["features"] & (1 << 32)
    assert info["config_size"] == 60 and len(bytes.fromhex(info["config"])) == 60
    assert info["block"]["capacity"] == IMAGE_SIZE // 512
    assert info["block"]["blk_size"] == 512
    assert info["block"]["num_queues"] == 1


@pytest.mark.qemu
def test_probe_type_block_and_module_entry_point(qsd):
    """``python -m frontend.probe`` works as a program, with --type."""
    res = subprocess.run([sys.executable, "-m", "frontend.probe", qsd, "--json", "--type", "block"],
                         capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["block"]["capacity"] == IMAGE_SIZE // 512


@pytest.mark.qemu
def test_backend_still_serves_after_probe(qsd):
    assert probe.main([qsd, "--json"]) == 0
    with VhostUserFrontend.connect(qsd) as fe:
        fe.negotiate()
        fe.setup_memory(8 << 20)
        blk = BlockDriver(fe.setup_queue(0, 64), depth=1)
        blk.write(4096, b"\x5a" * 4096)
        assert blk.read(4096, 4096) == b"\x5a" * 4096


def test_probe_missing_socket_fails_with_reason(tmp_path, capsys):
    path = str(tmp_path / "nothing.sock")
    assert probe.main([path, "--timeout", "0.1"]) == 1
    err = capsys.readouterr().err
    assert path in err and "No such file" in err


def test_probe_bad_arguments():
    assert probe.main(["--type", "floppy", "/x"]) == 2


def test_guess_type_from_feature_bits():
    version_1 = 1 << 32
    assert probe.guess_type(version_1 | (1 << 9) | (1 << 6), True) == "block"       # FLUSH, BLK_SIZE
    assert probe.guess_type(version_1 | (1 << 2), True) == "console"                # EMERG_WRITE only
    assert probe.guess_type(version_1 | (1 << 1) | (1 << 2), False) == "unknown"    # no config: ambiguous
    assert probe.guess_type(version_1, False) == "unknown"                          # rng-like: say so via --type


@pytest.mark.qemu
def test_probe_type_override_names_bits(qsd, capsys):
    assert probe.main([qsd, "--type", "unknown", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device_type"] == "unknown" and not info["device_type_guessed"]
    assert "bit9" in info["feature_names"] and "block" not in info
    assert info["config_size"] == 60   # qsd refuses anything larger than its config
