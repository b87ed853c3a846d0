"""Finding 3, from the attacker's side: a guest that floods its console
(``type=file``) costs at most max-size x (keep + 1) bytes of disk, and a
transmit chain of more than IOV_MAX buffers that all alias one guest buffer
is written in pieces, never joined (the device is jailed with its real
policy and budget, so the rotation runs with what the jail allows)."""

from __future__ import annotations

import os

import pytest

from devices import ConfigError
from devices.console import IOV_MAX, ConsoleBuilder

from frontend.hostile import MiB, peak_rss, reset_peak, rss, start_jailed, stop_jailed, wait_all

GROWTH_GOAL = 64 * MiB


def _files(out) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(out.parent.iterdir()) if p.name.startswith(out.name)}


def test_flood_is_bounded_by_max_size_and_keep(tmp_path):
    out = tmp_path / "console.log"
    child, fe = start_jailed("console", {"type": "file", "path": str(out), "max-size": "1M", "keep": "2"})
    try:
        fe.negotiate()
        fe.setup_memory(16 * MiB)
        fe.setup_queue(0, 64)
        tx = fe.setup_queue(1, 256)
        gpa, view = tx.alloc(64 << 10, 4096)
        heads = set()
        total = 0
        for i in range(200):           # 12.5 MiB of output, each chunk tagged
            view[:] = (b"%06d" % i) * (len(view) // 6) + b"\n" * (len(view) % 6)
            heads = {tx.submit([(gpa, len(view))], [])}
            tx.kick()
            wait_all(tx, heads)
            total += len(view)
        assert not tx.broken()
    finally:
        reason = stop_jailed(child, fe)
    assert reason == "exited with status 0"
    files = _files(out)
    assert set(files) == {"console.log", "console.log.1", "console.log.2"}
    assert all(size <= MiB for size in files.values()), files
    assert sum(files.values()) <= 3 * MiB < total
    # Rotation keeps order: console.log ends with the last chunk, and
    # console.log.1 ends with the chunk just before console.log's first.
    chunk = 64 << 10
    data = out.read_bytes()
    assert data[-chunk:][:6] == b"000199"
    first = int(data[:6])
    assert int((tmp_path / "console.log.1").read_bytes()[-chunk:][:6]) == first - 1
    assert files["console.log.1"] == MiB


def test_keep_zero_truncates_in_place(tmp_path):
    out = tmp_path / "c.log"
    out.write_bytes(b"old" * 100_000)     # an earlier run left more than max-size
    child, fe = start_jailed("console", {"type": "file", "path": str(out), "max-size": "64K", "keep": "0"})
    try:
        fe.negotiate()
        fe.setup_memory(4 * MiB)
        fe.setup_queue(0, 64)
        tx = fe.setup_queue(1, 64)
        gpa, view = tx.alloc(4096, 4096)
        view[:] = b"n" * 4096
        head = tx.submit([(gpa, 4096)], [])
        tx.kick()
        wait_all(tx, {head})
    finally:
        stop_jailed(child, fe)
    assert _files(out) == {"c.log": 4096}
    assert out.read_bytes() == b"n" * 4096


def test_chain_longer_than_iov_max_is_not_joined(tmp_path):
    """~2000 views (1000 descriptors that each straddle the boundary of two
    adjacent guest regions) all aliasing one 256 KiB buffer: the device
    writes 250 MiB of output (bounded by max-size on disk), its peak RSS
    grows by far less than the chain's length."""
    out = tmp_path / "console.log"
    child, fe = start_jailed("console", {"type": "file", "path": str(out), "max-size": "8M"})
    try:
        fe.negotiate()
        half = 16 * MiB
        mem = fe.setup_memory(2 * half, gpa1=half)    # region 1 right after region 0
        fe.setup_queue(0, 64)
        tx = fe.setup_queue(1, 1024)
        buf_len = 256 << 10
        start = half - buf_len // 2                    # straddles the two regions
        mem.view(start, buf_len // 2)[:] = b"a" * (buf_len // 2)
        mem.view(half, buf_len // 2)[:] = b"b" * (buf_len // 2)
        descriptors = 1000
        assert 2 * descriptors > IOV_MAX
        pid = child.device_pid
        before = rss(pid)
        reset_peak(pid)
        head = tx.submit([(start, buf_len)] * descriptors, [])
        tx.kick()
        wait_all(tx, {head})
        growth = peak_rss(pid) - before
        assert not tx.broken()
    finally:
        reason = stop_jailed(child, fe)
    assert reason == "exited with status 0"
    assert growth < GROWTH_GOAL, f"device peak RSS grew {growth / MiB:.0f} MiB writing one chain"
    files = _files(out)
    assert all(size <= 8 * MiB for size in files.values()), files
    data = out.read_bytes()
    assert data and data.count(b"a") == data.count(b"b") == len(data) // 2


def test_rotation_options(tmp_path):
    out = tmp_path / "c.log"
    with pytest.raises(ConfigError, match=r"device 'con', key 'max-size', value '1': outside"):
        ConsoleBuilder.from_options("con", {"type": "file", "path": str(out), "max-size": "1"})
    with pytest.raises(ConfigError, match=r"device 'con', key 'keep', value '10': outside"):
        ConsoleBuilder.from_options("con", {"type": "file", "path": str(out), "keep": "10"})
    with pytest.raises(ConfigError, match=r"device 'con', key 'max-size/keep': applies to type=file only"):
        ConsoleBuilder.from_options("con", {"type": "sink", "keep": "1"})
    b = ConsoleBuilder.from_options("con", {"type": "file", "path": str(out), "max-size": "2M", "keep": "1"})
    try:
        assert b.max_size == 2 * MiB and len(b.rotate_fds) == 1
        assert os.path.exists(f"{out}.1") and not os.path.exists(f"{out}.2")
    finally:
        b.close()


def test_oversized_old_file_rotates_within_budget(tmp_path):
    """A file an earlier run left larger than max-size is rotated on the
    first write, and only its last max-size bytes are kept in path.1."""
    out = tmp_path / "c.log"
    old = b"".join(b"%07d\n" % i for i in range(40_000))      # 320,000 bytes
    out.write_bytes(old)
    child, fe = start_jailed("console", {"type": "file", "path": str(out), "max-size": "64K", "keep": "1"})
    try:
        fe.negotiate()
        fe.setup_memory(4 * MiB)
        fe.setup_queue(0, 64)
        tx = fe.setup_queue(1, 64)
        gpa, view = tx.alloc(100, 64)
        view[:] = b"n" * 100
        head = tx.submit([(gpa, 100)], [])
        tx.kick()
        wait_all(tx, {head})
    finally:
        stop_jailed(child, fe)
    assert out.read_bytes() == b"n" * 100
    assert (tmp_path / "c.log.1").read_bytes() == old[-(64 << 10):]
