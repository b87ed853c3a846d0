"""A stand-in for the connection layer's Virtqueue and DescriptorChain, so the
devices' request logic can be tested (and timed) without sockets: chains are
memoryviews over plain bytearrays, exactly the shape the real queue hands out."""

from __future__ import annotations

from collections import deque


class FakeChain:
    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> None:
        self.head = head
        self.readable = list(readable)
        self.writable = list(writable)
        self.readable_len = sum(len(v) for v in readable)
        self.writable_len = sum(len(v) for v in writable)


def views(*chunks: bytes | bytearray | int) -> list[memoryview]:
    """Writable views: ints become zeroed buffers of that size."""
    out = []
    for c in chunks:
        buf = bytearray(c) if isinstance(c, int) else bytearray(c)
        out.append(memoryview(buf))
    return out


class FakeQueue:
    """pop/add_used/flush/wait_kick/mark_broken; ``wait_kick`` returns True
    ``kicks`` times, then False (stopped)."""

    def __init__(self, chains: list[FakeChain] = (), kicks: int = 1) -> None:
        self.chains = deque(chains)
        self.used: list[tuple[int, int]] = []
        self.flushes = 0
        self.broken = False
        self.reason = ""
        self.kicks = kicks

    def pop(self):
        if self.broken or not self.chains:
            return None
        return self.chains.popleft()

    def add_used(self, head: int, written: int) -> None:
        self.used.append((head, written))

    def flush(self) -> None:
        self.flushes += 1

    async def wait_kick(self) -> bool:
        if self.broken or self.kicks <= 0:
            return False
        self.kicks -= 1
        return True

    def mark_broken(self, reason: str) -> None:
        self.broken = True
        self.reason = reason
