"""Guest kernel cache: Debian's cloud kernel, unpacked (never installed) under .cache/e2e.

Why Debian's cloud kernel: it is small, signed, reproducible with `apt-get download`, and
builds exactly the virtio drivers we need as modules, so the initramfs must carry them.
Everything here is idempotent: a second call with a warm cache does no network and no
unpacking.
"""

from __future__ import annotations

import dataclasses
import fcntl
import lzma
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("E2E_CACHE_DIR", REPO_ROOT / ".cache" / "e2e"))

META_PACKAGE = "linux-image-cloud-amd64"


class HarnessError(RuntimeError):
    """The e2e harness could not prepare or run something; the message says what."""


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    """An unpacked kernel: the bzImage and the module tree of one release."""

    release: str
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<release>

    def module_index(self) -> dict[str, Path]:
        """Map module name (underscores) to its .ko / .ko.xz / .ko.zst file."""
        index: dict[str, Path] = {}
        for path in (self.modules_dir / "kernel").rglob("*.ko*"):
            name = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", path.name).replace("-", "_")
            index[name] = path
        return index


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as exc:
        raise HarnessError(f"{cmd[0]} is not installed: run `make system-packages`") from exc
    except subprocess.CalledProcessError as exc:
        raise HarnessError(f"{' '.join(cmd)} failed ({exc.returncode}): {exc.stderr.strip()}") from exc


def resolve_kernel_package() -> str:
    """Name the concrete linux-image-<ver>-cloud-amd64 the meta-package points at."""
    override = os.environ.get("E2E_KERNEL_PACKAGE")
    if override:
        return override
    out = _run(["apt-cache", "depends", META_PACKAGE]).stdout
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise HarnessError(
        f"apt-cache depends {META_PACKAGE} names no linux-image-*-cloud-amd64; "
        "run `apt-get update` (the package lists may be missing)"
    )


def _find_unpacked(root: Path) -> GuestKernel | None:
    boot = root / "boot"
    kernels = sorted(boot.glob("vmlinuz-*")) if boot.is_dir() else []
    if not kernels:
        return None
    release = kernels[-1].name.removeprefix("vmlinuz-")
    mods = root / "lib" / "modules" / release
    if not mods.is_dir():
        return None
    return GuestKernel(release=release, vmlinuz=kernels[-1], modules_dir=mods)


def ensure_kernel(cache_dir: Path = CACHE_DIR) -> GuestKernel:
    """Return the cached guest kernel, downloading and unpacking it on first use.

    A cached kernel is used as is (no apt query) so warm runs need no package lists;
    delete .cache/e2e/kernel to pick up a newer one.
    """
    kdir = cache_dir / "kernel"
    kdir.mkdir(parents=True, exist_ok=True)
    with open(kdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for pkg_dir in sorted(kdir.iterdir()):
            if pkg_dir.is_dir() and (pkg_dir / ".complete").exists():
                found = _find_unpacked(pkg_dir / "root")
                if found:
                    return found
        pkg = resolve_kernel_package()
        pkg_dir = kdir / pkg
        shutil.rmtree(pkg_dir, ignore_errors=True)
        pkg_dir.mkdir()
        _run(["apt-get", "download", pkg], cwd=pkg_dir)
        debs = list(pkg_dir.glob("*.deb"))
        if len(debs) != 1:
            raise HarnessError(f"apt-get download {pkg} left {debs} in {pkg_dir}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(pkg_dir / "root")])
        debs[0].unlink()
        found = _find_unpacked(pkg_dir / "root")
        if not found:
            raise HarnessError(f"{pkg} holds no boot/vmlinuz-* with its lib/modules tree")
        (pkg_dir / ".complete").touch()
        return found


# --- modules -----------------------------------------------------------------------


def read_module(path: Path) -> bytes:
    """Return the ELF bytes of a module, decompressing .ko.xz / .ko.zst / .ko.gz."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return _run_bytes(["zstd", "-dc", str(path)])
    return data


def _run_bytes(cmd: list[str]) -> bytes:
    try:
        return subprocess.run(cmd, check=True, capture_output=True).stdout
    except FileNotFoundError as exc:
        raise HarnessError(f"{cmd[0]} is not installed: run `make system-packages`") from exc


def modinfo_depends(elf: bytes) -> list[str]:
    """Read `depends=` from the module's .modinfo ELF section.

    Debian ships no modules.dep (depmod runs at install time, and we never install), so
    we read the dependency list the kernel build wrote into each module instead.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise HarnessError("module is not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", elf, base)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name_off, off, size = section(i)
        end = elf.index(b"\0", stroff + name_off)
        if elf[stroff + name_off : end] == b".modinfo":
            for entry in elf[off : off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    deps = entry[len(b"depends=") :].decode()
                    return [d.replace("-", "_") for d in deps.split(",") if d]
            return []
    return []


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse a modules.dep file (used when the tree has one) into name -> direct deps."""
    result: dict[str, list[str]] = {}

    def name_of(p: str) -> str:
        return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", Path(p).name).replace("-", "_")

    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, deps = line.split(":", 1)
        result[name_of(mod)] = [name_of(d) for d in deps.split()]
    return result


def resolve_modules(kernel: GuestKernel, wanted: list[str]) -> list[tuple[str, bytes]]:
    """Return (name, decompressed ELF) for `wanted` and their dependencies, deps first.

    Names the kernel builds in (listed in modules.builtin) are dropped silently; names
    that are neither built in nor shipped are an error, because the guest would boot
    without the driver the test needs.
    """
    index = kernel.module_index()
    builtin: set[str] = set()
    bfile = kernel.modules_dir / "modules.builtin"
    if bfile.exists():
        builtin = {
            re.sub(r"\.ko$", "", Path(line).name).replace("-", "_")
            for line in bfile.read_text().split()
        }
    dep_file = kernel.modules_dir / "modules.dep"
    dep_map = parse_modules_dep(dep_file.read_text()) if dep_file.exists() else None

    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in stack:
            raise HarnessError(f"module dependency cycle: {' -> '.join(stack + (name,))}")
        if name not in index:
            if name in builtin:
                done.add(name)
                return
            raise HarnessError(f"kernel {kernel.release} has no module {name!r}")
        elf = read_module(index[name])
        deps = dep_map.get(name, []) if dep_map is not None else modinfo_depends(elf)
        for dep in deps:
            visit(dep, stack + (name,))
        done.add(name)
        order.append((name, elf))

    for name in wanted:
        visit(name, ())
    return order
