"""One line per event, ``device=NAME`` first; text for people, JSON for machines.

Text: ``device=block-0 event=exit pid=12 reason="killed by SIGKILL" ts=...``
(``ts=`` is left out under journald, which stamps lines itself).

The supervisor is the only writer of its log: children's stderr arrives
through pipes and is re-emitted here as ``event=stderr`` lines, so a single
stream (journald under systemd) holds everything, tagged with the device.
Plain ``logging`` records from the connection/devices packages that run in
the parent go through the same formatter, tagged ``device=-``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

LOGGER_NAME = "vhost_supervisor"


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\t\n\\'):
        return json.dumps(text)
    return text


def _timestamp(created: float) -> str:
    ms = int((created - int(created)) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


class EventFormatter(logging.Formatter):
    """Formats records that carry ``event``/``device``/``fields`` extras (and plain ones)."""

    def __init__(self, fmt: str = "text", timestamps: bool | None = None) -> None:
        super().__init__()
        if fmt not in ("text", "json"):
            raise ValueError(f"log-format: {fmt!r} is not one of text, json")
        self.fmt = fmt
        # journald stamps every line itself; elsewhere a text line ends with ts=
        self.timestamps = (not os.environ.get("JOURNAL_STREAM")) if timestamps is None else timestamps

    def format(self, record: logging.LogRecord) -> str:
        device = getattr(record, "device", None) or "-"
        event = getattr(record, "event", None)
        fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
        if event is None:
            # A record from another package (connection/, devices/, sandbox/).
            event = "log"
            fields = {"logger": record.name, "msg": record.getMessage()}
            if record.exc_info:
                fields["exc"] = self.formatException(record.exc_info)
        level = record.levelname.lower()
        if self.fmt == "json":
            out = {"ts": _timestamp(record.created), "device": device, "event": event, "level": level}
            out.update((k, v) for k, v in fields.items() if v is not None)
            return json.dumps(out, default=str, separators=(",", ":"))
        parts = [f"device={_quote(device)}", f"event={event}"]
        if level not in ("info",):
            parts.append(f"level={level}")
        parts.extend(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
        if self.timestamps:
            parts.append(f"ts={_timestamp(record.created)}")
        return " ".join(parts)


def setup_logging(fmt: str = "text", stream: TextIO | None = None, level: int = logging.INFO) -> logging.Logger:
    """Install one handler on the root logger, so every package logs through it."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_vhost_supervisor", False):
            root.removeHandler(h)
    from . import journal
    handler: logging.Handler
    if stream is None and journal.available():   # structured fields under journald
        handler = journal.JournalHandler(EventFormatter(fmt, timestamps=False))
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(EventFormatter(fmt))
    handler._vhost_supervisor = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(LOGGER_NAME)


_log = logging.getLogger(LOGGER_NAME)


def event(device: str | None, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event line: ``device=NAME event=NAME k=v ...``."""
    _log.log(level, "%s", name, extra={"device": device or "-", "event": name, "fields": fields})


class ChildFormatter(logging.Formatter):
    """In a device child: one JSON object per record on stderr, which the parent
    parses and re-emits as ``device=NAME event=log`` with the child's level."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup_child_logging() -> None:
    """Called in the child before it serves: records go to fd 2 (the pipe) as JSON."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ChildFormatter())
    root.addHandler(handler)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def child_line(device: str, pid: int, text: str) -> None:
    """Re-emit one line a child wrote on stderr."""
    if text.startswith("{") and text.endswith("}"):
        try:
            rec = json.loads(text)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("msg"), str):
            level = _LEVELS.get(str(rec.get("level")), logging.INFO)
            fields: dict[str, Any] = {"pid": pid, "logger": rec.get("logger"), "msg": rec["msg"]}
            if rec.get("exc"):
                fields["exc"] = rec["exc"]
            event(device, "log", level, **fields)
            return
    event(device, "stderr", pid=pid, msg=text)


class LogBudget:
    """What one device's children may cost the supervisor in log lines and bytes.

    A jailed child is not trusted: one that floods stderr must not flood the
    journal, nor keep the supervision loop busy.  Two token buckets (lines
    and bytes per second) decide which lines are re-emitted; everything else
    is dropped without being split or decoded (one ``bytes.count`` per
    chunk), counted, and reported as one ``event=log-dropped`` line at most
    once per ``report_every`` seconds.  ``exhausted`` tells the reader to
    pause: a child writing into a full pipe then blocks, paying for its own
    flood.
    """

    def __init__(self, rate: float = 200.0, burst: float = 2000.0, byte_rate: float = 64 << 10,
                 byte_burst: float = 512 << 10, report_every: float = 1.0) -> None:
        self.rate = rate
        self.burst = burst
        self.byte_rate = byte_rate
        self.byte_burst = byte_burst
        self.tokens = burst
        self.byte_tokens = byte_burst
        self.stamp = time.monotonic()
        self.report_every = report_every
        self.reported = 0.0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self.total_dropped = 0     # lines, since the device's first child

    def refill(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        dt = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + dt * self.rate)
        self.byte_tokens = min(self.byte_burst, self.byte_tokens + dt * self.byte_rate)
        self.stamp = now

    @property
    def exhausted(self) -> bool:
        return self.tokens < 1.0 or self.byte_tokens < 1.0

    def admit(self, line: bytes) -> bool:
        """Spend on one complete line; False (and counted) if over budget."""
        if self.tokens >= 1.0 and self.byte_tokens >= len(line):
            self.tokens -= 1.0
            self.byte_tokens -= len(line)
            return True
        self.drop(1, len(line))
        return False

    def drop(self, lines: int, nbytes: int) -> None:
        self.dropped_lines += lines
        self.total_dropped += lines
        self.dropped_bytes += nbytes

    def report_due(self, now: float | None = None, final: bool = False) -> tuple[int, int] | None:
        """(lines, bytes) dropped since the last report, if one is due."""
        now = time.monotonic() if now is None else now
        if not self.dropped_lines and not self.dropped_bytes:
            return None
        if not final and now - self.reported < self.report_every:
            return None
        out = (self.dropped_lines, self.dropped_bytes)
        self.dropped_lines = self.dropped_bytes = 0
        self.reported = now
        return out
