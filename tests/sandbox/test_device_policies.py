"""The real devices under load, jailed with their real policies in kill mode
(user-notify: any syscall outside the policy kills them and is named)."""

from __future__ import annotations

import pytest

from .device_load import run


@pytest.mark.parametrize("kind", ["block", "console", "rng"])
def test_device_serves_load_without_violation(kind, tmp_path):
    child, status = run(kind, workdir=str(tmp_path))
    try:
        reason = child.decode_status(status)
    finally:
        child.close()
    assert (reason.kind, reason.code) == ("disconnected", 0), f"{kind}: {reason}"
