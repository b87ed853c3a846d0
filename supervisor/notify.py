"""sd_notify without libsystemd: one datagram per state change.

systemd's ``Type=notify`` waits for READY=1, shows STATUS= in
``systemctl status``, and restarts us if WATCHDOG=1 stops arriving while
``WatchdogSec=`` is set.  The socket is opened once and is close-on-exec;
children never see it (fd hygiene closes it after fork).
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends to ``$NOTIFY_SOCKET`` if set; every method is a no-op otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        self.sock: socket.socket | None = None
        if addr:
            self.address = "\0" + addr[1:] if addr.startswith("@") else addr
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Never block the supervision loop on a full receiver queue: a lost
            # STATUS= is harmless, a stalled supervisor is not.
            self.sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        wpid = env.get("WATCHDOG_PID", "")
        self.watchdog_usec: int | None = None
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, *lines: str) -> bool:
        if self.sock is None or self.address is None:
            return False
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
