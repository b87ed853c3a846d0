"""Run one QEMU guest against vhost-user back-ends and parse what it reports.

The guest prints `E2E-RESULT key=value` lines and a final `E2E-DONE rc=N` on its serial
console, which QEMU writes to a file. The host reads that file, so nothing depends on
QEMU's stdio. Every run is bounded in time and the QEMU process is ended by pid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

from . import procs
from .initramfs import base_initramfs, compose_initrd
from .kernel import CACHE_DIR, GuestKernel

log = logging.getLogger("e2e.qemu")

QEMU = os.environ.get("E2E_QEMU", "qemu-system-x86_64")
RESULT_RE = re.compile(r"E2E-RESULT (\w+)=(.*)$")
DONE_RE = re.compile(r"E2E-DONE rc=(-?\d+)")
BOOTED_RE = re.compile(r"E2E-BOOTED uptime=([\d.]+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\x00|\r")
BOOT_TIMEOUT = float(os.environ.get("E2E_BOOT_TIMEOUT", "30"))
KERNEL_CMDLINE = "console=ttyS0 panic=-1 loglevel=4 rdinit=/init tsc=reliable no_timer_check"


class GuestFailure(AssertionError):
    """The guest did not finish cleanly; the message carries its console tail and logs."""


@dataclasses.dataclass
class GuestResult:
    """What one guest run reported, and how long it took on the host's clock."""

    rc: int | None
    results: dict[str, str]
    console: str
    booted_after: float | None  # host seconds from QEMU start to E2E-BOOTED
    duration: float  # host seconds from QEMU start to exit
    guest_uptime_at_boot: float | None

    def sub(self, prefix: str) -> "GuestResult":
        """The results of one part of a combined script, with its key prefix removed."""
        picked = {k[len(prefix) :]: v for k, v in self.results.items() if k.startswith(prefix)}
        picked.setdefault("io_errors", self.results.get("io_errors", "0"))
        return dataclasses.replace(self, results=picked)

    def int(self, key: str) -> int:
        if key not in self.results:
            raise GuestFailure(f"guest reported no {key!r}; results={self.results}")
        return int(self.results[key])


def parse_console(text: str) -> tuple[int | None, dict[str, str], float | None]:
    """Pull (rc, results, guest uptime at boot) from the serial console text."""
    rc = None
    results: dict[str, str] = {}
    uptime = None
    for raw in text.splitlines():
        line = ANSI_RE.sub("", raw).strip()
        if m := RESULT_RE.search(line):
            results[m.group(1)] = m.group(2).strip()
        elif m := DONE_RE.search(line):
            rc = int(m.group(1))
        elif m := BOOTED_RE.search(line):
            uptime = float(m.group(1))
    return rc, results, uptime


@dataclasses.dataclass
class _Dev:
    args: list[str]


class Qemu:
    """Builds and runs one QEMU command line; a context manager that always ends it.

    Why these options: memory is a shared memfd because vhost-user back-ends map guest
    RAM from the fds QEMU passes; `reconnect=1` lets QEMU find a restarted back-end on the
    same socket; `-nodefaults` plus a file-backed serial keeps the console the only output.
    """

    def __init__(
        self,
        kernel: GuestKernel,
        workdir: Path,
        *,
        mem_mb: int = 256,
        smp: int = 1,
        accel: str | None = None,
        base_initrd: Path | None = None,
        name: str = "guest",
        qmp: bool = False,
    ) -> None:
        self.kernel = kernel
        self.workdir = workdir
        self.mem_mb = mem_mb
        self.smp = smp
        self.accel = accel or choose_accel(kernel)
        self.base_initrd = base_initrd or base_initramfs(kernel)
        self.name = name
        self.console_path = workdir / f"{name}-console.log"
        self.log_path = workdir / f"{name}-qemu.log"
        self.initrd_path = workdir / f"{name}-initrd.cpio.gz"
        # A QMP monitor socket (frontend.guest.qmp) for hot-plug at run time.
        self.qmp_path: Path | None = workdir / f"{name}-qmp.sock" if qmp else None
        self._devs: list[_Dev] = []
        self._n = 0
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.extra_logs: list[Callable[[], str]] = []
        # Each watcher returns a reason to give up now (e.g. the back-end is crash-looping),
        # so a broken back-end fails the case in a second instead of at the timeout.
        self.watchers: list[Callable[[], str | None]] = []

    # --- devices ------------------------------------------------------------------

    def _chardev(self, socket_path: Path, reconnect: bool = True) -> str:
        cid = f"vu{self._n}"
        self._n += 1
        opts = f"socket,id={cid},path={socket_path}" + (",reconnect=1" if reconnect else "")
        self._devs.append(_Dev(["-chardev", opts]))
        return cid

    def add_vhost_user_blk(self, socket_path: Path, num_queues: int = 1, queue_size: int = 128) -> None:
        cid = self._chardev(socket_path)
        self._devs.append(
            _Dev(["-device", f"vhost-user-blk-pci,chardev={cid},num-queues={num_queues},queue-size={queue_size}"])
        )

    def add_vhost_user_rng(self, socket_path: Path, reconnect: bool = False) -> None:
        """No `reconnect=1` by default: with it, QEMU 7.2 connects the chardev
        asynchronously, and vhost-user-rng-pci (unlike vhost-user-blk-pci, which waits
        for the connection) runs vhost_dev_init on a socket that is not connected yet,
        fails with "Failed to set msg fds." and then aborts in error_setv. Later QEMUs
        that fixed this can pass reconnect=True."""
        cid = self._chardev(socket_path, reconnect)
        self._devs.append(_Dev(["-device", f"vhost-user-rng-pci,chardev={cid}"]))

    def add_vhost_user_net(self, socket_path: Path, mac: str = "52:54:00:12:34:56",
                           reconnect: bool = True, queues: int = 1) -> None:
        """`vectors=0` (legacy INTx): QEMU 7.2 under TCG crashes (SIGSEGV) when the guest
        starts a vhost-user netdev on a virtio-net-pci with MSI-X (see docs/operations.md)."""
        cid = self._chardev(socket_path, reconnect)
        nid = f"n{self._n}"
        self._n += 1
        mq = f",queues={queues}" if queues > 1 else ""
        self._devs.append(_Dev(["-netdev", f"vhost-user,chardev={cid},id={nid}{mq}",
                                "-device", f"virtio-net-pci,netdev={nid},mac={mac},vectors=0"
                                + (",mq=on" if queues > 1 else "")]))

    # --- command line ---------------------------------------------------------------

    def command(self) -> list[str]:
        accel_args = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg"]
        cmd = [
            QEMU,
            "-name", self.name,
            "-machine", "pc",
            *accel_args,
            "-smp", str(self.smp),
            "-m", f"{self.mem_mb}M",
            "-object", f"memory-backend-memfd,id=mem0,size={self.mem_mb}M,share=on",
            "-numa", "node,memdev=mem0",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-chardev", f"file,id=ser0,path={self.console_path}",
            "-serial", "chardev:ser0",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(self.initrd_path),
            "-append", KERNEL_CMDLINE,
        ]
        for dev in self._devs:
            cmd += dev.args
        if self.qmp_path is not None:
            cmd += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        return cmd

    def qmp(self):
        """A connected ``frontend.guest.qmp.Qmp`` (start with ``qmp=True`` first)."""
        from .qmp import Qmp
        assert self.qmp_path is not None, "Qemu(..., qmp=True)"
        return Qmp(self.qmp_path).connect()

    # --- running --------------------------------------------------------------------

    def start(self, guest_script: str, files: dict[str, bytes] | None = None) -> None:
        """Compose the initrd for this run and start QEMU (does not wait)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        compose_initrd(self.base_initrd, guest_script, files, self.initrd_path)
        self.console_path.write_bytes(b"")
        cmd = self.command()
        (self.workdir / f"{self.name}-cmdline.txt").write_text(" ".join(cmd) + "\n")
        log.info("qemu accel=%s smp=%d mem=%dM", self.accel, self.smp, self.mem_mb)
        self.started_at = time.monotonic()
        self.proc = procs.spawn(cmd, self.log_path)

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        """Wait until a console line matches `pattern`; fail if QEMU exits first."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console())
            if m:
                return m
            if self.proc is None or self.proc.poll() is not None:
                raise self.failure(f"QEMU exited before the console showed {pattern!r}")
            if time.monotonic() > deadline:
                raise self.failure(f"console did not show {pattern!r} within {timeout:.0f}s")
            self._check_watchers()
            time.sleep(0.05)

    def attach(self, backend: object) -> None:
        """Show `backend`'s log on failure and, if it has `watch()`, give up when it fails."""
        log_tail = getattr(backend, "log_tail", None)
        if log_tail is not None:
            self.extra_logs.append(log_tail)
        watch = getattr(backend, "watch", None)
        if watch is not None:
            self.watchers.append(watch)

    def _check_watchers(self) -> None:
        if self.watchers and "E2E-DONE" in self.console():
            return  # the guest is done; back-ends may go as QEMU shuts down
        for watch in self.watchers:
            why = watch()
            if why:
                self.stop()
                raise self.failure(f"gave up early: {why}")

    def wait(self, timeout: float, boot_timeout: float = BOOT_TIMEOUT) -> GuestResult:
        """Wait for QEMU to exit (the guest powers off), then parse the console.

        QEMU does not start the guest until every vhost-user back-end has answered its
        first requests, so a back-end that accepts nothing shows up as no boot at all.
        """
        assert self.proc is not None, "start() first"
        booted_at = None
        deadline = self.started_at + timeout
        while self.proc.poll() is None:
            now = time.monotonic()
            if booted_at is None:
                if "E2E-BOOTED" in self.console():
                    booted_at = now - self.started_at
                elif now - self.started_at > boot_timeout:
                    self.stop()
                    raise self.failure(
                        f"guest did not reach /init within {boot_timeout:.0f}s; QEMU waits for every "
                        "vhost-user back-end to answer before it boots, so check the back-end logs"
                    )
            if now > deadline:
                self.stop()
                raise self.failure(f"guest did not power off within {timeout:.0f}s (QEMU killed)")
            self._check_watchers()
            time.sleep(0.05)
        duration = time.monotonic() - self.started_at
        procs.stop(self.proc)
        text = self.console()
        rc, results, uptime = parse_console(text)
        if booted_at is None and uptime is not None:
            booted_at = duration  # booted and finished between two polls
        result = GuestResult(rc, results, text, booted_at, duration, uptime)
        if rc is None:
            raise self.failure(f"QEMU exited ({self.proc.returncode}) without E2E-DONE")
        return result

    def run(self, guest_script: str, files: dict[str, bytes] | None = None, timeout: float = 60) -> GuestResult:
        """Start, wait, and insist on `E2E-DONE rc=0`."""
        self.start(guest_script, files)
        result = self.wait(timeout)
        if result.rc != 0:
            raise self.failure(f"guest script failed rc={result.rc} results={result.results}")
        return result

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, grace=2.0)

    def failure(self, why: str) -> GuestFailure:
        parts = [
            why,
            f"--- guest console tail ({self.console_path}) ---",
            procs.tail(self.console_path, 40),
            f"--- qemu log ({self.log_path}) ---",
            procs.tail(self.log_path, 20),
        ]
        for extra in self.extra_logs:
            parts.append(extra())
        return GuestFailure("\n".join(parts))

    def __enter__(self) -> "Qemu":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- KVM or TCG -------------------------------------------------------------------------

_ACCEL_MEMO: dict[str, str] = {}


def choose_accel(kernel: GuestKernel) -> str:
    """TCG unless a short trial boot proves KVM runs this kernel; logged either way.

    Why a trial: /dev/kvm on these hosts is a nested paravirtual KVM that aborts a stock
    kernel (MSR 0x10a, then emulation failures), so its mere presence proves nothing.
    `E2E_ACCEL=tcg|kvm` overrides. The verdict is cached on disk per host kernel, QEMU
    and guest kernel, so the trial costs once.
    """
    forced = os.environ.get("E2E_ACCEL", "auto")
    if forced in ("tcg", "kvm"):
        log.warning("accel=%s forced by E2E_ACCEL", forced)
        return forced
    if kernel.release in _ACCEL_MEMO:
        return _ACCEL_MEMO[kernel.release]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log.warning("accel=tcg: /dev/kvm is not usable")
        _ACCEL_MEMO[kernel.release] = "tcg"
        return "tcg"
    qver = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = f"{os.uname().release}|{qver}|{kernel.release}"
    cache = CACHE_DIR / "accel.json"
    try:
        known = json.loads(cache.read_text())
    except (FileNotFoundError, ValueError):
        known = {}
    if key in known:
        verdict = known[key]
        log.warning("accel=%s (cached trial verdict: %s)", verdict["accel"], verdict["why"])
    else:
        verdict = _kvm_trial(kernel)
        known[key] = verdict
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)  # concurrent runs never see half a file
        log.warning("accel=%s (trial boot: %s)", verdict["accel"], verdict["why"])
    _ACCEL_MEMO[kernel.release] = verdict["accel"]
    return verdict["accel"]


def _kvm_trial(kernel: GuestKernel, timeout: float = 20.0) -> dict[str, str]:
    workdir = CACHE_DIR / "kvm-trial"
    workdir.mkdir(parents=True, exist_ok=True)
    q = Qemu(kernel, workdir, accel="kvm", name="kvm-trial", mem_mb=128)
    try:
        res = q.run("echo E2E-RESULT trial=ok\n", timeout=timeout)
        if res.results.get("trial") == "ok":
            return {"accel": "kvm", "why": f"booted and ran /init in {res.duration:.1f}s"}
        return {"accel": "tcg", "why": "kvm guest ran but reported nothing"}
    except GuestFailure as exc:
        first = str(exc).splitlines()[0]
        qlog = procs.tail(q.log_path, 3).replace("\n", " | ")
        return {"accel": "tcg", "why": f"kvm trial failed: {first}; qemu: {qlog}"}
    finally:
        q.stop()
