"""Case 1: our block device under a real guest: write/verify, read-only, discard.

Each case runs against the standalone device (`vhost-supervisor device block`) and, for
write/verify, also under the supervisor (`vhost-supervisor run --block`), so a failure
tells which layer broke.
"""

from __future__ import annotations

import logging
import os

import pytest

from frontend.guest import guest_scripts as gs
from frontend.guest.backends import start_our_block

log = logging.getLogger("e2e")

MiB = 1 << 20


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["device", "supervisor"])
def test_block_write_verify(mode, make_qemu, workdir, record_property):
    """O_DIRECT pattern write, fsync, drop caches, read back; the host checks the image."""
    image = gs.make_image(workdir / "disk.img", 64 * MiB)
    sock = workdir / "blk.sock"
    data = gs.pattern(seed=11, size=4 * MiB)
    offset = 8 * MiB
    backend = start_our_block(mode, workdir, image, sock)
    try:
        q = make_qemu(name=f"blk-{mode}")
        q.attach(backend)
        q.add_vhost_user_blk(sock)
        res = q.run(gs.write_verify_script(offset, len(data)), {"pattern": data}, timeout=90)
    finally:
        backend.stop()
    record_property("boot_s", res.booted_after)
    record_property("case_s", res.duration)
    log.warning("our block (%s) write/verify: booted after %.1fs, done after %.1fs", mode, res.booted_after, res.duration)
    gs.check_write_verify(res, image, offset, data, 64 * MiB)


@pytest.mark.e2e
def test_block_read_only(make_qemu, workdir):
    """ro: the guest sees a read-only disk, its writes fail, the image is unchanged."""
    image = gs.make_image(workdir / "disk.img", 16 * MiB)
    with open(image, "r+b") as f:  # non-zero content, so a wrong read is visible
        f.write(gs.pattern(seed=12, size=gs.BS))
    before = image.read_bytes()
    sock = workdir / "blk.sock"
    backend = start_our_block("device", workdir, image, sock, ro=True)
    try:
        q = make_qemu(name="blk-ro")
        q.attach(backend)
        q.add_vhost_user_blk(sock)
        res = q.run(gs.read_only_script(), {"pattern": gs.pattern(13, gs.BS)}, timeout=60)
    finally:
        backend.stop()
    gs.check_read_only(res, image, before)


def _allocated_ranges(path) -> list[tuple[int, int]]:
    """Data extents of a sparse file via SEEK_DATA/SEEK_HOLE."""
    out = []
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole))
            pos = hole
    return out


@pytest.mark.e2e
def test_block_discard_punches_holes(make_qemu, workdir):
    """blkdiscard in the guest deallocates the range in the image file (and reads zero)."""
    size = 32 * MiB
    image = gs.make_image(workdir / "disk.img", size)
    data = gs.pattern(seed=14, size=4 * MiB)
    d_off, d_len = 1 * MiB, 2 * MiB
    sock = workdir / "blk.sock"
    backend = start_our_block("device", workdir, image, sock)
    try:
        q = make_qemu(name="blk-discard")
        q.attach(backend)
        q.add_vhost_user_blk(sock)
        res = q.run(gs.discard_script(d_off, d_len), {"pattern": data}, timeout=60)
    finally:
        backend.stop()
    assert res.int("discard_max") > 0, "the device did not offer VIRTIO_BLK_F_DISCARD"
    assert res.int("write_rc") == 0
    assert res.int("discard_rc") == 0, res.results
    assert gs.image_bytes(image, 0, d_off) == data[:d_off]
    assert gs.image_bytes(image, d_off, d_len) == bytes(d_len), "discarded range does not read as zeroes"
    assert gs.image_bytes(image, d_off + d_len, len(data) - d_off - d_len) == data[d_off + d_len :]
    extents = _allocated_ranges(image)
    overlapping = [(a, b) for a, b in extents if a < d_off + d_len and b > d_off]
    assert not overlapping, f"discarded range is still allocated: extents={extents}"
    assert res.int("io_errors") == 0
