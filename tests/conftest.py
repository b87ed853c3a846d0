"""Fixtures shared by every test package (keep this small).

Unix socket paths are capped at 108 bytes, and pytest's ``tmp_path`` can be
longer than that, so socket tests take ``sock_dir``: a short private
directory under /tmp, removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


def open_fds() -> set[int]:
    """The fds this process has open now (from /proc/self/fd)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fds.add(int(name))
    return fds


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
