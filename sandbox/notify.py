"""Parent side of the seccomp user-notification channel.

The jailed device's filter ends in SECCOMP_RET_USER_NOTIF instead of a plain
kill: a forbidden syscall then blocks in the kernel (it never runs) and queues
a notification on a listener fd that the child handed to the parent.  The
parent reads the syscall number from it, names it with libseccomp and kills the
child.  Plain ioctls on the fd, so this works on any event loop (add_reader).
"""

from __future__ import annotations

import errno
import fcntl
import select
import struct
from dataclasses import dataclass

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
# struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
_NOTIF = struct.Struct("=QIIiIQ6Q")
SECCOMP_IOCTL_NOTIF_RECV = 0xC0000000 | (_NOTIF.size << 16) | (ord("!") << 8) | 0
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40000000 | (8 << 16) | (ord("!") << 8) | 2


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, ...]


def pending(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLIN for _, ev in p.poll(0))


def receive(fd: int) -> Notification | None:
    """One pending notification, or None (nothing queued / all users gone)."""

    if not pending(fd):
        return None
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
            return None  # the target died or was killed meanwhile
        raise
    nid, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buf)
    return Notification(nid, pid, nr, arch, tuple(args))


def still_valid(fd: int, notif_id: int) -> bool:
    """True while the notifying task is still blocked in that syscall; checked
    before signalling notif.pid so a recycled pid is never hit."""

    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", notif_id))
        return True
    except OSError:
        return False
