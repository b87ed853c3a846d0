"""Drive the real devices, jailed with their real policies, from a front-end.

Used two ways: by tests (kill/notify mode: the device must serve a realistic
load without a single seccomp violation) and to grow the policies
(`python -m tests.sandbox.device_load learn`: the same load in log mode,
printing every syscall the policy would have refused).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import uvloop  # noqa: F401  (imported before fork: nothing can be imported after pivot_root)

from connection.connection import VhostUserStream
from connection.executor import Executor
from frontend.vhost_user import VhostUserFrontend
from frontend.virtio_blk import BlockDriver
from devices import BUILDERS
from sandbox import JailConfig, JailedChild, spawn
from sandbox.jail import POLICY_DIR

IMAGE_SIZE = 8 << 20


def _serve(builder, sock: socket.socket) -> Callable[[], int]:
    def target() -> int:
        ex = Executor()
        try:
            VhostUserStream(sock).run_device(ex, builder)
        finally:
            ex.close()
        return 0
    return target


def start(kind: str, options: dict[str, str], *, log: bool = False,
          policy: str | None = None) -> tuple[JailedChild, VhostUserFrontend, object]:
    builder = BUILDERS[kind].from_options(f"{kind}0", options)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    config = JailConfig(
        name=f"{kind}0", keep_fds=list(builder.keep_fds()) + [theirs.fileno()], log_fd=2,
        seccomp_policy=os.path.join(POLICY_DIR, policy or builder.seccomp_policy), seccomp_log=log,
    )
    child = spawn(config, _serve(builder, theirs))
    theirs.close()
    builder.close()
    return child, VhostUserFrontend(mine), builder


def load_block(fe: VhostUserFrontend, seconds: float = 0.5) -> None:
    fe.negotiate()
    fe.setup_memory(16 << 20)
    blk = BlockDriver(fe.setup_queue(0, 128), depth=8, max_io=64 << 10)
    deadline = time.monotonic() + seconds
    i = 0
    while True:
        off = (i * 65536) % (IMAGE_SIZE - 65536)
        blk.write(off, bytes([i & 0xFF]) * 4096)
        assert blk.read(off, 4096) == bytes([i & 0xFF]) * 4096
        i += 1
        if time.monotonic() > deadline:
            break
    blk.flush()
    blk.discard(0, 65536)
    blk.write_zeroes(65536, 65536)
    blk.get_id()


def load_rng(fe: VhostUserFrontend, seconds: float = 0.3) -> None:
    fe.negotiate()
    fe.setup_memory(4 << 20)
    q = fe.setup_queue(0, 64)
    gpa, _view = q.alloc(4096, 4096)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        q.submit([], [(gpa, 4096)])
        q.kick()
        assert q.wait_used(5.0), "rng device did not answer"


def load_console(fe: VhostUserFrontend, seconds: float = 0.3) -> None:
    fe.negotiate()
    fe.setup_memory(4 << 20)
    rx = fe.setup_queue(0, 64)
    tx = fe.setup_queue(1, 64)
    gpa, view = tx.alloc(256, 64)
    view[:] = b"x" * 256
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tx.submit([(gpa, 256)], [])
        tx.kick()
        assert tx.wait_used(5.0), "console device did not consume output"
    del rx


def run(kind: str, *, log: bool = False, workdir: str | None = None) -> tuple[JailedChild, int]:
    """Start `kind` jailed, drive it, disconnect; returns (child, wait status)."""

    workdir = workdir or tempfile.mkdtemp(prefix="jail-load-")
    if kind == "block":
        image = os.path.join(workdir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        child, fe, _b = start("block", {"path": image, "id": "jail-load"}, log=log)
        driver = load_block
    elif kind == "console":
        child, fe, _b = start("console", {"type": "file", "path": os.path.join(workdir, "console.out")}, log=log)
        driver = load_console
    else:
        child, fe, _b = start("rng", {}, log=log)
        driver = load_rng
    try:
        driver(fe)
    finally:
        fe.close()
    deadline = time.monotonic() + 10
    while True:
        if child.violation_fd is not None:
            child.read_violation()
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            return child, status
        if time.monotonic() > deadline:
            child.kill()
        time.sleep(0.01)


def _kmsg_collector(out_path: str) -> int:
    """Fork a process that copies new kernel-log records to out_path until
    killed: the ring buffer is small, so records are drained while the load
    runs instead of read afterwards."""

    pid = os.fork()
    if pid:
        return pid
    try:
        kmsg = os.open("/dev/kmsg", os.O_RDONLY)
        os.lseek(kmsg, 0, os.SEEK_END)
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        while True:
            try:
                os.write(out, os.read(kmsg, 8192))
            except BrokenPipeError:
                continue
    finally:
        os._exit(0)


def main(argv: list[str]) -> int:
    import re
    import signal

    from sandbox.compiler import syscall_name
    from sandbox.learn import unlimited_kernel_log

    kinds = argv[1:] or ["block", "console", "rng"]
    record = re.compile(r"type=1326 .*?\bpid=(\d+)\b.*?\barch=([0-9a-f]+)\b.*?\bsyscall=(\d+)\b")
    policy = os.environ.get("LEARN_POLICY")
    for kind in kinds:
        out = tempfile.mktemp(prefix="kmsg-")
        with unlimited_kernel_log():
            collector = _kmsg_collector(out)
            time.sleep(0.1)
            try:
                global start
                if policy:
                    real = start
                    start = lambda k, o, log=False, policy=None: real(k, o, log=log, policy=os.environ["LEARN_POLICY"])  # noqa: E731
                child, status = run(kind, log=True)
                time.sleep(0.3)
            finally:
                os.kill(collector, signal.SIGKILL)
                os.waitpid(collector, 0)
                if policy:
                    start = real
        pids = {child.pid, child.device_pid}
        seen: dict[str, int] = {}
        with open(out, errors="replace") as f:
            for line in f:
                m = record.search(line)
                if m and int(m.group(1)) in pids:
                    name = syscall_name(int(m.group(3)), int(m.group(2), 16))
                    seen[name] = seen.get(name, 0) + 1
        os.unlink(out)
        print(f"{kind}: {child.decode_status(status)}; not in policy: {dict(sorted(seen.items())) or 'nothing'}")
        child.close()
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["learn"]:
    sys.exit(main(sys.argv[1:]))
