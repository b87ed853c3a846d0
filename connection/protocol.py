"""The vhost-user wire format: request codes, header flags, feature bits,
payload layouts and the size rules every front-end message must obey.

Numbers are in the host's byte order (the spec says "machine native"); the
struct formats use ``=`` so that C padding is spelled out, never implied.
Reference: the vhost-user specification (docs/interop/vhost-user.rst in QEMU).
"""

from __future__ import annotations

import enum
import os
import struct
from typing import NamedTuple

from .errors import ProtocolError

# --------------------------------------------------------------------------
# Header

HEADER = struct.Struct("=III")  # request, flags, size
HEADER_SIZE = HEADER.size

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

#: Largest payload we accept.  rust-vmm uses the same cap; the largest real
#: message (a memory table of 8 regions) is 264 bytes.
MAX_PAYLOAD = 0x1000
#: Most fds one message may carry (a memory table of 8 regions).
MAX_FDS = 8
#: Memory regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_TABLE_REGIONS = 8
#: Regions with CONFIGURE_MEM_SLOTS (what libvhost-user and rust-vmm report).
MAX_MEM_SLOTS = 509
#: QEMU's and libvhost-user's cap on a config-space access.
MAX_CONFIG_SIZE = 256


class FrontendReq(enum.IntEnum):
    """Requests the front-end (VMM) sends to the back-end."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


def request_name(request: int) -> str:
    """A readable name for a request code, also for codes we do not know."""
    try:
        return FrontendReq(request).name
    except ValueError:
        return f"UNKNOWN({request})"


# --------------------------------------------------------------------------
# Feature bits (masks, not bit numbers)

class VirtioFeature(enum.IntFlag):
    """Device-independent virtio feature bits used over GET/SET_FEATURES."""

    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


#: Payload bits of SET_VRING_KICK/CALL/ERR.
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

#: SET_CONFIG flags (spec values, not rust-vmm's bit values).
CONFIG_FLAG_FRONTEND = 0
CONFIG_FLAG_MIGRATION = 1

# --------------------------------------------------------------------------
# Payload layouts

U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")          # index, num
VRING_ADDR = struct.Struct("=IIQQQQ")       # index, flags, desc, used, avail, log
MEM_REGION = struct.Struct("=QQQQ")         # gpa, size, uaddr, mmap_offset
MEM_TABLE_HEADER = struct.Struct("=II")     # nregions, padding
SINGLE_REGION = struct.Struct("=QQQQQ")     # padding, then one region
LOG = struct.Struct("=QQ")                  # mmap_size, mmap_offset
CONFIG_HEADER = struct.Struct("=III")       # offset, size, flags
INFLIGHT = struct.Struct("=QQHH4x")         # C sizeof pads 20 bytes of fields to 24
DEVICE_STATE = struct.Struct("=II")         # direction, phase
SHARED_OBJECT = struct.Struct("=16s")

assert INFLIGHT.size == 24 and VRING_ADDR.size == 40 and SINGLE_REGION.size == 40


class VringState(NamedTuple):
    index: int
    num: int


class VringAddr(NamedTuple):
    index: int
    flags: int
    desc: int   # front-end virtual address (QVA)
    used: int
    avail: int
    log: int    # guest-physical address of the used-ring log


class MemoryRegion(NamedTuple):
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


class InflightInfo(NamedTuple):
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


class ConfigAccess(NamedTuple):
    offset: int
    size: int
    flags: int
    data: bytes


# Fixed payload sizes; requests absent here take variable sizes checked in
# ``check_payload_size`` (memory table, config) or carry no payload at all.
_FIXED_SIZE: dict[int, int] = {
    FrontendReq.SET_FEATURES: U64.size,
    FrontendReq.SET_PROTOCOL_FEATURES: U64.size,
    FrontendReq.SET_LOG_BASE: LOG.size,
    FrontendReq.SET_VRING_NUM: VRING_STATE.size,
    FrontendReq.SET_VRING_ADDR: VRING_ADDR.size,
    FrontendReq.SET_VRING_BASE: VRING_STATE.size,
    FrontendReq.GET_VRING_BASE: VRING_STATE.size,
    FrontendReq.SET_VRING_KICK: U64.size,
    FrontendReq.SET_VRING_CALL: U64.size,
    FrontendReq.SET_VRING_ERR: U64.size,
    FrontendReq.SET_VRING_ENABLE: VRING_STATE.size,
    FrontendReq.SEND_RARP: U64.size,
    FrontendReq.NET_SET_MTU: U64.size,
    FrontendReq.SET_VRING_ENDIAN: VRING_STATE.size,
    FrontendReq.CLOSE_CRYPTO_SESSION: U64.size,
    FrontendReq.GET_INFLIGHT_FD: INFLIGHT.size,
    FrontendReq.SET_INFLIGHT_FD: INFLIGHT.size,
    FrontendReq.VRING_KICK: VRING_STATE.size,
    FrontendReq.ADD_MEM_REG: SINGLE_REGION.size,
    FrontendReq.REM_MEM_REG: SINGLE_REGION.size,
    FrontendReq.SET_STATUS: U64.size,
    FrontendReq.GET_SHARED_OBJECT: SHARED_OBJECT.size,
    FrontendReq.SET_DEVICE_STATE_FD: DEVICE_STATE.size,
}
_EMPTY = frozenset({
    FrontendReq.GET_FEATURES, FrontendReq.SET_OWNER, FrontendReq.RESET_OWNER,
    FrontendReq.GET_PROTOCOL_FEATURES, FrontendReq.GET_QUEUE_NUM,
    FrontendReq.SET_BACKEND_REQ_FD, FrontendReq.SET_LOG_FD,
    FrontendReq.POSTCOPY_ADVISE, FrontendReq.POSTCOPY_LISTEN, FrontendReq.POSTCOPY_END,
    FrontendReq.GPU_SET_SOCKET, FrontendReq.RESET_DEVICE, FrontendReq.GET_MAX_MEM_SLOTS,
    FrontendReq.GET_STATUS, FrontendReq.CHECK_DEVICE_STATE,
})
# Some front-ends send a zero u64 with the "empty" getters; accept it.
_EMPTY_OR_U64 = frozenset({
    FrontendReq.GET_FEATURES, FrontendReq.GET_PROTOCOL_FEATURES, FrontendReq.GET_QUEUE_NUM,
    FrontendReq.GET_MAX_MEM_SLOTS, FrontendReq.GET_STATUS, FrontendReq.CHECK_DEVICE_STATE,
    FrontendReq.SET_OWNER, FrontendReq.RESET_OWNER, FrontendReq.RESET_DEVICE,
})


def check_payload_size(request: int, size: int) -> None:
    """Raise ProtocolError unless ``size`` is a valid payload size for ``request``."""
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"{request_name(request)}: payload size {size} exceeds cap {MAX_PAYLOAD}")
    fixed = _FIXED_SIZE.get(request)
    if fixed is not None:
        if size != fixed:
            raise ProtocolError(f"{request_name(request)}: payload size {size}, expected {fixed}")
        return
    if request in _EMPTY:
        if size == 0 or (size == U64.size and request in _EMPTY_OR_U64):
            return
        raise ProtocolError(f"{request_name(request)}: payload size {size}, expected 0")
    if request == FrontendReq.SET_MEM_TABLE:
        regions, rest = divmod(size - MEM_TABLE_HEADER.size, MEM_REGION.size)
        if size < MEM_TABLE_HEADER.size or rest or not 0 <= regions <= MAX_TABLE_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE: payload size {size} is not 8 + 32*n with n <= {MAX_TABLE_REGIONS}")
        return
    if request in (FrontendReq.GET_CONFIG, FrontendReq.SET_CONFIG):
        if not CONFIG_HEADER.size <= size <= CONFIG_HEADER.size + MAX_CONFIG_SIZE:
            raise ProtocolError(f"{request_name(request)}: payload size {size} outside "
                                f"[{CONFIG_HEADER.size}, {CONFIG_HEADER.size + MAX_CONFIG_SIZE}]")
        return
    # Requests we know by number but do not implement (IOTLB, crypto, ...):
    # the cap above is the only size rule; the handler refuses them.


# --------------------------------------------------------------------------
# Codecs

def _check_len(what: str, payload: bytes, size: int, at_least: bool = False) -> None:
    """ProtocolError (not struct.error) for a payload of the wrong size, so a
    decoder called on unchecked bytes still fails with a typed error."""
    if len(payload) < size or (not at_least and len(payload) != size):
        raise ProtocolError(f"{what}: payload size {len(payload)}, expected {'at least ' if at_least else ''}{size}")


def decode_u64(request: int, payload: bytes) -> int:
    if len(payload) != U64.size:
        raise ProtocolError(f"{request_name(request)}: payload size {len(payload)}, expected 8")
    return U64.unpack(payload)[0]


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def decode_vring_state(payload: bytes) -> VringState:
    _check_len("vring state", payload, VRING_STATE.size)
    return VringState(*VRING_STATE.unpack(payload))


def encode_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_vring_addr(payload: bytes) -> VringAddr:
    _check_len("vring address", payload, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(payload))


def encode_vring_addr(addr: VringAddr) -> bytes:
    return VRING_ADDR.pack(*addr)


def decode_mem_table(payload: bytes) -> list[MemoryRegion]:
    _check_len("SET_MEM_TABLE", payload, MEM_TABLE_HEADER.size, at_least=True)
    nregions, _padding = MEM_TABLE_HEADER.unpack_from(payload)
    expected = MEM_TABLE_HEADER.size + nregions * MEM_REGION.size
    if nregions > MAX_TABLE_REGIONS or len(payload) != expected:
        raise ProtocolError(f"SET_MEM_TABLE: nregions {nregions} does not match payload size {len(payload)}")
    return [MemoryRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEADER.size + i * MEM_REGION.size))
            for i in range(nregions)]


def encode_mem_table(regions: list[MemoryRegion]) -> bytes:
    return MEM_TABLE_HEADER.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)


def decode_single_region(payload: bytes) -> MemoryRegion:
    _check_len("single memory region", payload, SINGLE_REGION.size)
    return MemoryRegion(*SINGLE_REGION.unpack(payload)[1:])


def encode_single_region(region: MemoryRegion) -> bytes:
    return SINGLE_REGION.pack(0, *region)


def decode_inflight(payload: bytes) -> InflightInfo:
    _check_len("inflight", payload, INFLIGHT.size)
    return InflightInfo(*INFLIGHT.unpack(payload))


def encode_inflight(info: InflightInfo) -> bytes:
    return INFLIGHT.pack(*info)


def decode_config(request: int, payload: bytes) -> ConfigAccess:
    _check_len(request_name(request), payload, CONFIG_HEADER.size, at_least=True)
    offset, size, flags = CONFIG_HEADER.unpack_from(payload)
    data = bytes(payload[CONFIG_HEADER.size:])
    if size > MAX_CONFIG_SIZE or len(data) != size:
        raise ProtocolError(f"{request_name(request)}: config size field {size} does not match "
                            f"{len(data)} payload bytes")
    return ConfigAccess(offset, size, flags, data)


def encode_config(offset: int, flags: int, data: bytes, size: int | None = None) -> bytes:
    """Encode a config access; ``size`` defaults to ``len(data)`` (GET_CONFIG
    requests send zeroed data of the size they want back)."""
    return CONFIG_HEADER.pack(offset, len(data) if size is None else size, flags) + data


def vring_fd_payload(index: int, nofd: bool = False) -> bytes:
    """Payload of SET_VRING_KICK/CALL/ERR."""
    return U64.pack(index | (VRING_NOFD_MASK if nofd else 0))


def decode_vring_fd_payload(request: int, payload: bytes) -> tuple[int, bool]:
    value = decode_u64(request, payload)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
        raise ProtocolError(f"{request_name(request)}: unknown bits in payload {value:#x}")
    return value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK)


# --------------------------------------------------------------------------
# One message

class Message:
    """A decoded front-end or back-end message with the fds that came with it.

    The receiver owns ``fds``: every fd it does not keep must be closed,
    which ``close_fds`` does for the ones still listed.
    """

    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int] | None = None) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds if fds is not None else []

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def take_fd(self) -> int:
        """Remove and return the first fd; ProtocolError if none came."""
        if not self.fds:
            raise ProtocolError(f"{self.name}: expected a file descriptor, none attached")
        return self.fds.pop(0)

    def close_fds(self) -> None:
        while self.fds:
            fd = self.fds.pop()
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"Message({self.name}, flags={self.flags:#x}, size={len(self.payload)}, fds={self.fds})"
