"""What a device implements, and what builds it.

Modelled on crosvm's ``VhostUserDevice`` and rust-vmm's
``VhostUserBackend``: a device states its features and config space and is
handed started queues; the request handler does all the protocol work.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .executor import Executor
    from .memory import GuestMemory
    from .virtqueue import Virtqueue


class VhostUserDevice(abc.ABC):
    """One virtio device served over vhost-user, inside the (jailed) child."""

    #: Largest queue size the device accepts in SET_VRING_NUM.
    max_queue_size: int = 1024

    @abc.abstractmethod
    def max_queue_num(self) -> int:
        """Number of queues the device supports (GET_QUEUE_NUM)."""

    @abc.abstractmethod
    def features(self) -> int:
        """Virtio feature bits offered, including VERSION_1 and ring features.
        The handler adds VHOST_USER_F_PROTOCOL_FEATURES itself."""

    def protocol_features(self) -> int:
        """Device-specific protocol features (e.g. CONFIG); the handler adds
        the ones it implements generically (MQ, REPLY_ACK, INFLIGHT_SHMFD, ...)."""
        return 0

    def ack_features(self, features: int) -> None:
        """The features the front-end accepted (already checked to be offered)."""

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the device config space.
        Raise ``ValueError`` (naming the field) for a range the device refuses."""
        raise ValueError(f"device has no config space (offset {offset}, size {size})")

    def write_config(self, offset: int, data: bytes) -> None:
        """A front-end write to the config space; ``ValueError`` if read-only."""
        raise ValueError(f"config space is read-only (offset {offset}, size {len(data)})")

    @abc.abstractmethod
    def start_queue(self, index: int, queue: "Virtqueue", mem: "GuestMemory") -> None:
        """Begin serving ``queue``; typically spawns a task that loops on
        ``await queue.wait_kick()`` and pops chains.  Must not raise for
        anything the guest did."""

    @abc.abstractmethod
    def stop_queue(self, index: int) -> None:
        """Stop serving queue ``index``: no guest memory access after this
        returns.  Completed requests must have been flushed to the used ring."""

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE changed ring ``index`` (started or not); a net
        device stops supplying rx packets on a disabled ring."""

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (only with protocol feature MTU, which a device
        offers in ``protocol_features``); ``ValueError`` refuses it."""
        raise ValueError(f"device does not take an MTU ({mtu})")

    def reset(self) -> None:
        """Return to the state right after build (RESET_DEVICE/RESET_OWNER);
        every queue has been stopped first."""


class VhostUserDeviceBuilder(abc.ABC):
    """Opens a device's resources in the privileged parent and builds the
    device later, in the jailed child, where nothing can be opened."""

    @abc.abstractmethod
    def build(self, ex: "Executor") -> VhostUserDevice:
        """Create the device on the child's executor."""
