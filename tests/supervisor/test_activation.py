"""Socket activation: sockets passed as LISTEN_FDS are used, never re-bound,
never unlinked, and survive the supervisor (as under a systemd socket unit).

The test plays systemd: it binds the listening sockets itself, keeps them,
and starts each supervisor through bash, which puts them at fds 3 and 4 and
sets LISTEN_PID to its own pid before exec'ing Python (the same pid).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from frontend.exercise import drive_block, drive_rng

from .conftest import SupervisorProc


def _listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    return s


def _wrap(fds: list[int], names: str) -> tuple[str, ...]:
    moves = " ".join(f"{3 + i}<&{fd}" for i, fd in enumerate(fds))
    script = f'exec {moves}; export LISTEN_PID=$$ LISTEN_FDS={len(fds)} LISTEN_FDNAMES={names}; exec "$@"'
    return ("bash", "-c", script, "activate")


def test_inherited_sockets_survive_supervisor_restarts(sup: SupervisorProc) -> None:
    blk, rng = sup.path("blk0.sock"), sup.path("rng0.sock")
    held = [_listen(blk), _listen(rng)]
    inodes = [os.stat(p).st_ino for p in (blk, rng)]
    image = sup.image()
    args = ("--disable-sandbox", "--block", f"vhost={blk},path={image},name=blk0", "--rng", f"vhost={rng},name=rng0")
    fds = [s.fileno() for s in held]
    try:
        sup.start(*args, wrap=_wrap(fds, "blk0:rng0"), pass_fds=tuple(fds))
        data = os.urandom(8192)
        drive_block(blk, 4096, data)
        assert len(drive_rng(rng, 32)) == 32
        assert "inherited=blk0" in sup.read_log() and "inherited=rng0" in sup.read_log()
        assert sup.terminate() == 0
        # Nothing unlinked or rebound: the nodes are the ones "systemd" holds.
        assert [os.stat(p).st_ino for p in (blk, rng)] == inodes
        # A VMM that reconnects while no supervisor runs waits in the backlog...
        early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        early.connect(blk)
        early.close()
        # ...and the next supervisor serves the same sockets.
        sup.start(*args, wrap=_wrap(fds, "blk0:rng0"), pass_fds=tuple(fds))
        assert drive_block(blk, 4096, data) == data
        assert [os.stat(p).st_ino for p in (blk, rng)] == inodes
        assert sup.terminate() == 0
        assert all(os.path.exists(p) for p in (blk, rng))
    finally:
        for s in held:
            s.close()


def test_unused_inherited_socket_is_reported_and_device_binds_its_own(sup: SupervisorProc) -> None:
    stray = _listen(sup.path("stray.sock"))
    rng = sup.path("rng0.sock")
    try:
        sup.start("--disable-sandbox", "--rng", f"vhost={rng},name=rng0", wrap=_wrap([stray.fileno()], "stray"),
                  pass_fds=(stray.fileno(),))
        assert len(drive_rng(rng, 16)) == 16
        log = sup.read_log()
        assert "event=listen-fd-unused" in log and "fd_name=stray" in log, log
        assert sup.terminate() == 0
        assert not os.path.exists(rng)   # the one it bound itself is removed as before
    finally:
        stray.close()


def test_listen_pid_of_another_process_is_ignored(sup: SupervisorProc) -> None:
    rng = sup.path("rng0.sock")
    sup.start("--disable-sandbox", "--rng", f"vhost={rng},name=rng0",
              env={"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"})
    assert len(drive_rng(rng, 16)) == 16
    assert "event=listen-fds-ignored" in sup.read_log()


def test_passed_datagram_socket_is_a_config_error(sup: SupervisorProc) -> None:
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.bind(sup.path("dgram.sock"))
    try:
        proc = subprocess.run(
            [*_wrap([d.fileno()], "bad"), sys.executable, "-m", "supervisor.cli", "run", "--disable-sandbox",
             "-s", sup.path("c.sock"), "--rng", f"vhost={sup.path('rng0.sock')}"],
            pass_fds=(d.fileno(),), capture_output=True, text=True, timeout=60)
    finally:
        d.close()
    assert proc.returncode == 2, proc
    assert "LISTEN_FDS" in proc.stderr and "not an AF_UNIX stream socket" in proc.stderr, proc.stderr
