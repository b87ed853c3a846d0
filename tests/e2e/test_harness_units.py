"""The harness's own pieces, checked without booting anything (fast, so they run first).

Why: a parsing or packing bug in the harness would otherwise show up as a confusing guest
failure; these pin the console format, the cpio layout and the module order.
"""

from __future__ import annotations

import gzip
import subprocess

import pytest

from frontend.guest.initramfs import DEFAULT_MODULES, CpioWriter, overlay_cpio
from frontend.guest.kernel import modinfo_depends, parse_modules_dep, read_module, resolve_modules
from frontend.guest.qemu import parse_console


@pytest.mark.e2e
def test_parse_console_strips_escapes_and_reads_results():
    text = (
        "Probing EDD (edd=off to disable)... o\x1bc\x1b[?7l\x1b[2JE2E-BOOTED uptime=1.81\r\n"
        "[    1.9] some kernel line\n"
        "E2E-RESULT readback_md5=abc123\n"
        "E2E-RESULT write_err=dd: error writing '/dev/vda': Operation not permitted\n"
        "E2E-DONE rc=0 uptime=1.90\n"
    )
    rc, results, uptime = parse_console(text)
    assert rc == 0 and uptime == 1.81
    assert results == {"readback_md5": "abc123", "write_err": "dd: error writing '/dev/vda': Operation not permitted"}


@pytest.mark.e2e
def test_parse_console_without_done_has_no_rc():
    assert parse_console("E2E-BOOTED uptime=2.0\nE2E-RESULT a=1\n")[0] is None


@pytest.mark.e2e
def test_cpio_is_readable_by_gnu_cpio(tmp_path):
    w = CpioWriter()
    w.add_file("e2e/guest.sh", b"echo hi\n", 0o755)
    w.add_symlink("bin/sh", "busybox")
    archive = tmp_path / "a.cpio"
    archive.write_bytes(w.finish())
    out = subprocess.run(["cpio", "-itv"], stdin=open(archive, "rb"), capture_output=True, text=True, check=True)
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in out.stdout.splitlines()]
    assert names == ["e2e", "e2e/guest.sh", "bin", "bin/sh"]
    assert "-rwxr-xr-x" in out.stdout


@pytest.mark.e2e
def test_overlay_is_gzip_cpio_with_script_and_files():
    data = gzip.decompress(overlay_cpio("echo x\n", {"pattern": b"\x01" * 10}))
    assert data.startswith(b"070701") and b"e2e/guest.sh" in data and b"e2e/pattern" in data
    assert b"TRAILER!!!" in data


@pytest.mark.e2e
def test_parse_modules_dep():
    deps = parse_modules_dep(
        "kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko.zst: kernel/drivers/virtio/virtio.ko.zst\n"
    )
    assert deps == {"virtio_blk": ["virtio", "virtio_ring"], "virtio_rng": ["virtio"]}


@pytest.mark.e2e
def test_module_order_puts_dependencies_first(guest_kernel):
    order = [name for name, _ in resolve_modules(guest_kernel, DEFAULT_MODULES)]
    for mod in ("virtio_pci", "virtio_blk", "virtio_rng", "virtio_console"):
        assert mod in order
    for name, elf in resolve_modules(guest_kernel, DEFAULT_MODULES):
        for dep in modinfo_depends(elf):
            assert order.index(dep) < order.index(name), f"{dep} must load before {name}"


@pytest.mark.e2e
def test_read_module_decompresses_xz(guest_kernel, tmp_path):
    import lzma

    src = guest_kernel.module_index()["virtio_blk"]
    raw = read_module(src)
    packed = tmp_path / "virtio_blk.ko.xz"
    packed.write_bytes(lzma.compress(raw))
    assert read_module(packed) == raw and raw[:4] == b"\x7fELF"
