"""Per-device cgroup v2 budgets inside the supervisor's delegated subtree.

Under ``Delegate=yes`` systemd hands the unit's cgroup to the supervisor
(it marks it with the ``trusted.delegate`` xattr) and never touches what is
below.  The supervisor then:

- moves itself into ``supervisor/`` (a cgroup with processes may not enable
  controllers for its children: the "no internal processes" rule), before
  READY=1 and before any fork;
- enables ``memory pids cpu`` in the unit cgroup's ``cgroup.subtree_control``;
- gives each device a fresh ``dev-NAME/`` per spawn with the device's budget
  (``memory.max``, ``memory.swap.max``, ``pids.max``, ``cpu.weight`` from the
  device keys ``memory-max``, ``memory-swap-max``, ``pids-max``,
  ``cpu-weight``), ``memory.oom.group=1`` so an OOM kill takes the whole jail;
- moves each child into its cgroup in the child itself, right after fork
  (an at-fork hook, armed only around the device's spawn), so everything the
  device allocates is charged to its budget;
- reads ``oom_kill`` from the device's ``memory.events`` when it dies of
  SIGKILL: that exit is reported as ``oom``.

Without a delegated cgroup v2 subtree nothing is written anywhere; the
supervisor says once, at start, which configured budgets it cannot enforce.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import logs

CGROUP_ROOT = "/sys/fs/cgroup"
#: device key -> (cgroup file, controller)
BUDGET_KEYS = {
    "memory-max": ("memory.max", "memory"),
    "memory-swap-max": ("memory.swap.max", "memory"),
    "pids-max": ("pids.max", "pids"),
    "cpu-weight": ("cpu.weight", "cpu"),
}
CONTROLLERS = ("memory", "pids", "cpu")
SUPERVISOR_LEAF = "supervisor"
DEVICE_PREFIX = "dev-"
_SIZE = re.compile(r"^(\d+)([KMGT]?)$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_BYTES = 1 << 50


class BudgetError(ValueError):
    """A budget value is not valid; the message names the key and value."""


def parse_budget(options: dict[str, str]) -> dict[str, str]:
    """Take the budget keys out of ``options``; returns {cgroup file: value}.

    Sizes accept K/M/G/T (binary) suffixes or ``max``; ``pids-max`` a
    positive count or ``max``; ``cpu-weight`` 1..10000.
    """
    out: dict[str, str] = {}
    for key, (fname, _ctl) in BUDGET_KEYS.items():
        if key not in options:
            continue
        raw = str(options.pop(key)).strip()
        text = raw.upper()
        if key in ("memory-max", "memory-swap-max"):
            if text == "MAX":
                out[fname] = "max"
                continue
            m = _SIZE.match(text)
            if not m or not 0 <= int(m.group(1)) * _UNITS[m.group(2)] <= MAX_BYTES:
                raise BudgetError(f"key {key!r}: {raw!r} is not a size (bytes with K/M/G/T, or max)")
            out[fname] = str(int(m.group(1)) * _UNITS[m.group(2)])
        elif key == "pids-max":
            if text == "MAX":
                out[fname] = "max"
            elif text.isdigit() and 1 <= int(text) <= 4194304:
                out[fname] = text
            else:
                raise BudgetError(f"key {key!r}: {raw!r} is not a process count 1..4194304 (or max)")
        else:
            if not (text.isdigit() and 1 <= int(text) <= 10000):
                raise BudgetError(f"key {key!r}: {raw!r} is not a weight 1..10000")
            out[fname] = text
    return out


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:   # 'with': EBUSY/EINVAL raise here, not at garbage collection
        f.write(value)


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if v.strip().isdigit():
                    out[k] = int(v)
    except OSError:
        pass
    return out


def find_delegated(proc_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> tuple[str | None, str]:
    """(absolute path of our delegated cgroup, "") or (None, why not).

    Read-only: on a cgroup v1 or hybrid host, or in a cgroup nobody
    delegated to us, nothing is ever written.
    """
    try:
        with open(proc_cgroup) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
        return None, f"cannot read {proc_cgroup}: {e.strerror}"
    if len(lines) != 1 or not lines[0].startswith("0::"):
        return None, "the host does not use the unified cgroup v2 hierarchy"
    rel = lines[0][3:]
    if not os.path.isfile(os.path.join(root, "cgroup.controllers")):
        return None, f"{root} is not a cgroup v2 mount"
    if rel in ("", "/"):
        return None, "the supervisor runs in the root cgroup"
    path = os.path.join(root, rel.lstrip("/"))
    if os.path.basename(path) == SUPERVISOR_LEAF and _is_delegated(os.path.dirname(path)):
        path = os.path.dirname(path)   # a previous setup in this same process
    if not _is_delegated(path):
        return None, f"cgroup {rel} is not delegated to the supervisor (run it under systemd with Delegate=yes)"
    return path, ""


def _is_delegated(path: str) -> bool:
    for attr in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, attr) == b"1":
                return True
        except OSError:
            continue
    return False


@dataclass
class _Pending:
    procs: str = ""


_pending = _Pending()


def _enter_in_child() -> None:
    """At-fork hook, in the new child: join the device's cgroup before anything else runs."""
    target, _pending.procs = _pending.procs, ""
    if not target:
        return
    try:
        _write(target, "0")
    except OSError as e:
        os.write(2, f"cannot join {os.path.dirname(target)}: {e.strerror}\n".encode())
        os._exit(125)


os.register_at_fork(after_in_child=_enter_in_child)


@dataclass
class CgroupBudgets:
    """The supervisor's view of per-device budgets; every method is safe without delegation."""

    budgets: dict[str, dict[str, str]]           # device -> {file: value}
    base: str | None = None                      # the delegated cgroup, once set up
    controllers: set[str] = field(default_factory=set)

    @classmethod
    def setup(cls, budgets: dict[str, dict[str, str]]) -> "CgroupBudgets":
        """Detect delegation, move into the leaf, enable controllers; report once what cannot be enforced."""
        self = cls(budgets)
        wanted = {f for b in budgets.values() for f in b}
        base, why = find_delegated()
        if base is None:
            if wanted:
                logs.event(None, "cgroup-budgets-unenforced", logging.WARNING, reason=why,
                           budgets=",".join(f"{d}:{f}={v}" for d, b in budgets.items() for f, v in b.items()))
            else:
                logs.event(None, "cgroups", logging.DEBUG, delegated=False, reason=why)
            return self
        try:
            leaf = os.path.join(base, SUPERVISOR_LEAF)
            os.makedirs(leaf, exist_ok=True)
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
            with open(os.path.join(base, "cgroup.controllers")) as f:
                available = set(f.read().split())
            enable = [c for c in CONTROLLERS if c in available]
            if enable:
                _write(os.path.join(base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in enable))
        except OSError as e:
            logs.event(None, "cgroup-budgets-unenforced", logging.WARNING,
                       reason=f"cannot set up {base}: {e.strerror or e}",
                       budgets=",".join(f"{d}:{f}={v}" for d, b in budgets.items() for f, v in b.items()))
            return self
        self.base, self.controllers = base, set(enable)
        missing = sorted({f for f in wanted if BUDGET_KEY_CONTROLLER[f] not in self.controllers})
        if missing:
            logs.event(None, "cgroup-budgets-unenforced", logging.WARNING, budgets=",".join(missing),
                       reason=f"controllers not delegated (have {' '.join(sorted(self.controllers)) or 'none'})")
        logs.event(None, "cgroups", cgroup=base, controllers=" ".join(sorted(self.controllers)))
        return self

    def path(self, device: str) -> str | None:
        return None if self.base is None else os.path.join(self.base, DEVICE_PREFIX + device)

    def _prepare(self, device: str) -> str | None:
        """A fresh cgroup for the device's next child, with its budget written."""
        path = self.path(device)
        if path is None:
            return None
        try:
            os.rmdir(path)       # the previous child's, now empty: its counters go with it
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            _write(os.path.join(path, "cgroup.kill"), "1")   # stragglers of a dead jail
        os.makedirs(path, exist_ok=True)
        values = dict(self.budgets.get(device, {}))
        if "memory" in self.controllers:
            values.setdefault("memory.oom.group", "1")
        for fname, value in values.items():
            if BUDGET_KEY_CONTROLLER.get(fname, "memory") in self.controllers:
                _write(os.path.join(path, fname), value)
        return os.path.join(path, "cgroup.procs")

    @contextmanager
    def placing(self, device: str) -> Iterator[None]:
        """Around one device spawn: the next fork's child joins the device's cgroup."""
        try:
            procs = self._prepare(device)
        except OSError as e:
            logs.event(device, "cgroup-failed", logging.ERROR, error=f"{e.strerror or e}",
                       cgroup=self.path(device))
            raise
        _pending.procs = procs or ""
        try:
            yield
        finally:
            _pending.procs = ""

    def oom_killed(self, device: str) -> bool:
        """True if the kernel's OOM killer killed a process of the device's current cgroup."""
        path = self.path(device)
        if path is None:
            return False
        return _read_kv(os.path.join(path, "memory.events")).get("oom_kill", 0) > 0

    def usage(self, device: str) -> dict[str, int]:
        """memory.current / pids.current of the device's cgroup (for status), when enforced."""
        path = self.path(device)
        out: dict[str, int] = {}
        if path is None:
            return out
        for fname in ("memory.current", "pids.current"):
            try:
                with open(os.path.join(path, fname)) as f:
                    out[fname] = int(f.read().strip())
            except (OSError, ValueError):
                pass
        return out


BUDGET_KEY_CONTROLLER = {fname: ctl for fname, ctl in BUDGET_KEYS.values()}
