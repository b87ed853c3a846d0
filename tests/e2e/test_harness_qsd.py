"""The harness proven against qemu-storage-daemon, the reference vhost-user-blk back-end.

Why: if these pass and a case against our device fails, the fault is in our device, not in
the kernel, initramfs, QEMU command line or result parsing.
"""

from __future__ import annotations

import logging

import pytest

from frontend.guest import guest_scripts as gs
from frontend.guest.backends import QsdBlock

log = logging.getLogger("e2e")

MiB = 1 << 20


@pytest.mark.e2e
def test_qsd_write_verify(make_qemu, workdir, record_property):
    image = gs.make_image(workdir / "disk.img", 64 * MiB)
    sock = workdir / "qsd.sock"
    data = gs.pattern(seed=1, size=4 * MiB)
    offset = 8 * MiB
    with QsdBlock(image, sock, workdir / "qsd.log"):
        q = make_qemu(name="qsd")
        q.add_vhost_user_blk(sock)
        res = q.run(gs.write_verify_script(offset, len(data)), {"pattern": data}, timeout=90)

    record_property("boot_s", res.booted_after)
    record_property("case_s", res.duration)
    log.warning("qsd write/verify: booted after %.1fs, done after %.1fs", res.booted_after, res.duration)
    gs.check_write_verify(res, image, offset, data, 64 * MiB)


@pytest.mark.e2e
def test_qsd_read_only(make_qemu, workdir):
    """Reference for our read-only device: what a guest sees when the export is writable=off."""
    image = gs.make_image(workdir / "disk.img", 16 * MiB)
    before = image.read_bytes()
    sock = workdir / "qsd.sock"
    with QsdBlock(image, sock, workdir / "qsd.log", writable=False):
        q = make_qemu(name="qsd-ro")
        q.add_vhost_user_blk(sock)
        res = q.run(gs.read_only_script(), {"pattern": gs.pattern(2, gs.BS)}, timeout=60)
    log.warning("qsd read-only results: %s", res.results)
    gs.check_read_only(res, image, before)
