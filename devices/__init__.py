"""Device types, one module each, and the registry everything else reads.

Each device module ends with its declaration (``DEVICE``, a
``devtype.DeviceType``): options, capabilities, the modules its child needs,
its seccomp policy.  The supervisor's config parsing and ``run`` flags, the
standalone command, ``--print-capabilities`` and the pre-fork imports all
come from ``DEVICE_TYPES`` below; adding a type is one entry here
(docs/architecture.md, "Adding a device").

Every device module is imported here on purpose: the supervisor imports
this package before it forks, and a jailed child can import nothing new.
"""

from __future__ import annotations

from . import block, console, net, rng
from .base import DeviceBuilder
from .devtype import DeviceType, registry
from .options import ConfigError, Option, parse_bool

#: device type name -> its declaration, in the order help texts list them.
DEVICE_TYPES: dict[str, DeviceType] = registry(block.DEVICE, console.DEVICE, rng.DEVICE, net.DEVICE)

#: device type name -> builder class (``Builder.from_options(name, options)``),
#: derived from ``DEVICE_TYPES`` for callers that only build.
BUILDERS: dict[str, type[DeviceBuilder]] = {name: t.builder for name, t in DEVICE_TYPES.items()}

#: what a device child needs besides the connection package (see ``child_modules``).
_SHARED_CHILD_MODULES = ("devices", "devices.base", "devices.devtype", "devices.options")


def type_names() -> dict[str, str]:
    """Every name a config may use for a type (its name, supervisor flag and
    aliases) -> the type's name."""
    return {n: t.name for t in DEVICE_TYPES.values() for n in t.names}


def lookup(type_name: str) -> DeviceType | None:
    """The declaration selected by ``type_name`` (a name, flag or alias)."""
    name = type_names().get(type_name)
    return None if name is None else DEVICE_TYPES[name]


def by_flag(flag: str) -> DeviceType:
    """The declaration behind a supervisor ``run`` flag (``serial`` -> console)."""
    return next(t for t in DEVICE_TYPES.values() if t.flag == flag)


def child_modules() -> tuple[str, ...]:
    """Every module a device child of any registered type needs imported before fork."""
    mods = list(_SHARED_CHILD_MODULES)
    for t in DEVICE_TYPES.values():
        mods.extend(t.modules)
    return tuple(dict.fromkeys(mods))


__all__ = ["BUILDERS", "DEVICE_TYPES", "ConfigError", "DeviceBuilder", "DeviceType", "Option", "by_flag",
           "child_modules", "lookup", "parse_bool", "type_names"]
