"""What every fuzz target shares: the bug signal, fd accounting, fd kinds.

A target's ``one_input`` catches the project's typed errors (the expected
answer to hostile input) and lets everything else escape: an escaping
exception is the crash atheris reports and the replay test fails on.
Invariants a target checks itself (no fd leaked, guard bytes untouched,
a view no longer than asked) raise ``FuzzBug``.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable

#: Most bytes of memory one input may have the harness allocate for it.
MEMFD_LIMIT = 4 << 20


class FuzzBug(AssertionError):
    """An invariant broken by a fuzz input (a finding, not an expected error)."""


def open_fds() -> set[int]:
    """The fds open in this process (the listing's own fd excluded)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


def check_no_leak(before: set[int], what: str) -> None:
    leaked = open_fds() - before
    if leaked:
        kinds = {fd: describe_fd(fd) for fd in leaked}
        for fd in leaked:
            os.close(fd)
        raise FuzzBug(f"{what}: fds leaked: {kinds}")


def describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def memfd(size: int, content: bytes = b"") -> int:
    """A memfd of ``size`` bytes, ``content`` repeated over its start."""
    fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if content and size:
            os.pwrite(fd, content[:size], 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


#: One epoll instance; each use hands out a dup (an fd of the same kind).
_EPOLL = select.epoll()


def _pipe_end() -> int:
    r, w = os.pipe()
    os.close(r)
    return w


def _socket_fd() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _sealed_memfd() -> int:
    import fcntl
    fd = memfd(4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


#: Every kind of fd a hostile front-end can attach, each made fresh.
FD_KINDS: dict[str, Callable[[], int]] = {
    "eventfd": lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
    "eventfd-kicked": lambda: os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
    "eventfd-blocking": lambda: os.eventfd(0, os.EFD_CLOEXEC),
    "eventfd-semaphore": lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE),
    "memfd-0": lambda: memfd(0),
    "memfd-4k": lambda: memfd(4096),
    "memfd-sealed": _sealed_memfd,
    "pipe": _pipe_end,
    "socket": _socket_fd,
    "directory": lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
    "dev-zero": lambda: os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC),
    "dev-null": lambda: os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC),
    "epoll": lambda: os.dup(_EPOLL.fileno()),
}
FD_KIND_NAMES = tuple(FD_KINDS)
