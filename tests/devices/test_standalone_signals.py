"""SIGTERM ends the standalone program with status 0 in every state: while
it waits for its first front-end on an inherited listening fd, and in the
milliseconds after a front-end left, while it is already exiting by itself
(its loop closing or closed, Python finalizing).  QEMU's own test harness
(tests/qtest/vhost-user-blk-test.c) sends SIGTERM right after killing QEMU
and fails the test on anything but exit status 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from frontend.vhost_user import VhostUserFrontend

from .conftest import REPO, standalone_cmd

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    return str(path)


def _spawn(fd: int, image: str, log) -> subprocess.Popen:
    return subprocess.Popen(standalone_cmd("block", "--fd", str(fd), "--file", image),
                            cwd=REPO, pass_fds=[fd], stdout=log, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, text: bytes, log_path) -> None:
    """Until the device's log holds ``text`` (bounded; not a timing claim)."""
    deadline = time.monotonic() + 30
    while text not in log_path.read_bytes():
        assert proc.poll() is None, f"device exited {proc.returncode}: {log_path.read_text()}"
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.01)


def test_sigterm_while_waiting_on_a_listening_fd(tmp_path, image):
    """A listening --fd with nobody connecting: SIGTERM ends the wait (it
    used to log "SIGTERM received" and stay blocked in accept())."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(tmp_path / "l.sock"))
    lsock.listen(1)
    log_path = tmp_path / "dev.log"
    with open(log_path, "wb") as log:
        proc = _spawn(lsock.fileno(), image, log)
    lsock.close()
    try:
        # its handler is installed once its loop runs (sleeping in epoll)
        _wait_until_sleeping(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the listening socket was the device's to close; nobody was accepted
    assert b"Traceback" not in log_path.read_bytes()


def test_listening_fd_still_serves_its_first_client(tmp_path, image):
    """The async accept serves a front-end as the blocking one did, then
    exits 0 when it leaves."""
    path = str(tmp_path / "l.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    with open(tmp_path / "dev.log", "wb") as log:
        proc = _spawn(lsock.fileno(), image, log)
    lsock.close()
    try:
        fe = VhostUserFrontend.connect(path)
        fe.negotiate()
        fe.setup_memory(16 * MiB)
        fe.setup_queue(0, 64)
        fe.close()
        assert proc.wait(20) == 0, (tmp_path / "dev.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_until_sleeping(proc: subprocess.Popen) -> None:
    """Until the device's main thread sleeps in epoll (its loop runs)."""
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, f"device exited {proc.returncode}"
        try:
            with open(f"/proc/{proc.pid}/wchan") as f:
                if "epoll" in f.read():
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "device never went to sleep in its event loop"
        time.sleep(0.01)


@pytest.mark.parametrize("delay_ms", [0, 2, 5, 8, 12, 16, 20, 25, 30, 40])
def test_sigterm_while_exiting_after_the_front_end_left(tmp_path, image, delay_ms):
    """The front-end leaves; once the device has closed its end (it is now
    exiting by itself), SIGTERM follows after ``delay_ms`` and then every
    millisecond until the process is gone, so the signals land in every
    state of the exit: run_device returning, the loop closing, closed,
    Python finalizing.  Each run must end with status 0."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log_path = tmp_path / "dev.log"
    with open(log_path, "wb") as log:
        proc = _spawn(b.fileno(), image, log)
    b.close()
    try:
        fe = VhostUserFrontend(a)
        fe.negotiate()
        fe.setup_memory(16 * MiB)
        fe.setup_queue(0, 64)
        a.shutdown(socket.SHUT_WR)            # the front-end leaves
        a.settimeout(20)
        while a.recv(4096):                   # until the device closed its end
            pass
        time.sleep(delay_ms / 1000)
        while proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.001)
        status = proc.wait(20)
        assert status == 0, f"exit status {status}: {log_path.read_text()}"
        assert b"Traceback" not in log_path.read_bytes(), log_path.read_text()
    finally:
        a.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
