"""Typed errors of the vhost-user layer.

Every bad input gets one of these, with a message naming the field and the
value, so a caller can decide what it loses: a ``ProtocolError`` ends one
connection, a ``GuestMemoryError`` or ``QueueBrokenError`` breaks one queue,
and nothing here ever takes the process down.
"""


class VhostUserError(Exception):
    """Base class for every error this package raises on bad input."""


class ProtocolError(VhostUserError):
    """A front-end message is malformed or not allowed in the current state."""


class GuestMemoryError(VhostUserError):
    """An address or length leaves the guest memory the front-end shared."""


class QueueBrokenError(VhostUserError):
    """A virtqueue holds a malformed descriptor chain; the queue is unusable."""


class ConnectionClosed(VhostUserError):
    """The peer closed the socket (EOF), possibly in the middle of a message."""
