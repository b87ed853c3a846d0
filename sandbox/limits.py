"""Resource limits of the jail (soft == hard, so the device cannot raise them).

RLIMIT_DATA is the device's memory budget: since Linux 4.7 it counts brk and
every private writable mapping (malloc arenas, thread stacks, private
anonymous mmaps), not shared ones, so guest RAM and the inflight region
(memfds mapped MAP_SHARED) are outside it, and a device's budget does not
depend on its guest's size.  Going over it makes the allocation fail
(ENOMEM, a MemoryError in Python) in the device, not in the host.
"""

from __future__ import annotations

import resource

from .config import JailConfig, JailError


def planned_limits(config: JailConfig) -> dict[int, int]:
    limits = {resource.RLIMIT_NOFILE: config.nofile, resource.RLIMIT_CORE: 0}
    if config.nproc is not None:
        limits[resource.RLIMIT_NPROC] = config.nproc
    if config.address_space is not None:
        limits[resource.RLIMIT_AS] = config.address_space
    if config.memlock is not None:
        limits[resource.RLIMIT_MEMLOCK] = config.memlock
    if config.data_limit is not None:
        limits[resource.RLIMIT_DATA] = config.data_limit
    return limits


def forwarder_limits(limits: dict[int, int]) -> dict[int, int]:
    """The forwarder's: the device's, but 16 fds and no memory budget (it
    runs no device code, and a budget smaller than the heap it inherited from
    the supervisor could fail its signal forwarding)."""
    out = {k: v for k, v in limits.items() if k not in (resource.RLIMIT_NOFILE, resource.RLIMIT_DATA)}
    out[resource.RLIMIT_NOFILE] = 16
    return out


def apply_limits(limits: dict[int, int]) -> None:
    for which, value in limits.items():
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as e:
            raise JailError("rlimit", getattr(e, "errno", 0) or 0, f"resource {which} = {value}: {e}") from e
