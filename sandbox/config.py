"""The jail's configuration and its error type.

Kept free of any system call so that the supervisor can build configs (and
tests can inspect them) without importing the parts that touch the kernel.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass, field

# Exit status of a child whose jail set-up failed.  125 follows the convention
# of env(1)/chroot(1) ("the command itself failed"), but the status alone is not
# trusted: spawn() also receives the failure message over the handshake
# socket, so a device that happens to exit with 125 is not mistaken for it.
JAIL_SETUP_FAILED = 125

OVERFLOW_ID = 65534


@dataclass
class BindMount:
    """A host path made visible inside the jail (read-only unless writable)."""

    source: str
    target: str
    writable: bool = False


@dataclass
class JailConfig:
    """Everything the jail needs to know; nothing about vhost-user."""

    name: str
    uid: int = OVERFLOW_ID
    gid: int = OVERFLOW_ID
    root: str | None = None
    bind_mounts: list[BindMount] = field(default_factory=list)
    mount_proc: bool = False
    dev_nodes: list[str] = field(default_factory=list)
    nofile: int = 1024
    nproc: int | None = None
    address_space: int | None = None
    memlock: int | None = None
    #: RLIMIT_DATA in bytes: the device's own heap (brk and private writable
    #: mappings, thread stacks included); shared mappings such as guest RAM
    #: do not count (Linux >= 4.7).  None = inherited.
    data_limit: int | None = None
    keep_fds: list[int] = field(default_factory=list)
    log_fd: int | None = None
    seccomp_policy: str | None = None
    seccomp_log: bool = False
    namespaces: bool = True


class JailError(Exception):
    """A step of the jail set-up failed; names the step and the errno."""

    def __init__(self, step: str, err: int = 0, detail: str = "") -> None:
        self.step = step
        self.errno = err
        self.detail = detail
        parts = [f"jail step {step!r} failed"]
        if err:
            parts.append(f"errno {err} ({_errno.errorcode.get(err, '?')}: {os.strerror(err)})")
        if detail:
            parts.append(detail)
        super().__init__(": ".join(parts))
