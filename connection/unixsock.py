"""Binding listening Unix sockets at a path, one way for the whole project.

The vhost-user listener, the console's `type=unix` output and the supervisor's
control socket all need the same three guarantees: a stale socket left by a
killed process is replaced, any other kind of file at the path is never
deleted, and the socket never exists with a wider mode than asked (umask is
set around bind, so there is no chmod window).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

log = logging.getLogger("vhost.connection")


def remove_stale_socket(path: str) -> None:
    """Remove a socket left at ``path``; raise FileExistsError naming the path if
    something other than a socket is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"socket path {path} exists and is not a socket", path)
    log.info("removing stale socket %s", path)
    unlink_quietly(path)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def bind_unix_listener(path: str, *, mode: int = 0o600, backlog: int = 8) -> tuple[socket.socket, os.stat_result]:
    """Bind and listen at ``path`` (replacing a stale socket) with ``mode`` from
    the first instant; returns the socket and the stat of the file it made, whose
    st_dev/st_ino later prove the path still names this socket."""
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, mode)
        st = os.lstat(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        unlink_quietly(path)
        raise
    return sock, st


def unlink_if_same(path: str, ident: tuple[int, int]) -> bool:
    """Unlink ``path`` only if it still names the socket with (st_dev, st_ino)
    ``ident``; a file someone else put there since is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != ident:
        log.info("socket path %s now names another file; left in place", path)
        return False
    unlink_quietly(path)
    return True
