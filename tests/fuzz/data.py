"""Turns fuzz bytes into structured choices, without atheris.

The targets must replay under pytest where atheris is not installed, so
they read their input through this small consumer instead of
``atheris.FuzzedDataProvider``.  Once the bytes run out every read returns
zeros (or empty), so any input is a complete one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Data:
    """A cursor over the fuzz input."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def bytes(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at the end of the input)."""
        out = self.buf[self.pos:self.pos + max(0, n)]
        self.pos += len(out)
        return out

    def uint(self, nbytes: int) -> int:
        """A little-endian unsigned integer of ``nbytes`` (zero-padded)."""
        return int.from_bytes(self.bytes(nbytes).ljust(nbytes, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        """An integer in ``[0, n)`` (``n`` at most 65536)."""
        return (self.u8() if n <= 256 else self.u16()) % n

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def blob(self, limit: int) -> bytes:
        """A length-prefixed byte string of at most ``limit`` bytes."""
        return self.bytes(self.u16() % (limit + 1))

    def text(self, limit: int) -> str:
        """A length-prefixed string (UTF-8, undecodable bytes replaced)."""
        return self.blob(limit).decode("utf-8", "surrogateescape")

    def rest(self) -> bytes:
        return self.bytes(self.left)
