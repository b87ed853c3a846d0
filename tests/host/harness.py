"""``make host-test``: the package under a real systemd, in a booted Debian 12 guest.

Build (cached under /var/cache/vhost-supervisor/host-test, or $HOST_TEST_CACHE;
rebuilt only when an input changes):
  1. base: debootstrap of Debian 12 with systemd, python3 and the cloud
     kernel (``build_base.sh``, keyed on that script);
  2. image: the base plus a venv at /opt/vhost-supervisor holding this
     checkout's wheel and its dependencies (built here, installed in a chroot
     with ``pip --no-index``), the units installed by the package's own
     ``vhost-supervisor systemd-units --install``, and the guest checks;
     keyed on the sources, the wheel's dependency list and tests/host.
Run: QEMU (TCG; KVM is not usable here) boots the image with systemd as PID 1
on cgroup v2; ``host-test.service`` runs ``guest/checks.py`` after boot and
powers the guest off; its lines come back on the serial console.

Exit status 0 only if every check printed PASS.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Outside the checkout, like the conformance build: a fresh clone (CI) reuses it.
CACHE = Path(os.environ.get("HOST_TEST_CACHE", "/var/cache/vhost-supervisor/host-test"))
SOURCES = ("pyproject.toml", "README.md", "vhost_supervisor.py", "connection", "devices", "sandbox", "seccomp",
           "supervisor")
IMAGE_SIZE = "3G"
VENV = "/opt/vhost-supervisor"
CHECKS = 5


class HostTestError(RuntimeError):
    """Something the host test needs could not be built or booted; the message says what."""


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for top in paths:
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise HostTestError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                            f"{proc.stderr[-3000:]}")
    return proc


def build_base() -> Path:
    script = HERE / "build_base.sh"
    out = CACHE / f"base-{_digest([script])[:12]}"
    if not (out / ".done").exists():
        print(f"host-test: debootstrap Debian 12 into {out} (once; a few minutes)", flush=True)
        _run(["sh", str(script), str(out)])
    return out


def _wheels(dest: Path) -> None:
    """This checkout's wheel, plus its dependencies as wheels (cached by the dependency list)."""
    py = sys.executable
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(REPO)])
    deps_key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    deps = CACHE / f"deps-{deps_key}"
    if not (deps / ".done").exists():
        shutil.rmtree(deps, ignore_errors=True)
        deps.mkdir(parents=True)
        whl = next(dest.glob("vhost_supervisor-*.whl"))
        _run([py, "-m", "pip", "wheel", "-q", "-w", str(deps), str(whl)])
        for w in deps.glob("vhost_supervisor-*.whl"):
            w.unlink()
        (deps / ".done").touch()
    for w in deps.glob("*.whl"):
        shutil.copy(w, dest)


def build_image() -> tuple[Path, Path, Path]:
    """(image, kernel, initrd) for the current inputs."""
    base = build_base()
    key = _digest([REPO / s for s in SOURCES] + [HERE]) + "-" + base.name
    img_dir = CACHE / f"image-{key}"
    image, kernel, initrd = img_dir / "root.img", img_dir / "vmlinuz", img_dir / "initrd.img"
    if image.exists():
        return image, kernel, initrd
    for old in CACHE.glob("image-*"):      # one image at a time: each is 3 GB (sparse)
        shutil.rmtree(old, ignore_errors=True)
    print(f"host-test: building {img_dir.name}", flush=True)
    img_dir.mkdir(parents=True)
    stage = Path(tempfile.mkdtemp(prefix="stage-", dir=CACHE))
    try:
        root = stage / "root"
        _run(["cp", "-a", "--reflink=auto", str(base / "root"), str(root)])
        wheels = root / "tmp" / "wheels"
        wheels.mkdir(parents=True)
        _wheels(wheels)
        _run(["chroot", str(root), "/usr/bin/python3", "-m", "venv", VENV])
        _run(["chroot", str(root), f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels",
              "vhost-supervisor"])
        shutil.rmtree(wheels)
        # The operator's documented step, with the installed command itself.
        _run(["chroot", str(root), f"{VENV}/bin/vhost-supervisor", "systemd-units", "--install",
              "/etc/systemd/system"])
        opt = root / "opt" / "host-test"
        shutil.copytree(HERE / "guest", opt)
        shutil.copy(opt / "host-test.service", root / "etc" / "systemd" / "system" / "host-test.service")
        wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "host-test.service").symlink_to("/etc/systemd/system/host-test.service")
        boot = sorted((root / "boot").glob("vmlinuz-*"))
        if not boot:
            raise HostTestError(f"no kernel in {root}/boot (linux-image-cloud-amd64 missing from the base)")
        release = boot[-1].name[len("vmlinuz-"):]
        shutil.copy(boot[-1], kernel)
        shutil.copy(root / "boot" / f"initrd.img-{release}", initrd)
        tmp_img = img_dir / "root.img.tmp"
        _run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), "-L", "root", str(tmp_img), IMAGE_SIZE])
        tmp_img.rename(image)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return image, kernel, initrd


def boot(image: Path, kernel: Path, initrd: Path, timeout: float, log: Path) -> str:
    """Boot a throw-away copy-on-write overlay of the image; returns the serial output."""
    overlay = log.with_suffix(".qcow2")
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image), str(overlay)])
    cmd = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "2048",
           "-display", "none", "-monitor", "none", "-serial", f"file:{log}", "-no-reboot", "-nic", "none",
           "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", "root=/dev/nvme0n1 rw console=ttyS0 panic=-1 systemd.unified_cgroup_hierarchy=1 "
                      "systemd.show_status=0 loglevel=4 quiet",
           "-drive", f"file={overlay},if=none,id=d0,format=qcow2,discard=unmap",
           "-device", "nvme,drive=d0,serial=root"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        err = b""
        print(f"host-test: the guest did not power off within {timeout:.0f}s", flush=True)
    finally:
        overlay.unlink(missing_ok=True)
    out = log.read_text(errors="replace") if log.exists() else ""
    if proc.returncode not in (0, None, -9) and err:
        out += f"\n[qemu exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}]"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make host-test")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("HOST_TEST_TIMEOUT", 900)))
    p.add_argument("--keep-log", default=str(CACHE / "serial.log"))
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("host-test: needs root (debootstrap, chroot)", file=sys.stderr)
        return 2
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        image, kernel, initrd = build_image()
    except HostTestError as e:
        print(f"host-test: build failed: {e}", file=sys.stderr)
        return 1
    t_build = time.monotonic() - t0
    print(f"host-test: image ready in {t_build:.1f}s ({image})", flush=True)
    log = Path(a.keep_log)
    log.unlink(missing_ok=True)
    t1 = time.monotonic()
    out = boot(image, kernel, initrd, a.timeout, log)
    t_boot = time.monotonic() - t1
    lines = [ln.rstrip("\r") for ln in out.splitlines()]
    start = next((i for i, ln in enumerate(lines) if "=== TEST-START" in ln), None)
    body = lines[start:] if start is not None else lines[-80:]
    for ln in body:
        if ln.startswith(("===", "CHECK", "  ")) or "PASS" in ln or "FAIL" in ln:
            print(ln)
    passed = {int(m.group(1)) for ln in lines if (m := re.match(r"CHECK (\d) PASS", ln))}
    failed = {int(m.group(1)) for ln in lines if (m := re.match(r"CHECK (\d) FAIL", ln))}
    print(f"host-test: build {t_build:.1f}s, boot+checks {t_boot:.1f}s, total {time.monotonic() - t0:.1f}s; "
          f"passed {sorted(passed)}, failed {sorted(failed)} (serial log {log})")
    if start is None:
        print("host-test: the checks never started; end of the serial log:\n" + "\n".join(lines[-60:]))
    return 0 if passed == set(range(1, CHECKS + 1)) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
