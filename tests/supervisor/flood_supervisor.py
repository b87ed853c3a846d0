"""``python -m tests.supervisor.flood_supervisor run ...``: the supervisor CLI
with a hostile rng device whose child floods its stderr with short lines
from its event loop (between answering heartbeats and serving), as a
compromised device would.  Used by test_containment's stderr-budget test.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import devices
from devices.rng import RngBuilder

LINE = b"flood flood flood\n"
CHUNK = LINE * (65536 // len(LINE))


class FloodingRngBuilder(RngBuilder):
    def build(self, ex: Any) -> Any:
        device = super().build(ex)

        def flood() -> None:
            try:
                os.write(2, CHUNK)        # blocks while the supervisor does not read: our own cost
            except OSError:
                return
            ex.loop.call_soon(flood)

        ex.loop.call_soon(flood)
        return device


if __name__ == "__main__":
    devices.DEVICE_TYPES["rng"] = dataclasses.replace(devices.DEVICE_TYPES["rng"], builder=FloodingRngBuilder)
    from supervisor.cli import main
    sys.exit(main(sys.argv[1:]))
