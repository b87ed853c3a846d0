"""The temporary world a check runs in: a work directory, images, a real
supervisor (in a subprocess, as ``vhost-supervisor run``) with jailed
devices of every type, and the helpers cases share (pick an instance, wait
for it, prove it still serves).  ``close()`` stops everything and removes
what it made; nothing of a production supervisor is touched (own control
socket, own device sockets, own images, all under one temporary directory).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from frontend.supervisor_process import SupervisorProcess

from .catalog import CaseFailed
from .devtypes import TYPES, DeviceType


#: instances the exhaustion cases abuse (left out of "other devices were not touched")
SPECIAL = ("-storm", "-crash", "-fill", "-direct")


@dataclass(frozen=True)
class Instance:
    name: str
    type: DeviceType
    variant: str
    socket: str


class Environment:
    """One temporary supervisor shared by many cases (``pool`` plain instances
    per device type, round-robin, so one device restarting after a hostile
    connection does not hold up the next case)."""

    def __init__(self, device_types: list[str] | None = None, pool: int = 2,
                 policy_dir: str | None = None) -> None:
        names = device_types or list(TYPES)
        unknown = [n for n in names if n not in TYPES]
        if unknown:
            raise ValueError(f"--device-type {unknown[0]!r} is not one of {', '.join(TYPES)}")
        self.types = [TYPES[n] for n in names]
        self.pool = pool
        from .policies import policy_dir as _policy_dir
        self.policy_dir = _policy_dir(policy_dir)
        self.dir = ""
        self.sup: SupervisorProcess | None = None
        self.instances: dict[str, Instance] = {}
        self._rr: dict[str, int] = {}
        self._probe: Any = None
        self.notes: list[str] = []
        #: results an attack computes once and several cases read (e.g. one jail child, many probes)
        self.cache: dict[str, Any] = {}
        #: how the child before the last ``recovered`` ended (status' last_exit)
        self.last_exit: dict[str, Any] = {}

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="vhost-seccheck-")
        os.chmod(self.dir, 0o755)
        for sub in ("sock", "ctl", "out", "img"):
            os.mkdir(self.path(sub), 0o755)
            os.chmod(self.path(sub), 0o755)
        args: list[str] = []
        for t in self.types:
            for variant in t.variants:
                count = self.pool if variant == "" else 1
                for i in range(count):
                    name = f"{t.name}-{i}" if variant == "" else f"{t.name}-{variant}"
                    inst = Instance(name, t, variant, self.path("sock", f"{name}.sock"))
                    self.instances[name] = inst
                    opts = t.options(self.path("img" if t.name == "block" else "out"), name, variant)
                    args += [f"--{t.flag}", ",".join(x for x in (f"vhost={inst.socket}", f"name={name}", opts) if x)]
        self.sup = SupervisorProcess(self.dir)
        self.sup.control = self.path("ctl", "control.sock")
        self._launch(args + ["--grace-period", "2", "--jail", f"seccomp-policy-dir={self.policy_dir}"])
        for name in self.instances:
            self.wait_ready(name, timeout=30)

    def _launch(self, args: list[str]) -> None:
        """``vhost-supervisor run`` in a subprocess that gets SIGTERM (a clean
        shutdown) if the check itself dies, so nothing is left running."""
        import socket
        import subprocess
        import sys
        sup = self.sup
        assert sup is not None
        sup.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sup.notify.bind(sup.notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=sup.notify_path)
        with open(sup.log_path, "ab") as log:
            sup.proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "-s", sup.control, *args],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=sup.dir, env=env,
                                        preexec_fn=_die_with_parent)
        sup.wait_notify("READY=1", 60)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self.sup is not None:
            try:
                if self.sup.proc is not None and self.sup.proc.poll() is None:
                    self.sup.terminate(20)
            except Exception as e:  # noqa: BLE001 - clean up whatever happened
                self.notes.append(f"supervisor did not stop cleanly: {type(e).__name__}: {e}")
            finally:
                self.sup.cleanup()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> "Environment":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ helpers

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def control(self) -> str:
        assert self.sup is not None
        return self.sup.control

    def log(self) -> str:
        assert self.sup is not None
        return self.sup.read_log()

    def has_type(self, name: str) -> bool:
        return any(t.name == name for t in self.types)

    def instance(self, type_name: str, variant: str = "") -> Instance:
        """A plain instance of ``type_name`` (round-robin over the pool) or the
        one instance of a variant."""
        if variant:
            return self.instances[f"{type_name}-{variant}"]
        i = self._rr.get(type_name, 0)
        self._rr[type_name] = i + 1
        return self.instances[f"{type_name}-{i % self.pool}"]

    def any_instance(self, exclude: Instance | None = None) -> Instance:
        """A plain instance of whatever types this run has (for cases that are
        not about one device type), other than ``exclude``."""
        for _ in range(2):
            for t in self.types:
                inst = self.instance(t.name)
                if exclude is None or inst.name != exclude.name:
                    return inst
        raise ValueError("no other device instance")

    def status(self) -> dict[str, dict[str, Any]]:
        assert self.sup is not None
        return self.sup.status()

    def request(self, cmd: str, **kw: Any) -> dict[str, Any]:
        assert self.sup is not None
        return self.sup.request(cmd, **kw)

    def supervisor_alive(self) -> bool:
        return self.sup is not None and self.sup.proc is not None and self.sup.proc.poll() is None

    def wait_ready(self, name: str, not_pid: int | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The device's status once a child (other than ``not_pid``) waits for a front-end."""
        assert self.sup is not None
        try:
            return self.sup.wait_state(name, ("ready",), timeout=timeout,
                                       pred=lambda d: d["pid"] is not None and d["pid"] != not_pid)
        except RuntimeError as e:
            raise CaseFailed(f"{name} did not come back ready: {e}") from None

    def pid(self, name: str) -> int:
        return self.wait_ready(name)["pid"]

    def exercise(self, inst: Instance) -> None:
        inst.type.exercise(inst.socket, inst.variant)

    def recovered(self, inst: Instance, old_pid: int, *, allow_crash: bool = False,
                  others: dict[str, int] | None = None) -> str:
        """After a hostile connection to ``inst`` (whose child was ``old_pid``):
        the supervisor lives, the child ended cleanly (unless ``allow_crash``),
        a fresh child serves real I/O, and no other device was restarted.
        Returns how the old child ended."""
        if not self.supervisor_alive():
            raise CaseFailed("the supervisor died")
        d = self.wait_ready(inst.name, not_pid=old_pid)
        fresh = d["pid"]
        last = d.get("last_exit") or {}
        self.last_exit = last
        how = last.get("text", "?")
        if not allow_crash and last.get("kind") != "disconnected":
            raise CaseFailed(f"the device child crashed instead of ending the connection: {how}")
        try:
            self.exercise(inst)
        except CaseFailed:
            raise
        except Exception as e:  # noqa: BLE001
            raise CaseFailed(f"{inst.name} does not serve a fresh connection: {type(e).__name__}: {e}") from None
        self.wait_ready(inst.name, not_pid=fresh)   # quiet again before the next case looks at the pool
        if others:
            now = self.status()
            moved = [n for n, p in others.items() if now[n]["pid"] != p]
            if moved:
                raise CaseFailed(f"other devices were restarted: {', '.join(moved)}")
        return how

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every pooled device waits for a front-end (a case that
        failed half-way may have left one restarting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if all(d["state"] == "ready" and d["pid"] for n, d in st.items() if not n.endswith(SPECIAL)):
                return
            time.sleep(0.01)

    def other_pids(self, inst: Instance) -> dict[str, int]:
        """pids of every other device that is ready (to check they are left alone)."""
        return {n: d["pid"] for n, d in self.status().items()
                if n != inst.name and d["pid"] and d["state"] in ("ready", "serving")
                and not n.endswith(SPECIAL)}

    def probe(self) -> Any:
        """The jail prober (children spawned exactly as the supervisor spawns them)."""
        if self._probe is None:
            from .inchild import JailProber
            self._probe = JailProber(self.path("probe"), [t.name for t in self.types], self.policy_dir)
        return self._probe

    def audits(self) -> dict[str, Any]:
        """``sandbox.audit`` of every device child (the JSON report)."""
        import sandbox
        out: dict[str, Any] = {}
        try:
            devs = self.status()
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}
        for name, d in devs.items():
            pid = d.get("supervised_pid") or d.get("pid")
            if not pid:
                out[name] = None
                continue
            try:
                out[name] = sandbox.audit(pid)
            except Exception as e:  # noqa: BLE001 - the child may exit in between
                out[name] = {"error": f"{type(e).__name__}: {e}"}
        return out


def _die_with_parent() -> None:
    import prctl
    prctl.set_pdeathsig(signal.SIGTERM)


def wait_until(pred: Any, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
