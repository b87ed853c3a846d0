"""Test helpers for connection/: a small real device and a back-end thread.

``XorDevice`` serves every queue end to end through the real Virtqueue: it
XORs the device-readable bytes of a chain with a key and writes them to the
device-writable buffers.  ``LoopThread`` runs an ``Executor``'s loop in a
thread, so a test can drive the back-end from the main thread with the
blocking front-end (``MessageSocket`` or ``VhostUserFrontend``) over a real
socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from connection.device import VhostUserDevice, VhostUserDeviceBuilder
from connection.executor import Executor
from connection.memory import GuestMemory
from connection.protocol import ProtocolFeature, VirtioFeature
from connection.virtqueue import Virtqueue

T = TypeVar("T")

CONFIG_SIZE = 16
#: Bytes [0, 8) of the config space are read-only, [8, 16) writable.
CONFIG_RO = 8


class XorDevice(VhostUserDevice):
    """Echo with a twist: used len = bytes written = XOR of what it read."""

    max_queue_size = 256

    def __init__(self, ex: Executor, queues: int = 2, key: int = 0x5A, config: bool = True) -> None:
        self.ex = ex
        self.nqueues = queues
        self.key = key
        self.has_config = config
        self.config = bytearray(range(CONFIG_SIZE))
        self.events: list[tuple[Any, ...]] = []
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.acked = 0
        self.served = 0

    def max_queue_num(self) -> int:
        return self.nqueues

    def features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                   | VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_PACKED | 1)

    def protocol_features(self) -> int:
        return int(ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ) if self.has_config else 0

    def ack_features(self, features: int) -> None:
        self.acked = features
        self.events.append(("ack", features))

    def read_config(self, offset: int, size: int) -> bytes:
        if not self.has_config or offset + size > CONFIG_SIZE:
            raise ValueError(f"config offset {offset} size {size} outside {CONFIG_SIZE} bytes")
        return bytes(self.config[offset:offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < CONFIG_RO or offset + len(data) > CONFIG_SIZE:
            raise ValueError(f"config offset {offset} size {len(data)} is not writable")
        self.config[offset:offset + len(data)] = data

    def start_queue(self, index: int, queue: Virtqueue, mem: GuestMemory) -> None:
        self.events.append(("start", index, queue.enabled))
        self.tasks[index] = self.ex.spawn(self._serve(queue))

    def stop_queue(self, index: int) -> None:
        self.events.append(("stop", index))
        task = self.tasks.pop(index, None)
        if task is not None:
            task.cancel()

    def reset(self) -> None:
        self.events.append(("reset",))

    async def _serve(self, queue: Virtqueue) -> None:
        key = self.key
        while await queue.wait_kick():
            while (chain := queue.pop()) is not None:
                data = bytes(b ^ key for b in b"".join(bytes(v) for v in chain.readable))
                written = 0
                for view in chain.writable:
                    n = min(len(view), len(data) - written)
                    if n <= 0:
                        break
                    view[:n] = data[written:written + n]
                    written += n
                queue.add_used(chain.head, written)
                self.served += 1
            queue.flush()


class XorBuilder(VhostUserDeviceBuilder):
    def __init__(self, fail: bool = False, **kwargs: Any) -> None:
        self.fail = fail
        self.kwargs = kwargs
        self.built: XorDevice | None = None

    def build(self, ex: Executor) -> XorDevice:
        asyncio.get_running_loop()   # built on the executor's loop
        if self.fail:
            raise RuntimeError("builder asked to fail")
        self.built = XorDevice(ex, **self.kwargs)
        return self.built


class LoopThread:
    """An Executor whose loop runs in a background thread."""

    def __init__(self) -> None:
        self.ex = Executor()
        self._thread = threading.Thread(target=self._run, name="backend-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.ex.loop)
        self.ex.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.ex.loop)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the loop thread and return its result."""
        async def run() -> Any:
            return fn(*args)
        return self.submit(run()).result(5)

    def close(self) -> None:
        self.ex.loop.call_soon_threadsafe(self.ex.loop.stop)
        self._thread.join(5)
        self.ex.close()

    def __enter__(self) -> "LoopThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HoldingXorDevice(XorDevice):
    """Pops requests but never completes them: what a back-end that crashed
    mid-request leaves behind (in the inflight region)."""

    async def _serve(self, queue: Virtqueue) -> None:
        self.held: list[int] = getattr(self, "held", [])
        while await queue.wait_kick():
            while (chain := queue.pop()) is not None:
                self.held.append(chain.head)


class RawFrontend:
    """A bare front-end on ``MessageSocket``: exactly the bytes a test asks for."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        import socket as _socket

        from connection.transport import MessageSocket
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        self.sock = MessageSocket(sock)

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = (),
             need_reply: bool = False, flags: int | None = None) -> None:
        from connection.protocol import FLAG_NEED_REPLY, VERSION
        if flags is None:
            flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        self.sock.send(request, flags, payload, fds)

    def recv(self) -> Any:
        msg = self.sock.recv(expect_reply=True)
        return msg

    def request(self, request: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = ()) -> Any:
        """Send and read the reply (for requests that have one)."""
        self.send(request, payload, fds)
        msg = self.recv()
        assert msg.request == request, (msg.request, request)
        return msg

    def ack(self, request: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = ()) -> int:
        """Send with NEED_REPLY and return the u64 ack (0 = success)."""
        from connection.protocol import decode_u64
        self.send(request, payload, fds, need_reply=True)
        msg = self.recv()
        assert msg.request == request, (msg.request, request)
        msg.close_fds()
        return decode_u64(request, msg.payload)

    def u64(self, request: int) -> int:
        from connection.protocol import decode_u64
        msg = self.request(request)
        msg.close_fds()
        return decode_u64(request, msg.payload)

    def assert_closed(self) -> None:
        """The back-end ended the connection: the next read sees EOF."""
        from connection.errors import ConnectionClosed
        try:
            msg = self.sock.recv(expect_reply=True)
        except (ConnectionClosed, ConnectionResetError):
            return
        raise AssertionError(f"connection still open, got {msg!r}")

    def close(self) -> None:
        self.sock.close()
