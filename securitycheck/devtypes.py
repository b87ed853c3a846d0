"""Device types the check knows how to set up and exercise (pluggable).

A new device type (e.g. net) registers a ``DeviceType``: how to declare a
temporary instance on the supervisor's command line, how many queues it
has, and one checked piece of real I/O (the health check every case uses to
show the device still serves, and comes back for a fresh connection).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from frontend.exercise import drive_block, drive_console, drive_rng

IMAGE_SIZE = 8 << 20


@dataclass(frozen=True)
class DeviceType:
    name: str                                   # "block"
    flag: str                                   # the supervisor's flag without dashes ("block", "serial", "rng")
    num_queues: int
    #: workspace dir, instance name, variant -> "key=value,..." (without vhost=)
    options: Callable[[str, str, str], str]
    #: socket path, variant -> None; raises on a wrong result
    exercise: Callable[[str, str], None]
    variants: tuple[str, ...] = field(default=("",))   # extra instances the cases need, e.g. "ro"


#: the O_DIRECT instance is where the amplification case reads 128 MiB in one request
DIRECT_IMAGE_SIZE = 256 << 20


def _image(workdir: str, name: str, size: int = IMAGE_SIZE) -> str:
    path = os.path.join(workdir, f"{name}.img")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.truncate(size)   # sparse: costs no disk
    return path


def _block_options(workdir: str, name: str, variant: str) -> str:
    extra = {"ro": ",ro=true", "direct": ",direct=true"}.get(variant, "")
    size = DIRECT_IMAGE_SIZE if variant == "direct" else IMAGE_SIZE
    return f"path={_image(workdir, name, size)}{extra}"


def _block_exercise(sock: str, variant: str) -> None:
    if variant == "ro":
        _read_only_read(sock)
    else:
        drive_block(sock, offset=4096, data=os.urandom(4096))


def _read_only_read(sock: str) -> None:
    """A read of a read-only disk (a write would be refused)."""
    from frontend.vhost_user import VhostUserFrontend
    from frontend.virtio_blk import BlockDriver
    with VhostUserFrontend.connect(sock, timeout=5.0) as fe:
        fe.negotiate()
        fe.setup_memory(16 << 20)
        BlockDriver(fe.setup_queue(0, 128)).read(0, 4096)


def _console_options(workdir: str, name: str, variant: str) -> str:
    return f"type=file,path={os.path.join(workdir, name + '.out')}"


def _console_exercise(sock: str, variant: str) -> None:
    drive_console(sock, b"health\n")


def _rng_exercise(sock: str, variant: str) -> None:
    drive_rng(sock, 64)


TYPES: dict[str, DeviceType] = {}


def register(t: DeviceType) -> None:
    TYPES[t.name] = t


register(DeviceType("block", "block", 1, _block_options, _block_exercise, ("", "ro", "direct", "crash", "hang")))
register(DeviceType("console", "serial", 2, _console_options, _console_exercise, ("", "fill")))
register(DeviceType("rng", "rng", 1, lambda w, n, v: "", _rng_exercise, ("", "storm")))
