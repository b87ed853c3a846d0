"""Target: device options and supervisor configuration (devices/options.py,
devices/devtype.py, supervisor/config.py).

Three shapes of input, as an operator (or whoever writes the config) would
give them: a ``--block``/``--serial``/``--rng`` flag value (key=value list)
checked by every device type's declaration; a TOML file with
``[supervisor]``, ``[jail]`` and ``[[device]]`` tables; a list of device
flags plus ``--jail`` flags, then the cross-device ``validate``.  An ``@``
in the input stands for a private directory (with a subdirectory ``s``),
so socket and pivot-root paths can exist (sockets are only checked, never bound;
images are never opened: only the declarations parse).  A configuration
that passes must carry jail ids a jail can switch to.  Fine: ConfigError
(which names key, device and value).  A bug: any other exception.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import devices
from devices import ConfigError
from supervisor.config import (SupervisorConfig, add_cli_devices, apply_jail_flags, load_toml,
                               parse_keyvalues, validate)

from ..data import Data
from ..harness import FuzzBug

_dir: str | None = None
FLAGS = tuple(t.flag for t in devices.DEVICE_TYPES.values())


def _workdir() -> str:
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="fuzz-config-")
        atexit.register(shutil.rmtree, _dir, True)
        os.mkdir(os.path.join(_dir, "s"))
    return _dir


def one_input(buf: bytes) -> None:
    d = Data(buf)
    mode = d.u8() % 3
    work = _workdir()
    try:
        if mode == 0:
            raw = parse_keyvalues(d.text(2048).replace("@", work + "/"), "--fuzz")
            for t in devices.DEVICE_TYPES.values():
                try:
                    t.parse("fuzz", raw)
                except ConfigError:
                    pass
        elif mode == 1:
            path = os.path.join(work, "c.toml")
            with open(path, "wb") as f:
                f.write(d.rest().replace(b"@", work.encode() + b"/"))
            cfg = load_toml(path)
            for dev in cfg.devices:
                try:
                    devices.DEVICE_TYPES[dev.type].parse(dev.name, dev.options)
                except ConfigError:
                    pass
            validate(cfg)
            _check(cfg)
        else:
            cfg = SupervisorConfig()
            flags = [(d.pick(FLAGS), d.text(512).replace("@", work + "/")) for _ in range(d.below(4))]
            jail = [d.text(256).replace("@", work + "/") for _ in range(d.below(2))]
            apply_jail_flags(cfg, jail)
            add_cli_devices(cfg, flags)
            validate(cfg)
            _check(cfg)
    except ConfigError:
        pass


def _check(cfg: SupervisorConfig) -> None:
    """What a configuration that passed must hold: ids a jail can switch to."""
    for dev in cfg.devices:
        uid, gid = dev.jail_user
        if not (0 < uid <= 0xFFFF_FFFE and 0 < gid <= 0xFFFF_FFFE):
            raise FuzzBug(f"device {dev.name}: jail-user {dev.jail_user} accepted")
