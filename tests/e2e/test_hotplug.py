"""Case: a disk added at run time, hot-plugged into a running guest, unplugged, removed.

Why: the point of ``vhost-supervisor add`` is a VM host where disks come and go
while guests run.  The guest keeps writing and verifying its first disk the
whole time; the new device is added to the running supervisor, hot-plugged over
QMP (``chardev-add`` + ``device_add vhost-user-blk-pci``: the command lines of
docs/operations.md), written and verified by the guest, unplugged
(``device_del``, the guest ejects it) and removed from the supervisor.  The
first disk's child must never change, and its loop must see no error.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from frontend.guest import guest_scripts as gs
from frontend.guest.backends import REPO_ROOT, Supervisor, _cli

MiB = 1 << 20
HP_OFFSET = 1 * MiB
HP_SIZE = 1 * MiB
GO_OFFSET = 8 * MiB    # on the first disk: where the host tells the guest to finish

GUEST = r"""
set -u
BS={bs}
# the first disk: write and verify one block after another, all along
(
    i=0; bad=0
    while [ ! -e /tmp/stop_bg ]; do
        off=$((i % 32))
        dd if=/e2e/pattern of=/dev/vda bs=$BS seek=$off count=1 oflag=direct conv=notrunc 2>/dev/null || bad=$((bad + 1))
        dd if=/dev/vda of=/tmp/bg.read bs=$BS skip=$off count=1 iflag=direct 2>/dev/null || bad=$((bad + 1))
        cmp -s /tmp/bg.read /e2e/pattern || bad=$((bad + 1))
        i=$((i + 1))
        echo "$i $bad" > /tmp/bg.count
    done
) &
BG=$!
while [ ! -e /tmp/bg.count ]; do usleep 50000; done
echo "E2E-HOTPLUG-WAIT"
n=0
while [ ! -b /dev/vdb ] && [ $n -lt 1200 ]; do usleep 100000; n=$((n + 1)); done
if [ -b /dev/vdb ]; then
    read before _ < /tmp/bg.count
    echo "E2E-RESULT hp_size=$(blockdev --getsize64 /dev/vdb)"
    dd if=/e2e/pattern2 of=/dev/vdb bs=$BS seek={hp_blocks_off} count={hp_blocks} oflag=direct conv=fsync,notrunc 2>/tmp/hp.err
    echo "E2E-RESULT hp_write_rc=$?"
    echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/vdb of=/tmp/hp.read bs=$BS skip={hp_blocks_off} count={hp_blocks} iflag=direct 2>>/tmp/hp.err
    echo "E2E-RESULT hp_read_rc=$?"
    echo "E2E-RESULT hp_md5=$(md5sum < /tmp/hp.read | cut -d' ' -f1)"
    tail -n 3 /tmp/hp.err
    read after _ < /tmp/bg.count
    echo "E2E-RESULT bg_during_hotplug=$((after - before))"
else
    echo "E2E-RESULT hp_error=no_vdb"
fi
echo "E2E-HOTPLUG-WRITTEN"
n=0
while [ -e /sys/block/vdb ] && [ $n -lt 1200 ]; do usleep 100000; n=$((n + 1)); done
[ -e /sys/block/vdb ] && echo "E2E-RESULT hp_gone=0" || echo "E2E-RESULT hp_gone=1"
echo "E2E-HOTPLUG-GONE"
# keep going until the host, done removing the device, writes GO on the first disk
# (at {go_off}, outside the loop's blocks; read with O_DIRECT, so from the image)
n=0
while [ $n -lt 1200 ]; do
    [ "$(dd if=/dev/vda bs=512 skip={go_sector} count=1 iflag=direct 2>/dev/null | head -c 2)" = "GO" ] && break
    usleep 100000; n=$((n + 1))
done
echo "E2E-RESULT go_seen=$([ $n -lt 1200 ] && echo 1 || echo 0)"
read gone _ < /tmp/bg.count
while read now _ < /tmp/bg.count && [ $((now - gone)) -lt 3 ]; do usleep 50000; done
touch /tmp/stop_bg
wait $BG
read rounds bad < /tmp/bg.count
echo "E2E-RESULT bg_rounds=$rounds"
echo "E2E-RESULT bg_bad=$bad"
"""


def _cli_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cli() + list(args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_hotplug_a_disk_added_at_run_time(make_qemu, workdir):
    base_img = gs.make_image(workdir / "base.img", 16 * MiB)
    hp_img = gs.make_image(workdir / "hot.img", 8 * MiB)
    base_sock, hp_sock = workdir / "base.sock", workdir / "hot.sock"
    # a uid-range of its own: other supervisors on this host may hold the default one
    conf = workdir / "sup.toml"
    start = 1879048192 + 65536 * random.randrange(1000, 2000)
    conf.write_text(f'[supervisor]\nuid-range = "{start}-{start + 255}"\n')
    sup = Supervisor(workdir, ["--config", str(conf), "--block", f"vhost={base_sock},path={base_img},name=base"],
                     workdir / "supervisor.log")
    bg_data = gs.pattern(seed=31, size=gs.BS)
    hp_data = gs.pattern(seed=32, size=HP_SIZE)
    script = GUEST.format(bs=gs.BS, hp_blocks_off=HP_OFFSET // gs.BS, hp_blocks=HP_SIZE // gs.BS,
                          go_off=GO_OFFSET, go_sector=GO_OFFSET // 512)
    ctl = str(sup.control)
    try:
        sup.start([base_sock])
        q = make_qemu(name="hotplug", qmp=True)
        q.attach(sup)
        q.add_vhost_user_blk(base_sock)
        q.start(script, {"pattern": bg_data, "pattern2": hp_data})
        q.wait_for_line("E2E-HOTPLUG-WAIT", 120)
        base_pid = sup.device_pid("base")
        assert "hot" not in {d["name"] for d in sup.devices()}

        r = _cli_run("add", "--block", f"vhost={hp_sock},path={hp_img},name=hot", "-s", ctl)
        assert r.returncode == 0, r.stderr
        with q.qmp() as qmp:
            qmp.hotplug_vhost_user_blk("hotchr", "hotdisk", hp_sock)
            q.wait_for_line("E2E-HOTPLUG-WRITTEN", 180)
            hot = {d["name"]: d for d in sup.devices()}["hot"]
            assert hot["state"] == "serving", hot
            # connected: refused without --force
            r = _cli_run("remove", "hot", "-s", ctl)
            assert r.returncode == 1 and "front-end is connected" in r.stderr, r.stderr
            qmp.unplug("hotchr", "hotdisk", timeout=120)
        q.wait_for_line("E2E-HOTPLUG-GONE", 60)
        # QEMU closed the connection: the device can go, while the guest still runs
        hot_pid = hot["pid"]
        r = _cli_run("remove", "hot", "-s", ctl)
        assert r.returncode == 0, r.stderr
        assert not hp_sock.exists()
        assert sup.device_pid("base") == base_pid
        with open(base_img, "r+b") as f:
            f.seek(GO_OFFSET)
            f.write(b"GO")
        res = q.wait(240)
    finally:
        sup.stop()
    assert res.rc == 0, res.results
    assert res.results.get("hp_gone") == "1" and res.results.get("go_seen") == "1", res.results
    assert res.int("hp_size") == 8 * MiB
    assert res.int("hp_write_rc") == 0 and res.int("hp_read_rc") == 0, res.results
    assert res.results["hp_md5"] == gs.md5(hp_data)
    assert gs.image_bytes(hp_img, HP_OFFSET, HP_SIZE) == hp_data   # on the host's image too
    # the first disk served all along: no error, its child never changed
    assert res.int("bg_bad") == 0 and res.int("bg_rounds") > 0, res.results
    assert res.int("io_errors") == 0, res.results
    assert gs.image_bytes(base_img, 0, gs.BS) == bg_data
    log = sup.log_path.read_text()
    assert "device=hot event=removed" in log and f"pid={hot_pid}" in log
    # up to the removal (before the guest powered off): one child for the first disk, no exit
    upto = log.split("device=hot event=removed", 1)[0].splitlines()
    base_spawns = [line for line in upto if "device=base event=spawn" in line]
    assert len(base_spawns) == 1 and f"pid={base_pid}" in base_spawns[0], base_spawns
    assert not [line for line in upto if "device=base event=exit" in line]
    assert not sup.abnormal_exits(), sup.abnormal_exits()
    assert os.path.getsize(hp_img) == 8 * MiB
