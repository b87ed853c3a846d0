"""Device types, one module each, and the registry the supervisor uses.

Every device module is imported here on purpose: the supervisor imports
this package before it forks, and a jailed child can import nothing new.
"""

from __future__ import annotations

from .base import ConfigError, DeviceBuilder
from .block import BlockBuilder, BlockDevice
from .console import ConsoleBuilder, ConsoleDevice
from .net import NetBuilder, NetDevice
from .rng import RngBuilder, RngDevice

#: device type -> builder class (``Builder.from_options(name, options)``).
BUILDERS: dict[str, type[DeviceBuilder]] = {
    "block": BlockBuilder,
    "console": ConsoleBuilder,
    "rng": RngBuilder,
    "net": NetBuilder,
}

__all__ = ["BUILDERS", "ConfigError", "DeviceBuilder", "BlockBuilder", "BlockDevice",
           "ConsoleBuilder", "ConsoleDevice", "NetBuilder", "NetDevice",
           "RngBuilder", "RngDevice"]
