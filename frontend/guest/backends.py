"""The vhost-user back-ends the guest talks to: qemu-storage-daemon, our devices, our supervisor.

Why qemu-storage-daemon here: it is the reference vhost-user-blk back-end, so it proves the
harness works before our devices exist and gives the benchmark its baseline. Each class
starts one process through `procs.spawn` and ends it by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from frontend.qsd import qsd_command

from . import procs
from .kernel import REPO_ROOT, HarnessError

QSD = os.environ.get("E2E_QSD", "qemu-storage-daemon")


class QsdBlock:
    """qemu-storage-daemon exporting one image as vhost-user-blk on `socket_path`."""

    def __init__(self, image: Path, socket_path: Path, log_path: Path, *, writable: bool = True, num_queues: int = 1) -> None:
        self.image = image
        self.socket_path = socket_path
        self.log_path = log_path
        self.writable = writable
        self.num_queues = num_queues
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return qsd_command(QSD, self.image, self.socket_path, writable=self.writable,
                           num_queues=self.num_queues)

    def start(self) -> "QsdBlock":
        self.socket_path.unlink(missing_ok=True)
        self.proc = procs.spawn(self.command(), self.log_path)
        procs.wait_for_path(self.socket_path, 10, self.proc)
        return self

    def log_tail(self) -> str:
        return f"--- qemu-storage-daemon log ({self.log_path}) ---\n{procs.tail(self.log_path, 40)}"

    def kill(self) -> None:
        """SIGKILL, as a crash: the socket file stays behind, like after a real crash."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)

    def __enter__(self) -> "QsdBlock":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cli() -> list[str]:
    """Our CLI, run from the repo with the venv's interpreter (no install needed)."""
    return [sys.executable, "-m", "supervisor.cli"]


def require_cli(*words: str) -> None:
    """Fail (not skip) with a clear reason when our CLI lacks a subcommand a case needs."""
    cli_py = REPO_ROOT / "supervisor" / "cli.py"
    if not cli_py.exists():
        raise HarnessError(f"supervisor/cli.py does not exist yet: `vhost-supervisor {' '.join(words)}` is needed by this case")
    out = subprocess.run(
        _cli() + [*words, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise HarnessError(
            f"`vhost-supervisor {' '.join(words)} --help` failed ({out.returncode}); "
            f"this case needs that subcommand:\n{out.stderr[-2000:]}"
        )


class OurDevice:
    """One standalone device: `vhost-supervisor device KIND --socket-path SOCK ...`."""

    def __init__(self, kind: str, socket_path: Path, log_path: Path, args: list[str]) -> None:
        self.kind = kind
        self.socket_path = socket_path
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return _cli() + ["device", self.kind, "--socket-path", str(self.socket_path), *self.args]

    def start(self) -> "OurDevice":
        require_cli("device", self.kind)
        self.socket_path.unlink(missing_ok=True)
        self.proc = procs.spawn(self.command(), self.log_path, cwd=REPO_ROOT)
        procs.wait_for_path(self.socket_path, 15, self.proc)
        return self

    def log_tail(self) -> str:
        return f"--- device log ({self.log_path}) ---\n{procs.tail(self.log_path, 60)}"

    def watch(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"device process exited with {self.proc.returncode}"
        return None

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)

    def __enter__(self) -> "OurDevice":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Supervisor:
    """`vhost-supervisor run ... -s CTRL`, with `status --json` to find device children."""

    def __init__(self, workdir: Path, device_args: list[str], log_path: Path) -> None:
        self.workdir = workdir
        self.control = workdir / "ctrl.sock"
        self.device_args = device_args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        extra = os.environ.get("E2E_SUPERVISOR_ARGS", "").split()
        return _cli() + ["run", *self.device_args, *extra, "-s", str(self.control)]

    def watch(self) -> str | None:
        """A reason to stop waiting for the guest: the supervisor died or gave up on a device."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"supervisor exited with {self.proc.returncode}"
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            if "event=crash-loop" in line:
                return f"supervisor reports a crash loop: {line.strip()}"
        return None

    def start(self, sockets: list[Path]) -> "Supervisor":
        require_cli("run")
        require_cli("status")
        for s in sockets:
            s.unlink(missing_ok=True)
        self.proc = procs.spawn(self.command(), self.log_path, cwd=REPO_ROOT)
        for s in [self.control, *sockets]:
            procs.wait_for_path(s, 20, self.proc)
        return self

    def status(self) -> dict:
        """The parsed `status --json` document."""
        out = subprocess.run(
            _cli() + ["status", "--json", "-s", str(self.control)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=15,
        )
        if out.returncode != 0:
            raise HarnessError(f"vhost-supervisor status failed ({out.returncode}): {out.stderr[-1000:]}")
        return json.loads(out.stdout)

    def devices(self) -> list[dict]:
        """The device entries of `status --json` ({"devices": [{"name", "socket", "pid", ...}]})."""
        doc = self.status()
        devs = doc.get("devices") if isinstance(doc, dict) else None
        if not isinstance(devs, list):
            raise HarnessError(f"status --json has no devices list: {doc}")
        return devs

    def device_pid(self, name: str, timeout: float = 15.0, not_pid: int | None = None) -> int:
        """Pid of the live child serving device `name` (or the device on socket `name`).

        With `not_pid`, waits until a different pid serves it (i.e. the restart happened).
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(f"supervisor exited with {self.proc.returncode}:\n{procs.tail(self.log_path)}")
            try:
                for dev in self.devices():
                    if name in (dev.get("name"), dev.get("socket")):
                        last = dev
                        pid = dev.get("pid")
                        if pid and pid != not_pid and _alive(int(pid)):
                            return int(pid)
            except (HarnessError, ValueError, subprocess.TimeoutExpired) as exc:
                last = exc
            time.sleep(0.1)
        raise HarnessError(f"no live child for device {name!r} (other than pid {not_pid}) in status; last: {last}")

    def exits(self) -> list[str]:
        """The supervisor's `event=exit` log lines (one per child exit)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if "event=exit" in line]

    def abnormal_exits(self) -> list[str]:
        """Child exits other than the normal end of a front-end session or our own stop."""
        return [
            line for line in self.exits()
            if "kind=disconnected" not in line and "(requested)" not in line
        ]

    def log_tail(self) -> str:
        return f"--- supervisor log ({self.log_path}) ---\n{procs.tail(self.log_path, 60)}"

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, grace=5.0)

    def __exit__(self, *exc) -> None:
        self.stop()

    def __enter__(self) -> "Supervisor":
        return self


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def start_our_block(
    mode: str, workdir: Path, image: Path, sock: Path, *, ro: bool = False, num_queues: int = 1, name: str = "disk0",
    poll_us: int | None = None,
) -> "OurDevice | Supervisor":
    """Our block device, either standalone (`device block`) or under `run --block`."""
    if mode == "device":
        args = ["--file", str(image), "--num-queues", str(num_queues)]
        if ro:
            args.append("--read-only")
        if poll_us is not None:
            args += ["--poll-us", str(poll_us)]
        return OurDevice("block", sock, workdir / f"{name}-device.log", args).start()
    if mode == "supervisor":
        spec = f"vhost={sock},path={image},name={name},num-queues={num_queues}" + (",ro=true" if ro else "")
        if poll_us is not None:
            spec += f",poll-us={poll_us}"
        return Supervisor(workdir, ["--block", spec], workdir / "supervisor.log").start([sock])
    raise ValueError(f"mode must be device or supervisor, not {mode!r}")
