"""The supervisor as the shipped systemd unit runs it: not root, but a service
user holding only CAP_SETUID and CAP_SETGID (ambient), with no CAP_SYS_PTRACE.

Started here through setpriv(1) with exactly that identity and those sets:
every device must still run jailed under its own host uid, serve I/O, and
show up as "serving" with a front-end, although the supervisor cannot read a
jailed (non-dumpable) child's fd table.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import psutil
import pytest

from frontend.exercise import drive_block, drive_rng
from frontend.supervisor_process import SupervisorProcess
from frontend.vhost_user import VhostUserFrontend

SERVICE_UID = 1878999001          # outside the default jail pool (1879048192-)
UID_RANGE = "1879111000-1879111063"


def _unused(uid: int) -> None:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        pass
    else:
        raise AssertionError(f"uid {uid} has an account here; the test needs an unused one")
    users = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and uid in p.info["uids"]]
    assert not users, f"uid {uid} is used by processes {users}"


class Started(NamedTuple):
    sup: SupervisorProcess
    work: str
    wrap: tuple[str, ...]
    config: str
    image: str


@pytest.fixture
def service_user_supervisor() -> Iterator[Started]:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to start the supervisor as a capable non-root user"
    _unused(SERVICE_UID)
    work = tempfile.mkdtemp(prefix="vs-svcuser-", dir="/tmp")
    os.chown(work, SERVICE_UID, SERVICE_UID)
    image = os.path.join(work, "disk.img")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    os.chown(image, SERVICE_UID, SERVICE_UID)
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write(f'[supervisor]\nuid-range = "{UID_RANGE}"\n')
    sup = SupervisorProcess(work)
    # READY=1 comes on a socket we (root) bind: the service user may send to it
    sup.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sup.notify.bind(sup.notify_path)
    os.chmod(sup.notify_path, 0o666)
    wrap = (setpriv, f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups",
            "--inh-caps=-all,+setuid,+setgid", "--ambient-caps=-all,+setuid,+setgid",
            "--bounding-set=-all,+setuid,+setgid")
    try:
        yield Started(sup, work, wrap, config, image)
    finally:
        sup.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def test_capable_service_user_jails_each_device_under_its_own_uid(service_user_supervisor: Started) -> None:
    sup, work, wrap, config, image = service_user_supervisor
    blk, rng = os.path.join(work, "b.sock"), os.path.join(work, "r.sock")
    sup.start("--config", config, "--block", f"vhost={blk},path={image}", "--rng", f"vhost={rng}",
              wrap=wrap, env={"HOME": work})
    assert sup.proc is not None
    me = psutil.Process(sup.proc.pid)
    assert me.uids().effective == SERVICE_UID
    status = open(f"/proc/{sup.proc.pid}/status").read()
    assert "CapEff:\t00000000000000c0" in status, status      # CAP_SETUID | CAP_SETGID, nothing else

    lo, hi = (int(x) for x in UID_RANGE.split("-"))
    uids = {}
    for name in ("block-0", "rng-0"):
        d = sup.wait_state(name, ("ready",))
        uids[name] = psutil.Process(d["pid"]).uids()
    assert all(lo <= u.real == u.effective <= hi for u in uids.values()), uids
    assert uids["block-0"].real != uids["rng-0"].real, uids

    # I/O through the jailed device, and the front-end seen without reading its fd table
    data = os.urandom(4096)
    assert drive_block(blk, 8192, data) == data
    with VhostUserFrontend.connect(rng) as fe:
        fe.negotiate()
        d = sup.wait_state("rng-0", ("serving",))
        assert d["frontend"] == "yes", d
    sup.wait_state("rng-0", ("ready",), pred=lambda d: d["frontend"] == "no")
    assert len(drive_rng(rng)) == 64
    assert sup.terminate() == 0


def test_root_without_id_capabilities_refuses_rather_than_run_devices_as_root(tmp_path) -> None:  # noqa: ANN001
    """uid 0 that lost CAP_SETUID/CAP_SETGID (a unit with a narrower bounding
    set) could map only itself, i.e. root, into a jail: a config error instead."""
    import subprocess
    import sys
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop the capabilities"
    proc = subprocess.run([setpriv, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                           sys.executable, "-m", "supervisor.cli", "run", "-s", str(tmp_path / "c.sock"),
                           "--rng", f"vhost={tmp_path / 'r.sock'}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "without CAP_SETUID/CAP_SETGID" in proc.stderr and "will not run as root" in proc.stderr, proc.stderr
    assert not (tmp_path / "r.sock").exists()
