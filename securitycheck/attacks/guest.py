"""Class 3, hostile guest: forged descriptor chains, rings and requests in
guest memory, as a malicious guest kernel would write them.

Expected every time: the request fails with an error status or that queue
breaks (the err eventfd fires); the child lives on (same pid); nothing
outside the announced guest memory changes (guard bytes around every region
are compared after each case); a read-only image is unchanged on disk; the
device then serves a fresh connection.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from connection.errors import ProtocolError
from connection.protocol import ProtocolFeature
from frontend.vhost_user import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DRIVER_PROTOCOL_FEATURES, DriverQueue,
                                 VhostUserFrontend)

from ..catalog import Case, CaseFailed, check, register
from ..env import wait_until
from ..guestmem import GPA_HIGH, GuardedMemory, RawRing

N, W, I = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ = 0, 1, 4, 8, 11, 13
STATUS = {0: "OK", 1: "IOERR", 2: "UNSUPP"}
REGION = 4 << 20
QSIZE = 64
BROKEN = "queue broken"


@dataclass
class Guest:
    """One connected guest: memory with guards, its queues, raw access."""
    fe: VhostUserFrontend
    mem: GuardedMemory
    queues: dict[int, DriverQueue]
    env: Any
    inst: Any
    main: int = 0     # the queue chain attacks go to (console: transmitq, which pops without input)
    pid: int | None = None   # set by a script that reconnects (a new child serves from then on)

    def ring(self, index: int = 0) -> RawRing:
        return RawRing(self.queues[index])

    def buf(self, size: int, fill: int = 0) -> tuple[int, memoryview]:
        gpa, view = self.mem.alloc(size, 64, region=1)
        if fill:
            view[:] = bytes([fill]) * size
        return gpa, view

    def blk_header(self, kind: int, sector: int = 0) -> int:
        gpa, view = self.buf(16)
        struct.pack_into("<IIQ", view, 0, kind, 0, sector & (2**64 - 1))
        return gpa

    def status(self) -> tuple[int, memoryview]:
        return self.buf(1, fill=0xEE)


def _verdict(kind: str, head: int, length: int, status: memoryview | None = None) -> str:
    if kind == "broken":
        return BROKEN
    if kind == "nothing":
        return "no completion"
    if status is not None:
        return f"completed with status {STATUS.get(status[0], hex(status[0]))}"
    return f"completed, {length} bytes written"


def submit(g: Guest, descs: list[tuple[int, int, int, int]], status: memoryview | None = None,
           head: int = 0, queue: int | None = None, wait: float = 2.0) -> str:
    """Write ``descs`` (addr, len, flags, next) at ring indices 0.., publish ``head``, see what happens."""
    r = g.ring(g.main if queue is None else queue)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        r.desc(i, addr, length, flags, nxt)
    r.publish(head)
    return _verdict(*r.wait(wait), status=status)


def guest_case(id: str, type_name: str, tries: str, script: Callable[[Guest], str], *,
               accept: tuple[str, ...] = (BROKEN, "completed with status IOERR", "completed with status UNSUPP"),
               variant: str = "", expected: str | None = None,
               inflight: bool = False, after: Callable[[Guest, str], str | None] | None = None) -> Case:
    nq = {"console": 2}.get(type_name, 1)

    def run(env: Any) -> str:
        env.settle()
        inst = env.instance(type_name, variant)
        pid = env.wait_ready(inst.name)["pid"]
        others = env.other_pids(inst)
        mem = GuardedMemory(REGION)
        fe = VhostUserFrontend.connect(inst.socket, timeout=5.0)
        fe.mem = mem
        try:
            fe.negotiate(protocol_features=DRIVER_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD)
            fe.setup_memory()
            if inflight:
                fe.get_inflight(nq, QSIZE)
            g = Guest(fe, mem, {}, env, inst, main=1 if type_name == "console" else 0)
            if not inflight:
                for i in range(nq):
                    g.queues[i] = fe.setup_queue(i, QSIZE)
            outcome = script(g)
            guard = mem.intact()
            if g.pid is not None:
                pid = g.pid
            now = env.status()[inst.name]
            alive = now["pid"] == pid and now["state"] in ("ready", "serving")
            extra = after(g, outcome) if after is not None else None
        finally:
            fe.disconnect()
            fe.close()
        if guard:
            raise CaseFailed(f"{outcome}; {guard}")
        check(alive, f"{outcome}; the child did not live on (now {now['state']}, pid {now['pid']}, "
                     f"last exit {(now.get('last_exit') or {}).get('text')})")
        check(any(outcome.startswith(a) for a in accept), f"{outcome} (wanted {' or '.join(accept)})")
        if extra:
            raise CaseFailed(f"{outcome}; {extra}")
        env.recovered(inst, pid, others=others)
        return f"{outcome}; child lived on; guard bytes intact; device serves again"

    return Case(f"guest.{id}.{type_name}" + (f"-{variant}" if variant else ""), "guest", type_name, tries,
                expected or f"{' or '.join(accept)}; child lives on; guards intact", run)


# ---------------------------------------------------------------------------
# Chains (any device type: the virtqueue walk is shared, each device pops)

def _data(g: Guest, size: int = 512) -> int:
    return g.buf(size)[0]


def _loop(g: Guest) -> str:
    a = _data(g)
    return submit(g, [(a, 512, W | N, 1), (a, 512, W | N, 0)])


def _self_loop(g: Guest) -> str:
    return submit(g, [(_data(g), 512, W | N, 0)])


def _next_out_of_range(g: Guest) -> str:
    return submit(g, [(_data(g), 512, W | N, 999)])


def _head_out_of_range(g: Guest) -> str:
    r = g.ring(g.main)
    r.desc(0, _data(g), 512, W)
    r.publish(500)
    return _verdict(*r.wait())


def _indirect(g: Guest, entries: list[tuple[int, int, int, int]], length: int | None = None,
              table_gpa: int | None = None, flags: int = I) -> str:
    gpa, view = g.buf(max(16, 16 * len(entries)))
    for i, (addr, ln, fl, nxt) in enumerate(entries):
        RawRing(g.queues[g.main]).desc(i, addr, ln, fl, nxt, table=view)
    return submit(g, [(gpa if table_gpa is None else table_gpa, 16 * len(entries) if length is None else length,
                       flags, 0)])


def _indirect_nested(g: Guest) -> str:
    inner, _ = g.buf(16)
    return _indirect(g, [(inner, 16, I, 0)])


def _indirect_loop(g: Guest) -> str:
    a = _data(g)
    return _indirect(g, [(a, 512, W | N, 1), (a, 512, W | N, 0)])


def _indirect_next_out(g: Guest) -> str:
    return _indirect(g, [(_data(g), 512, W | N, 40)])


def _indirect_odd_len(g: Guest) -> str:
    return _indirect(g, [(_data(g), 512, W, 0)], length=24)


def _indirect_huge(g: Guest) -> str:
    return _indirect(g, [(_data(g), 512, W, 0)], length=1 << 24)


def _indirect_outside(g: Guest) -> str:
    return _indirect(g, [(_data(g), 512, W, 0)], table_gpa=1 << 52)


def _indirect_with_next(g: Guest) -> str:
    return _indirect(g, [(_data(g), 512, W, 0)], flags=I | N)


def _outside(g: Guest) -> str:
    return submit(g, [(1 << 50, 512, W, 0)])


def _hole(g: Guest) -> str:
    """A buffer straddling the end of region 0 into the unmapped hole."""
    return submit(g, [(REGION - 256, 512, W, 0)])


def _below_high(g: Guest) -> str:
    return submit(g, [(GPA_HIGH - 256, 512, W, 0)])


def _wrap(g: Guest) -> str:
    return submit(g, [((1 << 64) - 256, 512, W, 0)])


def _len_max(g: Guest) -> str:
    return submit(g, [(0, 0xFFFFFFFF, W, 0)])


def _avail_leap(g: Guest) -> str:
    r = g.ring(g.main)
    r.desc(0, _data(g), 512, W)
    r.set_avail_idx(1000)
    r.kick()
    return _verdict(*r.wait())


def _avail_back(g: Guest) -> str:
    r = g.ring(g.main)
    r.set_avail_idx(0xFFFF)
    r.kick()
    return _verdict(*r.wait())


CHAINS: dict[str, tuple[str, Callable[[Guest], str]]] = {
    "desc-loop": ("a two-descriptor NEXT loop", _loop),
    "desc-self-loop": ("a descriptor whose next is itself", _self_loop),
    "desc-next-out-of-range": ("a next index of 999 in a 64-entry table", _next_out_of_range),
    "head-out-of-range": ("an avail entry naming head 500", _head_out_of_range),
    "indirect-nested": ("an INDIRECT descriptor inside an indirect table", _indirect_nested),
    "indirect-loop": ("a NEXT loop inside an indirect table", _indirect_loop),
    "indirect-next-out": ("an indirect next index past the table", _indirect_next_out),
    "indirect-odd-length": ("an indirect table of 24 bytes", _indirect_odd_len),
    "indirect-huge": ("an indirect table of 16 MiB (1M descriptors)", _indirect_huge),
    "indirect-outside": ("an indirect table outside guest memory", _indirect_outside),
    "indirect-and-next": ("INDIRECT and NEXT on one descriptor", _indirect_with_next),
    "buffer-outside": ("a buffer at GPA 2^50, outside guest memory", _outside),
    "buffer-into-hole": ("a buffer straddling the end of region 0 into unmapped space", _hole),
    "buffer-before-region": ("a buffer straddling into region 1 from below", _below_high),
    "buffer-wraps": ("a buffer whose range wraps past 2^64", _wrap),
    "buffer-len-4g": ("a 4 GiB buffer at GPA 0", _len_max),
    "avail-idx-leap": ("the avail index jumping 1000 entries ahead", _avail_leap),
    "avail-idx-backwards": ("the avail index moving backwards", _avail_back),
}


# ---------------------------------------------------------------------------
# Block requests

def _blk(g: Guest, kind: int, sector: int, data: list[tuple[int, int, int]], *, head_flags: int = 0,
         status_flags: int = W, hdr_len: int = 16) -> str:
    hdr = g.blk_header(kind, sector)
    st_gpa, st = g.status()
    descs = [(hdr, hdr_len, head_flags | N, 1)]
    for addr, ln, fl in data:
        descs.append((addr, ln, fl | N, len(descs) + 1))
    descs.append((st_gpa, 1, status_flags, 0))
    out = submit(g, descs, status=st if status_flags & W else None)
    if status_flags & W == 0 and out.startswith("completed") and st[0] != 0xEE:
        return f"{out}, and the status byte in a device-readable buffer was written"
    return out


#: a request that fails or completes is fine when the after-check (nothing written where it must not be) holds
_ANY_CLEAN = ("completed with status OK", "completed with status IOERR", "completed with status UNSUPP", BROKEN)


def _capacity(g: Guest) -> int:
    return 8 << 20 >> 9   # sectors of the check's images (devtypes.IMAGE_SIZE)


BLOCK: dict[str, tuple[str, Callable[[Guest], str], tuple[str, ...] | None]] = {
    "blk-bad-type": ("request type 99", lambda g: _blk(g, 99, 0, [(_data(g), 512, W)]), ("completed with status UNSUPP",)),
    "blk-read-past-end": ("read one sector past the end of the disk",
                          lambda g: _blk(g, T_IN, _capacity(g), [(_data(g), 512, W)]), None),
    "blk-sector-overflow": ("read at sector 2^64-1 (offset overflows)",
                            lambda g: _blk(g, T_IN, 2**64 - 1, [(_data(g), 512, W)]), None),
    "blk-write-past-end": ("write straddling the end of the disk",
                           lambda g: _blk(g, T_OUT, _capacity(g) - 1, [(_data(g, 1024), 1024, 0)]), None),
    "blk-unaligned-length": ("a read of 100 bytes (not a sector multiple)",
                             lambda g: _blk(g, T_IN, 0, [(_data(g), 100, W)]), None),
    "blk-read-into-readonly-buffer": ("a read whose data buffer is device-readable (wrong direction)",
                                      lambda g: _readonly_target(g), _ANY_CLEAN),
    "blk-write-from-writable-buffer": ("a write whose data buffer is device-writable (wrong direction)",
                                       lambda g: _writable_source(g), _ANY_CLEAN),
    "blk-status-readonly": ("the status byte in a device-readable descriptor",
                            lambda g: _blk(g, T_IN, 0, [(_data(g), 512, W)], status_flags=0), None),
    "blk-header-writable": ("the request header in a device-writable descriptor",
                            lambda g: _blk(g, T_IN, 0, [(_data(g), 512, W)], head_flags=W), None),
    "blk-header-short": ("an 8-byte request header", lambda g: _blk(g, T_IN, 0, [(_data(g), 512, W)], hdr_len=8), None),
    "blk-no-status": ("a chain with a header and nothing else", lambda g: submit(g, [(g.blk_header(T_IN), 16, 0, 0)]),
                      None),
    "blk-discard-huge": ("DISCARD of 2^32-1 sectors from sector 2^63",
                         lambda g: _segment(g, T_DISCARD, 2**63, 0xFFFFFFFF), None),
    "blk-write-zeroes-past-end": ("WRITE_ZEROES beyond the end of the disk",
                                  lambda g: _segment(g, T_WZ, _capacity(g), 16), None),
    "blk-discard-flags": ("DISCARD with unknown segment flags", lambda g: _segment(g, T_DISCARD, 0, 1, flags=0xFF),
                          ("completed with status UNSUPP", "completed with status IOERR", BROKEN)),
    "blk-get-id-short": ("GET_ID into a 1-byte buffer", lambda g: _blk(g, T_GET_ID, 0, [(_data(g), 1, W)]),
                         _ANY_CLEAN),
    "blk-aliased-buffers": ("a read whose data buffer aliases its own header and status byte",
                            lambda g: _aliased(g), ("completed with status OK", "completed with status IOERR",
                                                    "completed with status", BROKEN)),
    "blk-aliased-many": ("a read listing the same 4 KiB buffer 512 times (indirect)", lambda g: _aliased_many(g),
                         ("completed with status OK", "completed with status IOERR", BROKEN)),
}


def _writable_source(g: Guest) -> str:
    """A write whose data sits in a device-writable buffer: the disk must not
    take data from it (sector 0 of the check's images stays zero)."""
    gpa, _ = g.buf(512, fill=0x77)
    out = _blk(g, T_OUT, 0, [(gpa, 512, W)])
    with open(g.env.path("img", f"{g.inst.name}.img"), "rb") as f:
        if f.read(512) != bytes(512):
            return f"{out}, and the disk took data from a device-writable buffer"
    return out


def _readonly_target(g: Guest) -> str:
    gpa, view = g.buf(512, fill=0x5A)
    out = _blk(g, T_IN, 0, [(gpa, 512, 0)])
    if bytes(view) != b"\x5a" * 512:
        return f"{out}, and the device wrote into a device-readable buffer"
    return out


def _segment(g: Guest, kind: int, sector: int, count: int, flags: int = 0) -> str:
    seg, view = g.buf(16)
    struct.pack_into("<QII", view, 0, sector & (2**64 - 1), count, flags)
    return _blk(g, kind, 0, [(seg, 16, 0)])


def _aliased(g: Guest) -> str:
    gpa, view = g.buf(512)
    struct.pack_into("<IIQ", view, 0, T_IN, 0, 0)
    return submit(g, [(gpa, 16, N, 1), (gpa, 512, W | N, 2), (gpa + 16, 1, W, 0)], status=view[16:17])


def _aliased_many(g: Guest) -> str:
    hdr = g.blk_header(T_IN, 0)
    data, _ = g.buf(4096)
    st_gpa, st = g.status()
    table, tview = g.buf(16 * 514)
    r = g.ring()
    r.desc(0, hdr, 16, N, 1, table=tview)
    for i in range(1, 513):
        r.desc(i, data, 4096, W | N, i + 1, table=tview)
    r.desc(513, st_gpa, 1, W, 0, table=tview)
    return submit(g, [(table, 16 * 514, I, 0)], status=st)


def _ro_write(g: Guest) -> str:
    data, view = g.buf(4096, fill=0x77)
    return _blk(g, T_OUT, 8, [(data, 4096, 0)])


def _ro_unchanged(g: Guest, outcome: str) -> str | None:
    path = g.env.path("img", f"{g.inst.name}.img")
    with open(path, "rb") as f:
        f.seek(8 * 512)
        if f.read(4096) != bytes(4096):
            return "the read-only image changed on disk"
    return None


# ---------------------------------------------------------------------------
# Console and rng requests

def _console_rx_readonly(g: Guest) -> str:
    """Console input into a device-readable buffer: nothing may be written."""
    gpa, view = g.buf(256, fill=0x5A)
    out = submit(g, [(gpa, 256, 0, 0)], queue=0, wait=0.5)
    if bytes(view) != b"\x5a" * 256:
        return f"{out}, and the device wrote into a device-readable buffer"
    return out


def _console_tx_outside(g: Guest) -> str:
    return submit(g, [(1 << 50, 64, 0, 0)], queue=1)


def _console_tx_hole(g: Guest) -> str:
    return submit(g, [(REGION - 32, 64, 0, 0)], queue=1)


def _console_tx_loop(g: Guest) -> str:
    a = _data(g)
    return submit(g, [(a, 64, N, 1), (a, 64, N, 0)], queue=1)


def _console_tx_writable(g: Guest) -> str:
    gpa, view = g.buf(64, fill=0x41)
    return submit(g, [(gpa, 64, W, 0)], queue=1)


def _rng_readonly(g: Guest) -> str:
    gpa, view = g.buf(256, fill=0x5A)
    out = submit(g, [(gpa, 256, 0, 0)])
    if bytes(view) != b"\x5a" * 256:
        return f"{out}, and the device wrote into a device-readable buffer"
    return out


def _rng_huge(g: Guest) -> str:
    gpa, _ = g.buf(2 << 20)
    out = submit(g, [(gpa, 2 << 20, W, 0)])
    return out


def _rng_bounded(g: Guest, outcome: str) -> str | None:
    if outcome.startswith("completed,"):
        n = int(outcome.split()[1])
        if n > 64 << 10:
            return f"one request filled {n} bytes (bound 64 KiB)"
    return None


# ---------------------------------------------------------------------------
# Forged inflight regions (the front-end hands a region back on reconnect)

def _forge_inflight(what: str) -> Callable[[Guest], str]:
    def script(g: Guest) -> str:
        import mmap as _mmap
        fe = g.fe
        fd = fe.inflight_fd
        size = os.fstat(fd).st_size
        m = _mmap.mmap(fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
        try:
            struct.pack_into("<QHHHH", m, 0, 0, 1, QSIZE, 0, 0)     # version 1: "recover me"
            if what == "counter-max":
                struct.pack_into("<B5xHQ", m, 16 + 16 * 3, 1, 0, 2**64 - 1)   # head 3, fetched "last"
            elif what == "last-batch-out-of-range":
                struct.pack_into("<H", m, 12, 9999)
                struct.pack_into("<H", m, 14, 5)
            elif what == "desc-num-lies":
                struct.pack_into("<H", m, 10, 0xFFFF)
                struct.pack_into("<B5xHQ", m, 16, 1, 0, 1)
            elif what == "all-inflight":
                for i in range(QSIZE):
                    struct.pack_into("<B5xHQ", m, 16 + 16 * i, 1, 0xFFFF, i + 1)
        finally:
            m.close()
        try:
            q = fe.setup_queue(0, QSIZE)
        except ProtocolError as e:
            return f"ring start refused: {e}"
        g.queues[0] = q
        r = RawRing(q)
        # (counter-max is the reconnect flow below)
        # the descriptors the forged region points at are garbage too
        for i in range(QSIZE):
            r.desc(i, (1 << 50) + i, 0xFFFFFFFF, N, i)
        r.kick()
        return _verdict(*r.wait(0.5))
    return script


def _counter_max(g: Guest) -> str:
    """What QEMU does after a back-end restart, with a forged region: the
    ring holds two valid requests (heads 3 and 6), the front-end reconnects
    and hands back an inflight region saying head 3 was fetched with counter
    2^64-1; the new child resubmits head 3, then fetches head 6."""
    import mmap as _mmap
    fe = g.fe
    q = fe.setup_queue(0, QSIZE)
    g.queues[0] = q
    r = RawRing(q)
    for head in (3, 6):
        hdr = g.blk_header(T_IN, 0)
        data, _ = g.buf(512)
        st, _ = g.status()
        r.desc(head, hdr, 16, N, head + 1)
        r.desc(head + 1, data, 512, W | N, head + 2)
        r.desc(head + 2, st, 1, W, 0)
    old = g.env.status()[g.inst.name]["pid"]
    fe.disconnect()          # the back-end "crashed" with head 3 fetched and not completed
    r.publish(3, kick=False)
    fd = fe.inflight_fd
    m = _mmap.mmap(fd, os.fstat(fd).st_size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
    try:
        struct.pack_into("<QHHHH", m, 0, 0, 1, QSIZE, 0, 0)            # version 1: "recover me"
        struct.pack_into("<B5xHQ", m, 16 + 16 * 3, 1, 0, 2**64 - 1)    # head 3, fetched with counter 2^64-1
    finally:
        m.close()
    try:
        fe.reconnect()
    except ProtocolError as e:      # SET_INFLIGHT_FD refused: the region is checked before use
        wait_until(lambda: g.env.status()[g.inst.name]["pid"] not in (old, None), 5.0)
        g.pid = g.env.status()[g.inst.name]["pid"]     # the child that refused it, still serving
        return f"inflight region refused: {e}"
    wait_until(lambda: g.env.status()[g.inst.name]["pid"] not in (old, None), 5.0)
    g.pid = g.env.status()[g.inst.name]["pid"]     # the child serving the reconnected front-end
    r.publish(6)
    results = [r.wait(2.0)]
    if results[0][0] == "used":
        results.append(r.wait(2.0))
    kinds = [k for k, _h, _l in results]
    if "broken" in kinds:
        return BROKEN
    if kinds == ["used", "used"]:
        return "completed both requests"
    return "stalled: " + ", ".join(_verdict(*x) for x in results)


def _no_unexpected(g: Guest, outcome: str) -> str | None:
    """The queue must break for a reason the code names, not through an
    exception it did not expect (the supervisor logs the child's reason)."""
    if outcome != BROKEN:
        return None
    start = len(g.env.log()) - 20000
    lines: list[str] = []

    def logged() -> bool:
        lines[:] = [ln for ln in g.env.log()[max(0, start):].splitlines()
                    if g.inst.name in ln and "broken" in ln]
        return bool(lines)
    wait_until(logged, 2.0, 0.02)
    bad = [ln for ln in lines if "unexpected" in ln]
    if bad:
        return f"the queue broke through an unexpected exception: {bad[-1][-200:]}"
    return None


# ---------------------------------------------------------------------------

for _t in ("block", "console", "rng"):
    for _k, (_tries, _fn) in CHAINS.items():
        if _t != "block" and _k not in ("desc-loop", "indirect-nested", "indirect-loop", "buffer-outside",
                                        "avail-idx-leap", "head-out-of-range"):
            continue
        if _t == "console" and _k in ("indirect-nested", "indirect-loop"):
            continue   # virtio-console offers no INDIRECT_DESC
        register(guest_case(_k, _t, _tries, _fn))

for _k, (_tries, _fn, _acc) in BLOCK.items():
    register(guest_case(_k, "block", _tries, _fn, **({"accept": _acc} if _acc else {})))
register(guest_case("blk-write-readonly-image", "block", "write 4 KiB to a read-only image", _ro_write,
                    variant="ro", accept=("completed with status IOERR", BROKEN), after=_ro_unchanged,
                    expected="IOERR; the image is unchanged on disk; child lives on"))
register(guest_case("blk-discard-readonly-image", "block", "DISCARD on a read-only image",
                    lambda g: _segment(g, T_DISCARD, 8, 8), variant="ro",
                    accept=("completed with status IOERR", "completed with status UNSUPP", BROKEN),
                    after=_ro_unchanged))
register(guest_case("console-rx-readonly-buffer", "console", "console input into a device-readable buffer",
                    _console_rx_readonly, accept=("no completion", "completed, 0 bytes", BROKEN),
                    expected="nothing written into the buffer; child lives on"))
register(guest_case("console-tx-outside", "console", "console output from a buffer outside guest memory",
                    _console_tx_outside, accept=(BROKEN,)))
register(guest_case("console-tx-into-hole", "console", "console output from a buffer straddling into a hole",
                    _console_tx_hole, accept=(BROKEN,)))
register(guest_case("console-tx-loop", "console", "a looping console output chain", _console_tx_loop,
                    accept=(BROKEN,)))
register(guest_case("console-tx-writable-buffer", "console", "console output from a device-writable buffer",
                    _console_tx_writable, accept=("completed", BROKEN)))
register(guest_case("rng-readonly-buffer", "rng", "an entropy request with only a device-readable buffer",
                    _rng_readonly, accept=("completed, 0 bytes", BROKEN),
                    expected="0 bytes given, the buffer untouched; child lives on"))
register(guest_case("rng-huge-buffer", "rng", "an entropy request for 2 MiB", _rng_huge,
                    accept=("completed",), after=_rng_bounded, expected="at most 64 KiB per request"))
register(guest_case("inflight-counter-max", "block",
                    "reconnect with a forged inflight region: head 3 fetched with counter 2^64-1",
                    _counter_max, inflight=True, after=_no_unexpected,
                    accept=(BROKEN, "completed both", "inflight region refused"),
                    expected="SET_INFLIGHT_FD refused, both requests complete, or the queue breaks with a "
                             "clear reason; child lives on"))
for _what, _tries in (("last-batch-out-of-range", "last_batch_head 9999 in a 64-entry region"),
                      ("desc-num-lies", "desc_num 65535 in a 64-entry region"),
                      ("all-inflight", "every descriptor marked in flight, all pointing outside memory")):
    register(guest_case(f"inflight-{_what}", "block", f"a forged inflight region: {_tries}", _forge_inflight(_what),
                        inflight=True, after=_no_unexpected,
                        accept=(BROKEN, "no completion", "completed with status", "ring start refused"),
                        expected="the queue breaks with a clear reason (or ignores the entry); child lives on"))
