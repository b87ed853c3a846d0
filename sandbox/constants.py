"""Named constants usable in seccomp policy files (x86_64 Linux values).

Taken from the Python standard library where it exposes them (so the values are
the platform's own) and written out for the rest (clone flags, prctl options,
futex ops, a few ioctls), which Python does not export.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import socket
import termios

_EXTRA: dict[str, int] = {
    # clone(2) flags (linux/sched.h)
    "CSIGNAL": 0xFF, "CLONE_VM": 0x100, "CLONE_FS": 0x200, "CLONE_FILES": 0x400,
    "CLONE_SIGHAND": 0x800, "CLONE_PIDFD": 0x1000, "CLONE_PTRACE": 0x2000, "CLONE_VFORK": 0x4000,
    "CLONE_PARENT": 0x8000, "CLONE_THREAD": 0x10000, "CLONE_NEWNS": 0x20000, "CLONE_SYSVSEM": 0x40000,
    "CLONE_SETTLS": 0x80000, "CLONE_PARENT_SETTID": 0x100000, "CLONE_CHILD_CLEARTID": 0x200000,
    "CLONE_DETACHED": 0x400000, "CLONE_UNTRACED": 0x800000, "CLONE_CHILD_SETTID": 0x1000000,
    "CLONE_NEWCGROUP": 0x2000000, "CLONE_NEWUTS": 0x4000000, "CLONE_NEWIPC": 0x8000000,
    "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000, "CLONE_NEWNET": 0x40000000,
    "CLONE_IO": 0x80000000,
    # prctl(2) options (linux/prctl.h)
    "PR_SET_PDEATHSIG": 1, "PR_GET_PDEATHSIG": 2, "PR_GET_DUMPABLE": 3, "PR_SET_DUMPABLE": 4,
    "PR_GET_KEEPCAPS": 7, "PR_SET_KEEPCAPS": 8, "PR_SET_NAME": 15, "PR_GET_NAME": 16,
    "PR_GET_SECCOMP": 21, "PR_SET_SECCOMP": 22, "PR_CAPBSET_READ": 23, "PR_CAPBSET_DROP": 24,
    "PR_GET_SECUREBITS": 27, "PR_SET_SECUREBITS": 28, "PR_SET_TIMERSLACK": 29, "PR_GET_TIMERSLACK": 30,
    "PR_SET_CHILD_SUBREAPER": 36, "PR_GET_CHILD_SUBREAPER": 37, "PR_SET_NO_NEW_PRIVS": 38,
    "PR_GET_NO_NEW_PRIVS": 39, "PR_SET_THP_DISABLE": 41, "PR_GET_THP_DISABLE": 42,
    "PR_CAP_AMBIENT": 47, "PR_SET_VMA": 0x53564D41,
    # futex(2) operations
    "FUTEX_WAIT": 0, "FUTEX_WAKE": 1, "FUTEX_REQUEUE": 3, "FUTEX_CMP_REQUEUE": 4, "FUTEX_WAKE_OP": 5,
    "FUTEX_LOCK_PI": 6, "FUTEX_UNLOCK_PI": 7, "FUTEX_WAIT_BITSET": 9, "FUTEX_WAKE_BITSET": 10,
    "FUTEX_PRIVATE_FLAG": 128, "FUTEX_CLOCK_REALTIME": 256,
    # ioctls Python does not export
    "TCGETS2": 0x802C542A, "TCSETS2": 0x402C542B, "BLKDISCARD": 0x1277, "BLKZEROOUT": 0x127F,
    "BLKGETSIZE64": 0x80081272, "BLKSSZGET": 0x1268, "BLKFLSBUF": 0x1261,
    # fallocate(2) modes
    "FALLOC_FL_KEEP_SIZE": 1, "FALLOC_FL_PUNCH_HOLE": 2, "FALLOC_FL_ZERO_RANGE": 0x10,
    # mmap(2) flags missing from the mmap module
    "MAP_FIXED": 0x10, "MAP_NORESERVE": 0x4000, "MAP_FIXED_NOREPLACE": 0x100000, "MAP_GROWSDOWN": 0x100,
    "PROT_NONE": 0, "PROT_GROWSDOWN": 0x01000000, "PROT_GROWSUP": 0x02000000,
    "MADV_GUARD_INSTALL": 102, "MADV_GUARD_REMOVE": 103,
    # socket(2) flags
    "SOCK_NONBLOCK": 0o4000, "SOCK_CLOEXEC": 0o2000000,
    # sigprocmask how
    "SIG_BLOCK": 0, "SIG_UNBLOCK": 1, "SIG_SETMASK": 2,
    # fcntl commands missing from the fcntl module on some builds
    "F_DUPFD_CLOEXEC": 1030, "F_ADD_SEALS": 1033, "F_GET_SEALS": 1034,
}

_PREFIXES = {
    socket: ("AF_", "SOCK_", "MSG_", "SOL_", "SO_", "SCM_"),
    mmap: ("PROT_", "MAP_", "MADV_"),
    os: ("O_", "EFD_", "GRND_", "MFD_", "SEEK_", "P_", "W", "RWF_"),
    fcntl: ("F_", "FD_", "LOCK_"),
    termios: ("TC", "FIO", "TIOC"),
}


def _collect() -> dict[str, int]:
    table: dict[str, int] = {}
    for module, prefixes in _PREFIXES.items():
        for name in dir(module):
            if name.startswith(prefixes) and name.isupper():
                value = getattr(module, name)
                if isinstance(value, int):
                    table[name] = int(value)
    for sig in signal.Signals:
        table[sig.name] = int(sig)
    for num, name in errno.errorcode.items():
        table[name] = num
    table.update(_EXTRA)
    return table


CONSTANTS: dict[str, int] = _collect()


#: Largest errno a syscall can return (linux/err.h MAX_ERRNO).
MAX_ERRNO = 4095


def errno_value(name: str) -> int | None:
    """The number of an errno name (ENOENT) or a decimal, None if unknown."""

    if name.isascii() and name.isdigit():   # not '²', which isdigit() takes and int() refuses
        return int(name) if len(name) <= 4 and int(name) <= MAX_ERRNO else None
    return getattr(errno, name, None) if name.startswith("E") else None
