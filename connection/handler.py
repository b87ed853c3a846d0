"""The back-end side of the vhost-user protocol for one device.

``Backend`` is what ``VhostUserConnection.run_req_handler`` drives: it turns
one front-end request into an optional reply.  ``DeviceRequestHandler`` is
the one real implementation: it keeps the negotiated state (features, guest
memory, rings, inflight region) and hands started queues to a
``VhostUserDevice``, which then only ever sees guest buffers.  Each ring's
configuration is a ``QueueConfig``; starting one (``activate``) gives the
running ``Virtqueue`` the device serves.

Rules it follows (vhost-user spec, "Ring states"): every ring begins stopped
and disabled; a ring starts when its kick fd arrives (SET_VRING_KICK, also
with the NOFD polling bit) and stops on GET_VRING_BASE; rings are enabled at
once by a SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES (tested as a
mask, not libvhost-user's bit number), else by SET_VRING_ENABLE.
"""

from __future__ import annotations

import abc
import logging
import os
import stat
from collections.abc import Callable

from .device import VhostUserDevice
from .errors import ProtocolError
from .executor import Executor
from .inflight import InflightRegion
from .memory import GuestMemory
from .protocol import (CONFIG_FLAG_FRONTEND, CONFIG_FLAG_MIGRATION, MAX_CONFIG_SIZE, MAX_MEM_SLOTS,
                       FrontendReq, Message, ProtocolFeature, VirtioFeature,
                       decode_config, decode_inflight, decode_mem_table, decode_single_region,
                       decode_u64, decode_vring_addr, decode_vring_fd_payload, decode_vring_state,
                       encode_config, encode_inflight, encode_u64, encode_vring_state)
from .virtqueue import QueueConfig

log = logging.getLogger("vhost.connection")

Reply = tuple[bytes, list[int]]

#: Requests whose definition includes a reply of their own.  REPLY_ACK never
#: applies to them, and an error while answering one ends the connection,
#: since the front-end waits for a payload of a given shape, not an ack.
REQUESTS_WITH_REPLY = frozenset({
    FrontendReq.GET_FEATURES, FrontendReq.GET_PROTOCOL_FEATURES, FrontendReq.GET_VRING_BASE,
    FrontendReq.GET_QUEUE_NUM, FrontendReq.GET_CONFIG, FrontendReq.GET_MAX_MEM_SLOTS,
    FrontendReq.GET_STATUS, FrontendReq.GET_INFLIGHT_FD, FrontendReq.SET_LOG_BASE,
    FrontendReq.IOTLB_MSG, FrontendReq.POSTCOPY_ADVISE, FrontendReq.POSTCOPY_END,
    FrontendReq.GET_SHARED_OBJECT, FrontendReq.SET_DEVICE_STATE_FD, FrontendReq.CHECK_DEVICE_STATE,
    FrontendReq.CREATE_CRYPTO_SESSION,
})

#: Protocol features this handler implements for every device.  CONFIG is
#: added only when the device asks for it (it has a config space).
#: (Plain ints: ``~`` on an IntFlag only inverts the known bits.)
GENERIC_PROTOCOL_FEATURES = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                                | ProtocolFeature.INFLIGHT_SHMFD | ProtocolFeature.CONFIGURE_MEM_SLOTS
                                | ProtocolFeature.RESET_DEVICE | ProtocolFeature.STATUS)
#: Device-specific protocol features the handler knows how to serve
#: (MTU: NET_SET_MTU, handed to ``VhostUserDevice.set_mtu``).
DEVICE_PROTOCOL_FEATURES = int(ProtocolFeature.CONFIG | ProtocolFeature.MTU)

#: Virtio bits never offered whatever the device says: the rings are split
#: rings only, dirty logging (LOG_ALL/LOG_SHMFD) is not implemented, and
#: neither is the IOTLB that ACCESS_PLATFORM would make every address go through.
_NEVER_OFFERED = int(VirtioFeature.RING_PACKED | VirtioFeature.LOG_ALL | VirtioFeature.ACCESS_PLATFORM)
_F_PROTOCOL_FEATURES = int(VirtioFeature.PROTOCOL_FEATURES)

#: How many fds each request may carry (anything else is refused); requests
#: absent here take none.  SET_MEM_TABLE is checked against its region count.
_FDS_ALLOWED: dict[int, tuple[int, int]] = {
    FrontendReq.SET_MEM_TABLE: (0, 8),
    FrontendReq.SET_VRING_KICK: (0, 1),
    FrontendReq.SET_VRING_CALL: (0, 1),
    FrontendReq.SET_VRING_ERR: (0, 1),
    FrontendReq.SET_INFLIGHT_FD: (1, 1),
    FrontendReq.ADD_MEM_REG: (1, 1),
    FrontendReq.REM_MEM_REG: (0, 1),   # the spec allows one, which is then closed
}


class RequestRefused(ProtocolError):
    """A well-formed request the back-end declines (a write to a read-only
    config field): a failure ack where one is asked for, otherwise logged;
    unlike other protocol errors it does not end the connection."""


class Backend(abc.ABC):
    """What ``run_req_handler`` drives: one call per front-end request."""

    @abc.abstractmethod
    async def handle(self, msg: Message) -> Reply | None:
        """Answer ``msg``: the reply payload and fds to attach, or None.

        Fds left in ``msg.fds`` are closed by the caller afterwards; fds in a
        reply stay owned by the backend (the caller only sends them).
        Raises ``VhostUserError`` for a request that is malformed or not
        allowed now."""

    @abc.abstractmethod
    def on_disconnect(self) -> None:
        """The front-end is gone: release everything this connection set up."""

    @property
    def reply_ack_enabled(self) -> bool:
        """True once REPLY_ACK was negotiated: NEED_REPLY then gets a u64 ack."""
        return False


class DeviceRequestHandler(Backend):
    """The back-end of one device: answers every front-end request."""

    def __init__(self, device: VhostUserDevice, ex: Executor) -> None:
        self.device = device
        self.ex = ex
        self.num_queues = int(device.max_queue_num())
        if not 1 <= self.num_queues <= 256:
            raise ValueError(f"device max_queue_num {self.num_queues} outside 1..256")
        self.mem = GuestMemory()
        self.queues: list[QueueConfig] = self._new_queues()
        self.owned = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self._protocol_set = False   # SET_PROTOCOL_FEATURES seen on this connection
        #: Regions REM_MEM_REG removed on this connection (gpa, uaddr, size), so a
        #: second vhost_dev removing the same one is not an error (see _rem_mem_reg).
        self._removed: dict[tuple[int, int, int], None] = {}
        self.status = 0
        self.inflight: InflightRegion | None = None
        self._dispatch: dict[int, Callable[[Message], Reply | None]] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_kick,
            FrontendReq.SET_VRING_CALL: self._set_vring_call,
            FrontendReq.SET_VRING_ERR: self._set_vring_err,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.GET_INFLIGHT_FD: self._get_inflight_fd,
            FrontendReq.SET_INFLIGHT_FD: self._set_inflight_fd,
            FrontendReq.RESET_DEVICE: self._reset_device,
            FrontendReq.GET_STATUS: self._get_status,
            FrontendReq.SET_STATUS: self._set_status,
            FrontendReq.NET_SET_MTU: self._net_set_mtu,
        }
        #: Protocol feature each request needs negotiated before it is served.
        self._gates: dict[int, int] = {
            FrontendReq.GET_QUEUE_NUM: ProtocolFeature.MQ,
            FrontendReq.GET_CONFIG: ProtocolFeature.CONFIG,
            FrontendReq.SET_CONFIG: ProtocolFeature.CONFIG,
            FrontendReq.GET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
            FrontendReq.SET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
            FrontendReq.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
            FrontendReq.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
            FrontendReq.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
            FrontendReq.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
            FrontendReq.GET_STATUS: ProtocolFeature.STATUS,
            FrontendReq.SET_STATUS: ProtocolFeature.STATUS,
            FrontendReq.NET_SET_MTU: ProtocolFeature.MTU,
        }

    # ------------------------------------------------------------------
    # Backend

    @property
    def reply_ack_enabled(self) -> bool:
        return bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)

    def offered_features(self) -> int:
        """GET_FEATURES: the device's bits (less packed rings and dirty
        logging, which nothing here implements) plus PROTOCOL_FEATURES."""
        return (int(self.device.features()) & ~_NEVER_OFFERED) | _F_PROTOCOL_FEATURES

    def offered_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES: what this handler implements, and CONFIG
        when the device has a config space."""
        return GENERIC_PROTOCOL_FEATURES | (int(self.device.protocol_features()) & DEVICE_PROTOCOL_FEATURES)

    async def handle(self, msg: Message) -> Reply | None:
        method = self._dispatch.get(msg.request)
        if method is None:
            raise ProtocolError(f"{msg.name}: request not supported (code {msg.request})")
        gate = self._gates.get(msg.request)
        if gate is not None and not self.acked_protocol_features & gate:
            raise ProtocolError(f"{msg.name}: protocol feature {ProtocolFeature(gate).name} not negotiated")
        low, high = _FDS_ALLOWED.get(msg.request, (0, 0))
        if not low <= len(msg.fds) <= high:
            raise ProtocolError(f"{msg.name}: {len(msg.fds)} file descriptors attached, "
                                f"expected {low}..{high}")
        return method(msg)

    def on_disconnect(self) -> None:
        """Stop every queue, unmap memory, close fds; the handler is then as
        new, so a later front-end starts from scratch.  The inflight region
        is only unmapped: the front-end owns it and brings it back with
        SET_INFLIGHT_FD on its next connection."""
        self._stop_all_queues()
        self._close_queues()
        self._drop_inflight()
        self._clear_memory()
        self.owned = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self._protocol_set = False
        self._removed.clear()
        self.status = 0

    # ------------------------------------------------------------------
    # helpers

    def _new_queues(self) -> list[QueueConfig]:
        # The device's name (when it has one) tags the queues' log lines.
        name = str(getattr(self.device, "name", "") or "")
        return [QueueConfig(i, int(self.device.max_queue_size), self.ex.loop, name=name)
                for i in range(self.num_queues)]

    def _queue(self, msg: Message, index: int) -> QueueConfig:
        if not 0 <= index < self.num_queues:
            raise ProtocolError(f"{msg.name}: vring index {index} out of range (device has {self.num_queues})")
        return self.queues[index]

    def _stopped_queue(self, msg: Message, index: int) -> QueueConfig:
        queue = self._queue(msg, index)
        if queue.started:
            raise ProtocolError(f"{msg.name}: vring {index} is started; GET_VRING_BASE must stop it first")
        return queue

    def _stop_queue(self, index: int) -> int:
        """Stop one started ring: the device first (no guest access after it
        returns), then the ring itself.  Returns the next avail index."""
        queue = self.queues[index]
        if queue.started:
            try:
                self.device.stop_queue(index)
            except Exception:  # a device bug must not keep the ring running
                log.exception("device stop_queue(%d) failed", index)
        return queue.stop()

    def _stop_all_queues(self) -> None:
        for i, queue in enumerate(self.queues):
            if queue.started:
                try:
                    self._stop_queue(i)
                except Exception:
                    log.exception("stopping vring %d failed", i)

    def _close_queues(self) -> None:
        for queue in self.queues:
            try:
                queue.close()
            except Exception:
                log.exception("closing vring %d failed", queue.index)
        self.queues = self._new_queues()

    def _drop_inflight(self) -> None:
        if self.inflight is not None:
            region, self.inflight = self.inflight, None
            region.close()

    def _clear_memory(self) -> None:
        try:
            self.mem.clear()
        except Exception:
            # Views still alive somewhere (a device holding a chain): start
            # over with a fresh object; the old maps go with their last view.
            log.exception("unmapping guest memory failed")
            self.mem = GuestMemory()

    def _remap_queues(self) -> None:
        """Re-translate ring pointers of configured queues after a memory
        table change; a ring that no longer maps breaks that queue only."""
        for queue in self.queues:
            queue.remap(self.mem)   # a ring that no longer maps breaks, nothing raises

    def _start_queue(self, msg: Message, index: int) -> None:
        queue = self.queues[index]
        if queue.addr is None:
            raise ProtocolError(f"{msg.name}: vring {index} started before SET_VRING_ADDR")
        if self.inflight is not None and index < self.inflight.num_queues:
            queue.set_inflight(self.inflight.queue(index))   # activate() checks it fits the ring
        else:
            queue.set_inflight(None)
        try:
            running = queue.activate(self.mem, self.acked_features)
        except OSError as e:   # e.g. the kick fd cannot be polled
            raise ProtocolError(f"{msg.name}: vring {index} cannot start: {e}") from e
        try:
            self.device.start_queue(index, running, self.mem)
        except Exception as e:
            queue.stop()
            raise ProtocolError(f"{msg.name}: device refused to start vring {index}: {e}") from e

    # ------------------------------------------------------------------
    # features and ownership

    def _get_features(self, msg: Message) -> Reply:
        return encode_u64(self.offered_features()), []

    def _set_features(self, msg: Message) -> None:
        features = decode_u64(msg.request, msg.payload)
        unknown = features & ~self.offered_features()
        if unknown:
            raise ProtocolError(f"SET_FEATURES: bits {unknown:#x} were not offered "
                                f"(features {features:#x}, offered {self.offered_features():#x})")
        try:
            self.device.ack_features(features & ~_F_PROTOCOL_FEATURES)
        except ValueError as e:
            raise ProtocolError(f"SET_FEATURES: device refused features {features:#x}: {e}") from e
        self.acked_features = features
        if not features & _F_PROTOCOL_FEATURES:
            self._protocol_set = False   # bit 30 not acked after all: no SET_VRING_ENABLE
            for queue in self.queues:
                queue.enabled = True
        return None

    def _set_owner(self, msg: Message) -> None:
        if self.owned:
            raise ProtocolError("SET_OWNER: the session already has an owner")
        self.owned = True
        return None

    def _reset_owner(self, msg: Message) -> None:
        """Deprecated; QEMU sends it as the device reset when RESET_DEVICE is
        not negotiated.  Rings stop and the device resets; the connection's
        state (features, memory, inflight) stays."""
        self._reset_rings_and_device()
        self.owned = False
        return None

    def _get_protocol_features(self, msg: Message) -> Reply:
        return encode_u64(self.offered_protocol_features()), []

    def _set_protocol_features(self, msg: Message) -> None:
        features = decode_u64(msg.request, msg.payload)
        unknown = features & ~self.offered_protocol_features()
        if unknown:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES: bits {unknown:#x} were not offered "
                                f"(features {features:#x}, offered {self.offered_protocol_features():#x})")
        self.acked_protocol_features = features
        self._protocol_set = True
        return None

    def _reset_rings_and_device(self) -> None:
        self._stop_all_queues()
        self._close_queues()
        try:
            self.device.reset()
        except Exception:
            log.exception("device reset failed")

    def _reset_device(self, msg: Message) -> None:
        """Disable all rings and reset device state, keeping ownership and
        the connection (protocol features, memory, inflight region)."""
        self._reset_rings_and_device()
        self.acked_features = 0
        self.status = 0
        return None

    def _get_status(self, msg: Message) -> Reply:
        return encode_u64(self.status), []

    def _set_status(self, msg: Message) -> None:
        status = decode_u64(msg.request, msg.payload)
        if status > 0xFF:
            raise ProtocolError(f"SET_STATUS: status {status:#x} does not fit the 8-bit device status")
        self.status = status
        return None

    def _net_set_mtu(self, msg: Message) -> None:
        """NET_SET_MTU (net devices that offer protocol MTU): a refusal is a
        failure ack, after which QEMU does not start the rings."""
        mtu = decode_u64(msg.request, msg.payload)
        try:
            self.device.set_mtu(mtu)
        except ValueError as e:
            raise RequestRefused(f"NET_SET_MTU: {e}") from e
        return None

    def _get_queue_num(self, msg: Message) -> Reply:
        return encode_u64(self.num_queues), []

    # ------------------------------------------------------------------
    # memory

    def _set_mem_table(self, msg: Message) -> None:
        regions = decode_mem_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise ProtocolError(f"SET_MEM_TABLE: {len(regions)} regions but {len(msg.fds)} fds attached")
        self._clear_memory()
        try:
            for region in regions:
                self.mem.add_region(region, msg.take_fd())
        except BaseException:
            self._clear_memory()
            self._remap_queues()
            raise
        self._remap_queues()
        return None

    def _get_max_mem_slots(self, msg: Message) -> Reply:
        return encode_u64(MAX_MEM_SLOTS), []

    def _add_mem_reg(self, msg: Message) -> None:
        region = decode_single_region(msg.payload)
        if any(r.matches(region) and r.mmap_offset == region.mmap_offset for r in self.mem.regions):
            # QEMU's multiqueue net runs one vhost_dev per queue pair on one
            # socket, each with its own region list: pair 1 adds what pair 0
            # added.  The same region again is a no-op (its fd is closed).
            os.close(msg.take_fd())
            return None
        self.mem.add_region(region, msg.take_fd())
        self._remap_queues()
        return None

    def _rem_mem_reg(self, msg: Message) -> None:
        region = decode_single_region(msg.payload)
        key = (region.guest_phys_addr, region.userspace_addr, region.memory_size)
        if key in self._removed and not any(r.matches(region) for r in self.mem.regions):
            # ... and removes what pair 0 already removed (see _add_mem_reg);
            # a region never added is still refused.
            return None
        self.mem.remove_region(region)
        self._removed[key] = None
        while len(self._removed) > MAX_MEM_SLOTS:   # bounded: forget the oldest
            del self._removed[next(iter(self._removed))]
        self._remap_queues()
        return None

    # ------------------------------------------------------------------
    # rings

    def _set_vring_num(self, msg: Message) -> None:
        state = decode_vring_state(msg.payload)
        self._stopped_queue(msg, state.index).set_size(state.num)
        return None

    def _set_vring_addr(self, msg: Message) -> None:
        addr = decode_vring_addr(msg.payload)
        # Allowed on a started ring too (the spec lets the front-end move
        # rings while they run, e.g. for logging); the ring maps them at once.
        queue = self._queue(msg, addr.index)
        if addr.flags & ~1:
            raise ProtocolError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x} for vring {addr.index}")
        queue.set_addresses(addr)
        return None

    def _set_vring_base(self, msg: Message) -> None:
        state = decode_vring_state(msg.payload)
        queue = self._stopped_queue(msg, state.index)
        if state.num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: base {state.num:#x} for vring {state.index} "
                                f"exceeds a split ring's 16-bit index")
        queue.set_base(state.num)
        return None

    def _get_vring_base(self, msg: Message) -> Reply:
        state = decode_vring_state(msg.payload)
        self._queue(msg, state.index)
        num = self._stop_queue(state.index)
        # As libvhost-user and rust-vmm: the fds go with the stop; a restart
        # brings new ones (and the front-end may close its ends meanwhile).
        queue = self.queues[state.index]
        queue.set_kick_fd(None)
        queue.set_call_fd(None)
        return encode_vring_state(state.index, num), []

    def _vring_fd(self, msg: Message) -> tuple[int, int | None]:
        index, nofd = decode_vring_fd_payload(msg.request, msg.payload)
        self._queue(msg, index)
        if nofd:
            if msg.fds:
                raise ProtocolError(f"{msg.name}: NOFD set for vring {index} but an fd is attached")
            return index, None
        if not msg.fds:
            raise ProtocolError(f"{msg.name}: no fd attached for vring {index} and NOFD not set")
        fd = msg.fds[0]
        # An eventfd is an anonymous inode (no file type bits); anything else
        # (a file, a pipe that could fill up) is refused before we poll or
        # write it.  fstat needs no /proc, which the jail may not have.
        if stat.S_IFMT(os.fstat(fd).st_mode) != 0:
            raise ProtocolError(f"{msg.name}: fd for vring {index} is not an eventfd")
        os.set_blocking(fd, False)   # QEMU's are already; a write must never block us
        return index, msg.take_fd()

    def _set_vring_kick(self, msg: Message) -> None:
        index, _nofd = decode_vring_fd_payload(msg.request, msg.payload)
        self._stopped_queue(msg, index)   # checked before the fd is taken
        index, fd = self._vring_fd(msg)
        self.queues[index].set_kick_fd(fd)
        self._start_queue(msg, index)
        return None

    def _set_vring_call(self, msg: Message) -> None:
        index, fd = self._vring_fd(msg)
        self.queues[index].set_call_fd(fd)
        if fd is not None:
            # As libvhost-user, "in case of I/O hang after reconnecting": a
            # completion published before a back-end crash (or before the fd
            # changed) may have lost its notification.  One spurious
            # interrupt costs the driver a look at the used ring; a lost one
            # leaves it waiting forever.
            try:
                os.eventfd_write(fd, 1)
            except OSError as e:  # a full counter has a wake-up pending anyway
                log.debug("SET_VRING_CALL: initial signal of vring %d: %s", index, e)
        return None

    def _set_vring_err(self, msg: Message) -> None:
        index, fd = self._vring_fd(msg)
        self.queues[index].set_err_fd(fd)
        return None

    def _set_vring_enable(self, msg: Message) -> None:
        state = decode_vring_state(msg.payload)
        # QEMU's net device sends it before SET_FEATURES (at init, for every
        # pair), so a SET_PROTOCOL_FEATURES not yet followed by a SET_FEATURES
        # without bit 30 also counts.
        if not self.acked_features & _F_PROTOCOL_FEATURES and not self._protocol_set:
            raise ProtocolError("SET_VRING_ENABLE: VHOST_USER_F_PROTOCOL_FEATURES not negotiated")
        queue = self._queue(msg, state.index)
        if state.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: value {state.num} for vring {state.index} is not 0 or 1")
        queue.enabled = bool(state.num)
        try:
            self.device.set_queue_enabled(state.index, queue.enabled)
        except Exception:  # a device bug must not end the connection
            log.exception("device set_queue_enabled(%d, %s) failed", state.index, queue.enabled)
        return None

    # ------------------------------------------------------------------
    # config space

    def _get_config(self, msg: Message) -> Reply:
        access = decode_config(msg.request, msg.payload)
        try:
            data = bytes(self.device.read_config(access.offset, access.size))
            if len(data) != access.size:
                raise ValueError(f"device returned {len(data)} bytes for size {access.size}")
        except ValueError as e:
            # The spec's error signal is an empty payload, never a short one.
            log.warning("GET_CONFIG offset=%d size=%d refused: %s", access.offset, access.size, e)
            return b"", []
        return encode_config(access.offset, access.flags, data), []

    def _set_config(self, msg: Message) -> None:
        access = decode_config(msg.request, msg.payload)
        if access.flags not in (CONFIG_FLAG_FRONTEND, CONFIG_FLAG_MIGRATION):
            raise ProtocolError(f"SET_CONFIG: flags {access.flags:#x} are neither FRONTEND (0) nor MIGRATION (1)")
        if access.offset + access.size > MAX_CONFIG_SIZE:
            raise RequestRefused(f"SET_CONFIG: offset {access.offset} + size {access.size} "
                                 f"beyond the {MAX_CONFIG_SIZE}-byte config space")
        try:
            self.device.write_config(access.offset, access.data)
        except ValueError as e:
            raise RequestRefused(f"SET_CONFIG offset={access.offset} size={access.size} refused: {e}") from e
        return None

    # ------------------------------------------------------------------
    # inflight tracking

    def _any_started(self) -> bool:
        return any(q.started for q in self.queues)

    def _get_inflight_fd(self, msg: Message) -> Reply:
        info = decode_inflight(msg.payload)
        if not 1 <= info.num_queues <= self.num_queues:
            raise ProtocolError(f"GET_INFLIGHT_FD: num_queues {info.num_queues} outside 1..{self.num_queues}")
        if not 1 <= info.queue_size <= int(self.device.max_queue_size):
            raise ProtocolError(f"GET_INFLIGHT_FD: queue_size {info.queue_size} outside "
                                f"1..{self.device.max_queue_size}")
        if self._any_started():
            raise ProtocolError("GET_INFLIGHT_FD: rings are started")
        region = InflightRegion.create(info.num_queues, info.queue_size)
        self._drop_inflight()
        # Kept as the current region, as libvhost-user does; the front-end
        # sends it back with SET_INFLIGHT_FD, which replaces it.
        self.inflight = region
        return encode_inflight(region.info), [region.fd]

    def _set_inflight_fd(self, msg: Message) -> None:
        info = decode_inflight(msg.payload)
        if not 1 <= info.num_queues <= self.num_queues:
            raise ProtocolError(f"SET_INFLIGHT_FD: num_queues {info.num_queues} outside 1..{self.num_queues}")
        if not 1 <= info.queue_size <= int(self.device.max_queue_size):
            raise ProtocolError(f"SET_INFLIGHT_FD: queue_size {info.queue_size} outside "
                                f"1..{self.device.max_queue_size}")
        if self._any_started():
            raise ProtocolError("SET_INFLIGHT_FD: rings are started")
        region = InflightRegion.from_fd(msg.take_fd(), info)
        self._drop_inflight()
        self.inflight = region
        return None
