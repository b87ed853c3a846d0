"""User-namespace id maps, written by the parent (the child cannot map itself
to another host id) after the child has unshared."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import JailConfig, JailError
from .privileges import jails_take_configured_ids


@dataclass(frozen=True)
class IdMap:
    """inside id -> host id, one id each for uid and gid."""

    inner_uid: int
    host_uid: int
    inner_gid: int
    host_gid: int


def plan_ids(config: JailConfig) -> IdMap:
    """A parent that holds CAP_SETUID/CAP_SETGID (root, or the systemd unit's
    service user): the configured host ids; an ordinary user: only itself.
    Root without those capabilities gets the configured ids too, so writing
    the map fails and the jail is refused rather than a device run as uid 0.

    Inside ids equal host ids so logs and /proc read the same on both sides.
    """

    if jails_take_configured_ids():
        return IdMap(config.uid, config.uid, config.gid, config.gid)
    return IdMap(os.geteuid(), os.geteuid(), os.getegid(), os.getegid())


def write_maps(pid: int, ids: IdMap) -> None:
    try:
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"{ids.inner_uid} {ids.host_uid} 1\n")
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny\n")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"{ids.inner_gid} {ids.host_gid} 1\n")
    except OSError as e:
        raise JailError("uid_map", e.errno or 0, f"pid {pid}: {e}") from e
