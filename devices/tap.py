"""Opening and configuring a tap interface, in the privileged parent.

The jailed net child has no network namespace of its own to see, no
CAP_NET_ADMIN and no /dev: everything that needs privilege happens here,
before the fork, and the child only gets the queue fds.

* ``open_tap(name, queues)`` opens /dev/net/tun once per queue pair with
  ``TUNSETIFF`` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, plus IFF_MULTI_QUEUE
  for more than one pair), sets the vnet header size to the 12 bytes of
  ``virtio_net_hdr_v1`` (so a guest's header goes to the tap unchanged) and
  the offloads the device may offer the guest, sets the link MTU if asked
  and brings the link up (writes fail with EIO while it is down).
* ``adopt_tap_fds(fds)`` checks fds a caller opened (``tap-fd=``), as
  crosvm does: they must be taps with IFF_NO_PI and IFF_VNET_HDR.

Link configuration uses the classic SIOCSIF* ioctls on a datagram socket
(no netlink library needed for MTU and IFF_UP); addresses, bridges and
routes are the operator's business.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass, field

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETSNDBUF = 0x400454D4
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

# linux/sockios.h, linux/if.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFF_UP = 0x1

IFNAMSIZ = 16
#: struct ifreq is 40 bytes on x86_64: the name, then a 24-byte union.
_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_INT = struct.Struct("16si20x")

#: sizeof(struct virtio_net_hdr_v1): VERSION_1 (and MRG_RXBUF) header.
VNET_HDR_SIZE = 12
#: The kernel's limit on tap queues (MAX_TAP_QUEUES).
MAX_QUEUES = 256
#: Offloads a tap reader may accept: what the device can offer as GUEST_*.
DEVICE_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
TUN_PATH = "/dev/net/tun"
MIN_MTU = 68
MAX_MTU = 65535


class TapError(OSError):
    """Opening or configuring the tap failed; the message names the step."""


@dataclass
class Tap:
    """A tap's queue fds as the parent holds them (one per queue pair)."""

    name: str
    fds: list[int]
    mtu: int
    #: Whether this module opened the fds (and so closes them); tap-fd= fds
    #: belong to whoever passed them, but the supervisor owns them now too.
    owned: bool = True
    closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _ioctl_flags(fd: int, name: str, flags: int) -> tuple[str, int]:
    req = _IFREQ_FLAGS.pack(name.encode(), flags)
    out = fcntl.ioctl(fd, TUNSETIFF, req)
    got, _ = _IFREQ_FLAGS.unpack(out)
    return got.rstrip(b"\0").decode(), flags


def tap_flags(fd: int) -> tuple[str, int]:
    """TUNGETIFF: (interface name, IFF_* flags) of an attached tun/tap fd."""
    out = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ_FLAGS.size))
    name, flags = _IFREQ_FLAGS.unpack(out)
    return name.rstrip(b"\0").decode(), flags


def set_vnet_hdr_size(fd: int, size: int = VNET_HDR_SIZE) -> None:
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", size))


def vnet_hdr_size(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0]


def set_offload(fd: int, offloads: int) -> None:
    """TUNSETOFFLOAD: what the tap may hand to its reader (device-wide).
    The argument is the value itself, not a pointer."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)


def set_queue_attached(fd: int, attached: bool) -> None:
    """TUNSETQUEUE: take this queue fd in or out of the tap's steering
    (multi-queue taps only; needs no capability on an attached fd)."""
    flags = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
    fcntl.ioctl(fd, TUNSETQUEUE, _IFREQ_FLAGS.pack(b"", flags))


def _link_ioctl(name: str, request: int, packer: struct.Struct, value: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        out = fcntl.ioctl(s.fileno(), request, packer.pack(name.encode(), value))
    return packer.unpack(out)[1]


def link_mtu(name: str) -> int:
    return _link_ioctl(name, SIOCGIFMTU, _IFREQ_INT, 0)


def set_link_mtu(name: str, mtu: int) -> None:
    _link_ioctl(name, SIOCSIFMTU, _IFREQ_INT, mtu)


def set_link_up(name: str) -> None:
    flags = _link_ioctl(name, SIOCGIFFLAGS, _IFREQ_FLAGS, 0)
    if not flags & IFF_UP:
        _link_ioctl(name, SIOCSIFFLAGS, _IFREQ_FLAGS, flags | IFF_UP)


def _prepare_queue_fd(fd: int) -> None:
    """Per-device settings (QEMU resets them on every open, since a
    persistent tap keeps what the last user set) and the per-file ones."""
    set_vnet_hdr_size(fd, VNET_HDR_SIZE)
    set_offload(fd, DEVICE_OFFLOADS)
    # QEMU's default: a full socket buffer then never returns EAGAIN in practice.
    fcntl.ioctl(fd, TUNSETSNDBUF, struct.pack("i", 0x7FFFFFFF))
    os.set_blocking(fd, False)


def _configure_link(name: str, mtu: int | None, up: bool) -> int:
    try:
        if mtu is not None and link_mtu(name) != mtu:
            set_link_mtu(name, mtu)
        if up:
            set_link_up(name)
        return link_mtu(name)
    except OSError as exc:
        raise TapError(exc.errno, f"tap {name!r}: link set-up (mtu={mtu}, up={up}) failed: "
                                  f"{exc.strerror}") from None


def open_tap(name: str, queues: int = 1, *, mtu: int | None = None, up: bool = True) -> Tap:
    """Create (or attach to) tap ``name`` with ``queues`` queue fds.

    ``name`` may be a template such as ``tap%d``; the kernel's choice is
    returned in ``Tap.name``.  Raises ``TapError`` naming the step."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name in (".", ".."):
        raise TapError(0, f"tap name {name!r} is not a valid interface name (1..{IFNAMSIZ - 1} bytes)")
    if not 1 <= queues <= MAX_QUEUES:
        raise TapError(0, f"tap {name!r}: {queues} queues outside 1..{MAX_QUEUES}")
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    actual = name
    try:
        for _ in range(queues):
            try:
                fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise TapError(exc.errno, f"open {TUN_PATH}: {exc.strerror}") from None
            fds.append(fd)
            try:
                actual, _ = _ioctl_flags(fd, actual, flags)
            except OSError as exc:
                hint = " (an existing tap with other multi-queue flags?)" if exc.errno == 22 else ""
                raise TapError(exc.errno, f"TUNSETIFF {actual!r} flags {flags:#x}: {exc.strerror}{hint}") from None
            try:
                _prepare_queue_fd(fd)
            except OSError as exc:
                raise TapError(exc.errno, f"tap {actual!r}: configuring the queue fd: {exc.strerror}") from None
        real_mtu = _configure_link(actual, mtu, up)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Tap(actual, fds, real_mtu)


def adopt_tap_fds(fds: list[int], *, mtu: int | None = None, up: bool = True) -> Tap:
    """Take tap fds a caller opened (crosvm's ``tap-fd=``): check that they
    are taps of one interface with IFF_NO_PI and IFF_VNET_HDR (anything
    else would make the device read the wrong bytes), then configure them
    as ``open_tap`` does."""
    if not fds:
        raise TapError(0, "no tap fds given")
    names = set()
    for fd in fds:
        try:
            name, flags = tap_flags(fd)
        except OSError as exc:
            raise TapError(exc.errno, f"tap-fd={fd}: not an attached tun/tap fd ({exc.strerror})") from None
        missing = [n for n, bit in (("IFF_TAP", IFF_TAP), ("IFF_NO_PI", IFF_NO_PI),
                                    ("IFF_VNET_HDR", IFF_VNET_HDR)) if not flags & bit]
        if missing:
            raise TapError(0, f"tap-fd={fd}: interface {name!r} flags {flags:#x} lack {', '.join(missing)}")
        if len(fds) > 1 and not flags & IFF_MULTI_QUEUE:
            raise TapError(0, f"tap-fd={fd}: {len(fds)} fds given but {name!r} is not IFF_MULTI_QUEUE")
        names.add(name)
        try:
            _prepare_queue_fd(fd)
        except OSError as exc:
            raise TapError(exc.errno, f"tap-fd={fd}: configuring {name!r}: {exc.strerror}") from None
    if len(names) != 1:
        raise TapError(0, f"tap fds {fds} belong to several interfaces: {sorted(names)}")
    name = names.pop()
    return Tap(name, list(fds), _configure_link(name, mtu, up), owned=False)
