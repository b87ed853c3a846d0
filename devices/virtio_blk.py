"""The virtio-blk wire layout (virtio 1.2 section 5.2), written once.

Feature bits, request types, status codes, the request header, the
discard/write-zeroes segment and the configuration space, for the device
(devices/block.py) and for a driver (the test front-end) alike: two copies
of a layout drift, one cannot.  Only the layout lives here; what our device
chooses to advertise (queue count, limits) is devices/block.py's.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# Feature bits (5.2.3)
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_GEOMETRY = 1 << 4
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

# Request types (5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

# Status codes (5.2.6), the last byte of every request
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
STATUS_NAMES = {S_OK: "OK", S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
#: GET_ID answer: a serial of at most this many bytes, zero-padded.
ID_BYTES = 20

#: struct virtio_blk_req header: type, reserved (ioprio), sector.
HEADER = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
SEGMENT = struct.Struct("<QII")
#: The one segment flag: WRITE_ZEROES may unmap (DISCARD must not set it).
SEG_FLAG_UNMAP = 1

#: struct virtio_blk_config up to write_zeroes_may_unmap (60 bytes); reads
#: past it (secure erase, zoned) are the device's business.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG.size == 60


class BlkConfig(NamedTuple):
    """The fields of ``CONFIG`` in order: ``CONFIG.pack(*cfg)``,
    ``BlkConfig(*CONFIG.unpack(data))``."""

    capacity: int                     # in 512-byte sectors
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    unused0: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int


assert len(BlkConfig._fields) == len(CONFIG.unpack(bytes(CONFIG.size)))
