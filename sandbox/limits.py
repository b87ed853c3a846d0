"""Resource limits of the jail (soft == hard, so the device cannot raise them)."""

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
    return limits


def apply_limits(limits: dict[int, int]) -> None:
    for which, value in limits.items():
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as e:
            raise JailError("rlimit", getattr(e, "errno", 0) or 0, f"resource {which} = {value}: {e}") from e
