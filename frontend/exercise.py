"""Drive a device the way a VMM would, with ``frontend.vhost_user``.

Shared by the demo, the tests and the benchmarks: each function connects to
a vhost-user socket, does one small, checked piece of real I/O, and
disconnects (so the child exits 0 and the supervisor starts a fresh one).
"""

from __future__ import annotations

import os
import time

from .vhost_user import VhostUserFrontend
from .virtio_blk import BlockDriver


def drive_block(path: str, offset: int = 0, data: bytes | None = None, timeout: float = 5.0) -> bytes:
    """Write ``data`` at ``offset``, read it back, check it; returns what was read."""
    data = data if data is not None else os.urandom(4096)
    with VhostUserFrontend.connect(path, timeout=timeout) as fe:
        fe.negotiate()
        fe.setup_memory(16 << 20)
        q = fe.setup_queue(0, 128)
        drv = BlockDriver(q)
        drv.write(offset, data)
        drv.flush()
        got = drv.read(offset, len(data))
    if got != data:
        raise AssertionError(f"block {path}: read back {len(got)} bytes that differ from what was written")
    return got


def drive_rng(path: str, size: int = 64, timeout: float = 5.0) -> bytes:
    """Ask for ``size`` random bytes; returns them."""
    with VhostUserFrontend.connect(path, timeout=timeout) as fe:
        fe.negotiate()
        fe.setup_memory(16 << 20)
        q = fe.setup_queue(0, 64)
        gpa, view = q.alloc(size)
        q.submit([], [(gpa, size)])
        q.kick(force=True)
        used = q.wait_used(timeout)
        written = used[0][1]
        out = bytes(view[:written])
    if written <= 0:
        raise AssertionError(f"rng {path}: no bytes returned")
    return out


def drive_console(path: str, text: bytes, timeout: float = 5.0) -> None:
    """Send ``text`` on the console's transmit queue (guest -> host output)."""
    with VhostUserFrontend.connect(path, timeout=timeout) as fe:
        fe.negotiate()
        fe.setup_memory(16 << 20)
        fe.setup_queue(0, 64)
        tx = fe.setup_queue(1, 64)
        gpa, view = tx.alloc(len(text))
        view[:len(text)] = text
        tx.submit([(gpa, len(text))], [])
        tx.kick(force=True)
        tx.wait_used(timeout)


def wait_file_contains(path: str, needle: bytes, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        if needle in data:
            return data
        time.sleep(0.02)
    raise AssertionError(f"{path} does not contain {needle!r} after {timeout}s (has {data[-200:]!r})")
