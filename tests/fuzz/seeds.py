"""Writes the seed inputs of the structured targets (``python -m tests.fuzz.seeds``).

A seed spells out, read by read, the choices a target's ``Data`` consumer
makes, so the fuzzer starts from inputs that reach deep states (a
negotiated device serving a chain, a ring with indirect tables) instead of
finding every step by mutation.  ``Enc`` mirrors ``Data``: ``pick`` reads
its own index after any reads inside its alternatives, so a seed lists
those first.  The files are small and checked in under corpus/TARGET/.
"""

from __future__ import annotations

import struct
from pathlib import Path

from connection import protocol as P

from .targets import handler as H

HERE = Path(__file__).resolve().parent


class Enc:
    def __init__(self) -> None:
        self.out = bytearray()

    def u8(self, v: int) -> "Enc":
        self.out += struct.pack("<B", v)
        return self

    def u16(self, v: int) -> "Enc":
        self.out += struct.pack("<H", v)
        return self

    def u32(self, v: int) -> "Enc":
        self.out += struct.pack("<I", v)
        return self

    def u64(self, v: int) -> "Enc":
        self.out += struct.pack("<Q", v)
        return self

    def raw(self, b: bytes) -> "Enc":
        self.out += b
        return self

    def blob(self, b: bytes) -> "Enc":
        return self.u16(len(b)).raw(b)

    # handler's composite reads
    def h_u64(self, index: int = 0) -> "Enc":      # Session.u64(): the inner u64, then the index
        return self.u64(0).u8(index)

    def h_index(self, index: int = 0) -> "Enc":    # Session.index()
        return self.u32(0).u8(index)


def _req(e: Enc, req: P.FrontendReq, need_reply: bool = True) -> Enc:
    e.u8(1)   # a message, not a guest action
    return e.u8((H.IMPLEMENTED.index(req) << 1) | int(need_reply))


def _no_extra_fd(e: Enc, has_fds: bool) -> Enc:
    e.u8(1)
    return e.u8(1) if has_fds else e


def _vring_fd(e: Enc, req: P.FrontendReq, kicked: int = 0) -> None:
    _req(e, req)
    e.h_index(0).u8(1).u8(1).u8(kicked)
    _no_extra_fd(e, True)


def handler_seed(block: bool) -> bytes:
    """Negotiate, map 64 KiB, configure ring 0 (16 entries), publish one
    chain in guest memory and kick it: the device serves it."""
    if block:   # header (IN, sector 0) | 512 bytes to the guest | status
        descs = struct.pack("<QIHH", 0x3000, 16, 1, 1) + struct.pack("<QIHH", 0x4000, 512, 3, 2) \
            + struct.pack("<QIHH", 0x5000, 1, 2, 0)
    else:       # 16 readable bytes | 64 writable
        descs = struct.pack("<QIHH", 0x3000, 16, 1, 1) + struct.pack("<QIHH", 0x4000, 64, 2, 0)
    e = Enc().blob(descs)
    if block:
        e.u8(1).u8(0).u8(0)        # BlockDevice, read-write, 1 queue
    else:
        e.u8(0).u8(1)              # XorDevice, 2 queues
    _req(e, P.FrontendReq.SET_PROTOCOL_FEATURES)
    e.h_u64().u8(0)
    _no_extra_fd(e, False)
    _req(e, P.FrontendReq.SET_OWNER)
    e.u8(1)
    _no_extra_fd(e, False)
    _req(e, P.FrontendReq.SET_FEATURES)
    e.h_u64().u8(0)
    _no_extra_fd(e, False)
    _req(e, P.FrontendReq.SET_MEM_TABLE)
    e.u8(1)                                         # one region
    e.u64(0).u8(2)                                  # size 64 KiB
    e.h_u64().u8(0)                                 # gpa 0
    e.h_u64().u8(0)                                 # uaddr QVA
    e.h_u64().u8(0)                                 # mmap_offset 0
    e.u8(0)                                         # memfd of the right size
    _no_extra_fd(e, True)
    _req(e, P.FrontendReq.SET_VRING_NUM)
    e.u32(0).u8(4)                                  # num 16
    e.h_index(0)
    _no_extra_fd(e, False)
    _req(e, P.FrontendReq.SET_VRING_ADDR)
    e.u8(0)                                         # base QVA
    e.h_index(0).u8(0)                              # index 0, flags 0
    e.h_u64().u8(0)                                 # desc QVA
    e.h_u64().u8(0)                                 # used QVA + 8192
    e.h_u64().u8(0)                                 # avail QVA + 4096
    _no_extra_fd(e, False)
    _vring_fd(e, P.FrontendReq.SET_VRING_CALL)
    _vring_fd(e, P.FrontendReq.SET_VRING_ERR)
    # the guest publishes head 0: avail = {flags 0, idx 1, ring[0] = 0}
    e.u8(0).u8(0).u8(0).blob(struct.pack("<HHH", 0, 1, 0)).u16(4096 // 16)
    _vring_fd(e, P.FrontendReq.SET_VRING_KICK, kicked=1)
    e.u8(0).u8(1).u8(0)                             # guest kick
    _req(e, P.FrontendReq.GET_VRING_BASE)
    e.u32(0).u8(0).h_index(0)
    _no_extra_fd(e, False)
    return bytes(e.out)


def _vq_desc(e: Enc, addr_choice: int, below: int, length_choice: int, lbelow: int, flags_choice: int,
             nxt: int) -> None:
    """One structured descriptor of the virtqueue target (see ``_descriptor``)."""
    e.u8(1)                                          # structured, not raw
    e.u8(below).u8(below).u8(below).u64(0).u8(0).u8(addr_choice)
    e.u8(lbelow).u32(0).u8(length_choice)
    e.u16(0).u8(flags_choice)
    e.u8(nxt).u8(nxt).u16(0).u8(0)


def virtqueue_seed(straddle: bool) -> bytes:
    """A 16-entry ring, EVENT_IDX and INDIRECT: head 0 = readable 16 bytes ->
    an indirect table of two buffers; head 2 = one writable buffer in the
    second region (or straddling both when ``straddle``)."""
    e = Enc().u8(0)                                  # region 2 right after region 1
    e.u8(4).u8(1).u8(1).u8(0)                        # q = 16, EVENT_IDX, INDIRECT
    e.u8(2)                                          # 3 descriptors
    _vq_desc(e, 0, 8, 1, 0, 1, 1)                    # DATA+512, 16, NEXT -> 1
    _vq_desc(e, 0, 0, 5, 2, 4, 0)                    # DATA+0, 32, INDIRECT
    if straddle:
        _vq_desc(e, 3, 0, 4, 0, 2, 0)                # SIZE-8, 4096, WRITE
    else:
        _vq_desc(e, 2, 1, 4, 0, 2, 0)                # gpa2+64, 4096, WRITE
    e.u8(2)                                          # the indirect table: 2 descriptors
    _vq_desc(e, 0, 16, 2, 0, 3, 1)                   # DATA+1024, 64, NEXT|WRITE -> 1
    _vq_desc(e, 0, 32, 3, 0, 2, 0)                   # DATA+2048, 512, WRITE
    e.u8(2)                                          # two heads: 0, 2
    e.u8(0).u8(0).u16(0).u8(0)
    e.u8(2).u8(2).u16(0).u8(0)
    e.u16(0).u8(0)                                   # base 0
    e.u16(0).u8(0)                                   # avail idx = base + 2
    e.u16(0).u16(0)                                  # avail flags, used_event
    e.u16(0).u8(0)                                   # used idx = base
    e.u8(0).u8(0).u8(0)                              # ring addresses as laid out
    e.u8(1)                                          # no inflight region
    for _ in range(3):                               # pop, fill, complete, flush
        e.u8(1).u8(0x11).u8(1).u8(1)
    return bytes(e.out)


def block_seeds() -> dict[str, bytes]:
    """IN (513 writable bytes: data and status), OUT split over three buffers,
    DISCARD with two segments."""
    def device(e: Enc) -> Enc:
        return e.u8(1).blob(b"image").u8(1).u8(1).u8(0)   # read-write, image, sparse, serial, no FLUSH
    read = device(Enc()).u8(0).u64(0).u8(0).u8(1).u8(1)   # IN, sector 0
    read.u8(0).u16(0).u8(0).u8(0).u8(0)                   # no payload, whole header, one piece
    read.u16(0).u8(2).u8(0)                               # 513 writable bytes
    write = device(Enc()).u8(2).u64(0).u8(1).u8(1).u8(1)  # OUT, sector 1
    write.u8(0x42).u16(0).u8(3).u8(0)                     # 1024 bytes of 0x42
    write.u8(2).u16(10).u16(600)                          # cut at 10 and 600
    write.u8(0).u8(0).u8(0)                               # 1 status byte
    discard = device(Enc()).u8(6).u64(0).u8(0).u8(1).u8(1).u8(1)
    discard.u8(2)                                         # two segments
    for _ in range(2):
        discard.u64(0).u8(1).u32(0).u8(2).u32(0).u8(0)    # sector 1, 8 sectors, no flags
    discard.u8(0).u8(0).u8(0).u8(0).u8(0)
    return {"seed-read": bytes(read.out), "seed-write-split": bytes(write.out),
            "seed-discard": bytes(discard.out)}


def inflight_seed() -> bytes:
    """One queue of 16 whose last batch (heads 2, 4) was published in the
    ring (used idx 7) but not committed (used_idx 5): recovery clears it
    and leaves head 7 in flight."""
    e = Enc().u8(0).u8(2).u64(0).u8(0).u64(0).u8(0)      # 1 queue of 16, consistent size, offset 0
    e.u8(1).u16(0).u8(0).u16(0).u8(0)                    # structured, version 1, desc_num 16
    e.u8(2).u16(0).u8(1).u16(5)                          # last_batch_head 2, used_idx 5
    e.u8(3)                                              # three descriptors
    for head, nxt, counter in ((2, 4, 10), (4, 0, 11), (7, 0, 3)):
        e.u8(head).u8(0).u8(0).u8(nxt).u16(0).u8(0).u8(counter).u64(0).u8(0)
    e.u8(0)                                              # file of the right size
    e.u16(7)                                             # the ring's used idx
    e.u8(4)                                              # then 4 fetch/complete steps
    for _ in range(4):
        e.u8(1).u8(3)
    return bytes(e.out)


def main() -> None:
    out = HERE / "corpus" / "handler"
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed-xor-serves-a-chain").write_bytes(handler_seed(block=False))
    (out / "seed-block-serves-a-read").write_bytes(handler_seed(block=True))
    out = HERE / "corpus" / "virtqueue"
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed-indirect-and-second-region").write_bytes(virtqueue_seed(straddle=False))
    (out / "seed-straddling-buffer").write_bytes(virtqueue_seed(straddle=True))
    out = HERE / "corpus" / "block"
    out.mkdir(parents=True, exist_ok=True)
    for name, data in block_seeds().items():
        (out / name).write_bytes(data)
    out = HERE / "corpus" / "inflight"
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed-half-committed-batch").write_bytes(inflight_seed())


if __name__ == "__main__":
    main()
