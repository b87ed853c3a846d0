"""vhost-user back-end machinery: wire format, transport, connection, handler.

The public names are re-exported here.  Everything is imported eagerly on
purpose: a jailed child cannot import new modules after pivot_root, so
``import connection`` in the parent must load all of it.
"""

from .connection import (ParentResources, VhostUserConnection, VhostUserListener, VhostUserStream,
                         serve_connection)
from .device import VhostUserDevice, VhostUserDeviceBuilder
from .errors import ConnectionClosed, GuestMemoryError, ProtocolError, QueueBrokenError, VhostUserError
from .executor import Executor
from .handler import Backend, DeviceRequestHandler, RequestRefused
from .inflight import InflightQueue, InflightRegion
from .memory import GuestMemory
from .protocol import FrontendReq, Message, ProtocolFeature, VirtioFeature
from .virtqueue import DescriptorChain, QueueConfig, Virtqueue

__all__ = [
    "Backend", "ConnectionClosed", "DescriptorChain", "DeviceRequestHandler", "Executor", "FrontendReq",
    "GuestMemory", "GuestMemoryError", "InflightQueue", "InflightRegion", "Message", "ParentResources",
    "ProtocolError", "ProtocolFeature", "QueueBrokenError", "QueueConfig", "RequestRefused", "VhostUserConnection",
    "VhostUserDevice", "VhostUserDeviceBuilder", "VhostUserError", "VhostUserListener", "VhostUserStream",
    "Virtqueue", "VirtioFeature", "serve_connection",
]
