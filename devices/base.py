"""What every device builder and device shares.

A builder lives in two processes: ``from_options`` runs in the privileged
parent and opens every resource there (the jailed child can open nothing);
``build`` runs in the child after jailing and may only wrap what is already
open.  Options arrive as crosvm-style ``key=value`` strings, already split by
the supervisor; every bad one raises ``ConfigError`` naming the key and value,
so an operator sees exactly which part of a config line is wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, ClassVar

from connection.device import VhostUserDevice, VhostUserDeviceBuilder
from connection.executor import Executor

log = logging.getLogger("devices")


#: ``memory-limit=`` default: the device's own heap (RLIMIT_DATA in its jail),
#: guest RAM not included.  docs/sandbox.md has what each type uses.
DEFAULT_MEMORY_LIMIT = 256 << 20
MEMORY_LIMIT_RANGE = (32 << 20, 64 << 30)
_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(ValueError):
    """A device option is missing, unknown or has a bad value; the message
    names the key and the value."""


# --------------------------------------------------------------------------
# Option parsing

_TRUE = frozenset({"", "true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class Options:
    """Typed access to a ``dict[str, str]`` of device options.

    Every key read is remembered, so ``check_unknown`` can refuse typos
    (``readonly=true`` silently doing nothing is worse than an error).
    """

    def __init__(self, device: str, options: dict[str, str], *, ignored: Iterable[str] = ()) -> None:
        self.device = device
        self.raw = {str(k): str(v) for k, v in options.items()}
        self._used: set[str] = set(ignored)

    def _get(self, key: str, aliases: tuple[str, ...]) -> tuple[str, str] | None:
        found = None
        for k in (key, *aliases):
            self._used.add(k)
            if k in self.raw:
                if found is not None:
                    raise ConfigError(f"{self.device}: both {found[0]}={found[1]!r} and {k}={self.raw[k]!r} given")
                found = (k, self.raw[k])
        return found

    def text(self, key: str, default: str | None = None, *aliases: str) -> str | None:
        got = self._get(key, aliases)
        return default if got is None else got[1]

    def required(self, key: str, *aliases: str) -> str:
        got = self._get(key, aliases)
        if got is None or got[1] == "":
            raise ConfigError(f"{self.device}: option {key}= is required")
        return got[1]

    def flag(self, key: str, default: bool, *aliases: str) -> bool:
        got = self._get(key, aliases)
        if got is None:
            return default
        value = got[1].strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ConfigError(f"{self.device}: {got[0]}={got[1]!r} is not a boolean (true/false)")

    def integer(self, key: str, default: int, lo: int, hi: int, *aliases: str) -> int:
        got = self._get(key, aliases)
        if got is None:
            return default
        try:
            value = int(got[1], 0)
        except ValueError:
            raise ConfigError(f"{self.device}: {got[0]}={got[1]!r} is not an integer") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{self.device}: {got[0]}={got[1]!r} is outside [{lo}, {hi}]")
        return value

    def size(self, key: str, default: int, lo: int, hi: int, *aliases: str) -> int:
        """Bytes: a plain integer or with a K/M/G/T suffix (powers of 1024;
        ``KiB``/``MB`` spellings accepted), e.g. ``256M``."""
        got = self._get(key, aliases)
        if got is None:
            return default
        text = got[1].strip().lower().removesuffix("ib").removesuffix("b")
        number, suffix = text, ""
        if text and text[-1] in _SIZE_SUFFIX:
            number, suffix = text[:-1], text[-1]
        try:
            value = int(number, 0) * _SIZE_SUFFIX[suffix]
        except ValueError:
            raise ConfigError(f"{self.device}: {got[0]}={got[1]!r} is not a size (bytes, or with K/M/G)") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{self.device}: {got[0]}={got[1]!r} is outside [{lo}, {hi}] bytes")
        return value

    def memory_limit(self) -> int:
        """``memory-limit=``: every device type's memory budget (see
        ``DeviceBuilder.memory_limit``)."""
        return self.size("memory-limit", DEFAULT_MEMORY_LIMIT, *MEMORY_LIMIT_RANGE, "memory_limit")

    def check_unknown(self) -> None:
        for key, value in self.raw.items():
            if key not in self._used:
                raise ConfigError(f"{self.device}: unknown option {key}={value!r}")


# --------------------------------------------------------------------------
# Builder

class DeviceBuilder(VhostUserDeviceBuilder):
    """A device type's builder, as the supervisor sees it (docs/architecture.md)."""

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
