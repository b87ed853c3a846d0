"""Host-side helpers for the block device's backing file.

Kept apart from the request path so block.py reads as the virtio-blk
protocol: here are opening with the right flags, the advisory lock with an
error that says who holds it, the size of a file or block device, and
``fallocate`` with a mode (``os`` only has ``posix_fallocate``, which cannot
punch holes).  ``ctypes`` resolves libc here, at import time in the parent,
because the jailed child cannot load libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat

from . import safe_open
from .options import ConfigError

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode; raises OSError with the errno."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


class LockError(OSError):
    """The image is locked by someone else."""


def file_size(fd: int) -> int:
    """Size in bytes of a regular file or a block device."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)


def lock_holders(fd: int) -> list[str]:
    """Describe the processes holding a lock on the file behind ``fd``, from
    /proc/locks (pid and command line), for an error an operator can act on."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders: list[str] = []
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) < 6 or fields[5] != key:
            continue
        kind, mode, pid = fields[1], fields[3], fields[4]
        desc = f"{kind} {mode} lock"
        if pid.isdigit() and pid != "0":
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            desc += f" held by pid {pid} ({cmd})"
        holders.append(desc)
    return holders


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Take an advisory lock on the open file description: exclusive for a
    writable image, shared for a read-only one, so readers may share but a
    writer is alone.  flock locks belong to the open file description, so
    the child inherits the lock and a restarted child keeps it (the parent
    holds the fd).  Raises LockError naming the path and the holders."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holders = lock_holders(fd)
        who = "; ".join(holders) if holders else "holder unknown"
        raise LockError(errno.EWOULDBLOCK,
                        f"{path} is already locked by another device ({who}); "
                        f"use lock=false only if sharing it is intended") from None


def open_image(device: str, path: str, *, read_only: bool, direct: bool) -> tuple[int, str]:
    """Open the image with O_CLOEXEC (the supervisor passes it by keep list);
    returns (fd, resolved path).  The path is resolved once through
    ``safe_open`` (a symbolic link another user planted is refused, a
    root-owned one such as /dev/disk/by-id/* is followed) and the file is
    opened through the resulting fd, so nothing planted later is followed:
    the parent keeps this fd for every restart of the child.  Raises
    ConfigError for a refused path or a file that is neither a regular file
    nor a block device, OSError otherwise."""
    opath, resolved = safe_open.open_path(device, "path", path)
    try:
        mode = os.fstat(opath).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ConfigError(f"refused: {resolved} is not a regular file or a block device", "path", device, path)
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if direct:
            flags |= os.O_DIRECT
        return safe_open.reopen(opath, flags), resolved
    finally:
        os.close(opath)
