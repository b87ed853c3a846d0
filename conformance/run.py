"""QEMU's own vhost-user-blk test suite against our block device and against
qemu-storage-daemon, side by side.

QEMU's tests/qtest/vhost-user-blk-test.c (in the ``qos-test`` binary) drives a
vhost-user-blk back-end through a real QEMU with the qtest accelerator.  It
starts the back-end as ``$QTEST_QEMU_STORAGE_DAEMON_BINARY --blockdev ...
--export type=vhost-user-blk,addr.type=fd,...`` and stops it with SIGTERM,
expecting exit status 0.  With that variable pointing at conformance/qsd-shim
the same unmodified suite runs against our standalone block device with its
default options.

Steps: build (or reuse) QEMU's qtest binaries for the installed Debian QEMU
(conformance/build_qemu.sh), list every vhost-user-blk test path, run each
one on its own against both back-ends, print a table.  Exit status 0 only
when every path passes for both.

    python3 conformance/run.py [--only ours|qsd] [--timeout S] [-k SUBSTRING]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM = HERE / "qsd-shim"
BUILD = HERE / "build_qemu.sh"
QSD = "qemu-storage-daemon"


def build() -> tuple[Path, float]:
    """The cached build directory (building it if needed) and the seconds it took."""
    t0 = time.monotonic()
    out = subprocess.run([str(BUILD)], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"conformance: building QEMU's qtest binaries failed (status {out.returncode})")
    return Path(out.stdout.strip().splitlines()[-1]), time.monotonic() - t0


def test_paths(qos_test: Path, env: dict[str, str], pattern: str) -> list[str]:
    """Every vhost-user-blk test path ``qos-test -l`` lists."""
    out = subprocess.run([str(qos_test), "-l"], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"conformance: {qos_test} -l failed: {out.stderr.strip()}")
    paths = [line.strip() for line in out.stdout.splitlines()
             if line.startswith("/") and pattern in line
             and ("/vhost-user-blk-tests/" in line or "/vhost-user-blk-pci-tests/" in line)]
    if not paths:
        raise SystemExit(f"conformance: {qos_test} lists no vhost-user-blk test path")
    return paths


def run_one(qos_test: Path, path: str, env: dict[str, str], timeout: float, log: Path) -> tuple[bool, float]:
    """One test path in a fresh qos-test (and so a fresh back-end), in a
    scratch directory (the test makes its images in the current one).  It
    runs in a session of its own: whatever it leaves behind (a back-end
    after an aborted test) is killed with it."""
    with tempfile.TemporaryDirectory(prefix="qtest-") as cwd:
        out_path = Path(cwd) / "output"
        with open(out_path, "wb") as out:
            t0 = time.monotonic()
            proc = subprocess.Popen([str(qos_test), "--tap", "-k", "-p", path], env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                status = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                status = None
            elapsed = time.monotonic() - t0
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if status is None:
                proc.wait()
        text = out_path.read_text(errors="replace")
    ok = status == 0 and "\nok " in "\n" + text and "not ok" not in text
    verdict = "PASS" if ok else "FAIL"
    note = f"timed out after {timeout}s" if status is None else f"exit status {status}"
    with open(log, "a") as f:
        f.write(f"==== {path} ({verdict}, {elapsed:.2f}s, {env['QTEST_QEMU_STORAGE_DAEMON_BINARY']})\n"
                f"{text}\n{note}\n\n")
    return ok, elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("ours", "qsd"), help="run against one back-end only")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per test path (default 300)")
    ap.add_argument("-k", dest="pattern", default="", help="only test paths containing this")
    ap.add_argument("--log", type=Path, default=None,
                    help="qos-test output per path (default: conformance.log in the build cache)")
    args = ap.parse_args(argv)

    build_dir, build_s = build()
    qos_test = build_dir / "tests" / "qtest" / "qos-test"
    base_env = {**os.environ,
                "QTEST_QEMU_BINARY": str(build_dir / "qemu-system-x86_64"),
                # the shim runs the devices on this interpreter (a venv with our dependencies)
                "VHOST_SUPERVISOR_PYTHON": os.environ.get("VHOST_SUPERVISOR_PYTHON", sys.executable)}
    qsd = shutil.which(QSD)
    backends = {"ours": str(SHIM), "qsd": qsd}
    if args.only:
        backends = {args.only: backends[args.only]}
    if "qsd" in backends and not qsd:
        raise SystemExit("conformance: qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    log = args.log or build_dir.parent / "conformance.log"
    log.write_text("")
    paths = test_paths(qos_test, base_env, args.pattern)

    results: dict[str, dict[str, tuple[bool, float]]] = {}
    totals = {name: 0.0 for name in backends}
    for path in paths:
        results[path] = {}
        for name, binary in backends.items():
            env = {**base_env, "QTEST_QEMU_STORAGE_DAEMON_BINARY": binary}
            ok, elapsed = run_one(qos_test, path, env, args.timeout, log)
            results[path][name] = (ok, elapsed)
            totals[name] += elapsed

    prefix = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    width = max(len(p) - len(prefix) for p in paths) + 2
    print(f"\nQEMU {build_dir.parent.name}: vhost-user-blk qtest paths under {prefix}/")
    header = f"{'test path':<{width}}" + "".join(f"{name:>14}" for name in backends)
    print(header)
    print("-" * len(header))
    for path in paths:
        cells = "".join(f"{('pass' if ok else 'FAIL') + f' {t:5.2f}s':>14}"
                        for ok, t in (results[path][n] for n in backends))
        print(f"{path[len(prefix):]:<{width}}{cells}")
    print("-" * len(header))
    passed = {n: sum(results[p][n][0] for p in paths) for n in backends}
    print(f"{'passed':<{width}}" + "".join(f"{f'{passed[n]}/{len(paths)}':>14}" for n in backends))
    print(f"{'run time':<{width}}" + "".join(f"{f'{totals[n]:.1f}s':>14}" for n in backends))
    print(f"build: {build_s:.1f}s (cached when ~0s), {build_dir}")
    print(f"qos-test output: {log}")
    return 0 if all(passed[n] == len(paths) for n in backends) else 1


if __name__ == "__main__":
    sys.exit(main())
