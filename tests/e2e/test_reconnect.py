"""Case 5: the front-end goes away (QEMU quits) and a second QEMU attaches to the same socket."""

from __future__ import annotations

import logging

import pytest

from frontend.guest import guest_scripts as gs
from frontend.guest.backends import Supervisor

log = logging.getLogger("e2e")
MiB = 1 << 20


@pytest.mark.e2e
def test_second_qemu_attaches_after_first_quits(make_qemu, workdir):
    image = gs.make_image(workdir / "disk.img", 32 * MiB)
    sock = workdir / "blk.sock"
    first, second = gs.pattern(31, 1 * MiB), gs.pattern(32, 1 * MiB)
    sup = Supervisor(workdir, ["--block", f"vhost={sock},path={image},name=disk0"], workdir / "supervisor.log")
    try:
        sup.start([sock])
        pid0 = sup.device_pid("disk0")

        q1 = make_qemu(name="first")
        q1.attach(sup)
        q1.add_vhost_user_blk(sock)
        r1 = q1.run(gs.write_verify_script(0, len(first)), {"pattern": first}, timeout=60)
        gs.check_write_verify(r1, image, 0, first, 32 * MiB)

        # The child that served QEMU #1 ends with the connection; a fresh one waits.
        pid1 = sup.device_pid("disk0", not_pid=pid0, timeout=15)
        log.warning("after QEMU #1 quit: child %d replaced by %d", pid0, pid1)
        assert sock.exists(), "the listening socket must survive the front-end's exit"

        q2 = make_qemu(name="second")
        q2.attach(sup)
        q2.add_vhost_user_blk(sock)
        script = gs.write_verify_script(2 * MiB, len(second)) + (
            'echo "E2E-RESULT first_md5=$(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null'
            ' | md5sum | cut -d" " -f1)"\n'
        )
        r2 = q2.run(script, {"pattern": second}, timeout=60)
    finally:
        sup.stop()
    assert not sup.abnormal_exits(), sup.abnormal_exits()
    assert r2.results["first_md5"] == gs.md5(first), "QEMU #2 does not see what QEMU #1 wrote"
    assert r2.int("write_rc") == 0 and r2.results["readback_md5"] == gs.md5(second)
    assert gs.image_bytes(image, 2 * MiB, len(second)) == second
    assert r2.int("io_errors") == 0
