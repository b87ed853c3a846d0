"""Finding 2 and the memory budget, from the attacker's side: a hostile
driver lists one unaligned guest buffer hundreds of times in a request to a
``direct=true`` block device; the device, jailed as the supervisor jails it,
must serve it with a bounded bounce buffer (peak RSS growth < 64 MiB, where
the request is hundreds of MiB long), and its heap budget is RLIMIT_DATA,
with guest RAM (shared memory) outside it."""

from __future__ import annotations

import mmap
import os
import resource

import psutil
import pytest

from devices import ConfigError
from devices.devtype import DEFAULT_MEMORY_LIMIT
from devices.block import BlockBuilder

from devices.virtio_blk import T_IN, T_OUT
from frontend.hostile import (MiB, aliased_block_request, data_limit, peak_rss, reset_peak, rss,
                      start_jailed, stop_jailed, status_kib, wait_all)

ALIASES = 200          # each request: 200 x the same 1 MiB guest buffer
REQUESTS = 4           # in flight together (the I/O threads serve them in parallel)
GROWTH_GOAL = 64 * MiB


@pytest.fixture
def big_image(tmp_path):
    """A sparse image large enough for the aliased requests (ext4 here: O_DIRECT works)."""
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(REQUESTS * ALIASES * MiB)
    return str(path)


def _aliased_round(q, pid: int, op: int, buf: int) -> int:
    """REQUESTS aliased requests in flight; returns the device's peak RSS growth."""
    before = rss(pid)
    reset_peak(pid)
    heads, statuses = set(), []
    for i in range(REQUESTS):
        head, status = aliased_block_request(q, op, i * ALIASES * MiB // 512, buf, MiB, ALIASES)
        heads.add(head)
        statuses.append(status)
    q.kick()
    wait_all(q, heads)
    assert [s[0] for s in statuses] == [0] * REQUESTS, "the aliased requests must still be served"
    return peak_rss(pid) - before


def test_aliased_bounce_is_bounded(big_image):
    """Writes first (they allocate the image's blocks: O_DIRECT reads of
    holes need no alignment and would not reach the bounce path), then
    reads of what was written."""
    child, fe = start_jailed("block", {"path": big_image, "direct": "true"})
    try:
        fe.negotiate()
        fe.setup_memory(64 * MiB)
        q = fe.setup_queue(0, 1024)
        gpa, view = q.alloc(MiB + 4096, 4096)
        pattern = bytes(range(256)) * (MiB // 256)
        view[1:MiB + 1] = pattern
        buf = gpa + 1                  # unaligned: O_DIRECT refuses it, the bounce path runs
        pid = child.device_pid
        growth = _aliased_round(q, pid, T_OUT, buf)
        assert growth < GROWTH_GOAL, (f"device peak RSS grew {growth / MiB:.0f} MiB serving "
                                      f"{REQUESTS} x {ALIASES} MiB writes from 1 MiB of guest memory")
        with open(big_image, "rb") as f:
            f.seek((REQUESTS * ALIASES - 1) * MiB)
            assert f.read(MiB) == pattern
        view[1:MiB + 1] = bytes(MiB)
        growth = _aliased_round(q, pid, T_IN, buf)
        assert growth < GROWTH_GOAL, (f"device peak RSS grew {growth / MiB:.0f} MiB serving "
                                      f"{REQUESTS} x {ALIASES} MiB reads into 1 MiB of guest memory")
        assert bytes(view[1:MiB + 1]) == pattern
        assert not q.broken()
    finally:
        reason = stop_jailed(child, fe)
    assert reason == "exited with status 0"


# --------------------------------------------------------------------------
# The memory budget: memory-limit= -> RLIMIT_DATA in the jail

@pytest.mark.parametrize("kind,options", [("block", {"direct": "true"}), ("console", {}), ("rng", {})])
def test_memory_limit_is_the_jailed_childs_rlimit_data(tmp_path, kind, options):
    if kind == "block":
        img = tmp_path / "d.img"
        img.write_bytes(bytes(MiB))
        options = dict(options, path=str(img))
    child, fe = start_jailed(kind, options)
    try:
        assert data_limit(child.device_pid) == DEFAULT_MEMORY_LIMIT
        assert data_limit(child.pid) is None, "the forwarder runs no device code: no budget"
    finally:
        stop_jailed(child, fe)
    child, fe = start_jailed(kind, dict(options, **{"memory-limit": "96M"}))
    try:
        assert data_limit(child.device_pid) == 96 * MiB
    finally:
        stop_jailed(child, fe)


def test_memory_limit_option_errors_name_key_and_value(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    for bad, why in (("lots", "not a size"), ("1M", "outside"), ("100T", "outside")):
        with pytest.raises(ConfigError, match=rf"device 'blk', key 'memory-limit', value '{bad}': {why}"):
            BlockBuilder.from_options("blk", {"path": str(img), "memory-limit": bad})


def test_guest_ram_is_outside_the_budget(tmp_path):
    """A 1 GiB guest served by a device whose budget is what it inherits at
    fork plus 48 MiB: the device writes into 500 MiB of guest RAM (one read
    request), far more than its budget, because guest RAM is shared memory."""
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(512 * MiB)
    budget = (status_kib(os.getpid(), "VmData") * 1024 + 48 * MiB) // MiB * MiB
    child, fe = start_jailed("block", {"path": str(img), "memory-limit": str(budget)})
    try:
        assert data_limit(child.device_pid) == budget
        fe.negotiate()
        fe.setup_memory(1024 * MiB)    # two 512 MiB regions
        q = fe.setup_queue(0, 256)
        length = 500 * MiB
        gpa, view = q.alloc(length, 4096)
        view[::4096] = b"\x01" * len(view[::4096])
        st_gpa, status = q.alloc(1, 1)
        hdr_gpa, hdr = q.alloc(16, 16)
        hdr[:] = bytes(16)             # T_IN, sector 0
        head = q.submit([(hdr_gpa, 16)], [(gpa, length), (st_gpa, 1)])
        q.kick()
        wait_all(q, {head})
        assert status[0] == 0
        assert not any(view[::4096]), "the image's zeros did not reach guest memory"
        assert rss(child.device_pid) > length, "the device did not touch the guest pages itself"
        assert status_kib(child.device_pid, "VmData") * 1024 <= budget < length
    finally:
        reason = stop_jailed(child, fe)
    assert reason == "exited with status 0"


def test_rlimit_data_semantics_on_this_kernel():
    """What the budget rests on, checked in a real jail: MAP_SHARED memfd
    mappings (guest RAM) far larger than RLIMIT_DATA map and fill; a
    private allocation over it fails with MemoryError in the jailed process
    (and only there)."""
    from sandbox import JailConfig

    from tests.sandbox.helpers import run_in_jail

    budget = 64 * MiB

    def inside() -> dict:
        out = {"limit": resource.getrlimit(resource.RLIMIT_DATA)[0]}
        fd = os.memfd_create("guest-ram")
        os.ftruncate(fd, 4 * budget)
        ram = mmap.mmap(fd, 4 * budget, mmap.MAP_SHARED)
        for off in range(0, len(ram), mmap.PAGESIZE):
            ram[off] = 1
        out["shared_mapped"] = len(ram)
        try:
            big = bytearray(2 * budget)
            out["private"] = len(big)
        except MemoryError:
            out["private"] = "MemoryError"
        try:
            mmap.mmap(-1, 2 * budget, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            out["private_mmap"] = "mapped"
        except OSError as exc:
            out["private_mmap"] = exc.errno
        return out

    got, reason, _ = run_in_jail(JailConfig(name="rlimit-data", data_limit=budget), inside)
    assert str(reason) == "exited with status 0"
    assert got == {"limit": budget, "shared_mapped": 4 * budget, "private": "MemoryError",
                   "private_mmap": 12}   # ENOMEM


def test_supervisor_applies_memory_limit(sock_dir):
    """End to end: the supervisor's jailed block child has memory-limit= as RLIMIT_DATA."""
    from tests.supervisor.conftest import SupervisorProc

    sup = SupervisorProc(sock_dir)
    try:
        img = sup.image()
        sup.start("--block", f"vhost={sup.path('a.sock')},path={img},memory-limit=80M,name=a",
                  "--rng", f"vhost={sup.path('r.sock')},name=r")
        st = sup.status()
        assert data_limit(st["a"]["pid"]) == 80 * MiB
        assert data_limit(st["r"]["pid"]) == DEFAULT_MEMORY_LIMIT
        assert sup.terminate() == 0
    finally:
        sup.cleanup()


def test_over_budget_fails_the_request_not_the_device(big_image, tmp_path):
    """A device whose budget is spent (its soft RLIMIT_DATA lowered below
    what it uses now, from outside, as root) answers the request that needs
    a bounce buffer with IOERR; the queue and the device go on serving (once
    the budget is back: what else would need memory at that moment is
    luck)."""
    from frontend.virtio_blk import BlockDriver

    log = open(tmp_path / "device.log", "w+")
    child, fe = start_jailed("block", {"path": big_image, "direct": "true"}, log_fd=log.fileno())
    try:
        fe.negotiate()
        fe.setup_memory(64 * MiB)
        q = fe.setup_queue(0, 1024)
        gpa, _view = q.alloc(MiB + 4096, 4096)
        drv = BlockDriver(q, depth=1, max_io=64 << 10)
        drv.write(0, b"a" * 4096)
        pid = child.device_pid
        # 1 MiB below what it uses now: only a free of more than 2 MiB in
        # between would leave room for a 1 MiB bounce buffer.
        spent = status_kib(pid, "VmData") * 1024 - MiB
        # Only the soft limit: raising a hard one back needs CAP_SYS_RESOURCE.
        psutil.Process(pid).rlimit(psutil.RLIMIT_DATA, (spent, DEFAULT_MEMORY_LIMIT))
        head, status = aliased_block_request(q, T_OUT, 0, gpa + 1, MiB, 4)
        q.kick()
        wait_all(q, {head})
        assert status[0] == 1, "an over-budget request must fail with IOERR"
        assert not q.broken()
        # The budget back (as after memory is freed): the same queue serves on.
        psutil.Process(pid).rlimit(psutil.RLIMIT_DATA, (DEFAULT_MEMORY_LIMIT, DEFAULT_MEMORY_LIMIT))
        drv.write(0, b"b" * 4096)
        assert drv.read(0, 4096) == b"b" * 4096
    finally:
        reason = stop_jailed(child, fe)
        log.seek(0)
        print(log.read())
        log.close()
    assert reason == "exited with status 0"
