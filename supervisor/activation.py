"""Socket activation: use the listening sockets systemd passes instead of binding.

With one ``vhost-supervisor@NAME.socket`` unit per device, systemd owns each
device's listening socket and hands a duplicate to every supervisor it
starts (``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``, fds from 3, see
sd_listen_fds(3)).  A restart or an upgrade of the supervisor then never
closes a socket: a VMM that reconnects finds the same inode, and connections
made while no supervisor ran wait in the socket's backlog.

Inherited sockets are matched to devices by the path they are bound to
(``getsockname()``), so unit names and ``FileDescriptorName=`` are free.  The
supervisor never unlinks an inherited socket's node (systemd does, with
``RemoveOnStop=``) and never probes it with a ``connect()`` (that would queue
a fake front-end on it).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from connection.connection import VhostUserListener

from . import logs
from .config import ConfigError

SD_LISTEN_FDS_START = 3
#: More passed fds than this is a broken environment, not a configuration.
MAX_LISTEN_FDS = 4096
ENV_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass
class InheritedSocket:
    fd: int
    name: str
    path: str
    sock: socket.socket


class InheritedListener(VhostUserListener):
    """A ``VhostUserListener`` around a socket systemd bound and keeps.

    Same accept/serve behaviour as a bound listener; ``close`` only closes our
    duplicate, and there are no parent resources that would unlink the node.
    """

    def __init__(self, inherited: InheritedSocket) -> None:  # noqa: D107 - no bind on purpose
        self.path = inherited.path
        self._sock = inherited.sock
        st = os.stat(inherited.path)
        self._ident = (st.st_dev, st.st_ino)
        self._pid = os.getpid()
        self._resources_taken = True   # close() must not unlink: the node belongs to systemd
        self.fd_name = inherited.name

    def take_parent_process_resources(self) -> None:
        return None


def _key(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def take_inherited(environ: dict[str, str] | None = None) -> dict[str, InheritedSocket]:
    """The sockets passed to this process, keyed by bound path; clears ``LISTEN_*``.

    The variables are removed from the environment in every case, so device
    children (and anything they exec) never believe the fds are theirs.
    Variables meant for another process (``LISTEN_PID`` is not ours) are
    ignored.  A passed fd that is not a listening, path-bound AF_UNIX stream
    socket is a ConfigError naming it: the socket units are wrong.
    """
    env = os.environ if environ is None else environ
    values = {k: env.pop(k, None) for k in ENV_KEYS}
    if not values["LISTEN_FDS"]:
        return {}
    if values["LISTEN_PID"] != str(os.getpid()):
        logs.event(None, "listen-fds-ignored", logging.WARNING, listen_pid=values["LISTEN_PID"],
                   reason="LISTEN_PID is not this process")
        return {}
    try:
        count = int(values["LISTEN_FDS"])
    except ValueError:
        raise ConfigError(f"{values['LISTEN_FDS']!r} is not a number", "LISTEN_FDS") from None
    if not 0 <= count <= MAX_LISTEN_FDS:
        raise ConfigError(f"{count} is out of range 0..{MAX_LISTEN_FDS}", "LISTEN_FDS")
    names = (values["LISTEN_FDNAMES"] or "").split(":") if values["LISTEN_FDNAMES"] else []
    out: dict[str, InheritedSocket] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else "unknown"
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ConfigError(f"fd {fd} ({name}): {e.strerror or e}", "LISTEN_FDS") from None
        what = f"fd {fd} ({name})"
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise ConfigError(f"{what} is not an AF_UNIX stream socket (use ListenStream=/path)", "LISTEN_FDS")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.close()
            raise ConfigError(f"{what} is not listening (the socket unit needs Accept=no)", "LISTEN_FDS")
        path = sock.getsockname()
        if not isinstance(path, str) or not path.startswith("/"):
            sock.close()
            raise ConfigError(f"{what} is bound to {path!r}, not a filesystem path", "LISTEN_FDS")
        out[_key(path)] = InheritedSocket(fd, name, path, sock)
    return out


class Activation:
    """The inherited sockets of one supervisor start, handed out per device path."""

    def __init__(self, inherited: dict[str, InheritedSocket]) -> None:
        self.inherited = inherited

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> "Activation":
        return cls(take_inherited(environ))

    def has(self, path: str) -> bool:
        return _key(path) in self.inherited

    def listener(self, path: str) -> VhostUserListener:
        """The inherited socket bound at ``path``, else a freshly bound listener."""
        inherited = self.inherited.pop(_key(path), None)
        if inherited is None:
            return VhostUserListener(path)
        return InheritedListener(inherited)

    def close_unused(self) -> None:
        """Close (and report) passed sockets no configured device listens on."""
        for sk in self.inherited.values():
            logs.event(None, "listen-fd-unused", logging.WARNING, fd=sk.fd, fd_name=sk.name, socket=sk.path,
                       reason="no device in the configuration uses this socket")
            sk.sock.close()
        self.inherited.clear()
