"""``make demo``: the supervisor's promises, shown end to end in ~5 seconds.

A supervisor with a block device (on a fresh sparse image), a console and an
rng device; each is driven by the front-end driver the way a VMM would; the
block child is SIGKILLed and comes back on the same socket, with the data
still there; the status table; then SIGTERM, and a check that no socket
file, process or temporary file is left behind.

Run as ``python -m supervisor.demo [--disable-sandbox] [--keep-log]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

from frontend.exercise import drive_block, drive_console, drive_rng, wait_file_contains
from frontend.supervisor_process import SupervisorProcess
from .status import format_table

IMAGE_SIZE = 64 << 20


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def sandbox_available() -> tuple[bool, str]:
    """The jail needs root, the sandbox package and the seccomp policies."""
    if os.geteuid() != 0:
        return False, "not root"
    try:
        import sandbox
        sandbox.spawn  # noqa: B018
    except Exception as e:  # noqa: BLE001
        return False, f"sandbox unavailable: {e}"
    from .config import default_policy_dir
    missing = [p for p in ("block.policy", "console.policy", "rng.policy")
               if not (default_policy_dir() / p).is_file()]
    if missing:
        return False, f"missing seccomp policies: {', '.join(missing)}"
    return True, ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def _settle(sup: SupervisorProcess, n: int, served: set[int], timeout: float = 10.0) -> dict:
    """Wait until all ``n`` devices are ready with a child that has not served
    a front-end yet (the ones that did exit on the disconnect)."""
    deadline = time.monotonic() + timeout
    st = sup.status()
    while time.monotonic() < deadline:
        st = sup.status()
        if len(st) == n and all(d["state"] == "ready" and d["pid"] not in served for d in st.values()):
            break
        time.sleep(0.01)
    return st


def run(disable_sandbox: bool = False, keep_log: bool = False) -> int:
    sandboxed = not disable_sandbox
    if sandboxed:
        ok, why = sandbox_available()
        if not ok:
            print(f"note: running without the sandbox ({why})")
            sandboxed = False
    work = tempfile.mkdtemp(prefix="vhost-demo-", dir="/tmp")
    sup = SupervisorProcess(work)
    seen_pids: set[int] = set()
    sockets = {n: os.path.join(work, f"{n}.sock") for n in ("block", "console", "rng")}
    image = os.path.join(work, "disk.img")
    console_out = os.path.join(work, "console.out")
    rc = 1
    try:
        step(f"fresh {IMAGE_SIZE >> 20} MiB sparse image, supervisor with block, console and rng "
             f"(sandbox {'on' if sandboxed else 'OFF'})")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        args = ["--block", f"vhost={sockets['block']},path={image}",
                "--serial", f"vhost={sockets['console']},type=file,path={console_out}",
                "--rng", f"vhost={sockets['rng']}"]
        if not sandboxed:
            args.insert(0, "--disable-sandbox")
        print("$ vhost-supervisor run -s", sup.control, " ".join(args))
        took = sup.start(*args)
        print(f"READY=1 after {took * 1000:.0f} ms")
        st = sup.status()
        seen_pids.update(d["pid"] for d in st.values() if d["pid"])

        step("block: write 64 KiB at 1 MiB, read back, verify")
        data = os.urandom(64 << 10)
        drive_block(sockets["block"], 1 << 20, data)
        print(f"ok: {len(data)} bytes written and read back identical (sha prefix {data[:4].hex()})")

        step("console: the guest writes a line, it lands in the output file")
        drive_console(sockets["console"], b"hello from the guest console\n")
        print("output file:", wait_file_contains(console_out, b"hello from the guest").decode().strip())

        step("rng: 32 random bytes")
        print(drive_rng(sockets["rng"], 32).hex())

        st = _settle(sup, 3, served=set(seen_pids))
        seen_pids.update(d["pid"] for d in st.values() if d["pid"])
        step("status after one front-end per device (each disconnect -> a fresh child at once)")
        print(format_table(sup.request("status")))

        step("SIGKILL the block child")
        old = sup.wait_state("block-0", ("ready",))
        inode = os.stat(sockets["block"]).st_ino
        t0 = time.monotonic()
        os.kill(old["pid"], signal.SIGKILL)
        new = sup.wait_state("block-0", ("ready",), pred=lambda d: d["pid"] not in (None, old["pid"]))
        seen_pids.add(new["pid"])
        print(f"pid {old['pid']} killed -> pid {new['pid']} ready after {(time.monotonic() - t0) * 1000:.0f} ms; "
              f"last exit: {new['last_exit']['text']}; socket inode {inode} -> {os.stat(sockets['block']).st_ino}")
        back = drive_block(sockets["block"], 1 << 20, data)
        print(f"served again: the 64 KiB written before the kill read back identical ({back[:4].hex()})")

        step("status")
        st = _settle(sup, 3, served={new["pid"]})
        seen_pids.update(d["pid"] for d in st.values() if d["pid"])
        print(format_table(sup.request("status")))

        step("SIGTERM the supervisor")
        code = sup.terminate()
        print(f"supervisor exited with {code}")
        left_sockets = [p for p in list(sockets.values()) + [sup.control] if os.path.exists(p)]
        left_pids = [p for p in seen_pids if _alive(p)]
        print(f"socket files left: {left_sockets or 'none'}; device processes left: {left_pids or 'none'}")
        log = sup.read_log()
        step("supervisor log (last 12 lines)")
        print("\n".join(log.strip().splitlines()[-12:]))
        rc = 0 if code == 0 and not left_sockets and not left_pids else 1
    except Exception as e:  # noqa: BLE001
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        print(sup.read_log()[-3000:], file=sys.stderr)
        rc = 1
    finally:
        sup.cleanup()
        if keep_log:
            shutil.copy(sup.log_path, "demo-supervisor.log")
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ntemporary directory {work} removed: {not os.path.exists(work)}")
    print("demo", "passed" if rc == 0 else "FAILED")
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhost-supervisor demo")
    p.add_argument("--disable-sandbox", action="store_true")
    p.add_argument("--keep-log", action="store_true", help="copy the supervisor log to ./demo-supervisor.log")
    a = p.parse_args(argv)
    return run(a.disable_sandbox, a.keep_log)


if __name__ == "__main__":
    sys.exit(main())
