"""virtio-rng (entropy device, ID 4): fills guest buffers from getrandom(2).

``os.getrandom`` needs no file, so the jailed child needs no /dev/urandom
and the builder opens nothing.  One queue, no feature bits, no config space.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from connection.counters import BYTES, ERRORS, REQUESTS, DeviceCounters
from connection.executor import Executor
from connection.protocol import VirtioFeature

from .base import DeviceBuilder, QueueTaskDevice
from .devtype import DeviceType

log = logging.getLogger("devices.rng")

#: Most bytes given for one request: the driver may receive less than its
#: buffer (it checks the used length), and a huge buffer must not let one
#: request monopolise the loop.
MAX_PER_REQUEST = 64 << 10


class RngDevice(QueueTaskDevice):
    """requestq: every device-writable buffer gets random bytes."""

    def __init__(self, ex: Executor, name: str) -> None:
        super().__init__(ex, name)
        #: requests and bytes per queue (connection.counters), per kick, not per request
        self.counters = DeviceCounters.private(1)

    def attach_counters(self, counters: DeviceCounters) -> None:
        self.counters = counters

    def publish_counters(self) -> None:
        self.counters.publish()

    def stop_queue(self, index: int) -> None:
        super().stop_queue(index)
        self.counters.publish()

    def max_queue_num(self) -> int:
        return 1

    def features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX)

    def start_queue(self, index: int, queue: Any, mem: Any) -> None:
        self._spawn(index, queue, self._serve(index, queue))

    async def _serve(self, qi: int, queue: Any) -> None:
        pop = queue.pop
        add_used = queue.add_used
        warned = False
        tally = self.counters.tally(qi)
        while await queue.wait_kick():
            n = total = 0
            while (chain := pop()) is not None:
                written = 0
                for view in chain.writable:
                    want = min(len(view), MAX_PER_REQUEST - written)
                    if want <= 0:
                        break
                    data = os.getrandom(want)
                    view[:len(data)] = data
                    written += len(data)
                    if len(data) < want:
                        break
                if not written:
                    tally[ERRORS] += 1
                    if not warned:
                        warned = True
                        log.warning("device=%s queue=%d request without a writable buffer "
                                    "(further ones not logged)", self.name, qi)
                add_used(chain.head, written)
                n += 1
                total += written
            queue.flush()
            tally[REQUESTS] += n
            tally[BYTES] += total


class RngBuilder(DeviceBuilder):
    """Nothing to open: getrandom is a system call."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_options(cls, name: str, options: dict[str, str]) -> "RngBuilder":
        o = cls.declaration.parse(name, options)   # only the common options: refuses unknown keys
        builder = cls(name)
        builder.memory_limit = o["memory-limit"]
        return builder

    def build(self, ex: Executor) -> RngDevice:
        return RngDevice(ex, self.name)


DEVICE = DeviceType(
    name="rng",
    builder=RngBuilder,
    summary="virtio-rng from getrandom(2)",
    options=(),
    seccomp_policy="rng.policy",
)
