"""Opening operator-named files as root without being steered by other users.

The supervisor runs as root and opens what the configuration names: a block
image, a console output file, a console input.  Anyone who can write a
directory on such a path could plant a symbolic link there (``console.log ->
/etc/shadow``) and have root append guest output to, or read guest input
from, a file of their choosing.  So every path is resolved here once, one
component at a time from ``/``, holding a directory fd at each step:

- a symbolic link is followed only if it is owned by root or by the
  supervisor's own uid (the links an operator or the distribution made, such
  as ``/var/run -> /run`` or ``/dev/disk/by-id/*``); a link owned by anyone
  else is refused, wherever it is in the path (like the kernel's
  ``fs.protected_symlinks``, which is off on some hosts);
- the last step opens relative to the directory fd with ``O_NOFOLLOW``, so a
  link planted after the walk is refused too, and nothing is re-resolved
  later: the parent keeps the fd for every restart of the child;
- files the supervisor *creates or appends* (console output) are never
  reached through a link at all, and an existing one must be a regular file
  owned by root (or the supervisor's uid) with one name (no hard link to
  someone else's file).

A refusal is a ``ConfigError`` naming the device, the key and the path;
other failures (missing file, permissions) are ``OSError`` for the caller
to word.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections import deque

from .options import ConfigError

#: As the kernel's path walk: more links than this is a loop.
MAX_LINKS = 40
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def trusted_uids() -> frozenset[int]:
    """Owners whose links and files are the operator's: root and ourselves."""
    return frozenset({0, os.geteuid()})


class _Refused(Exception):
    """Internal: the reason a path is refused (becomes a ConfigError)."""


def _walk(path: str, follow_last: bool) -> tuple[int, str, str]:
    """Resolve ``path`` up to its last component: (O_PATH fd of the directory
    that holds it, its name, the resolved absolute path).  The last component
    is returned as is (it may not exist); if it is a trusted link it is
    resolved too, unless ``follow_last`` is false."""
    trusted = trusted_uids()
    parts = deque(p for p in os.path.abspath(path).split("/") if p)
    if not parts:
        raise _Refused("names the root directory")
    dirfd = os.open("/", _DIR_FLAGS)
    where: list[str] = []          # resolved components of dirfd
    links = 0
    try:
        while True:
            comp = parts.popleft()
            if comp == ".":
                if not parts:
                    raise _Refused("does not name a file")
                continue
            if comp == "..":
                if not parts:
                    raise _Refused("does not name a file")
                up = os.open("..", _DIR_FLAGS, dir_fd=dirfd)
                os.close(dirfd)
                dirfd = up
                if where:
                    where.pop()
                continue
            try:
                st = os.stat(comp, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                if not parts:
                    fd, dirfd = dirfd, -1
                    return fd, comp, "/" + "/".join(where + [comp])
                raise
            if stat.S_ISLNK(st.st_mode) and (parts or follow_last):
                here = "/" + "/".join(where + [comp])
                if st.st_uid not in trusted:
                    raise _Refused(f"{here} is a symbolic link owned by uid {st.st_uid} "
                                   f"(only links owned by root are followed)")
                links += 1
                if links > MAX_LINKS:
                    raise _Refused(f"more than {MAX_LINKS} symbolic links (a loop?)")
                target = os.readlink(comp, dir_fd=dirfd)
                if target.startswith("/"):
                    os.close(dirfd)
                    dirfd = os.open("/", _DIR_FLAGS)
                    where = []
                parts.extendleft(reversed([p for p in target.split("/") if p] or ["."]))
                continue
            if not parts:
                fd, dirfd = dirfd, -1
                return fd, comp, "/" + "/".join(where + [comp])
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(f"{'/' + '/'.join(where + [comp])} is not a directory")
            try:
                sub = os.open(comp, _DIR_FLAGS, dir_fd=dirfd)
            except NotADirectoryError:  # replaced by a link since the stat
                raise _Refused(f"{'/' + '/'.join(where + [comp])} changed while it was resolved") from None
            os.close(dirfd)
            dirfd = sub
            where.append(comp)
    finally:
        if dirfd >= 0:
            os.close(dirfd)


def _is_link(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _refuse(device: str, key: str, path: str, why: str) -> ConfigError:
    return ConfigError(f"refused: {why}", key, device, path)


def open_path(device: str, key: str, path: str) -> tuple[int, str]:
    """An ``O_PATH`` fd of an existing file (image, input), reached without
    following any link but root's; returns (fd, resolved path).  Reopen it
    with ``reopen`` for I/O: the same inode, whatever the path names later."""
    try:
        dirfd, name, resolved = _walk(path, follow_last=True)
    except _Refused as exc:
        raise _refuse(device, key, path, str(exc)) from None
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    finally:
        os.close(dirfd)
    if stat.S_ISLNK(os.fstat(fd).st_mode):  # a link planted after the walk
        os.close(fd)
        raise _refuse(device, key, path, f"{resolved} became a symbolic link while it was opened")
    return fd, resolved


def reopen(fd: int, flags: int) -> int:
    """Open the inode behind an ``O_PATH`` fd with ``flags`` (through
    /proc/self/fd: no path is walked again)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def connect_unix(fd: int) -> socket.socket:
    """Connect to the Unix socket behind an ``O_PATH`` fd from ``open_path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{fd}")
    except BaseException:
        sock.close()
        raise
    return sock


def open_output(device: str, key: str, path: str, *, append: bool = True, mode: int = 0o640) -> int:
    """Open (creating it if missing) a file the supervisor writes, read-write.

    Never through a symbolic link (not even root's: the final component is
    opened ``O_NOFOLLOW`` in the resolved directory); an existing file must
    be a regular file owned by root or the supervisor's uid, with one link."""
    try:
        dirfd, name, resolved = _walk(path, follow_last=False)
    except _Refused as exc:
        raise _refuse(device, key, path, str(exc)) from None
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if append:
        flags |= os.O_APPEND
    try:
        if _is_link(dirfd, name):
            raise _refuse(device, key, path, f"{resolved} is a symbolic link")
        try:
            fd = os.open(name, flags, mode, dir_fd=dirfd)
        except OSError as exc:
            # A link planted since: ELOOP (O_NOFOLLOW), or EACCES (O_CREAT on
            # a link in a sticky directory).
            if exc.errno in (errno.ELOOP, errno.EACCES) and _is_link(dirfd, name):
                raise _refuse(device, key, path, f"{resolved} is a symbolic link") from None
            raise
    finally:
        os.close(dirfd)
    try:
        st = os.fstat(fd)
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = f"{resolved} exists and is not a regular file"
        elif st.st_uid not in trusted_uids():
            why = f"{resolved} is owned by uid {st.st_uid}, not root"
        elif st.st_nlink != 1:
            why = f"{resolved} has {st.st_nlink} hard links"
        if why is not None:
            raise _refuse(device, key, path, why)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
