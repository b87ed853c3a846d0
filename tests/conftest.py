"""Fixtures shared by every test package (keep this small).

Unix socket paths are capped at 108 bytes, and pytest's ``tmp_path`` can be
longer than that, so socket tests take ``sock_dir``: a short private
directory under /tmp, removed afterwards.
"""

from __future__ import annotations

import os
import select
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from frontend.vhost_user import DriverQueue


def open_fds() -> set[int]:
    """The fds this process has open now (from /proc/self/fd).

    The directory listing holds an fd of its own while it runs; it is closed
    again when the listing returns, so only fds still open count (otherwise a
    leaked fd that took that number would go unseen)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


def wait_broken(q: DriverQueue, timeout: float = 5.0) -> None:
    """Wait for the back-end to signal queue ``q``'s err eventfd (it marked the
    queue broken), then check that nothing was completed instead.

    Why select on the eventfd: the signal is the event itself, so the test
    neither sleeps a guessed time nor polls."""
    ready, _, _ = select.select([q.err_fd], [], [], timeout)
    if not ready:
        raise AssertionError(f"queue {q.index} was not marked broken within {timeout}s")
    assert q.broken()
    assert not q.poll_used(), f"queue {q.index} completed a request instead of breaking"


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short private directory for socket files."""
    path = tempfile.mkdtemp(prefix="vu-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    """A socket path (not yet existing) inside ``sock_dir``."""
    return os.path.join(sock_dir, "dev.sock")
