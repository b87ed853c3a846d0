"""A device type's declaration: everything the rest of the project needs to
know about it, in one value beside its builder.

The supervisor's config parsing and ``run`` flags, the standalone command
(``vhost-supervisor device TYPE``), ``--print-capabilities``, the list of
modules imported before fork and the seccomp policy a child loads all read
a ``DeviceType``; none of them names a device type.  Adding one is a new
module that ends with its ``DEVICE = DeviceType(...)``, its policy file in
seccomp/, and one entry in ``devices/__init__.py`` (docs/architecture.md,
"Adding a device").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import Option, parse_options

if TYPE_CHECKING:
    from .base import DeviceBuilder

#: Keys and flags the supervisor or the standalone command consume
#: themselves; a device option cannot take one of these names.  (``type``
#: is not reserved because crosvm's ``--serial type=`` is the console's; in a
#: TOML ``[[device]]`` table ``type`` names the device type, so an option
#: called ``type`` can only be given on the command line.)
RESERVED = frozenset({"vhost", "name", "restart", "jail-user", "watchdog-sec", "crash-loop",
                      "memory-max", "memory-swap-max", "pids-max", "cpu-weight",
                      "socket-path", "fd", "print-capabilities", "log-level"})
#: Keys every type accepts and ignores: ``vhost`` is the socket (the
#: supervisor's), ``pci-address`` concerns the VMM.
COMMON_IGNORED = ("vhost", "pci-address")
#: ``memory-limit=`` default: the device's own heap (RLIMIT_DATA in its jail),
#: guest RAM (shared memory) not included.  docs/sandbox.md has what each type uses.
DEFAULT_MEMORY_LIMIT = 256 << 20
MEMORY_LIMIT_RANGE = (32 << 20, 64 << 30)
#: Options every device type has, appended to its own by ``DeviceType``.
COMMON_OPTIONS = (
    Option("memory-limit", int, DEFAULT_MEMORY_LIMIT,
           "the device child's own heap budget (RLIMIT_DATA; guest RAM not included), bytes or K/M/G",
           aliases=("memory_limit",), lo=MEMORY_LIMIT_RANGE[0], hi=MEMORY_LIMIT_RANGE[1], size=True,
           metavar="BYTES"),
)
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class DeviceType:
    """One device type, declared by its module.

    ``flag`` is the supervisor's command-line flag (crosvm's name: ``serial``
    for the console) and ``aliases`` further names a TOML ``type =`` may use.
    ``capabilities`` are the ``--print-capabilities`` features (vhost-user.json
    names).  ``child_modules`` are what the jailed child imports beyond the
    builder's own module (after pivot_root it can import nothing).
    ``ignored`` are crosvm keys for the VMM side, accepted and ignored.
    """

    name: str
    builder: type[DeviceBuilder]
    summary: str
    options: tuple[Option, ...]
    seccomp_policy: str
    capabilities: tuple[str, ...] = ()
    child_modules: tuple[str, ...] = ()
    flag: str = ""
    aliases: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"device type {self.name!r}: not a lower-case name")
        if not self.flag:
            object.__setattr__(self, "flag", self.name)
        if not self.seccomp_policy.endswith(".policy") or "/" in self.seccomp_policy:
            raise ValueError(f"device type {self.name}: seccomp_policy {self.seccomp_policy!r} "
                             f"must be a file name in seccomp/ ending in .policy")
        own = tuple(o for o in self.options if o not in COMMON_OPTIONS)   # (dataclasses.replace passes them back)
        object.__setattr__(self, "options", own + COMMON_OPTIONS)
        keys: set[str] = set()
        for opt in self.options:
            for key in opt.keys:
                if key in RESERVED:
                    raise ValueError(f"device type {self.name}: option {key!r} is reserved "
                                     f"({', '.join(sorted(RESERVED))})")
                if key in keys:
                    raise ValueError(f"device type {self.name}: option {key!r} declared twice")
                keys.add(key)
        # The builder reads its own declaration (``parse``) and the code that
        # only holds a builder (jail set-up) reads the policy from it.
        self.builder.declaration = self
        self.builder.device_type = self.name
        self.builder.seccomp_policy = self.seccomp_policy

    @property
    def modules(self) -> tuple[str, ...]:
        """Modules a jailed child of this type needs imported before fork."""
        return (self.builder.__module__, *self.child_modules)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that selects this type (TOML ``type =``)."""
        return tuple(dict.fromkeys((self.name, self.flag, *self.aliases)))

    def parse(self, device: str, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``raw`` options of device ``device``: option name -> typed value."""
        return parse_options(self.options, raw, device, ignored=COMMON_IGNORED + self.ignored)

    def capabilities_json(self) -> dict[str, Any]:
        """What ``--print-capabilities`` prints (vhost-user spec, back-end program conventions)."""
        return {"type": self.name, "features": list(self.capabilities)}


def registry(*types: DeviceType) -> dict[str, DeviceType]:
    """The name -> type map, refusing two types that share a name, flag or alias."""
    out: dict[str, DeviceType] = {}
    names: dict[str, str] = {}
    for t in types:
        for n in t.names:
            if n in names:
                raise ValueError(f"device types {names[n]} and {t.name} both answer to {n!r}")
            names[n] = t.name
        out[t.name] = t
    return out
