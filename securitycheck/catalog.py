"""The attack catalog: one ``Case`` per real attempt, registered by the
modules in ``securitycheck.attacks``.

A case is a function ``fn(env) -> str``: it makes the attempt against the
temporary supervisor in ``env`` and returns what it observed when the defence
held; it raises ``CaseFailed(observed)`` when the attack got through (any
other exception is a failure too: the check could not establish the
defence).  Nothing here reads a setting back from configuration: every
verdict comes from the outcome of an attempt.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: The six classes, in the order they run.
CLASSES = ("jail", "frontend", "guest", "exhaustion", "localuser", "control")

ATTACK_MODULES = tuple(f"securitycheck.attacks.{c}" for c in CLASSES)


class CaseFailed(AssertionError):
    """The attack was not stopped; the message is what was observed."""


@dataclass(frozen=True)
class Case:
    id: str                       # unique, e.g. "jail.seccomp.socket.block"
    cls: str                      # one of CLASSES
    device_type: str              # "block", "console", "rng", or "-" (not device-specific)
    tries: str                    # what the attack attempts, in one line
    expected: str                 # the outcome that counts as a pass
    fn: Callable[[Any], str] = field(repr=False, compare=False)
    #: Set when the defence is being built elsewhere (issue 9 finding and branch):
    #: the case is expected to fail until that lands, and the report says so.


_REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.cls not in CLASSES:
        raise ValueError(f"case {case.id}: class {case.cls!r} is not one of {CLASSES}")
    if case.id in _REGISTRY:
        raise ValueError(f"case id {case.id!r} registered twice")
    _REGISTRY[case.id] = case
    return case


def all_cases(classes: list[str] | None = None, device_types: list[str] | None = None) -> list[Case]:
    """Every registered case (importing the attack modules once), filtered,
    in class order then registration order."""
    for mod in ATTACK_MODULES:
        importlib.import_module(mod)
    for c in classes or []:
        if c not in CLASSES:
            raise ValueError(f"--class {c!r} is not one of {', '.join(CLASSES)}")
    out = [c for c in _REGISTRY.values()
           if (not classes or c.cls in classes)
           and (not device_types or c.device_type in device_types or c.device_type == "-")]
    order = {c: i for i, c in enumerate(CLASSES)}
    return sorted(out, key=lambda c: order[c.cls])


def check(cond: bool, observed: str) -> None:
    """Fail the case with ``observed`` unless ``cond``."""
    if not cond:
        raise CaseFailed(observed)
