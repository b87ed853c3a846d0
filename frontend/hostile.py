"""The attacker's side of the containment tests and benchmarks.

A hostile driver builds chains that a well-behaved one never would (the same
guest buffer listed hundreds of times, chains longer than IOV_MAX), through
the real front-end (``frontend.vhost_user``), against a real device in a
real jail (``sandbox.spawn`` with the device's seccomp policy and memory
budget).  The device's memory is read from /proc: ``VmHWM`` after resetting
it (``clear_refs`` 5) is the peak resident size during an attack.
"""

from __future__ import annotations

import os
import socket
import signal
import struct
import time

import psutil
import uvloop  # noqa: F401  (imported before fork: nothing can be imported after pivot_root)

from connection.connection import VhostUserStream
from connection.executor import Executor
from frontend.vhost_user import DriverQueue, VhostUserFrontend
from devices import BUILDERS
from devices.virtio_blk import T_IN
from sandbox import JailConfig, JailedChild, spawn
from sandbox.jail import POLICY_DIR
from supervisor.logs import setup_child_logging

MiB = 1 << 20
BLK_HEADER = struct.Struct("<IIQ")


def _serve(builder, sock: socket.socket):
    def target() -> int:
        setup_child_logging()   # as the supervisor's child: records to fd 2, not pytest's capture
        ex = Executor()
        try:
            VhostUserStream(sock).run_device(ex, builder)
        finally:
            ex.close()
        return 0
    return target


def start_jailed(kind: str, options: dict[str, str], name: str | None = None, log_fd: int = 2
                 ) -> tuple[JailedChild, VhostUserFrontend]:
    """The device ``kind`` in a real jail: its policy, and its memory budget
    (``memory-limit=``) as RLIMIT_DATA, as the supervisor starts it."""
    name = name or f"{kind}0"
    builder = BUILDERS[kind].from_options(name, options)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    config = JailConfig(name=name, keep_fds=list(builder.keep_fds()) + [theirs.fileno()], log_fd=log_fd,
                        seccomp_policy=os.path.join(POLICY_DIR, builder.seccomp_policy),
                        data_limit=builder.memory_limit)
    try:
        child = spawn(config, _serve(builder, theirs))
    finally:
        theirs.close()
        builder.close()
    return child, VhostUserFrontend(mine)


def stop_jailed(child: JailedChild, fe: VhostUserFrontend, timeout: float = 10.0) -> str:
    """Disconnect and reap; returns the exit reason as text (kills a child
    that does not leave in time, so no test leaves a process behind)."""
    fe.close()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if child.violation_fd is not None:
                child.read_violation()
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                return str(child.decode_status(status))
            if time.monotonic() > deadline:
                child.kill()
            time.sleep(0.01)
    finally:
        child.close()


# --------------------------------------------------------------------------
# Memory of the device process

def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (proc(5): clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss(pid: int) -> int:
    return status_kib(pid, "VmHWM") * 1024


def data_limit(pid: int) -> int | None:
    """The process's RLIMIT_DATA (soft), None if unlimited."""
    soft, _hard = psutil.Process(pid).rlimit(psutil.RLIMIT_DATA)
    return None if soft == psutil.RLIM_INFINITY else soft


# --------------------------------------------------------------------------
# Hostile chains

def aliased_block_request(q: DriverQueue, op: int, sector: int, buf_gpa: int, buf_len: int,
                          count: int) -> tuple[int, memoryview]:
    """Submit one virtio-blk IN/OUT whose data is the same guest buffer
    listed ``count`` times: the request is ``count * buf_len`` bytes long,
    the guest spends ``buf_len``.  Returns (head, status view)."""
    hdr_gpa, hdr = q.alloc(BLK_HEADER.size, 16)
    BLK_HEADER.pack_into(hdr, 0, op, 0, sector)
    st_gpa, status = q.alloc(1, 1)
    status[0] = 0xFF
    data = [(buf_gpa, buf_len)] * count
    if op == T_IN:
        head = q.submit([(hdr_gpa, BLK_HEADER.size)], data + [(st_gpa, 1)])
    else:
        head = q.submit([(hdr_gpa, BLK_HEADER.size)] + data, [(st_gpa, 1)])
    return head, status


def wait_all(q: DriverQueue, heads: set[int], timeout: float = 60.0) -> None:
    pending = set(heads)
    deadline = time.monotonic() + timeout
    while pending:
        for head, _len in q.wait_used(max(0.1, deadline - time.monotonic())):
            pending.discard(head)


def garbage_storm(path: str, cycles: int) -> int:
    """A front-end looping connect / 64 bytes of garbage / close on the
    vhost-user socket at ``path`` (issue 9, finding 6); a connect waits up to
    5 ms for room in the accept queue.  Returns the cycles that connected."""
    connected = 0
    for _ in range(cycles):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 5000))
        try:
            s.connect(path)
            s.send(b"\xff" * 64)
            connected += 1
        except OSError:
            pass
        finally:
            s.close()
    return connected


def hold_unix_sockets(n: int, per_process: int = 8000) -> list[int]:
    """Fork processes that hold ``n`` connected Unix sockets in all (an fd
    limit is per process), as an unrelated local user would; returns their
    pids once every socket exists (kill them to release the sockets)."""
    pids = []
    for start in range(0, n, per_process):
        count = min(per_process, n - start)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            held = [socket.socketpair() for _ in range(count // 2)]
            os.write(w, b"k")
            os.close(w)
            signal.pause()
            del held
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"k"
        os.close(r)
        pids.append(pid)
    return pids
