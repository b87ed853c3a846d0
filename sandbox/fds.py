"""File-descriptor hygiene: stdio to /dev/null or the log pipe, close the rest."""

from __future__ import annotations

import fcntl
import os

from .config import JailError


def open_devnull() -> int:
    """An fd to /dev/null above stdio, opened before pivot_root hides it."""

    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return high


def setup_stdio(devnull: int, log_fd: int | None, keep: set[int]) -> None:
    """stdin/stdout -> /dev/null, stderr -> log_fd (or /dev/null); kept fds win."""

    try:
        for target in (0, 1):
            if target not in keep:
                os.dup2(devnull, target, inheritable=True)
        if log_fd is not None and log_fd != 2:
            os.dup2(log_fd, 2, inheritable=True)
        elif log_fd is None and 2 not in keep:
            os.dup2(devnull, 2, inheritable=True)
    except OSError as e:
        raise JailError("stdio", e.errno or 0, str(e)) from e


def close_all_except(keep: set[int]) -> None:
    """Close every fd not in `keep` (close_range under os.closerange)."""

    start = 0
    for fd in sorted(k for k in keep if k >= 0):
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 20)


def open_fds() -> list[int]:
    return sorted(int(x) for x in os.listdir("/proc/self/fd"))
