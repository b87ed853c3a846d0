"""The qemu-storage-daemon shim: the command line QEMU's vhost-user-blk
qtest uses, mapped onto our block device; one device per export; exit 0 on
SIGTERM in every state; clear errors for what it cannot serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from frontend.vhost_user import VhostUserFrontend
from devices.qsd_shim import ShimError, parse_command_line, parse_keyval

from .conftest import REPO

MiB = 1 << 20
SHIM = str(REPO / "conformance" / "qsd-shim")
#: The wrapper runs this interpreter (it would pick the checkout's .venv).
ENV = {**os.environ, "VHOST_SUPERVISOR_PYTHON": sys.executable}


def _qtest_args(image: str, fd: int, i: int = 0, queues: int = 1) -> list[str]:
    """Exactly what vhost-user-blk-test.c passes for export ``i``."""
    return ["--blockdev", f"driver=file,node-name=disk{i},filename={image}",
            "--export", f"type=vhost-user-blk,id=disk{i},addr.type=fd,addr.str={fd},"
                        f"node-name=disk{i},writable=on,num-queues={queues}"]


def test_keyval():
    assert parse_keyval("file,node-name=a,filename=x,,y", "driver") == {
        "driver": "file", "node-name": "a", "filename": "x,y"}
    assert parse_keyval('{"driver": "file", "cache": {"direct": true}}', "driver") == {
        "driver": "file", "cache.direct": "on"}
    with pytest.raises(ShimError, match="given twice"):
        parse_keyval("a=1,a=2", "driver")
    with pytest.raises(ShimError, match="'b' has no '='"):
        parse_keyval("a=1,b", "driver")


def test_qtest_command_line_maps_onto_the_device():
    exports = parse_command_line(_qtest_args("qtest.ab12", 5) + _qtest_args("qtest.cd34", 7, 1, 8))
    assert [e.device_argv("warning") for e in exports] == [
        ["block", "--name", "disk0", "--log-level", "warning", "--file", "qtest.ab12", "--fd", "5",
         "--num-queues", "1"],
        ["block", "--name", "disk1", "--log-level", "warning", "--file", "qtest.cd34", "--fd", "7",
         "--num-queues", "8"],
    ]
    # qemu-storage-daemon's default is writable=off; unix sockets; iothreads accepted
    (e,) = parse_command_line(["--object", "iothread,id=io0",
                               "--blockdev=driver=file,node-name=f,filename=i,cache.direct=on",
                               "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                                           "addr.path=/s,iothread=io0,logical-block-size=4096"])
    assert e.device_argv("info") == ["block", "--name", "e", "--log-level", "info", "--file", "i",
                                     "--socket-path", "/s", "--read-only", "--block-size", "4096",
                                     "--direct"]


@pytest.mark.parametrize("argv,message", [
    (["--blockdev", "driver=qcow2,node-name=a,filename=x"], r"driver='qcow2' is not supported"),
    (["--blockdev", "driver=file,node-name=a,filename=x,aio=native"], r"option aio='native' is not supported"),
    (["--blockdev", "driver=file,node-name=a"], r"filename= is required"),
    (["--export", "type=vhost-user-blk,id=e,node-name=zz,addr.type=fd,addr.str=3"],
     r"node-name='zz' names no --blockdev"),
    (["--blockdev", "driver=file,node-name=a,filename=x",
      "--export", "type=nbd,id=e,node-name=a"], r"type='nbd' is not supported"),
    (["--blockdev", "driver=file,node-name=a,filename=x",
      "--export", "type=vhost-user-blk,id=e,node-name=a,addr.type=fd,addr.str=fdname"],
     r"addr.str='fdname' is not a file descriptor number"),
    (["--blockdev", "driver=file,node-name=a,filename=x",
      "--export", "type=vhost-user-blk,id=e,node-name=a,addr.type=fd,addr.str=3,writable=maybe"],
     r"writable='maybe' is not on/off"),
    (["--chardev", "socket,id=c"], r"option --chardev='socket,id=c' is not supported"),
    (["--blockdev", "driver=file,node-name=a,filename=x"], r"no --export given"),
])
def test_refusals_name_the_option(argv, message):
    with pytest.raises(ShimError, match=message):
        parse_command_line(argv)


def test_bad_command_line_exits_1_with_the_reason(tmp_path):
    out = subprocess.run([SHIM, "--blockdev", "driver=qcow2,node-name=a,filename=x"],
                         capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 1
    assert "driver='qcow2' is not supported" in out.stderr


class Exports:
    """N listening sockets and images, the shim serving them as the qtest does."""

    def __init__(self, tmp_path, n: int, queues: int = 1) -> None:
        self.paths, self.socks, args = [], [], []
        for i in range(n):
            image = tmp_path / f"qtest.{i}"
            image.write_bytes(bytes(MiB))
            path = str(tmp_path / f"s{i}.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(1)
            self.paths.append(path)
            self.socks.append(sock)
            args += _qtest_args(image.name, sock.fileno(), i, queues)
        self.log = tmp_path / "shim.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([SHIM, *args], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=[s.fileno() for s in self.socks],
                                         env={**ENV, "VHOST_SUPERVISOR_SHIM_LOG_LEVEL": "info"})
        for s in self.socks:
            s.close()

    def wait(self) -> int:
        status = self.proc.wait(30)
        assert b"Traceback" not in self.log.read_bytes(), self.log.read_text()
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def exports(tmp_path):
    made = []

    def make(n: int, queues: int = 1) -> Exports:
        e = Exports(tmp_path, n, queues)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def _forked_devices(pid: int) -> bool:
    """Whether the shim has forked its devices (children that are Python
    too: its shell wrapper forks for a command substitution, and imports
    may run ldconfig)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
        comms = []
        for child in children:
            with open(f"/proc/{child}/comm") as f:
                comms.append(f.read())
    except OSError:   # a short-lived child went away
        return False
    return any(c.startswith("python") for c in comms)


def test_sigterm_at_once_exits_0(exports):
    """SIGTERM as soon as the shim has forked its devices, before they have
    their handlers (the wrapper blocks the stop signals before Python
    imports anything; only the interpreter's own start precedes that)."""
    e = exports(2)
    deadline = time.monotonic() + 30
    while not _forked_devices(e.proc.pid):
        assert e.proc.poll() is None and time.monotonic() < deadline, e.log.read_text()
    e.proc.send_signal(signal.SIGTERM)
    assert e.wait() == 0, e.log.read_text()


def test_two_exports_served_and_stopped(exports):
    """Both exports serve a front-end; one front-end leaving ends only its
    device; SIGTERM then ends the rest, status 0."""
    e = exports(2, queues=8)
    fes = [VhostUserFrontend.connect(p) for p in e.paths]
    for fe in fes:
        fe.negotiate()
        assert fe.get_queue_num() == 8
        fe.setup_memory(16 * MiB)
        fe.setup_queue(0, 64)
    fes[0].close()
    deadline = time.monotonic() + 30
    while b"disk0" not in e.log.read_bytes() or b"disconnected" not in e.log.read_bytes():
        assert time.monotonic() < deadline, e.log.read_text()
        time.sleep(0.01)
    assert e.proc.poll() is None, "the shim ended with one export still served"
    e.proc.send_signal(signal.SIGTERM)
    assert e.wait() == 0, e.log.read_text()
    fes[1].close()


def test_all_front_ends_gone_exits_0(exports):
    e = exports(1)
    fe = VhostUserFrontend.connect(e.paths[0])
    fe.negotiate()
    fe.close()
    assert e.wait() == 0, e.log.read_text()


def test_failing_device_fails_the_shim(tmp_path):
    """A device that cannot start (missing image) makes the shim exit
    non-zero and stops the other device."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s.sock"))
    sock.listen(1)
    (tmp_path / "ok.img").write_bytes(bytes(MiB))
    args = _qtest_args("ok.img", sock.fileno(), 0) + _qtest_args("missing.img", sock.fileno(), 1)
    out = subprocess.run([SHIM, *args], cwd=tmp_path, pass_fds=[sock.fileno()], capture_output=True,
                         text=True, timeout=60, env=ENV)
    sock.close()
    assert out.returncode == 1, out.stderr
    assert "missing.img" in out.stderr and "export disk1 exited with status 1" in out.stderr


def test_devices_end_with_the_shim(exports):
    """SIGKILL to the shim: its devices get SIGTERM and end (exit 0) rather
    than staying orphaned in accept()."""
    e = exports(2)
    deadline = time.monotonic() + 30
    while not _forked_devices(e.proc.pid):
        assert e.proc.poll() is None and time.monotonic() < deadline, e.log.read_text()
    with open(f"/proc/{e.proc.pid}/task/{e.proc.pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    e.proc.kill()
    e.proc.wait()
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and not _zombie(pid):
            assert time.monotonic() < deadline, f"device {pid} outlived the shim"
            time.sleep(0.01)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_unix_socket_export_read_only_by_default(tmp_path):
    """addr.type=unix, and qemu-storage-daemon's default writable=off: the
    device offers VIRTIO_BLK_F_RO."""
    from devices.block import F_RO
    (tmp_path / "img").write_bytes(bytes(MiB))
    sock = str(tmp_path / "e.sock")
    proc = subprocess.Popen([SHIM, "--blockdev", "driver=file,node-name=n,filename=img",
                             "--export", f"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock}"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        fe = VhostUserFrontend.connect(sock, timeout=30)
        fe.negotiate()
        assert fe.features & F_RO
        fe.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
