"""Identity and privilege steps: ids, securebits, capabilities, prctl flags.

Uses python-prctl for capabilities and securebits; ambient capabilities are
cleared with a raw prctl because python-prctl does not wrap PR_CAP_AMBIENT.
"""

from __future__ import annotations

import os
import select
import signal

import prctl

from . import libc
from .config import JailError

# Read once at import: after pivot_root /proc/sys may not exist.
try:
    with open("/proc/sys/kernel/cap_last_cap") as _f:
        CAP_LAST_CAP = int(_f.read())
except OSError:  # pragma: no cover - /proc always exists where the jail runs
    CAP_LAST_CAP = max(prctl.ALL_CAPS)

# NOROOT: uid 0 gets no capabilities from exec; NO_SETUID_FIXUP: id changes do
# not touch capabilities (we clear them ourselves, explicitly); KEEP_CAPS stays
# off; NO_CAP_AMBIENT_RAISE: ambient set can never be raised.  All locked, so
# nothing in the jail can turn them back (minijail's default set).
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
PR_SET_SECUREBITS = 28
JAIL_SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP
                   | SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED
                   | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)


def can_map_ids() -> bool:
    """True if this process may give a jail another host uid/gid.

    Writing a child's uid_map/gid_map with ids other than our own takes
    CAP_SETUID and CAP_SETGID in our user namespace, not uid 0: the shipped
    systemd unit runs the supervisor as an unprivileged service user that holds
    exactly those two capabilities (AmbientCapabilities=), and root without
    them cannot do it either.
    """

    return bool(prctl.cap_effective.setuid and prctl.cap_effective.setgid)


def jails_take_configured_ids() -> bool:
    """True if a jail gets the configured uid/gid rather than this process's
    own: when we may map other ids, and also as root without that capability,
    whose own id is 0 (writing the map then fails and the jail is refused:
    never a device run as root by omission)."""

    return can_map_ids() or os.geteuid() == 0


def _err(step: str, e: BaseException) -> JailError:
    return JailError(step, getattr(e, "errno", 0) or 0, str(e))


def set_parent_death_signal(expected_parent: int | None, alive_fd: int | None = None) -> None:
    """PDEATHSIG=SIGKILL, then make sure the parent did not die before that.

    A parent that died between fork and prctl would never deliver the signal,
    so the check after setting it closes the race: either getppid() still
    names the parent, or (inside a new pid namespace, where getppid() is 0) the
    parent's end of `alive_fd` is still open.
    """

    try:
        prctl.set_pdeathsig(signal.SIGKILL)
    except OSError as e:
        raise _err("pdeathsig", e) from e
    if expected_parent is not None and os.getppid() != expected_parent:
        raise JailError("pdeathsig", 0, f"parent {expected_parent} died before PR_SET_PDEATHSIG was set")
    if alive_fd is not None:
        poller = select.poll()
        poller.register(alive_fd, select.POLLIN)
        if poller.poll(0):
            raise JailError("pdeathsig", 0, "parent died before PR_SET_PDEATHSIG was set")


def lock_securebits() -> None:
    # python-prctl 1.8 refuses the NO_CAP_AMBIENT_RAISE bits ("Invalid
    # securebits set"), so the whole mask goes through a raw prctl; python-prctl
    # reads it back to check.
    libc.prctl(PR_SET_SECUREBITS, JAIL_SECUREBITS, step="securebits")
    if prctl.get_securebits() & JAIL_SECUREBITS != JAIL_SECUREBITS:
        raise JailError("securebits", 0, f"read back {prctl.get_securebits():#x}")


def drop_supplementary_groups() -> None:
    """Before unshare: a privileged parent's group list (gid 0, or the service
    user's groups) must not leak in."""

    if can_map_ids():
        try:
            os.setgroups([])
        except OSError as e:
            raise _err("setgroups", e) from e


def switch_ids(uid: int, gid: int) -> None:
    try:
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise _err("setresuid", e) from e


def drop_capabilities() -> None:
    """Empty bounding, ambient, inheritable, permitted and effective sets."""

    try:
        for cap in range(CAP_LAST_CAP + 1):
            if prctl.capbset_read(cap):
                prctl.capbset_drop(cap)
        libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL, step="caps")
        prctl.cap_inheritable.limit()
        prctl.cap_effective.limit()
        prctl.cap_permitted.limit()
    except OSError as e:
        raise _err("caps", e) from e


def set_process_flags(name: str) -> None:
    """no_new_privs, not dumpable, the device's name in comm and argv."""

    try:
        prctl.set_no_new_privs(1)
        prctl.set_dumpable(0)
        prctl.set_name(name[:15])
    except OSError as e:
        raise _err("prctl", e) from e
    try:
        prctl.set_proctitle(name)
    except Exception:  # argv rewriting is cosmetic; never fail the jail for it
        pass
