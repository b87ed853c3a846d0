"""Case 3: several devices in one guest, all served by one supervisor."""

from __future__ import annotations

import pytest

from frontend.guest import guest_scripts as gs
from frontend.guest.backends import Supervisor

MiB = 1 << 20


@pytest.mark.e2e
def test_one_supervisor_three_devices(make_qemu, workdir):
    """A read-write disk, a read-only disk and an rng, each its own jailed child."""
    rw_img = gs.make_image(workdir / "rw.img", 32 * MiB)
    ro_img = gs.make_image(workdir / "ro.img", 16 * MiB)
    with open(ro_img, "r+b") as f:
        f.write(gs.pattern(seed=21, size=gs.BS))
    ro_before = ro_img.read_bytes()
    socks = {n: workdir / f"{n}.sock" for n in ("rw", "ro", "rng")}
    sup = Supervisor(
        workdir,
        [
            "--block", f"vhost={socks['rw']},path={rw_img},name=rw",
            "--block", f"vhost={socks['ro']},path={ro_img},name=ro,ro=true",
            "--rng", f"vhost={socks['rng']},name=rng",
        ],
        workdir / "supervisor.log",
    )
    data = gs.pattern(seed=22, size=2 * MiB)
    offset = 4 * MiB
    try:
        sup.start(list(socks.values()))
        pids = {n: sup.device_pid(n) for n in socks}
        assert len(set(pids.values())) == 3, f"devices must run in separate children: {pids}"
        q = make_qemu(name="multi")
        q.attach(sup)
        q.add_vhost_user_blk(socks["rw"])  # PCI order gives vda
        q.add_vhost_user_blk(socks["ro"])  # ... and vdb
        q.add_vhost_user_rng(socks["rng"])
        script = gs.combine(
            {
                "rw": gs.write_verify_script(offset, len(data), dev="vda"),
                "ro": gs.read_only_script(dev="vdb"),
                "rng": gs.rng_script(),
            }
        )
        res = q.run(script, {"pattern": data}, timeout=90)
    finally:
        sup.stop()
    # each child ended only because QEMU quit (or we stopped it): nothing crashed under the guest
    assert not sup.abnormal_exits(), sup.abnormal_exits()
    gs.check_write_verify(res.sub("rw_"), rw_img, offset, data, 32 * MiB)
    ro = res.sub("ro_")
    assert ro.int("ro") == 1 and ro.int("write_rc") != 0, ro.results
    assert ro_img.read_bytes() == ro_before
    assert ro.results["read_md5"] == gs.md5(ro_before[: gs.BS])
    rng = res.sub("rng_")
    assert rng.results["rng_current"].startswith("virtio_rng"), rng.results
    assert rng.int("bytes") == 16 * 1024 and rng.int("zero_run") == 0
