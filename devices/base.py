"""What every device builder and device shares.

A builder lives in two processes: ``from_options`` runs in the privileged
parent and opens every resource there (the jailed child can open nothing);
``build`` runs in the child after jailing and may only wrap what is already
open.  Options arrive as crosvm-style ``key=value`` strings, already split by
the supervisor; ``from_options`` checks them against the type's declaration
(``cls.declaration``, a ``devtype.DeviceType``), and every bad one raises
``options.ConfigError`` naming the device, key and value, so an operator sees
exactly which part of a config line is wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar

from connection.device import VhostUserDevice, VhostUserDeviceBuilder
from connection.executor import Executor
from .devtype import DEFAULT_MEMORY_LIMIT

if TYPE_CHECKING:
    from .devtype import DeviceType

log = logging.getLogger("devices")


# --------------------------------------------------------------------------
# Builder

class DeviceBuilder(VhostUserDeviceBuilder):
    """A device type's builder, as the supervisor sees it (docs/architecture.md)."""

    #: Set by the type's ``DeviceType`` declaration (never by hand): the
    #: declaration, its name and its policy file, for code holding a builder.
    declaration: ClassVar[DeviceType]
    device_type: ClassVar[str]
    seccomp_policy: ClassVar[str]
    #: Bytes of the child's own heap (``memory-limit=``), applied as
    #: RLIMIT_DATA in its jail; guest RAM (shared memory) is not part of it.
    memory_limit: int = DEFAULT_MEMORY_LIMIT

    @classmethod
    def from_options(cls, name: str, options: dict[str, str]) -> "DeviceBuilder":
        """Validate ``options`` and open the device's resources (in the parent)."""
        raise NotImplementedError

    def keep_fds(self) -> list[int]:
        """Every fd the child must keep open across the jail's fd hygiene."""
        return []

    def bind_mounts(self) -> list[tuple[str, str, bool]]:
        """(source, target, writable) mounts the jail must add; fds are passed
        instead of paths, so this is usually empty."""
        return []

    def close(self) -> None:
        """Close the parent's copies of the resources (device removed)."""

    def __enter__(self) -> "DeviceBuilder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Device with one serving task per queue

class QueueTaskDevice(VhostUserDevice):
    """A device that serves each started queue from one asyncio task.

    ``stop_queue`` cancels the task.  Serving loops only touch guest memory
    between awaits (synchronously), so once the task is cancelled at its
    await point nothing touches guest memory any more: that is what makes a
    plain ``cancel()`` satisfy the "no memory access after stop" contract.
    A task may also let its queue serve from the kick callback while it
    sleeps (``_hook``); ``stop_queue`` withdraws that hook synchronously,
    before cancelling, so the contract holds for that path too.
    """

    def __init__(self, ex: Executor, name: str) -> None:
        self.ex = ex
        self.name = name
        self.acked_features = 0
        self._tasks: dict[int, asyncio.Task[None]] = {}
        #: Queues whose ``serve_hook`` a serving task installed (see ``_hook``).
        self._hooked: dict[int, Any] = {}

    def ack_features(self, features: int) -> None:
        self.acked_features = features

    def _spawn(self, index: int, queue: Any, serve: Coroutine[Any, Any, None]) -> None:
        """Run ``serve`` as queue ``index``'s task, replacing an older one."""
        self.stop_queue(index)
        self._tasks[index] = self.ex.spawn(self._guard(index, queue, serve))

    async def _guard(self, index: int, queue: Any, coro: Coroutine[Any, Any, None]) -> None:
        """Nothing the guest does may raise out of a device: an unexpected
        error breaks this queue only, and the others keep serving."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - contain everything, report it
            log.error("device=%s queue=%d serving failed: %r; queue marked broken", self.name, index, exc)
            try:
                queue.mark_broken(f"device error: {exc!r}")
            except Exception:  # noqa: BLE001
                pass

    def _hook(self, index: int, queue: Any, drain: Any) -> None:
        """Let ``queue`` run ``drain`` from its kick callback while the task
        sleeps (``Virtqueue.serve_hook``); ``stop_queue`` withdraws it at once,
        so nothing is served from a callback after it returns."""
        queue.serve_hook = drain
        self._hooked[index] = queue

    def stop_queue(self, index: int) -> None:
        queue = self._hooked.pop(index, None)
        if queue is not None:
            queue.serve_hook = None
        task = self._tasks.pop(index, None)
        if task is not None:
            task.cancel()

    def reset(self) -> None:
        for index in list(self._tasks):
            self.stop_queue(index)
        self.acked_features = 0
