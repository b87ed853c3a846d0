"""virtio-net over vhost-user on a tap the supervisor opened.

The parent (``NetBuilder.from_options``) opens the tap with
``devices.tap``: one fd per queue pair, vnet header size 12, the offloads
the device may offer.  The jailed child (``NetDevice``) only moves frames:

* **tx** (transmitq, odd vrings): each chain is one frame with a 12-byte
  ``virtio_net_hdr_v1`` in front, the format the tap takes with
  IFF_VNET_HDR, so it goes out with one ``writev`` straight from guest
  memory.  The header is first copied into a private buffer and checked
  there (the guest cannot change it between the check and the write):
  offloads only as negotiated, checksum offsets inside the frame, a GSO size
  within the MTU, non-GSO frames within MTU + Ethernet header.  A chain
  that fails is completed with length 0 and counted; the queue goes on.
  ``EAGAIN`` keeps the chain and waits for the tap to be writable.
* **rx** (receiveq, even vrings): one ``readv`` per frame into a fixed
  per-queue buffer (the only per-queue memory: 69632 bytes, QEMU's
  NET_BUFSIZE), then copied into as many guest buffers as it needs
  (MRG_RXBUF) or one (without), with ``num_buffers`` written and ``flags``
  cleared unless GUEST_CSUM was negotiated; the used index is published
  once per batch.  When the guest has no buffer the frame stays in the
  buffer, the tap is no longer read (the kernel queues up to its
  ``txqueuelen`` and counts what it drops on the tap) and the task sleeps
  on the rx kick, with kicks re-armed and the ring re-checked by
  ``Virtqueue.wait_kick``: no spinning, no silent drop.

Counters (``NetDevice.stats``) name every drop and error; the first of
each kind is logged, later ones at powers of two.

Multiqueue (``num-queues`` > 1, VIRTIO_NET_F_MQ): one tap queue fd per
pair; the tap queue of a pair whose rx ring the front-end disables
(SET_VRING_ENABLE 0, QEMU's VQ_PAIRS_SET) is detached with TUNSETQUEUE, so
the kernel steers no flow to it, and attached again when it is enabled.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
from collections import Counter
from typing import Any

from connection.executor import Executor
from connection.protocol import ProtocolFeature, VirtioFeature

from . import tap as taplib
from .base import DeviceBuilder, QueueTaskDevice
from .devtype import DeviceType
from .options import ConfigError, Option

log = logging.getLogger("devices.net")

# --------------------------------------------------------------------------
# virtio-net constants (virtio 1.2, 5.1)

F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_HOST_UFO = 1 << 14
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_GUEST_ANNOUNCE = 1 << 21
F_MQ = 1 << 22

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

S_LINK_UP = 1

#: struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size,
#: csum_start, csum_offset, num_buffers.
HDR = struct.Struct("<BBHHHHH")
HDR_SIZE = HDR.size
assert HDR_SIZE == taplib.VNET_HDR_SIZE == 12
_unpack_hdr = HDR.unpack_from
_pack_hdr = HDR.pack_into
ETH_HLEN = 14
VLAN_HLEN = 4
#: Largest frame a tap hands out or takes (64 KiB GSO plus headers); the
#: per-queue rx buffer is QEMU's NET_BUFSIZE.
MAX_FRAME = 65535 + ETH_HLEN + VLAN_HLEN
RX_BUF_SIZE = 4096 + 65536
#: writev takes at most IOV_MAX (1024) buffers, one of them our header copy.
MAX_TX_BUFFERS = 1023
#: Frames moved per queue before the task yields to the other queues.
BATCH = 64
#: Back-off after a tap read error other than EAGAIN, so a broken tap is
#: not retried in a loop.
TAP_ERROR_BACKOFF = 0.05
#: config space: mac[6], status, max_virtqueue_pairs, mtu (le16 each).
CONFIG = struct.Struct("<6sHHH")
CONFIG_READ_LIMIT = 256
MAX_PAIRS = 16
#: tx ring polling bound (µs).  0 by default: the loop is single-threaded, so
#: polling the tx ring delays the tap's replies by up to the window; ping -A
#: went from 0.67 to 0.43 ms round trips with 0 (benchmarks/README.md, net).
DEFAULT_POLL_US = 0

_RING_FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                     | VirtioFeature.RING_EVENT_IDX)
#: What the device always offers on top of the ring features.
_NET_FEATURES = (F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6
                 | F_MRG_RXBUF | F_STATUS | F_GUEST_ANNOUNCE)

# Results of one drain.
_EMPTY, _MORE, _WAIT_TAP, _WAIT_BUFFERS, _DISABLED, _TAP_ERROR = range(6)


def guest_offloads(features: int) -> int:
    """The TUN_F_* set matching the guest-acked GUEST_* bits: the tap may
    hand the reader only what the guest accepts (TSO needs CSUM)."""
    off = 0
    if features & F_GUEST_CSUM:
        off |= taplib.TUN_F_CSUM
        if features & F_GUEST_TSO4:
            off |= taplib.TUN_F_TSO4
        if features & F_GUEST_TSO6:
            off |= taplib.TUN_F_TSO6
    return off


class _Pair:
    """One queue pair: its tap fd, its rings while started, the frame and
    chains held across a wait.  The only buffers are fixed-size."""

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self.fd = fd
        self.rx_buf = bytearray(RX_BUF_SIZE)
        self.rx_view = memoryview(self.rx_buf)
        self.rx_pending = 0              # bytes of a frame read but not delivered
        self.rx_held: list[Any] = []     # chains popped for that frame
        self.rx_held_len = 0
        self.rx_held_views = 0
        self.rx_queue: Any = None
        self.tx_queue: Any = None
        self.tx_hdr = bytearray(HDR_SIZE)
        self.tx_held: Any = None         # a chain waiting for the tap to take it (EAGAIN)
        self.enabled_waiter: asyncio.Future[None] | None = None
        self.rx_stall: asyncio.Future[int] | None = None   # set by the reader callback


class NetDevice(QueueTaskDevice):
    """virtio-net (ID 1): receiveq/transmitq pairs on tap queue fds."""

    #: QEMU allows a tx ring of 1024 for vhost-user peers.
    max_queue_size = 1024

    def __init__(self, ex: Executor, name: str, tap_fds: list[int], *, link_mtu: int = 1500,
                 mtu: int | None = None, mac: bytes | None = None, poll_max_ns: int = 0) -> None:
        super().__init__(ex, name)
        #: Bound of the tx ring's adaptive polling before sleeping on the kick.
        self.poll_max_ns = poll_max_ns
        if not 1 <= len(tap_fds) <= MAX_PAIRS:
            raise ValueError(f"{len(tap_fds)} tap fds: 1..{MAX_PAIRS} queue pairs")
        self.pairs = [_Pair(i, fd) for i, fd in enumerate(tap_fds)]
        self.link_mtu = link_mtu
        #: The MTU the guest is told (F_MTU), None when not configured.
        self.mtu = mtu
        self.mac = mac
        #: Largest non-GSO frame accepted from the guest.
        self.max_frame = (mtu or link_mtu) + ETH_HLEN + VLAN_HLEN
        self.stats: Counter[str] = Counter()
        self.offloads: int | None = None
        self._mrg = False
        self._guest_csum = False
        self._host_ok = 0

    # ---------------------------------------------------------------- virtio

    def max_queue_num(self) -> int:
        return 2 * len(self.pairs)

    def features(self) -> int:
        f = _RING_FEATURES | _NET_FEATURES
        if self.mac is not None:
            f |= F_MAC
        if self.mtu is not None:
            f |= F_MTU
        if len(self.pairs) > 1:
            f |= F_MQ
        return f

    def protocol_features(self) -> int:
        p = int(ProtocolFeature.MTU)
        if self.mac is not None:
            p |= int(ProtocolFeature.CONFIG)   # a front-end that reads config (not QEMU's net)
        return p

    def ack_features(self, features: int) -> None:
        if not features & VirtioFeature.VERSION_1:
            raise ValueError("VIRTIO_F_VERSION_1 not acked: legacy 10-byte headers are not supported")
        super().ack_features(features)
        self._mrg = bool(features & F_MRG_RXBUF)
        self._guest_csum = bool(features & F_GUEST_CSUM)
        self._host_ok = features
        off = guest_offloads(features)
        if off != self.offloads:
            # Per tap device: one fd sets it for every queue.
            try:
                taplib.set_offload(self.pairs[0].fd, off)
                self.offloads = off
            except OSError as exc:
                # Frames the guest cannot take are then dropped (and counted) on rx.
                log.error("device=%s TUNSETOFFLOAD %#x failed: %s", self.name, off, exc.strerror)

    def set_mtu(self, mtu: int) -> None:
        if not 68 <= mtu <= self.link_mtu:
            raise ValueError(f"MTU {mtu} outside 68..{self.link_mtu} (the tap's MTU)")
        self.max_frame = mtu + ETH_HLEN + VLAN_HLEN

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > CONFIG_READ_LIMIT:
            raise ValueError(f"config read offset {offset} size {size} outside [0, {CONFIG_READ_LIMIT})")
        data = CONFIG.pack(self.mac or bytes(6), S_LINK_UP, len(self.pairs), self.mtu or 0)
        data = data[offset:offset + size]
        return data + bytes(size - len(data))

    def start_queue(self, index: int, queue: Any, mem: Any) -> None:
        pair = self.pairs[index // 2]
        # _spawn stops an older task first (stop_queue), then the pair takes the queue.
        if index % 2 == 0:
            queue.poll_max_ns = 0   # rx waits for buffers rarely; never busy-poll for them
            self.set_queue_enabled(index, queue.enabled)   # the tap queue follows the ring
            self._spawn(index, queue, self._serve_rx(pair, queue))
            pair.rx_queue = queue
        else:
            queue.poll_max_ns = self.poll_max_ns
            self._spawn(index, queue, self._serve_tx(pair, queue))
            pair.tx_queue = queue

    def stop_queue(self, index: int) -> None:
        super().stop_queue(index)
        if index // 2 >= len(self.pairs):
            return
        p = self.pairs[index // 2]
        loop = self.ex.loop
        if index % 2 == 0:
            q, p.rx_queue = p.rx_queue, None
            # No reader callback (registered or already scheduled) runs a
            # drain after this: it finds no stall future to report to.
            stall, p.rx_stall = p.rx_stall, None
            if stall is not None and not stall.done():
                stall.cancel()
            if not loop.is_closed():
                loop.remove_reader(p.fd)
            # Buffers taken for a frame go back empty (the guest counts a
            # length error) rather than being lost to the guest for good.
            if q is not None:
                for chain in p.rx_held:
                    q.add_used(chain.head, 0)
            if p.rx_pending:
                self._count("rx_dropped_stopped")
            p.rx_held.clear()
            p.rx_held_len = p.rx_held_views = p.rx_pending = 0
            w, p.enabled_waiter = p.enabled_waiter, None
            if w is not None and not w.done():
                w.cancel()
        else:
            q, p.tx_queue = p.tx_queue, None
            if not loop.is_closed():
                loop.remove_writer(p.fd)
            if p.tx_held is not None and q is not None:
                q.add_used(p.tx_held.head, 0)
                self._count("tx_dropped_stopped")
            p.tx_held = None

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        if index // 2 >= len(self.pairs) or index % 2:
            return
        p = self.pairs[index // 2]
        if len(self.pairs) > 1:
            # The kernel steers flows over the attached queues only: a pair
            # the guest does not use must not receive any (QEMU's peer_detach).
            # The state lives on the parent's open file, across children, so
            # it is set every time; EINVAL means it already was.
            try:
                taplib.set_queue_attached(p.fd, enabled)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    self._count("tap_queue_errors", f"{'attach' if enabled else 'detach'} pair {p.index}: "
                                                    f"{exc.strerror}")
        if enabled:
            w = p.enabled_waiter
            if w is not None and not w.done():
                w.set_result(None)

    def reset(self) -> None:
        super().reset()
        self._mrg = self._guest_csum = False
        self._host_ok = 0

    # ------------------------------------------------------------ accounting

    def _count(self, what: str, detail: str = "") -> None:
        n = self.stats[what] + 1
        self.stats[what] = n
        if n & (n - 1) == 0:   # the 1st, 2nd, 4th, ... of each kind
            log.warning("device=%s %s (%d so far)%s", self.name, what, n, f": {detail}" if detail else "")

    # ------------------------------------------------------------------ wait

    async def _wait_fd(self, fd: int, writable: bool) -> None:
        """Until ``fd`` is readable (writable); the fd is watched only for
        this wait, so a tap that stays readable while the guest has no
        buffers never wakes the loop."""
        loop = self.ex.loop
        fut = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writable:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            if not loop.is_closed():
                (loop.remove_writer if writable else loop.remove_reader)(fd)

    # -------------------------------------------------------------------- rx

    async def _serve_rx(self, p: _Pair, queue: Any) -> None:
        """While frames flow, the tap's reader callback drains it straight
        into the ring (no task wake-up per frame batch); the task only
        handles what stops that: a disabled ring, an empty ring (sleep on the
        rx kick, the tap unwatched), a tap error (back off)."""
        loop = self.ex.loop
        while not queue.stopped and not queue.broken:
            if not queue.enabled:
                # "must not supply any new RX packets": the tap is not read.
                waiter = p.enabled_waiter = loop.create_future()
                try:
                    if not queue.enabled:
                        await waiter
                finally:
                    if p.enabled_waiter is waiter:
                        p.enabled_waiter = None
                continue
            stall = p.rx_stall = loop.create_future()
            loop.add_reader(p.fd, self._rx_ready, p, queue)
            if p.rx_pending:   # a frame held across the stall: deliver it even if the tap is empty
                loop.call_soon(self._rx_ready, p, queue)
            try:
                state = await stall
            finally:
                # (a restarted queue's new task may own the reader by now)
                if p.rx_stall is stall:
                    p.rx_stall = None
                    if not loop.is_closed():
                        loop.remove_reader(p.fd)
            if state == _WAIT_BUFFERS:
                self.stats["rx_no_buffers"] += 1
                if not await queue.wait_kick():
                    return
            elif state == _TAP_ERROR:
                await asyncio.sleep(TAP_ERROR_BACKOFF)

    def _rx_ready(self, p: _Pair, queue: Any) -> None:
        """The tap is readable: drain it; hand anything but "tap empty" or
        "batch done" (the callback runs again next loop turn) to the task."""
        stall = p.rx_stall
        if stall is None or stall.done() or queue is not p.rx_queue:
            return
        try:
            state = self._rx_drain(p, queue)
        except Exception as exc:  # noqa: BLE001 - nothing the guest does may escape
            log.error("device=%s rx queue %d failed: %r; queue marked broken", self.name, queue.index, exc)
            queue.mark_broken(f"device error: {exc!r}")
            state = _DISABLED
        if state != _WAIT_TAP and state != _MORE:
            self.ex.loop.remove_reader(p.fd)
            stall.set_result(state)

    def _rx_drain(self, p: _Pair, queue: Any) -> int:
        """Move up to BATCH frames from the tap into the ring; publish once."""
        fd = p.fd
        bufs = [p.rx_view]
        readv = os.readv
        state = _MORE
        for _ in range(BATCH):
            n = p.rx_pending
            if not n:
                try:
                    n = readv(fd, bufs)
                except BlockingIOError:
                    state = _WAIT_TAP
                    break
                except OSError as exc:
                    self._count("rx_tap_errors", f"read: {exc.strerror}")
                    state = _TAP_ERROR
                    break
                if not self._rx_check(p, n):
                    continue
                p.rx_pending = n
            if not queue.enabled:
                state = _DISABLED
                break
            if not self._rx_deliver(p, queue, n):
                state = _WAIT_BUFFERS
                break
            p.rx_pending = 0
        queue.flush()
        return state

    def _rx_check(self, p: _Pair, n: int) -> bool:
        """A frame from the tap the guest can take?  Fix up its header."""
        if n < HDR_SIZE + ETH_HLEN:
            self._count("rx_dropped_runt", f"{n} bytes from the tap")
            return False
        if n >= RX_BUF_SIZE:
            self._count("rx_dropped_truncated", f"frame of at least {n} bytes")
            return False
        buf = p.rx_buf
        flags = buf[0]
        if not self._guest_csum:
            if flags & HDR_F_NEEDS_CSUM or buf[1] != GSO_NONE:
                self._count("rx_dropped_offload", f"flags {flags:#x} gso_type {buf[1]} "
                                                  f"not negotiated by the guest")
                return False
            buf[0] = 0   # no DATA_VALID without GUEST_CSUM
        elif buf[1] != GSO_NONE:
            gso = buf[1] & ~GSO_ECN
            acked = self.acked_features
            if not ((gso == GSO_TCPV4 and acked & F_GUEST_TSO4) or (gso == GSO_TCPV6 and acked & F_GUEST_TSO6)) \
                    or buf[1] & GSO_ECN:
                self._count("rx_dropped_offload", f"gso_type {buf[1]} not negotiated by the guest")
                return False
        return True

    def _rx_deliver(self, p: _Pair, queue: Any, n: int) -> bool:
        """Copy the held frame (``n`` bytes) into guest buffers: True when
        done (delivered or dropped), False when the ring ran out (chains
        taken so far stay held)."""
        held = p.rx_held
        pop = queue.pop
        if not self._mrg:
            while not held:
                chain = pop()
                if chain is None:
                    return False
                if self._rx_usable(queue, chain):
                    held.append(chain)
            chain = held[0]
            if chain.writable_len < n:
                # Keep the chain for the next frame (it is not lost).
                self._count("rx_dropped_too_big", f"{n}-byte frame, {chain.writable_len}-byte buffer "
                                                  f"(no MRG_RXBUF)")
                return True
        else:
            have = p.rx_held_len
            while have < n:
                if p.rx_held_views >= queue.size:
                    # Every descriptor of the ring is held: the frame can never fit.
                    self._count("rx_dropped_too_big", f"{n}-byte frame, {have} bytes in the whole ring")
                    return True
                chain = pop()
                if chain is None:
                    p.rx_held_len = have
                    return False
                if not self._rx_usable(queue, chain, first=not held):
                    continue
                held.append(chain)
                have += chain.writable_len
                p.rx_held_views += len(chain.writable)
            p.rx_held_len = have
        src = p.rx_view
        struct.pack_into("<H", p.rx_buf, 10, len(held))   # num_buffers
        off = 0
        add_used = queue.add_used
        for chain in held:
            start = off
            for v in chain.writable:
                k = len(v)
                if k > n - off:
                    k = n - off
                    if k <= 0:
                        break
                    v[:k] = src[off:n]
                else:
                    v[:] = src[off:off + k]
                off += k
            add_used(chain.head, off - start)
        held.clear()
        p.rx_held_len = p.rx_held_views = 0
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += n - HDR_SIZE
        return True

    def _rx_usable(self, queue: Any, chain: Any, first: bool = True) -> bool:
        """An rx chain must be device-writable only and (the first of a
        frame) hold the header; a bad one is returned empty and counted."""
        if chain.readable or chain.writable_len < (HDR_SIZE if first else 1):
            self._count("rx_bad_buffers", f"chain {chain!r}")
            queue.add_used(chain.head, 0)
            return False
        return True

    # -------------------------------------------------------------------- tx

    async def _serve_tx(self, p: _Pair, queue: Any) -> None:
        """While the task sleeps in ``wait_kick``, a kick drains the ring
        from the kick fd's callback (``serve_hook``, as the block device
        does); a full tap (EAGAIN) withdraws that and the task waits for the
        tap to take frames again."""
        def drain() -> None:
            if self._tx_drain(p, queue) == _WAIT_TAP:
                queue.serve_hook = None

        self._hook(queue.index, queue, drain)
        try:
            while await queue.wait_kick():
                while True:
                    state = self._tx_drain(p, queue)
                    if state == _WAIT_TAP:
                        await self._wait_fd(p.fd, True)
                    elif state == _MORE:
                        await asyncio.sleep(0)
                    else:
                        break
                if queue.index in self._hooked:
                    queue.serve_hook = drain
        finally:
            if queue.serve_hook is drain:
                queue.serve_hook = None

    def _tx_drain(self, p: _Pair, queue: Any) -> int:
        """Write up to BATCH chains to the tap; publish once."""
        fd = p.fd
        pop = queue.pop
        add_used = queue.add_used
        writev = os.writev
        state = _MORE
        for _ in range(BATCH):
            chain = p.tx_held
            if chain is None:
                chain = pop()
                if chain is None:
                    state = _EMPTY
                    break
            else:
                p.tx_held = None
            if not queue.enabled:
                # Started but disabled: "process and discard any TX packets".
                self.stats["tx_dropped_disabled"] += 1
                add_used(chain.head, 0)
                continue
            iov = self._tx_check(p, chain)
            if iov is not None:
                try:
                    writev(fd, iov)
                except BlockingIOError:
                    p.tx_held = chain
                    state = _WAIT_TAP
                    break
                except OSError as exc:
                    self._count("tx_tap_errors", f"write: {errno.errorcode.get(exc.errno, exc.errno)} "
                                                 f"{exc.strerror}")
                else:
                    self.stats["tx_packets"] += 1
                    self.stats["tx_bytes"] += chain.readable_len - HDR_SIZE
            add_used(chain.head, 0)
        queue.flush()
        # A write to the tap runs the host's stack on return (softirq): a reply
        # (ARP, ICMP, TCP ACK) is often queued already; take it now rather
        # than one event-loop turn later.
        if p.rx_stall is not None and p.rx_queue is not None:
            self._rx_ready(p, p.rx_queue)
        return state

    def _tx_check(self, p: _Pair, chain: Any) -> list[Any] | None:
        """The iovec for one tx chain (a checked copy of the header, then
        the frame in guest memory), or None if it is dropped (counted)."""
        r = chain.readable
        total = chain.readable_len
        if chain.writable:
            self._count("tx_dropped_bad_chain", "device-writable buffer in a tx chain")
            return None
        if total < HDR_SIZE + ETH_HLEN:
            self._count("tx_dropped_short", f"{total}-byte chain (header + Ethernet header is "
                                            f"{HDR_SIZE + ETH_HLEN})")
            return None
        if total > HDR_SIZE + MAX_FRAME:
            self._count("tx_dropped_oversize", f"{total}-byte chain")
            return None
        if len(r) > MAX_TX_BUFFERS:
            self._count("tx_dropped_bad_chain", f"{len(r)} buffers (at most {MAX_TX_BUFFERS})")
            return None
        hdr = p.tx_hdr
        first = r[0]
        if len(first) > HDR_SIZE:
            hdr[:] = first[:HDR_SIZE]
            iov = [hdr, first[HDR_SIZE:], *r[1:]]
        elif len(first) == HDR_SIZE:
            hdr[:] = first
            iov = [hdr, *r[1:]]
        else:   # the header split over buffers
            got = 0
            iov = [hdr]
            for v in r:
                k = min(len(v), HDR_SIZE - got)
                if k:
                    hdr[got:got + k] = v[:k]
                    got += k
                if k < len(v):
                    iov.append(v[k:])
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = _unpack_hdr(hdr)
        length = total - HDR_SIZE
        feats = self._host_ok
        flags &= HDR_F_NEEDS_CSUM   # DATA_VALID and unknown bits are not the driver's to set
        if flags:
            if not feats & F_CSUM:
                self._count("tx_dropped_bad_header", "NEEDS_CSUM without VIRTIO_NET_F_CSUM")
                return None
            if csum_start + csum_offset + 2 > length:
                self._count("tx_dropped_bad_header", f"csum_start {csum_start} + csum_offset "
                                                     f"{csum_offset} outside a {length}-byte frame")
                return None
        if gso_type != GSO_NONE:
            if not ((gso_type == GSO_TCPV4 and feats & F_HOST_TSO4)
                    or (gso_type == GSO_TCPV6 and feats & F_HOST_TSO6)):
                self._count("tx_dropped_bad_header", f"gso_type {gso_type:#x} not negotiated")
                return None
            if not flags:
                self._count("tx_dropped_bad_header", "GSO without NEEDS_CSUM")
                return None
            if not 1 <= gso_size <= self.max_frame - ETH_HLEN - VLAN_HLEN or gso_size >= length:
                self._count("tx_dropped_bad_header", f"gso_size {gso_size} for a {length}-byte frame")
                return None
        else:
            gso_size = 0
            if length > self.max_frame:
                self._count("tx_dropped_over_mtu", f"{length}-byte frame, at most {self.max_frame}")
                return None
        if hdr_len > length:
            hdr_len = length
        _pack_hdr(hdr, 0, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
        return iov


# --------------------------------------------------------------------------
# Builder

def parse_mac(name: str, text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` -> six bytes; a unicast, non-zero address only."""
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(x) != 2 for x in parts):
            raise ValueError
        mac = bytes(int(x, 16) for x in parts)
    except ValueError:
        raise ConfigError("not six hex octets (aa:bb:cc:dd:ee:ff)", "mac", name, text) from None
    if mac[0] & 1:
        raise ConfigError("a multicast address", "mac", name, text)
    if mac == bytes(6):
        raise ConfigError("all zeros", "mac", name, text)
    return mac


def _mac_check(text: str) -> str | None:
    try:
        parse_mac("", text)
    except ConfigError as e:
        return e.message
    return None


class NetBuilder(DeviceBuilder):
    """Opens the tap in the parent; builds a NetDevice in the child."""

    def __init__(self, name: str, tap: taplib.Tap, *, mtu: int | None, mac: bytes | None,
                 poll_max_ns: int = DEFAULT_POLL_US * 1000) -> None:
        self.name = name
        self.poll_max_ns = poll_max_ns
        self.tap = tap
        self.mtu = mtu
        self.mac = mac
        #: The device built last (in this process): tests read its counters.
        self.device: NetDevice | None = None

    @classmethod
    def from_options(cls, name: str, options: dict[str, str]) -> "NetBuilder":
        """Check the options (``OPTIONS``) and how they combine; open or adopt the tap."""
        o = cls.declaration.parse(name, options)
        tap_name: str | None = o["tap-name"]
        tap_fd: str | None = o["tap-fd"]
        mac_text: str | None = o["mac"]
        mtu_given = o["mtu"] is not None
        mtu: int = o["mtu"] if mtu_given else 1500
        pairs_given = any(k in options for k in ("num-queues", "num_queues", "vq-pairs", "vq_pairs"))
        pairs: int = o["num-queues"]
        up: bool = o["link-up"]
        poll_us: int = o["poll-us"]
        if (tap_name is None) == (tap_fd is None):
            raise ConfigError("exactly one of tap-name= and tap-fd= is required", "tap-name", name, tap_name)
        mac = parse_mac(name, mac_text) if mac_text is not None else None
        if tap_name is not None:
            try:
                tap = taplib.open_tap(tap_name, pairs, mtu=mtu if mtu_given else None, up=up)
            except taplib.TapError as exc:
                raise ConfigError(str(exc.strerror or exc), "tap-name", name, tap_name) from None
        else:
            assert tap_fd is not None
            try:
                fds = [int(x) for x in tap_fd.split(":")]
            except ValueError:
                raise ConfigError("not N or N:M:... (fd numbers)", "tap-fd", name, tap_fd) from None
            if pairs_given and pairs != len(fds):
                raise ConfigError(f"num-queues={pairs} but tap-fd= gives {len(fds)} fds", "tap-fd", name, tap_fd)
            if len(fds) > MAX_PAIRS or len(set(fds)) != len(fds) or min(fds) < 3:
                raise ConfigError(f"1..{MAX_PAIRS} distinct fds above stdio", "tap-fd", name, tap_fd)
            try:
                tap = taplib.adopt_tap_fds(fds, mtu=mtu if mtu_given else None, up=up)
            except taplib.TapError as exc:
                raise ConfigError(str(exc.strerror or exc), "tap-fd", name, tap_fd) from None
        if mtu_given and tap.mtu != mtu:
            tap.close()
            raise ConfigError(f"the tap's MTU is {tap.mtu}", "mtu", name, mtu)
        builder = cls(name, tap, mtu=mtu if mtu_given else None, mac=mac, poll_max_ns=poll_us * 1000)
        builder.memory_limit = o["memory-limit"]
        return builder

    def keep_fds(self) -> list[int]:
        return [] if self.tap.closed else list(self.tap.fds)

    def build(self, ex: Executor) -> NetDevice:
        if self.tap.closed:
            raise RuntimeError(f"{self.name}: builder already closed")
        self.device = NetDevice(ex, self.name, list(self.tap.fds), link_mtu=self.tap.mtu,
                                mtu=self.mtu, mac=self.mac, poll_max_ns=self.poll_max_ns)
        return self.device

    def close(self) -> None:
        self.tap.close()


# --------------------------------------------------------------------------
# Declaration: the one place the rest of the project learns about "net"

#: crosvm ``--net`` keys, plus ``link-up`` and ``poll-us``.
OPTIONS = (
    Option("tap-name", str, help="the tap to create or attach (a template like tap%d works); "
           "exactly one of tap-name and tap-fd", aliases=("tap_name",), metavar="NAME"),
    Option("tap-fd", str, help="taps a caller opened, one fd per queue pair (N or N:M:...)",
           aliases=("tap_fd",), metavar="FDS"),
    Option("mac", str, help="told to front-ends that read the config space (QEMU keeps its own)",
           check=_mac_check, metavar="MAC"),
    Option("mtu", int, None, f"set on the tap and offered as VIRTIO_NET_F_MTU ({taplib.MIN_MTU}..{taplib.MAX_MTU})",
           lo=taplib.MIN_MTU, hi=taplib.MAX_MTU, metavar="BYTES"),
    Option("num-queues", int, 1, f"queue pairs (1..{MAX_PAIRS})", aliases=("num_queues", "vq-pairs", "vq_pairs"),
           lo=1, hi=MAX_PAIRS, metavar="N"),
    Option("link-up", bool, True, "bring the tap up", aliases=("link_up",)),
    Option("poll-us", int, DEFAULT_POLL_US, "bound of the tx ring's adaptive polling before it sleeps on "
           "the kick, in µs (0..1000)", aliases=("poll_us",), lo=0, hi=1000, metavar="US"),
)

DEVICE = DeviceType(
    name="net",
    builder=NetBuilder,
    summary="virtio-net on a tap the supervisor opens",
    options=OPTIONS,
    seccomp_policy="net.policy",
    child_modules=("devices.tap",),
    # crosvm --net keys that concern the VMM side (or are unneeded here), accepted and ignored.
    ignored=("vhost-net", "packed-queue"),
)
