"""A guest for the device micro-benchmarks: one memfd region mapped here and
described to ``GuestMemory``, and descriptor-table writes.

Why: ``block_drain``, ``device_micro`` and ``virtqueue_micro`` each time one
part of the device's path without sockets or a front-end; they build the same
guest and must build it the same way for their figures to compare.
"""

from __future__ import annotations

import asyncio
import mmap
import os

from connection.memory import GuestMemory
from connection.protocol import MemoryRegion, VringAddr
from connection.virtqueue import QueueConfig

MiB = 1 << 20
QSIZE = 256
QVA = 0x7F00_0000_0000      # where the (pretend) front-end has the region mapped


def write_desc(table: memoryview, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
    """Descriptor ``i`` of a split-ring table viewed as 64-bit words."""
    table[2 * i] = addr
    table[2 * i + 1] = length | (flags << 32) | (nxt << 48)


def memfd_guest(size: int) -> tuple[mmap.mmap, memoryview, GuestMemory]:
    """``size`` bytes of guest memory at guest address 0: our mapping, a view
    of it, and the ``GuestMemory`` the device reads it through."""
    fd = os.memfd_create("bench-guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        host = mmap.mmap(fd, size)
        mem = GuestMemory()
        mem.add_region(MemoryRegion(0, size, QVA, 0), os.dup(fd))
    finally:
        os.close(fd)
    return host, memoryview(host), mem


def queue_config(loop: asyncio.AbstractEventLoop, desc_gpa: int, avail_gpa: int, used_gpa: int, *,
                 kick: bool = True) -> tuple[QueueConfig, int, int | None]:
    """Queue 0 (``QSIZE`` entries) on rings at those guest addresses, with a
    fresh call eventfd and, unless ``kick`` is False, a kick eventfd: the
    configuration (which owns and closes both) and the two fd numbers, which
    the caller uses as the driver's ends."""
    cfg = QueueConfig(0, QSIZE, loop)
    cfg.set_size(QSIZE)
    cfg.set_addresses(VringAddr(0, 0, QVA + desc_gpa, QVA + used_gpa, QVA + avail_gpa, 0))
    cfg.set_base(0)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    cfg.set_call_fd(call)
    kick_fd = None
    if kick:
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        cfg.set_kick_fd(kick_fd)
    return cfg, call, kick_fd
