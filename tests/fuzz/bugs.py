"""Log records and loop errors that mean a bug, collected during one input.

The project logs a guest's or front-end's fault as a warning or a
"queue broken" error; a traceback (``exc_info``), an "internal error" or a
queue broken for an "unexpected" exception means code that did not expect
what it got.  Targets install ``BugLog`` on the project's loggers and call
``raise_if_any`` after each input.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .harness import FuzzBug

_MARKERS = ("internal error", "unexpected ", "failed: ")


class BugLog(logging.Handler):
    def __init__(self, *loggers: str) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []
        for name in loggers:
            lg = logging.getLogger(name)
            lg.addHandler(self)
            lg.propagate = False      # no stderr noise at thousands of inputs per second
            lg.setLevel(logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.exc_info or any(m in msg for m in _MARKERS):
            text = f"{record.name}: {msg}"
            if record.exc_info and record.exc_info[1] is not None:
                text += f" ({record.exc_info[1]!r})"
            self.bad.append(text)

    def loop_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.bad.append(f"loop: {context.get('message')}: {exc!r}")

    def raise_if_any(self) -> None:
        if self.bad:
            bad, self.bad = self.bad, []
            raise FuzzBug("; ".join(bad[:5]))
