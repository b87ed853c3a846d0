"""The jail's file system: a fresh read-only root with only what was asked for.

Runs in the device process after it unshared its mount namespace.  Every host
path (root, bind sources, device nodes) is opened O_PATH right after unshare,
by the forwarder which still has the parent's file-system identity, and before
the first mount, then bound through /proc/self/fd/N: mounting the staging tmpfs can
therefore never hide a source, and a path swapped after the parent checked it
is not re-resolved.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import libc
from .config import BindMount, JailConfig, JailError

STAGING = "/tmp"  # any existing directory; hidden only inside the jail's own mount ns
ROOT_TMPFS_OPTS = "size=256k,nr_inodes=256,mode=0755"
_ATIME = [(os.ST_NOATIME, libc.MS_NOATIME), (os.ST_NODIRATIME, libc.MS_NODIRATIME),
          (os.ST_RELATIME, libc.MS_RELATIME)]


@dataclass
class _Source:
    fd: int
    target: str
    writable: bool
    is_dir: bool
    device: bool


def _open_path(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise JailError("mount", e.errno or 0, f"{what} {path}") from e


def _kept_flags(path: str) -> int:
    """Flags the kernel locks on mounts copied into a user namespace (atime,
    nosuid, nodev, noexec): a remount must repeat them or fail with EPERM."""

    st = os.statvfs(path).f_flag
    flags = 0
    for bit, ms in ((os.ST_NOSUID, libc.MS_NOSUID), (os.ST_NODEV, libc.MS_NODEV), (os.ST_NOEXEC, libc.MS_NOEXEC)):
        if st & bit:
            flags |= ms
    atime = 0
    for bit, ms in _ATIME:
        if st & bit:
            atime |= ms
    return flags | (atime or libc.MS_STRICTATIME)


def _remount(path: str, flags: int) -> None:
    libc.mount(None, path, None, libc.MS_REMOUNT | libc.MS_BIND | flags | _kept_flags(path), None, step="remount")


def _make_target(path: str, is_dir: bool) -> None:
    try:
        os.makedirs(path if is_dir else os.path.dirname(path), mode=0o755, exist_ok=True)
        if not is_dir and not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise JailError("mount", e.errno or 0, f"creating mount point {path}") from e


def open_sources(config: JailConfig) -> tuple[int | None, list[_Source]]:
    """Step one, before any mount: pin every host path the jail will show."""

    root_fd = _open_path(config.root, "root") if config.root is not None else None
    sources = []
    mounts = list(config.bind_mounts) + [BindMount(d, d, True) for d in config.dev_nodes]
    for i, bm in enumerate(mounts):
        if not os.path.isabs(bm.target) or ".." in bm.target.split("/"):
            raise JailError("mount", errno.EINVAL, f"bind target must be absolute without '..': {bm.target}")
        fd = _open_path(bm.source, "bind source")
        sources.append(_Source(fd, bm.target, bm.writable, os.path.isdir(f"/proc/self/fd/{fd}"),
                               i >= len(config.bind_mounts)))
    return root_fd, sources


def build_and_pivot(config: JailConfig, root_fd: int | None, sources: list[_Source]) -> None:
    """Step two: assemble the new root at STAGING, make it read-only, pivot."""

    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE, None, step="mount-private")
    if not os.path.isdir(STAGING):
        raise JailError("mount", errno.ENOENT, f"staging directory {STAGING}")
    if root_fd is None:
        libc.mount("tmpfs", STAGING, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC,
                   ROOT_TMPFS_OPTS, step="mount-root")
    else:
        libc.mount(f"/proc/self/fd/{root_fd}", STAGING, None, libc.MS_BIND | libc.MS_REC, None, step="mount-root")
    for src in sources:
        target = STAGING + os.path.normpath(src.target)
        _make_target(target, src.is_dir)
        libc.mount(f"/proc/self/fd/{src.fd}", target, None, libc.MS_BIND | libc.MS_REC, None, step="bind")
        flags = libc.MS_NOSUID | libc.MS_NOEXEC
        if not src.device:
            flags |= libc.MS_NODEV
        if not src.writable:
            flags |= libc.MS_RDONLY
        _remount(target, flags)
        os.close(src.fd)
    if config.mount_proc:
        proc = STAGING + "/proc"
        _make_target(proc, True)
        libc.mount("proc", proc, "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC | libc.MS_RDONLY,
                   "hidepid=2", step="mount-proc")
    _remount(STAGING, libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV)
    if root_fd is not None:
        os.close(root_fd)
    os.chdir(STAGING)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
