"""Host uids/gids for device children: one id per device from a reserved range.

Why: ``kill(2)`` lets a process signal another whose real or saved uid
equals its own.  If every device ran as 65534 ("nobody"), any host process
running as nobody could SIGSTOP or SIGKILL every device.  With one id per
device that no account and no other process uses, nothing on the host but
root (and the device itself) can signal a device child.

The range is checked once at start: no entry of the passwd or group
database, and no running process (real, effective, saved or filesystem
id), may use an id in it.  Pure reads, no privilege needed.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


class IdRangeError(ValueError):
    """The range overlaps ids in use; the message names who uses which id."""


@dataclass(frozen=True)
class IdRange:
    start: int
    count: int

    def __contains__(self, ident: object) -> bool:
        return isinstance(ident, int) and self.start <= ident < self.start + self.count

    def __str__(self) -> str:
        return f"{self.start}-{self.start + self.count - 1}"


def _process_ids(pid: str) -> tuple[set[int], str]:
    """Every uid and gid of one process (Uid:/Gid: lines: real, effective, saved, fs);
    none for a zombie, which can use its ids for nothing any more."""
    ids: set[int] = set()
    name = "?"
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1].strip() if len(line.split(None, 1)) > 1 else "?"
                elif line.startswith("State:") and line.split()[1:2] == ["Z"]:
                    return set(), name
                elif line.startswith(("Uid:", "Gid:")):
                    ids.update(int(x) for x in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ids, name


def users_of(rng: IdRange, *, skip_pids: frozenset[int] = frozenset()) -> list[str]:
    """Who uses an id in ``rng``: passwd and group entries, running processes."""
    found: list[str] = []
    for pw in pwd.getpwall():
        if pw.pw_uid in rng or pw.pw_gid in rng:
            found.append(f"user {pw.pw_name!r} (uid {pw.pw_uid}, gid {pw.pw_gid})")
    for gr in grp.getgrall():
        if gr.gr_gid in rng:
            found.append(f"group {gr.gr_name!r} (gid {gr.gr_gid})")
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in skip_pids:
            continue
        ids, name = _process_ids(pid)
        hit = sorted(i for i in ids if i in rng)
        if hit:
            found.append(f"process {pid} ({name}) with id {hit[0]}")
    return found


def check_unused(rng: IdRange, *, skip_pids: frozenset[int] = frozenset()) -> None:
    """Raise IdRangeError naming the first few users of ids in ``rng``."""
    found = users_of(rng, skip_pids=skip_pids)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise IdRangeError(f"{rng} is not free: used by {', '.join(found[:3])}{more}")


def allocate(rng: IdRange, names: list[str], fixed: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """One (uid, gid) per name: ``fixed`` ones as given, the others the next
    free id of ``rng`` (uid == gid), never one a fixed entry uses."""
    taken = {i for pair in fixed.values() for i in pair}
    out: dict[str, tuple[int, int]] = {}
    nxt = rng.start
    for name in names:
        if name in fixed:
            out[name] = fixed[name]
            continue
        while nxt in taken:
            nxt += 1
        if nxt not in rng:
            raise IdRangeError(f"{rng} has no free id left for device {name!r} ({len(names)} devices)")
        out[name] = (nxt, nxt)
        taken.add(nxt)
        nxt += 1
    return out


def _used_ids(rng: IdRange, skip_pids: frozenset[int]) -> set[int]:
    """Every id of ``rng`` that an account, a group or a running process uses (one /proc scan)."""
    used = {i for pw in pwd.getpwall() for i in (pw.pw_uid, pw.pw_gid) if i in rng}
    used.update(gr.gr_gid for gr in grp.getgrall() if gr.gr_gid in rng)
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) not in skip_pids:
            used.update(i for i in _process_ids(pid)[0] if i in rng)
    return used


def claim_block(pool: IdRange, block: int, need: int, lock_dir: str, *,
                skip_pids: frozenset[int] = frozenset()) -> tuple[IdRange, int]:
    """The first ``block``-sized slice of ``pool`` that nothing uses and no
    other supervisor holds, for ``need`` devices; returns it and the fd of
    its lock file (held open for the supervisor's life: a second supervisor
    started at the same moment takes the next slice, not the same ids).

    Why slices: several supervisors on one host (one per tenant, or a test
    beside a production one) each get ids of their own without an operator
    assigning ranges, and the "no one else uses these ids" rule still holds.
    """
    import fcntl
    if need > block:
        raise IdRangeError(f"{need} devices need more ids than one slice of {block} holds")
    try:
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        writable = os.access(lock_dir, os.W_OK | os.X_OK)
    except OSError as e:
        raise IdRangeError(f"uid-slice lock directory {lock_dir}: {e.strerror}") from e
    if not writable:
        # e.g. made by a root supervisor, now used by the unit's service user
        raise IdRangeError(f"uid-slice lock directory {lock_dir} is not writable by uid {os.geteuid()}: "
                           f"set uid-range= or give it to this user")
    used = _used_ids(pool, skip_pids)
    for start in range(pool.start, pool.start + pool.count - block + 1, block):
        piece = IdRange(start, block)
        if any(i in piece for i in used):
            continue
        fd = os.open(os.path.join(lock_dir, f"uids-{start}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return piece, fd
    raise IdRangeError(f"{pool} has no free slice of {block} ids (every slice is used by a process, "
                       f"an account or another supervisor)")
