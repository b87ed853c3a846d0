"""Jail set-up cost: fork to jailed, per device (measured, never asserted).

Each configuration is timed side by side in one run, interleaved, so the
ratios are meaningful on a noisy machine:

  fork         os.fork(); the child exits at once (the floor)
  no-ns        spawn(namespaces=False): fds, ids, caps, prctl, rlimits
  jail         spawn(): + user/pid/mnt/net/ipc/uts/cgroup ns, id maps, tmpfs root, pivot_root
  jail+policy  spawn() with block.policy (user-notify filter + forwarder filter)
  compile      compile_policy(block.policy) alone, uncached (in the parent, before fork)

"ready" is spawn() returning: the child is jailed, seccomp loaded, and about
to run the device.  "exit" adds the device returning 0 and the parent reaping
it.  Run: python -m benchmarks.jail [rounds]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from sandbox import JailConfig, spawn
from sandbox.compiler import _compile_cached, compile_policy
from sandbox.jail import POLICY_DIR

POLICY = os.path.join(POLICY_DIR, "block.policy")


def _fork() -> tuple[float, float]:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    t1 = time.perf_counter()
    os.waitpid(pid, 0)
    return t1 - t0, time.perf_counter() - t0


def _spawn(config: JailConfig) -> tuple[float, float]:
    t0 = time.perf_counter()
    child = spawn(config, lambda: 0)
    t1 = time.perf_counter()
    _pid, status = os.waitpid(child.pid, 0)
    t2 = time.perf_counter()
    reason = child.decode_status(status)
    child.close()
    if reason.kind != "disconnected" or reason.code != 0:
        raise RuntimeError(f"{config.name}: {reason}")
    return t1 - t0, t2 - t0


def _compile() -> tuple[float, float]:
    _compile_cached.cache_clear()
    t0 = time.perf_counter()
    compile_policy(POLICY, "notify", (("sendmsg", 0, 99),))
    t = time.perf_counter() - t0
    return t, t


CASES = {
    "fork": _fork,
    "no-ns": lambda: _spawn(JailConfig(name="bench", namespaces=False)),
    "jail": lambda: _spawn(JailConfig(name="bench")),
    "jail+policy": lambda: _spawn(JailConfig(name="bench", seccomp_policy=POLICY)),
    "compile": _compile,
}


def run(rounds: int = 30) -> dict[str, tuple[list[float], list[float]]]:
    results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in CASES}
    for case in CASES.values():  # warm-up (imports, policy cache)
        case()
    for _ in range(rounds):
        for name, case in CASES.items():
            ready, done = case()
            results[name][0].append(ready)
            results[name][1].append(done)
    return results


def _ms(values: list[float], q: float) -> float:
    return 1000 * statistics.quantiles(values, n=100)[int(q) - 1] if q != 50 else 1000 * statistics.median(values)


def main(argv: list[str]) -> int:
    rounds = int(argv[1]) if len(argv) > 1 else 30
    res = run(rounds)
    base = statistics.median(res["fork"][1])
    print(f"jail set-up cost, {rounds} rounds, interleaved (ms; ratio = median exit / fork median exit)")
    print(f"{'case':<12} {'ready p50':>10} {'ready p90':>10} {'exit p50':>9} {'exit p90':>9} {'ratio':>7}")
    for name, (ready, done) in res.items():
        print(f"{name:<12} {_ms(ready, 50):>10.2f} {_ms(ready, 90):>10.2f} {_ms(done, 50):>9.2f} "
              f"{_ms(done, 90):>9.2f} {statistics.median(done) / base:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
