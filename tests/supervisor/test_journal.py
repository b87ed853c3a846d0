"""The journal handler against a real datagram socket standing in for journald."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

from supervisor import journal, logs


def parse(data: bytes) -> list[tuple[str, bytes]]:
    """journald's side of the native protocol."""
    out, i = [], 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out.append((k.decode(), v))
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out.append((line.decode(), data[nl + 9:nl + 9 + n]))
            i = nl + 9 + n + 1
    return out


def _receiver(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "journal.sock")
    r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    r.bind(path)
    r.settimeout(5)
    return r, path


def _record(handler: journal.JournalHandler, device: str | None, event: str, level: int = logging.INFO,
            **fields: object) -> None:
    rec = logging.LogRecord("vhost_supervisor", level, __file__, 1, "%s", (event,), None)
    rec.device, rec.event, rec.fields = device or "-", event, fields  # type: ignore[attr-defined]
    handler.handle(rec)


def test_exit_event_carries_structured_fields(tmp_path: Path) -> None:
    r, path = _receiver(tmp_path)
    h = journal.JournalHandler(logs.EventFormatter("text", timestamps=False), path)
    try:
        _record(h, "blk0", "exit", logging.WARNING, pid=4242, reason="out of memory", kind="oom", uptime=1.5,
                **{"weird-key": "a\nb"})
        fields = dict(parse(r.recv(65536)))
    finally:
        h.close()
        r.close()
    assert fields["DEVICE"] == b"blk0" and fields["EVENT"] == b"exit" and fields["EXIT_KIND"] == b"oom"
    assert fields["PID"] == b"4242" and fields["PRIORITY"] == b"4"
    assert fields["SYSLOG_IDENTIFIER"] == b"vhost-supervisor"
    assert fields["VHOST_WEIRD_KEY"] == b"a\nb"           # a newline: the length-prefixed form
    assert fields["MESSAGE"].startswith(b"device=blk0 event=exit level=warning pid=4242")
    assert all(k == k.upper() and not k.startswith("_") for k in fields)


def test_entry_larger_than_a_datagram_goes_through_a_sealed_memfd(tmp_path: Path) -> None:
    r, path = _receiver(tmp_path)
    h = journal.JournalHandler(logs.EventFormatter("text", timestamps=False), path)
    h.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    big = "x" * (1 << 20)
    try:
        _record(h, None, "log", msg=big)
        msg, fds, _flags, _addr = socket.recv_fds(r, 65536, 1)
    finally:
        h.close()
        r.close()
    assert msg == b"" and len(fds) == 1
    try:   # the fd shares the sender's file offset (at the end): read from 0
        fields = dict(parse(os.pread(fds[0], os.fstat(fds[0]).st_size, 0)))
    finally:
        os.close(fds[0])
    assert fields["VHOST_MSG"] == big.encode() and "DEVICE" not in fields


def test_stderr_is_journal_only_when_journal_stream_names_fd2(tmp_path: Path) -> None:
    code = "import sys; from supervisor import journal; print(journal.stderr_is_journal())"
    st = os.fstat(2)
    for value, expect in ((f"{st.st_dev}:{st.st_ino}", "True"), ("1:2", "False"), ("junk", "False")):
        env = dict(os.environ, JOURNAL_STREAM=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, timeout=30)
        assert out.stdout.strip() == expect, (value, out)


def test_field_names_are_valid() -> None:
    assert journal.field_name("spawn_ms") == "SPAWN_MS"
    assert journal.field_name("_x") == "X"
    assert journal.field_name("9lives") == "F_9LIVES"
    assert len(journal.field_name("a" * 100)) == 64
