"""Initramfs images for the e2e guest: busybox, the virtio modules, a small /init.

The image is split in two gzip'd cpio archives that the kernel unpacks one after the
other: a cached base (busybox, modules, /init) and a per-run overlay holding the test's
guest script and data files. So a new case costs only a tiny overlay, not a rebuild.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
from pathlib import Path

from .kernel import CACHE_DIR, GuestKernel, HarnessError, resolve_modules

# virtio_pci gives the PCI transport; the others are the drivers our devices need.
DEFAULT_MODULES = ["virtio_pci", "virtio_blk", "virtio_rng", "virtio_console"]

BUSYBOX_CANDIDATES = ["/bin/busybox", "/usr/bin/busybox"]

# Result lines are what the host parses; see qemu.parse_results.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
while read -r m; do
    insmod "/lib/modules/e2e/$m.ko" || echo "E2E-RESULT insmod_failed=$m"
done < /lib/modules/e2e/order
echo "E2E-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ -x /e2e/guest.sh ]; then
    cd /e2e && /bin/sh /e2e/guest.sh
    rc=$?
else
    echo "E2E-RESULT error=no_guest_script"
    rc=127
fi
echo "E2E-RESULT io_errors=$(dmesg | grep -ciE 'I/O error|blk_update_request|critical (target|medium)')"
echo "E2E-DONE rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
"""


class CpioWriter:
    """Minimal cpio "newc" writer: all the kernel's initramfs unpacker reads."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name_b = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (
                self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0,
            )
        )
        self._ino += 1
        self._buf.write(header.encode() + name_b)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self._dirs:
                self._dirs.add(sub)
                self._entry(sub, stat.S_IFDIR | 0o755)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def is_static_elf(path: Path) -> bool:
    """True if the ELF has no PT_INTERP, i.e. runs without a dynamic loader."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(
        struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum)
    )


def find_busybox() -> Path:
    """Why static: the initramfs carries no libc, busybox must run on its own."""
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.exists() and is_static_elf(p.resolve()):
            return p
    raise HarnessError(
        "no static busybox found (/bin/busybox): install Debian's busybox-static "
        "(`make system-packages`)"
    )


def base_initramfs(
    kernel: GuestKernel,
    modules: list[str] | None = None,
    extra_files: dict[str, Path] | None = None,
    cache_dir: Path = CACHE_DIR,
) -> Path:
    """Build (or reuse) the base image: busybox, the modules in load order, /init.

    `extra_files` maps guest paths to host files (e.g. fio and its libraries). The
    cache key covers everything that goes in, so a change rebuilds and a repeat does not.
    """
    modules = list(modules or DEFAULT_MODULES)
    extra_files = dict(extra_files or {})
    busybox = find_busybox()
    key = hashlib.sha256()
    key.update(kernel.release.encode())
    key.update(INIT_SCRIPT.encode())
    key.update(",".join(modules).encode())
    for src in [busybox, *extra_files.values()]:
        st = Path(src).stat()
        key.update(f"{src}:{st.st_size}:{st.st_mtime_ns}".encode())
    key.update(repr(sorted(extra_files)).encode())
    out = cache_dir / "initramfs" / f"base-{key.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out

    cpio = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "e2e", "lib64"):
        cpio.mkdir(d)
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_file("init", INIT_SCRIPT.encode(), 0o755)
    ordered = resolve_modules(kernel, modules)
    for name, elf in ordered:
        cpio.add_file(f"lib/modules/e2e/{name}.ko", elf)
    cpio.add_file("lib/modules/e2e/order", "".join(f"{n}\n" for n, _ in ordered).encode())
    for guest_path, src in sorted(extra_files.items()):
        cpio.add_file(guest_path, Path(src).read_bytes(), 0o755)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=1))
    os.replace(tmp, out)
    return out


def overlay_cpio(guest_script: str, files: dict[str, bytes] | None = None) -> bytes:
    """A gzip'd cpio holding /e2e/guest.sh and the run's data files under /e2e/."""
    cpio = CpioWriter()
    cpio.add_file("e2e/guest.sh", guest_script.encode(), 0o755)
    for name, data in (files or {}).items():
        cpio.add_file(f"e2e/{name}", data, 0o644)
    return gzip.compress(cpio.finish(), compresslevel=1)


def compose_initrd(base: Path, guest_script: str, files: dict[str, bytes] | None, dest: Path) -> Path:
    """Concatenate the cached base and the run's overlay into one -initrd file."""
    with open(dest, "wb") as out, open(base, "rb") as src:
        shutil.copyfileobj(src, out)
        out.write(overlay_cpio(guest_script, files))
    return dest
