"""The event loop a device runs on.

A thin wrapper over a uvloop loop, so devices depend on a small surface
(spawn, run, the loop for add_reader) rather than on uvloop itself.  It is
created in the process that runs it and never carried across a fork: a loop
inherited through fork shares its epoll fd with the parent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


async def wait_readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until ``fd`` is readable (or hung up) without a thread: one reader
    callback for the duration of the wait."""
    fut = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


class Executor:
    """One uvloop event loop, owned by the current process."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start ``coro`` as a task on this executor's loop."""
        return self.loop.create_task(coro)

    def run_until_complete(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run the loop until ``coro`` finishes and return its result."""
        asyncio.set_event_loop(self.loop)
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        """Cancel what is left and close the loop (idempotent)."""
        if self.loop.is_closed():
            return
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
