"""A vhost-user front-end (the driver side), for tests, benchmarks and ``probe``.

Why it exists: the back-end must be exercised the way a VMM drives it, with
guest memory it cannot see except through SET_MEM_TABLE, rings it only knows
by address, and a peer that reconnects.  QEMU cannot run in every test, so this
module plays QEMU's part in-process, and it is fast enough to drive a
benchmark (precompiled structs, cast memoryviews, prepared descriptor chains,
one kick per batch).

API
---
``VhostUserFrontend``
    ``connect(path, timeout=5.0)``            connect, retrying until the socket accepts
    ``negotiate(features=None, protocol_features=None, *, set_features=True)``
        GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ), SET_OWNER,
        SET_FEATURES.  ``None`` accepts everything offered that this driver
        implements (``DRIVER_FEATURES`` | device bits 0..23, ``DRIVER_PROTOCOL_FEATURES``);
        a given mask is intersected with the offer.  REPLY_ACK is used when acked.
    ``setup_memory(size=64 MiB, gpa1=4 GiB)``  one memfd, two regions: region 0 at GPA 0,
        region 1 at ``gpa1`` (mmap_offset = size/2); QVAs are distinct arbitrary
        values (``QVA_BASE``), so GPA != QVA everywhere.  Sends SET_MEM_TABLE.
    ``get_config(offset, size)`` / ``set_config(offset, data, flags=0)``
    ``get_inflight(num_queues, queue_size) -> fd``  GET_INFLIGHT_FD, then SET_INFLIGHT_FD;
        the fd is kept and re-sent on every (re)start.
    ``setup_queue(index, size=256, *, err=True) -> DriverQueue``  rings in guest memory,
        SET_VRING_NUM/BASE/ADDR/KICK/CALL(/ERR), SET_VRING_ENABLE(1) with F_PROTOCOL_FEATURES.
    ``drain(timeout)``  wait for every outstanding request (completions dropped)
    ``stop_queue(index) -> int`` / ``stop() -> dict``  GET_VRING_BASE (remembered for a resume)
    ``reconnect(path=None, timeout=5.0)``  new socket, same memory, inflight fd and queues;
        renegotiates the same features and resumes each queue at the base from
        GET_VRING_BASE if it was stopped cleanly, else at the used idx in guest memory
        (what QEMU does after a back-end crash); kicks queues with requests outstanding.
    ``disconnect()``  closes the socket only (memory and queues stay for ``reconnect``)
    ``close()``       best-effort drain (1 s) and stop, then frees everything (also the context manager)
    ``request(req, payload=b"", fds=(), reply=False, ack=None) -> Message | None``  raw access
    ``get_queue_num()``, ``enable_queue(index, enable=True)`` (SET_VRING_ENABLE)
    attributes: ``features`` / ``protocol_features`` (offered), ``acked_features`` /
    ``acked_protocol_features``, ``queue_num`` (GET_QUEUE_NUM or None), ``mem``, ``queues``.

``DriverMemory``: the memfd, ``regions``, ``alloc(size, align, region)``, ``view(gpa, len)``.

``DriverQueue`` (driver side of a split ring)
    ``alloc(size) -> (gpa, view)``              a buffer in guest memory (bump allocator)
    ``submit(readable, writable, indirect=False) -> head``   lists of (gpa, len); the
        descriptors return to the free list when the used entry is seen
    ``prepare(readable, writable, indirect=False) -> head``  a chain that stays owned;
        ``patch(head, pos, addr, length, write)`` rewrites one descriptor of it and
        ``resubmit(head)`` puts it on the avail ring again (the benchmark's hot path);
        ``release(head)`` frees it
    ``kick(force=False)``   one eventfd write for everything published since the last
        kick, suppressed per EVENT_IDX (avail_event) or used NO_NOTIFY
    ``poll_used()`` / ``wait_used(timeout) -> [(head, len)]``; ``wait_used`` raises
        ``TimeoutError`` naming the queue when nothing completes in time.  A used
        ring that names a head not in flight raises ``QueueBrokenError``.
    ``broken()`` -> True once the back-end signalled the err eventfd.
    ``desc_slot(head, pos)`` where a prepared descriptor lives (for one-``pack_into`` rewrites);
    ``outstanding``, ``avail_idx``, ``last_used_idx``, ``used_idx`` (as published in memory),
    ``kicks`` / ``calls`` counters (kicks sent, call wake-ups taken).

``feature_names(value, IntFlag)`` names feature bits.  The virtio-blk requests on top of
a ``DriverQueue`` are ``frontend.virtio_blk``.

Memory ordering: the host is little-endian x86 (asserted); ring stores happen in
program order, and the two store-then-load points that need a full fence
(publishing avail idx then reading avail_event; arming used_event then rechecking
used idx) take a lock, which is a locked instruction.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence

from connection.errors import ConnectionClosed, ProtocolError, QueueBrokenError
from connection.protocol import (CONFIG_HEADER, FLAG_NEED_REPLY, VERSION, FrontendReq, InflightInfo, Message,
                                 MemoryRegion, ProtocolFeature, VirtioFeature, VringAddr, decode_config,
                                 decode_inflight, decode_u64, decode_vring_state, encode_config, encode_inflight,
                                 encode_mem_table, encode_u64, encode_vring_addr, encode_vring_state,
                                 request_name, vring_fd_payload)
from connection.transport import MessageSocket

# The split ring's wire layout, shared with the device side.
from connection.split_ring import (DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE,
                                   USED_F_NO_NOTIFY, vring_need_event)

assert sys.byteorder == "little", "virtio rings are little-endian; this driver writes them natively"

# --------------------------------------------------------------------------
# Constants

#: Transport features this driver implements (device-specific bits 0..23 are all accepted).
DRIVER_FEATURES = (VirtioFeature.NOTIFY_ON_EMPTY | VirtioFeature.ANY_LAYOUT | VirtioFeature.RING_INDIRECT_DESC
                   | VirtioFeature.RING_EVENT_IDX | VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.VERSION_1)
DEVICE_FEATURE_MASK = (1 << 24) - 1
#: Protocol features this driver implements.
DRIVER_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                            | ProtocolFeature.INFLIGHT_SHMFD | ProtocolFeature.RESET_DEVICE)

#: Region 1's default guest-physical base: above 4 GiB, like a PC's high memory.
GPA_HIGH = 4 << 30
#: Front-end virtual addresses we announce (arbitrary, distinct from GPAs, region 1 below region 0).
QVA_BASE = (0x7F00_0000_0000, 0x7E00_0000_0000)

#: Max descriptors in one indirect table this driver prepares per head.
MAX_INDIRECT = 32


def _align(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def feature_names(value: int, flags: type) -> list[str]:
    """Names of the set bits of ``value`` per an IntFlag class, unknown bits as ``bitN``."""
    names = []
    for bit in range(64):
        mask = 1 << bit
        if value & mask:
            try:
                member = flags(mask)
                names.append(member.name or f"bit{bit}")
            except ValueError:
                names.append(f"bit{bit}")
    return names


# --------------------------------------------------------------------------
# Guest memory (driver side)

class DriverRegion:
    """One region as announced in SET_MEM_TABLE, with the driver's view of it."""

    __slots__ = ("gpa", "size", "qva", "offset", "view", "_next")

    def __init__(self, gpa: int, size: int, qva: int, offset: int, view: memoryview) -> None:
        self.gpa, self.size, self.qva, self.offset, self.view = gpa, size, qva, offset, view
        self._next = 0  # bump-allocator cursor, bytes from the region start

    def memory_region(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.qva, self.offset)


class DriverMemory:
    """The guest RAM this driver shares: one memfd split into two regions.

    Region ``i`` covers file bytes ``[i*size/2, (i+1)*size/2)``, so the back-end
    maps region 1 with a non-zero ``mmap_offset``; GPAs and QVAs differ per
    region and from each other, which catches a back-end mixing them up.
    """

    def __init__(self, size: int = 64 << 20, gpa1: int = GPA_HIGH) -> None:
        if size <= 0 or size % (2 * mmap.PAGESIZE):
            raise ValueError(f"memory size {size} is not a positive multiple of {2 * mmap.PAGESIZE}")
        half = size // 2
        if gpa1 < half:
            raise ValueError(f"gpa1 {gpa1:#x} overlaps region 0 [0, {half:#x})")
        self.size = size
        self.fd = os.memfd_create("vhost-frontend-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._view = memoryview(self._mmap)
        self.regions: tuple[DriverRegion, ...] = (
            DriverRegion(0, half, QVA_BASE[0], 0, self._view[:half]),
            DriverRegion(gpa1, half, QVA_BASE[1], half, self._view[half:]),
        )

    def table(self) -> list[MemoryRegion]:
        return [r.memory_region() for r in self.regions]

    def alloc(self, size: int, align: int = 64, region: int | None = None) -> tuple[int, memoryview]:
        """A zeroed buffer of ``size`` bytes: (GPA, writable view).  Never freed
        (a driver's rings and buffers live as long as the memory)."""
        if size <= 0:
            raise ValueError(f"alloc size {size} must be positive")
        order = (region,) if region is not None else (1, 0)
        for index in order:
            reg = self.regions[index]
            start = _align(reg._next, align)
            if start + size <= reg.size:
                reg._next = start + size
                view = reg.view[start:start + size]
                view[:] = bytes(size)
                return reg.gpa + start, view
        raise MemoryError(f"driver memory exhausted: {size} bytes (align {align}) do not fit in region(s) {order}")

    def region_of(self, gpa: int, length: int = 1) -> DriverRegion:
        for reg in self.regions:
            if reg.gpa <= gpa and gpa + length <= reg.gpa + reg.size:
                return reg
        raise ValueError(f"gpa {gpa:#x} length {length} is not inside one region")

    def view(self, gpa: int, length: int) -> memoryview:
        """The driver's view of ``[gpa, gpa+length)`` (must lie in one region)."""
        reg = self.region_of(gpa, length)
        off = gpa - reg.gpa
        return reg.view[off:off + length]

    def qva(self, gpa: int) -> int:
        """The front-end virtual address of a GPA (what SET_VRING_ADDR carries)."""
        reg = self.region_of(gpa)
        return reg.qva + (gpa - reg.gpa)

    def close(self) -> None:
        """Unmap and close; views handed out must be gone, else the mapping is
        left to the garbage collector."""
        for reg in self.regions:
            reg.view.release()
        self.regions = ()
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------
# Driver-side split queue

class DriverQueue:
    """One split virtqueue as the driver sees it: it writes descriptors and the
    avail ring, reads the used ring, kicks and waits for calls.

    A descriptor is reused only after its head came back on the used ring, and
    at most ``size`` chains are outstanding, so the back-end never sees a ring
    the driver rewrote under it.
    """

    def __init__(self, mem: DriverMemory, index: int, size: int, event_idx: bool, indirect: bool) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"queue size {size} is not a power of two in 1..32768")
        self.mem = mem
        self.index = index
        self.size = size
        self.mask = size - 1
        self.event_idx = event_idx
        self.indirect_ok = indirect
        # Rings: desc (16-aligned), avail (2), used (4); page-aligned like a real driver.
        self.desc_gpa, self._desc = mem.alloc(DESC_SIZE * size, 4096, region=0)
        self.avail_gpa, avail = mem.alloc(6 + 2 * size, 4096, region=0)
        self.used_gpa, used = mem.alloc(6 + 8 * size + 2, 4096, region=0)  # +2 pads to a u32 multiple
        self._avail_h = avail.cast("H")          # [0] flags [1] idx [2+i] ring [2+size] used_event
        self._used_h = used.cast("H")            # [0] flags [1] idx [2+4*size] avail_event
        self._used_i = used[:4 + 8 * size].cast("I")   # [1+2i] id [2+2i] len
        self._indirect_gpa = 0
        self._indirect: memoryview | None = None
        if indirect:
            self._indirect_gpa, self._indirect = mem.alloc(size * MAX_INDIRECT * DESC_SIZE, 4096)
        self.avail_idx = 0          # next avail slot (free-running u16), published value
        self.last_used_idx = 0      # next used entry to read
        self._kicked_idx = 0        # avail idx at the last kick decision
        self._free = list(range(size - 1, -1, -1))   # stack of free descriptor indices
        self._chains: list[list[int] | None] = [None] * size   # head -> descriptors (direct)
        self._chain_indirect = [False] * size
        self._prepared = [False] * size
        self._inflight = [False] * size
        self.outstanding = 0
        self.stopped_base: int | None = None
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.call_fd, select.POLLIN)
        self._fence = threading.Lock()
        self.kicks = 0
        self.calls = 0

    # ---- addresses for SET_VRING_ADDR
    def vring_addr(self) -> VringAddr:
        return VringAddr(self.index, 0, self.mem.qva(self.desc_gpa), self.mem.qva(self.used_gpa),
                         self.mem.qva(self.avail_gpa), 0)

    # ---- buffers
    def alloc(self, size: int, align: int = 64) -> tuple[int, memoryview]:
        """A buffer in guest memory (GPA, view); region 1 first, like high RAM."""
        return self.mem.alloc(size, align)

    # ---- building chains
    @staticmethod
    def _fill(table: memoryview, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]],
              indices: list[int]) -> None:
        """Write the chain's descriptors at ``indices`` of ``table``; ``next``
        values are indices within that table (the ring's or an indirect one)."""
        total = len(indices)
        pack = DESC.pack_into
        pos = 0
        for addr, length in readable:
            flags = DESC_F_NEXT if pos + 1 < total else 0
            nxt = indices[pos + 1] if pos + 1 < total else 0
            pack(table, indices[pos] * DESC_SIZE, addr, length, flags, nxt)
            pos += 1
        for addr, length in writable:
            flags = DESC_F_WRITE | (DESC_F_NEXT if pos + 1 < total else 0)
            nxt = indices[pos + 1] if pos + 1 < total else 0
            pack(table, indices[pos] * DESC_SIZE, addr, length, flags, nxt)
            pos += 1

    def _build(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]],
               indirect: bool) -> int:
        count = len(readable) + len(writable)
        if count == 0:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            if not self.indirect_ok:
                raise ValueError(f"queue {self.index}: INDIRECT_DESC was not negotiated")
            if count > MAX_INDIRECT:
                raise ValueError(f"indirect chain of {count} descriptors exceeds {MAX_INDIRECT}")
            if not self._free:
                raise BufferError(f"queue {self.index}: no free descriptor ({self.outstanding} outstanding)")
            head = self._free.pop()
            assert self._indirect is not None
            table_off = head * MAX_INDIRECT * DESC_SIZE
            table = self._indirect[table_off:table_off + count * DESC_SIZE]
            self._fill(table, readable, writable, list(range(count)))
            DESC.pack_into(self._desc, head * DESC_SIZE, self._indirect_gpa + table_off,
                           count * DESC_SIZE, DESC_F_INDIRECT, 0)
            self._chains[head] = [head]
            self._chain_indirect[head] = True
            return head
        if count > len(self._free):
            raise BufferError(f"queue {self.index}: chain of {count} needs more than the "
                              f"{len(self._free)} free descriptors")
        indices = [self._free.pop() for _ in range(count)]
        self._fill(self._desc, readable, writable, indices)
        head = indices[0]
        self._chains[head] = indices
        self._chain_indirect[head] = False
        return head

    def _publish(self, head: int) -> None:
        if self._inflight[head]:
            raise ValueError(f"queue {self.index}: head {head} is already in flight")
        self._inflight[head] = True
        self.outstanding += 1
        idx = self.avail_idx
        self._avail_h[2 + (idx & self.mask)] = head
        idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        self._avail_h[1] = idx

    def submit(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]],
               indirect: bool = False) -> int:
        """Publish a chain (device-readable buffers first); returns its head.
        Call ``kick`` after a batch."""
        head = self._build(readable, writable, indirect)
        self._publish(head)
        return head

    def prepare(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]],
                indirect: bool = False) -> int:
        """Write a chain that stays owned by the caller: ``resubmit`` it after
        each completion without rewriting its descriptors."""
        head = self._build(readable, writable, indirect)
        self._prepared[head] = True
        return head

    def desc_slot(self, head: int, pos: int) -> tuple[memoryview, int, int, bool]:
        """Where descriptor ``pos`` of prepared chain ``head`` lives: (table view,
        byte offset, its ``next`` value, whether it is the last).  Lets a hot
        loop rewrite it with one ``DESC.pack_into`` (see ``BlockDriver``)."""
        chain = self._chains[head]
        if chain is None or not self._prepared[head]:
            raise ValueError(f"queue {self.index}: head {head} is not a prepared chain")
        if self._chain_indirect[head]:
            assert self._indirect is not None
            count = DESC.unpack_from(self._desc, head * DESC_SIZE)[1] // DESC_SIZE
            if not 0 <= pos < count:
                raise IndexError(f"position {pos} outside a chain of {count}")
            last = pos + 1 >= count
            return self._indirect, (head * MAX_INDIRECT + pos) * DESC_SIZE, 0 if last else pos + 1, last
        if not 0 <= pos < len(chain):
            raise IndexError(f"position {pos} outside a chain of {len(chain)}")
        last = pos + 1 >= len(chain)
        return self._desc, chain[pos] * DESC_SIZE, 0 if last else chain[pos + 1], last

    def patch(self, head: int, pos: int, addr: int, length: int, write: bool) -> None:
        """Rewrite descriptor ``pos`` of prepared chain ``head`` (not in flight)."""
        if self._inflight[head]:
            raise ValueError(f"queue {self.index}: head {head} is in flight; cannot patch it")
        table, off, nxt, last = self.desc_slot(head, pos)
        flags = (DESC_F_WRITE if write else 0) | (0 if last else DESC_F_NEXT)
        DESC.pack_into(table, off, addr, length, flags, nxt)

    def resubmit(self, head: int) -> None:
        """Put prepared chain ``head`` on the avail ring again."""
        self._publish(head)

    def release(self, head: int) -> None:
        """Return a prepared chain's descriptors to the free list."""
        if self._inflight[head] or not self._prepared[head]:
            raise ValueError(f"queue {self.index}: head {head} is in flight or not prepared")
        self._prepared[head] = False
        self._free_chain(head)

    def _free_chain(self, head: int) -> None:
        chain = self._chains[head]
        self._chains[head] = None
        if chain is not None:
            self._free.extend(chain)

    # ---- notifications
    @property
    def avail_event(self) -> int:
        """The back-end's ``avail_event`` (EVENT_IDX): a kick is due once the
        avail idx passes it."""
        return self._used_h[2 + 4 * self.size]

    def kick(self, force: bool = False) -> bool:
        """Notify the back-end of everything published since the last kick,
        unless it asked not to be; returns whether the eventfd was written."""
        new = self.avail_idx
        old = self._kicked_idx
        if new == old and not force:
            return False
        self._kicked_idx = new
        with self._fence:   # full barrier: avail idx store before the avail_event load
            pass
        if not force:
            if self.event_idx:
                if not vring_need_event(self.avail_event, new, old):
                    return False
            elif self._used_h[0] & USED_F_NO_NOTIFY:
                return False
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1
        return True

    def poll_used(self) -> list[tuple[int, int]]:
        """Completed (head, len) pairs not yet seen; non-blocking."""
        used_idx = self._used_h[1]
        last = self.last_used_idx
        if used_idx == last:
            return []
        count = (used_idx - last) & 0xFFFF
        if count > self.outstanding:
            raise QueueBrokenError(f"queue {self.index}: used idx moved from {last} to {used_idx}, "
                                   f"but only {self.outstanding} chains are outstanding")
        used_i = self._used_i
        mask = self.mask
        inflight = self._inflight
        prepared = self._prepared
        out = []
        for _ in range(count):
            slot = last & mask
            head = used_i[1 + 2 * slot]
            length = used_i[2 + 2 * slot]
            if head >= self.size or not inflight[head]:
                raise QueueBrokenError(f"queue {self.index}: used ring entry {last} names head {head}, "
                                       f"which is not in flight")
            inflight[head] = False
            if not prepared[head]:
                self._free_chain(head)
            out.append((head, length))
            last = (last + 1) & 0xFFFF
        self.outstanding -= count
        self.last_used_idx = last
        if self.event_idx:
            self._avail_h[2 + self.size] = last   # used_event: call me at the next completion
        return out

    def wait_used(self, timeout: float) -> list[tuple[int, int]]:
        """Completed (head, len) pairs, at least one; sleeps on the call eventfd.
        Raises ``TimeoutError`` after ``timeout`` seconds without a completion."""
        done = self.poll_used()
        if done:
            return done
        deadline = time.monotonic() + timeout
        while True:
            if self.event_idx:
                self._avail_h[2 + self.size] = self.last_used_idx
                with self._fence:   # used_event store before the used idx load
                    pass
            done = self.poll_used()
            if done:
                return done
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"queue {self.index}: no completion within {timeout}s "
                                   f"({self.outstanding} outstanding, avail idx {self.avail_idx}, "
                                   f"used idx {self._used_h[1]})")
            if self._poll.poll(max(1, int(remaining * 1000) + 1)):
                try:
                    os.eventfd_read(self.call_fd)
                    self.calls += 1
                except BlockingIOError:
                    pass

    def broken(self) -> bool:
        """Whether the back-end signalled the err eventfd (it marked the queue broken)."""
        try:
            return os.eventfd_read(self.err_fd) > 0
        except BlockingIOError:
            return False

    @property
    def used_idx(self) -> int:
        """The used idx as the back-end last published it (guest memory)."""
        return self._used_h[1]

    def close(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                if name == "call_fd":
                    self._poll.unregister(fd)
                os.close(fd)
                setattr(self, name, -1)
        for view in (self._avail_h, self._used_h, self._used_i, self._desc, self._indirect):
            if view is not None:
                view.release()


# --------------------------------------------------------------------------
# The front-end

class VhostUserFrontend:
    """A vhost-user front-end over one Unix socket (the VMM's role)."""

    def __init__(self, sock: socket.socket, path: str | None = None) -> None:
        self.sock = MessageSocket(sock)
        self.path = path
        self.features = 0
        self.protocol_features = 0
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.queue_num: int | None = None
        self.mem: DriverMemory | None = None
        self.queues: dict[int, DriverQueue] = {}
        self.inflight_fd: int | None = None
        self.inflight_info: InflightInfo | None = None
        self._want_features: int | None = None
        self._want_protocol: int | None = None
        self._connected = True

    # ---- connection
    @staticmethod
    def _open(path: str, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise ConnectionRefusedError(f"cannot connect to {path!r} within {timeout}s: {exc}") from exc
                time.sleep(0.01)
            except BaseException:
                sock.close()
                raise

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> "VhostUserFrontend":
        """Connect to a listening back-end, retrying until ``timeout``."""
        return cls(cls._open(path, timeout), path)

    # ---- raw messages
    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = (),
                reply: bool = False, ack: bool | None = None) -> Message | None:
        """Send one request.  ``reply``: read and return its reply.  ``ack``
        (default: when REPLY_ACK was acked and no reply is expected): set
        NEED_REPLY and raise ``ProtocolError`` on a non-zero ack."""
        if ack is None:
            ack = not reply and bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        self.sock.send(req, flags, payload, fds)
        if not (reply or ack):
            return None
        msg = self.sock.recv(expect_reply=True)
        if msg.request != req:
            msg.close_fds()
            raise ProtocolError(f"{request_name(req)}: reply carries request {request_name(msg.request)}")
        if ack and not reply:
            status = decode_u64(req, msg.payload)
            msg.close_fds()
            if status != 0:
                raise ProtocolError(f"{request_name(req)}: back-end acked failure {status:#x}")
            return None
        return msg

    def _get_u64(self, req: int) -> int:
        msg = self.request(req, reply=True)
        assert msg is not None
        msg.close_fds()
        return decode_u64(req, msg.payload)

    # ---- negotiation
    def negotiate(self, features: int | None = None, protocol_features: int | None = None,
                  *, set_features: bool = True) -> None:
        """GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, SET_FEATURES
        (the last left out with ``set_features=False``: ``probe`` only looks)."""
        self._want_features = features
        self._want_protocol = protocol_features
        self.acked_protocol_features = 0   # no REPLY_ACK until it is set again
        self.features = self._get_u64(FrontendReq.GET_FEATURES)
        want = (DRIVER_FEATURES | DEVICE_FEATURE_MASK) if features is None else features
        acked = self.features & want
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            acked |= VirtioFeature.PROTOCOL_FEATURES
            self.protocol_features = self._get_u64(FrontendReq.GET_PROTOCOL_FEATURES)
            pwant = DRIVER_PROTOCOL_FEATURES if protocol_features is None else protocol_features
            packed = self.protocol_features & pwant
            self.request(FrontendReq.SET_PROTOCOL_FEATURES, encode_u64(packed), ack=False)
            self.acked_protocol_features = packed
            if packed & ProtocolFeature.MQ:
                self.queue_num = self._get_u64(FrontendReq.GET_QUEUE_NUM)
        self.request(FrontendReq.SET_OWNER)
        if set_features:
            self.request(FrontendReq.SET_FEATURES, encode_u64(acked))
            self.acked_features = acked

    def get_queue_num(self) -> int:
        return self._get_u64(FrontendReq.GET_QUEUE_NUM)

    # ---- memory
    def setup_memory(self, size: int = 64 << 20, gpa1: int = GPA_HIGH) -> DriverMemory:
        """Create the guest RAM (if not yet) and send SET_MEM_TABLE."""
        if self.mem is None:
            self.mem = DriverMemory(size, gpa1)
        self._send_mem_table()
        return self.mem

    def _send_mem_table(self) -> None:
        assert self.mem is not None
        self.request(FrontendReq.SET_MEM_TABLE, encode_mem_table(self.mem.table()),
                     fds=[self.mem.fd] * len(self.mem.regions))

    # ---- config
    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG; ``ProtocolError`` if the back-end refuses (empty reply) or
        answers with another size."""
        msg = self.request(FrontendReq.GET_CONFIG, encode_config(offset, 0, bytes(size)), reply=True)
        assert msg is not None
        msg.close_fds()
        if len(msg.payload) == 0:
            raise ProtocolError(f"GET_CONFIG: back-end refused offset {offset} size {size} (empty reply)")
        if len(msg.payload) != CONFIG_HEADER.size + size:
            raise ProtocolError(f"GET_CONFIG: reply payload {len(msg.payload)} bytes, "
                                f"expected {CONFIG_HEADER.size + size}")
        return decode_config(FrontendReq.GET_CONFIG, msg.payload).data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(FrontendReq.SET_CONFIG, encode_config(offset, flags, bytes(data)))

    # ---- inflight
    def get_inflight(self, num_queues: int, queue_size: int) -> int:
        """GET_INFLIGHT_FD then SET_INFLIGHT_FD; the fd is kept (and returned)
        and sent again on every restart."""
        msg = self.request(FrontendReq.GET_INFLIGHT_FD,
                           encode_inflight(InflightInfo(0, 0, num_queues, queue_size)), reply=True)
        assert msg is not None
        info = decode_inflight(msg.payload)
        if info.mmap_size == 0:
            msg.close_fds()
            raise ProtocolError("GET_INFLIGHT_FD: back-end returned mmap_size 0 (no inflight buffer)")
        fd = msg.take_fd()
        msg.close_fds()
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
        self.inflight_fd = fd
        self.inflight_info = InflightInfo(info.mmap_size, info.mmap_offset, num_queues, queue_size)
        self._send_inflight()
        return fd

    def _send_inflight(self) -> None:
        assert self.inflight_fd is not None and self.inflight_info is not None
        self.request(FrontendReq.SET_INFLIGHT_FD, encode_inflight(self.inflight_info), fds=[self.inflight_fd])

    # ---- queues
    def setup_queue(self, index: int, size: int = 256, *, err: bool = True) -> DriverQueue:
        """Lay out a split ring in guest memory and start it on the back-end."""
        if self.mem is None:
            raise RuntimeError("setup_memory() first")
        if index in self.queues:
            raise ValueError(f"queue {index} is already set up")
        q = DriverQueue(self.mem, index, size,
                        event_idx=bool(self.acked_features & VirtioFeature.RING_EVENT_IDX),
                        indirect=bool(self.acked_features & VirtioFeature.RING_INDIRECT_DESC))
        self.queues[index] = q
        self._start_queue(q, 0, err)
        return q

    def _start_queue(self, q: DriverQueue, base: int, err: bool = True) -> None:
        i = q.index
        self.request(FrontendReq.SET_VRING_NUM, encode_vring_state(i, q.size))
        self.request(FrontendReq.SET_VRING_BASE, encode_vring_state(i, base))
        self.request(FrontendReq.SET_VRING_ADDR, encode_vring_addr(q.vring_addr()))
        self.request(FrontendReq.SET_VRING_KICK, vring_fd_payload(i), fds=[q.kick_fd])
        self.request(FrontendReq.SET_VRING_CALL, vring_fd_payload(i), fds=[q.call_fd])
        if err:
            self.request(FrontendReq.SET_VRING_ERR, vring_fd_payload(i), fds=[q.err_fd])
        if self.acked_features & VirtioFeature.PROTOCOL_FEATURES:
            self.request(FrontendReq.SET_VRING_ENABLE, encode_vring_state(i, 1))
        q.stopped_base = None

    def enable_queue(self, index: int, enable: bool = True) -> None:
        self.request(FrontendReq.SET_VRING_ENABLE, encode_vring_state(index, int(enable)))

    def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring; returns (and remembers) the next avail index."""
        msg = self.request(FrontendReq.GET_VRING_BASE, encode_vring_state(index, 0), reply=True)
        assert msg is not None
        msg.close_fds()
        state = decode_vring_state(msg.payload)
        if state.index != index:
            raise ProtocolError(f"GET_VRING_BASE: reply for index {state.index}, asked {index}")
        if index in self.queues:
            self.queues[index].stopped_base = state.num
        return state.num

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queue has no request outstanding (completions are
        consumed and dropped), like a VMM draining before it stops the device:
        a back-end must not be left completing into rings it was told to stop."""
        deadline = time.monotonic() + timeout
        for q in self.queues.values():
            while q.outstanding:
                q.wait_used(max(0.0, deadline - time.monotonic()))

    def stop(self) -> dict[int, int]:
        """Stop every queue (GET_VRING_BASE); returns index -> base."""
        return {i: self.stop_queue(i) for i in sorted(self.queues) if self.queues[i].stopped_base is None}

    # ---- reconnect and teardown
    def reconnect(self, path: str | None = None, timeout: float = 5.0) -> None:
        """New socket to the same (or given) path; same memory, inflight fd and
        queues; resume each queue like QEMU does."""
        path = path or self.path
        if path is None:
            raise ValueError("no path to reconnect to")
        self.disconnect()
        self.sock = MessageSocket(self._open(path, timeout))
        self.path = path
        self._connected = True
        self.negotiate(self._want_features, self._want_protocol)
        if self.mem is not None:
            self._send_mem_table()
        if self.inflight_fd is not None:
            self._send_inflight()
        for index in sorted(self.queues):
            q = self.queues[index]
            base = q.stopped_base if q.stopped_base is not None else q.used_idx
            self._start_queue(q, base)
        for q in self.queues.values():
            if q.outstanding:
                q.kick(force=True)

    def disconnect(self) -> None:
        """Close the socket only: a reconnect keeps memory and queues."""
        if self._connected:
            self._connected = False
            self.sock.close()

    def close(self) -> None:
        """Stop the queues if the back-end is still there, then free everything."""
        if self._connected:
            try:
                self.drain(1.0)
            except (TimeoutError, QueueBrokenError):
                pass
            try:
                self.stop()
            except (OSError, ConnectionClosed, ProtocolError):
                pass
            self.disconnect()
        for q in self.queues.values():
            q.close()
        self.queues.clear()
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
            self.inflight_fd = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

