"""Shared pieces of the benchmarks: images, back-end processes, pinning, statistics.

Why a module: the block benchmark runs two back-ends side by side (ours and
qemu-storage-daemon) and must start, pin, measure and end both the same way;
keeping that here keeps ``block.py`` about the workload.  Every process is
ended by its own pid.
"""

from __future__ import annotations

import cProfile
import os
import platform
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from frontend.qsd import qsd_command

CHUNK = 1 << 20


def fill_image(path: Path, size: int, seed: int = 1) -> None:
    """A fully allocated image of random bytes (reads then hit real data, not holes)."""
    import random
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            f.write(rng.randbytes(CHUNK))
        f.flush()
        os.fsync(f.fileno())


def copy_image(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def machine_summary() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model or platform.machine()}), Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def qsd_version() -> str:
    try:
        out = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def wait_for_socket(path: str, proc_alive, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if not proc_alive():
            raise RuntimeError(f"back-end exited before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not created within {timeout}s")
        time.sleep(0.01)


class BackendProcess:
    """A back-end serving one image on one socket, ended by pid."""

    name = "backend"
    pid: int

    def cpu_seconds(self) -> float:
        """User+system CPU time of the process and all its threads."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def alive(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class QsdProcess(BackendProcess):
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk (optionally with an iothread)."""

    name = "qsd"

    def __init__(self, image: Path, sock: str, log: Path, iothread: bool = True,
                 cpus: set[int] | None = None) -> None:
        binary = shutil.which("qemu-storage-daemon")
        if binary is None:
            raise RuntimeError("qemu-storage-daemon not found in PATH (Debian: qemu-system-common)")
        if os.path.exists(sock):
            os.unlink(sock)
        cmd = qsd_command(binary, image, sock, iothread=iothread)
        self.sock = sock
        self.log = log
        self.cmd = cmd
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.pid = self.proc.pid
        try:
            wait_for_socket(sock, self.alive)
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class OurBlockProcess(BackendProcess):
    """Our block device (``devices.block``) in a forked child serving ``sock``.

    The child builds the device the way the supervisor does (builder from
    options, ``VhostUserListener.run_device`` on a fresh ``Executor``), without
    a jail: the benchmark measures the data path, not the sandbox.  With
    ``profile`` set, the child runs under cProfile and writes the stats there
    when the front-end disconnects.
    """

    name = "ours"

    def __init__(self, image: Path, sock: str, cpus: set[int] | None = None,
                 profile: Path | None = None, options: dict[str, str] | None = None) -> None:
        # Import in the parent so a missing module fails here, clearly.
        from connection.connection import VhostUserListener
        from connection.executor import Executor
        from devices.block import BlockBuilder

        if os.path.exists(sock):
            os.unlink(sock)
        self.sock = sock
        opts = {"path": str(image), **(options or {})}
        builder = BlockBuilder.from_options("bench", opts)
        listener = VhostUserListener(sock)
        self._resources = listener.take_parent_process_resources()   # unlinks the socket at stop
        pid = os.fork()
        if pid == 0:   # child
            status = 0
            try:
                if cpus:
                    os.sched_setaffinity(0, cpus)
                prof = cProfile.Profile() if profile else None
                if prof:
                    prof.enable()
                listener.run_device(Executor(), builder)
                if prof:
                    prof.disable()
                    prof.dump_stats(str(profile))
            except BaseException:
                import traceback
                traceback.print_exc()
                status = 1
            finally:
                os._exit(status)
        self.pid = pid
        builder.close()
        listener.close()   # the child owns the listening socket now (no unlink: resources taken)
        self._exit: int | None = None

    def alive(self) -> bool:
        if self._exit is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self._exit = os.waitstatus_to_exitcode(status)
        return False

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        """Wait briefly for a clean exit (it leaves when the front-end does),
        then SIGTERM, then SIGKILL, by pid."""
        try:
            if self.wait(3.0):
                return
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
                if self.wait(3.0):
                    return
        finally:
            if self._resources is not None:
                self._resources.close()


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)
