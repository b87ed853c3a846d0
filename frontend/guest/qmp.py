"""A small QMP client: enough to hot-plug and unplug vhost-user devices.

Why our own: QMP is JSON lines over a Unix socket (greeting, then
``qmp_capabilities``, then ``{"execute": ...}`` with one ``return`` or
``error`` each, events in between), and the e2e harness needs three
commands and one event; a dependency would be larger than this.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QmpError(RuntimeError):
    """QEMU answered a command with an error (class and description)."""


class Qmp:
    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self, wait: float = 20.0) -> "Qmp":
        """Connect (QEMU may not have created the socket yet), read the greeting, negotiate."""
        deadline = time.monotonic() + wait
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.settimeout(self.timeout)
        self._sock = s
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")
        return self

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QmpError(f"QEMU closed the QMP socket (events seen: {self.events})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; its ``return`` value, or QmpError."""
        assert self._sock is not None, "connect() first"
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The first event ``name`` whose data contains ``data`` (seen before or arriving)."""
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev.get("event") == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                    self.events.remove(ev)
                    return ev
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError(f"no {name} event {data} within {timeout:.0f}s (saw {[e['event'] for e in self.events]})")
            self._sock.settimeout(remaining)
            try:
                msg = self._read()
            except socket.timeout:
                continue
            finally:
                self._sock.settimeout(self.timeout)
            if "event" in msg:
                self.events.append(msg)

    # --- vhost-user hot-plug: the command lines docs/operations.md shows -----------------

    def hotplug_vhost_user_blk(self, chardev: str, device: str, socket_path: Path | str,
                               num_queues: int = 1, queue_size: int = 128) -> None:
        """``chardev-add`` a client socket on the back-end's path, then ``device_add`` the disk."""
        self.execute("chardev-add", id=chardev, backend={
            "type": "socket",
            "data": {"addr": {"type": "unix", "data": {"path": str(socket_path)}}, "server": False}})
        try:
            self.execute("device_add", driver="vhost-user-blk-pci", id=device, chardev=chardev,
                         **{"num-queues": num_queues, "queue-size": queue_size})
        except QmpError:
            self.execute("chardev-remove", id=chardev)
            raise

    def unplug(self, chardev: str, device: str, timeout: float = 60.0) -> None:
        """``device_del`` (the guest must release it: DEVICE_DELETED), then ``chardev-remove``."""
        self.execute("device_del", id=device)
        self.wait_event("DEVICE_DELETED", timeout, device=device)
        self.execute("chardev-remove", id=chardev)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
