"""Log records as structured journal entries (journald's native protocol).

Under systemd, stderr is a stream to journald and every line becomes a
MESSAGE with nothing else.  When ``$JOURNAL_STREAM`` names our stderr (so we
know journald is the reader) and its socket exists, each record is sent as
one datagram to ``/run/systemd/journal/socket`` instead, with fields an
operator can filter on::

    journalctl -u vhost-supervisor DEVICE=blk0 EVENT=exit EXIT_KIND=oom

``MESSAGE`` is the same text line as before; ``DEVICE``, ``EVENT``,
``EXIT_KIND`` (on exits) and ``PID`` (the device child's pid) come from the
event, every other event field as ``VHOST_<KEY>``.  Entries too big for one
datagram go through a sealed memfd, as the protocol says.  If the socket
fails, the line goes to stderr: a log line is never lost silently.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from typing import Any

SOCKET_PATH = "/run/systemd/journal/socket"
IDENTIFIER = "vhost-supervisor"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_BAD = re.compile(r"[^A-Z0-9_]")


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """True if ``$JOURNAL_STREAM`` is the device:inode of our fd 2 (sd_journal_stream_fd's contract)."""
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def available(environ: dict[str, str] | None = None) -> bool:
    return stderr_is_journal(environ) and os.path.exists(SOCKET_PATH)


def field_name(key: str) -> str:
    """A valid journal field name (A-Z, 0-9, _; not starting with _ or a digit; <= 64)."""
    name = _BAD.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:64]


def encode(fields: list[tuple[str, Any]]) -> bytes:
    """Native-protocol serialisation: ``KEY=value\\n``, or length-prefixed when the value has a newline."""
    out = bytearray()
    for key, value in fields:
        v = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        k = key.encode()
        if b"\n" in v:
            out += k + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
        else:
            out += k + b"=" + v + b"\n"
    return bytes(out)


def record_fields(record: logging.LogRecord, message: str) -> list[tuple[str, Any]]:
    fields: list[tuple[str, Any]] = [("MESSAGE", message), ("PRIORITY", _PRIORITY.get(record.levelno, 6)),
                                     ("SYSLOG_IDENTIFIER", IDENTIFIER)]
    device = getattr(record, "device", None)
    if device and device != "-":
        fields.append(("DEVICE", device))
    event = getattr(record, "event", None)
    fields.append(("EVENT", event or "log"))
    extra: dict[str, Any] = dict(getattr(record, "fields", None) or {})
    if event == "exit" and extra.get("kind"):
        fields.append(("EXIT_KIND", extra.pop("kind")))
    if extra.get("pid") is not None:
        fields.append(("PID", extra.pop("pid")))
    if event is None:
        fields.append(("VHOST_LOGGER", record.name))
    for k, v in extra.items():
        if v is not None:
            fields.append(("VHOST_" + field_name(k), v))
    return fields


class JournalHandler(logging.Handler):
    """A logging handler that sends each record as one journal entry."""

    def __init__(self, formatter: logging.Formatter, path: str = SOCKET_PATH) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001
            self.handleError(record)
            return
        data = encode(record_fields(record, message))
        try:
            self._send(data)
        except OSError as e:
            sys.stderr.write(f"{message}\n(journal: {e.strerror or e})\n")

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.path)
            return
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                        | fcntl.F_SEAL_SEAL)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        super().close()
