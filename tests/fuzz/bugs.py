"""Log records and loop errors that mean a bug, collected during one input.

The project logs a guest's or front-end's fault as a warning or a
"queue broken" error; a traceback (``exc_info``), an "internal error" or a
queue broken for an "unexpected" exception means code that did not expect
what it got.  Targets run each input inside ``with bugs:`` and call ``raise_if_any``
after it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .harness import FuzzBug

_MARKERS = ("internal error", "unexpected ", "failed: ")


class BugLog(logging.Handler):
    """Collects bug records from ``loggers`` while entered (``with bugs:``);
    on exit the loggers are as before, so replaying under pytest leaves the
    logging set-up of other tests alone."""

    def __init__(self, *loggers: str) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []
        self.loggers = [logging.getLogger(name) for name in loggers]
        self._saved: list[tuple[bool, int]] = []

    def __enter__(self) -> "BugLog":
        self._saved = [(lg.propagate, lg.level) for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self)
            lg.propagate = False      # no stderr noise at thousands of inputs per second
            lg.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        for lg, (propagate, level) in zip(self.loggers, self._saved):
            lg.removeHandler(self)
            lg.propagate = propagate
            lg.setLevel(level)

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
