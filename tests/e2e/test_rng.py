"""Case 2: vhost-user-rng-pci backed by our rng device."""

from __future__ import annotations

import pytest

from frontend.guest import guest_scripts as gs
from frontend.guest.backends import OurDevice


@pytest.mark.e2e
def test_rng_is_current_hwrng(make_qemu, workdir):
    """The guest picks the virtio rng as its hwrng and reads random-looking bytes from it."""
    sock = workdir / "rng.sock"
    dev = OurDevice("rng", sock, workdir / "rng-device.log", []).start()
    try:
        q = make_qemu(name="rng")
        q.attach(dev)
        q.add_vhost_user_rng(sock)
        res = q.run(gs.rng_script(), timeout=60)
    finally:
        dev.stop()
    assert res.results["rng_current"].startswith("virtio_rng"), res.results
    assert res.int("read_rc") == 0
    assert res.int("bytes") == 16 * 1024
    assert res.int("distinct") >= 250, "16 KiB of random bytes should use nearly every byte value"
    assert res.int("zero_run") == 0, "16 zero bytes in a row: the device returned unfilled buffers"
