"""ctypes bindings for the few libc calls Python 3.11 lacks.

unshare/mount/umount2/pivot_root/sethostname/prctl/seccomp are bound once at
import time (before any pivot_root), each with use_errno=True so failures carry
a real errno into JailError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from .config import JailError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_pivot_root = 155
SYS_seccomp = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3

_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(res: int, step: str, detail: str = "") -> int:
    if res < 0:
        raise JailError(step, ctypes.get_errno(), detail)
    return res


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare", hex(flags))


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None,
          step: str = "mount") -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), step, f"{source} -> {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), flags), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_pivot_root, _b(new_root), _b(put_old)), "pivot_root", new_root)


def sethostname(name: str) -> None:
    raw = name.encode()[:64]
    _check(_libc.sethostname(raw, len(raw)), "sethostname", name)


def prctl(option: int, arg2: int = 0, step: str = "prctl") -> int:
    return _check(_libc.prctl(option, arg2, 0, 0, 0), step, str(option))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_load(bpf: bytes, new_listener: bool) -> int:
    """Install a raw BPF program; returns the listener fd when asked for one.

    The program was compiled by libseccomp in the parent before fork, so the
    child needs neither libseccomp nor any file after pivot_root.
    """

    if len(bpf) % 8:
        raise JailError("seccomp", 0, "BPF program length is not a multiple of 8")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if new_listener else 0
    return _check(
        _libc.syscall(ctypes.c_long(SYS_seccomp), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(flags), ctypes.byref(prog)),
        "seccomp",
    )
