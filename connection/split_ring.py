"""The split virtqueue's wire layout (virtio 1.x, section 2.7), in one place.

Both sides of a ring import this module: the device side
(``connection.virtqueue``) and the front-end driver used by tests and
benchmarks.  Everything here is a fact of the virtio specification, nothing
is a policy of either side.

For a queue of ``Q`` entries (all fields little-endian)::

    descriptor table  16 * Q bytes, 16-byte aligned
                      entry: le64 addr, le32 len, le16 flags, le16 next
    avail ring        6 + 2 * Q bytes, 2-byte aligned
                      le16 flags, le16 idx, le16 ring[Q], le16 used_event
    used ring         6 + 8 * Q bytes, 4-byte aligned
                      le16 flags, le16 idx, {le32 id, le32 len}[Q], le16 avail_event

The ``*_INDEX``/``*_index`` helpers give positions in a ring cast to ``'H'``
(u16 words), which is how both sides read and publish indices: one aligned
16-bit load or store each.
"""

from __future__ import annotations

import struct

#: One descriptor: le64 addr, le32 len, le16 flags, le16 next.
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

#: Largest split queue (virtio: ``Queue Size`` is at most 32768).
MAX_QUEUE_SIZE = 32768

#: Required alignment of each part, in bytes (virtio 2.7, "Virtqueue Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

#: u16 word positions shared by the avail and used rings.
FLAGS_INDEX = 0
IDX_INDEX = 1
#: First avail ring entry (u16 words) and first used element (bytes).
AVAIL_RING_INDEX = 2
USED_RING_OFFSET = 4
USED_ELEM_SIZE = 8


def desc_table_size(q: int) -> int:
    """Bytes of the descriptor table of a ``q``-entry queue."""
    return DESC_SIZE * q


def avail_ring_size(q: int) -> int:
    """Bytes of the avail ring, ``used_event`` included."""
    return 6 + 2 * q


def used_ring_size(q: int) -> int:
    """Bytes of the used ring, ``avail_event`` included."""
    return 6 + USED_ELEM_SIZE * q


def used_event_index(q: int) -> int:
    """Position of ``used_event`` in the avail ring cast to u16."""
    return 2 + q


def avail_event_index(q: int) -> int:
    """Position of ``avail_event`` in the used ring cast to u16."""
    return 2 + 4 * q


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio's ``vring_need_event``: does moving an index from ``old_idx``
    to ``new_idx`` cross the other side's ``event_idx``?  (u16 arithmetic)"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
