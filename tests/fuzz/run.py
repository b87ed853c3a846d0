"""``make fuzz``: run every fuzz target for FUZZ_SECONDS and summarise.

    python -m tests.fuzz.run [--seconds N] [--jobs J] [--nice K] [TARGET ...]

Each target runs as ``python -m tests.fuzz.one TARGET`` (atheris/libFuzzer)
on a working corpus under ``.cache/fuzz/TARGET/corpus`` seeded from the
checked-in ``tests/fuzz/corpus/TARGET``; at most ``--jobs`` at a time,
under ``nice``.  A crash or hang does not end the target's time: the crash
input is kept under ``.cache/fuzz/TARGET/artifacts`` and the target is
started again for the rest of its time.  The table at the end gives, per
target, executions per second, libFuzzer's coverage (``cov:`` edges at the
start and at the end: the new coverage found) and features (``ft:``), the
corpus size and the crash inputs.  A finding is fixed in the project and
its input copied to ``tests/fuzz/regressions/TARGET/`` (replayed by
``make test``).  Exit status 1 when anything crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .targets import TARGETS

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = REPO / ".cache" / "fuzz"
#: Per-input limits: a slower input is a hang, a larger RSS an unbounded allocation.
TIMEOUT_S = 10
RSS_LIMIT_MB = 1536
#: A target that keeps crashing (one shallow bug) is stopped after this many.
MAX_CRASHES = 200
MAX_LEN = {"virtqueue": 8192, "handler": 8192, "block": 4096, "control": 8192}

_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+(?:.*?exec/s: (\d+))?")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    seconds: float = 0.0
    execs: int = 0
    cov_start: int | None = None
    cov_end: int = 0
    ft_end: int = 0
    corpus: int = 0
    runs: int = 0
    crashes: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    @property
    def exec_per_s(self) -> float:
        return self.execs / self.seconds if self.seconds else 0.0


def _run_once(target: str, seconds: int, nice: int, res: Result, log) -> None:
    work = CACHE / target / "corpus"
    art = CACHE / target / "artifacts"
    seeds = HERE / "corpus" / target
    regress = HERE / "regressions" / target
    for d in (work, art):
        d.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", str(nice), sys.executable, "-m", "tests.fuzz.one", target,
           f"-max_total_time={seconds}", f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}",
           f"-max_len={MAX_LEN.get(target, 4096)}", f"-artifact_prefix={art}/", "-print_final_stats=1",
           str(work)] + [str(d) for d in (seeds, regress) if d.is_dir()]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    last_execs = 0
    kind = None
    want_kind = False
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        m = _STATUS.match(line)
        if m:
            last_execs = int(m.group(1))
            cov, ft, corp = int(m.group(3)), int(m.group(4)), int(m.group(5))
            if res.cov_start is None and m.group(2) == "INITED":
                res.cov_start = cov
            res.cov_end = max(res.cov_end, cov)
            res.ft_end = max(res.ft_end, ft)
            res.corpus = max(res.corpus, corp)
        elif line.startswith("stat::number_of_executed_units:"):
            last_execs = int(line.split(":")[-1])
        elif "Uncaught Python exception" in line:
            want_kind = True
        elif want_kind and line.strip():
            kind = kind or line.strip()[:160]   # "ValueError: ..." (or "FuzzBug: ...")
            want_kind = False
        elif "ERROR: libFuzzer:" in line:
            kind = kind or line.strip()
        elif m2 := _ARTIFACT.search(line):
            res.crashes.append(m2.group(1))
            res.kinds.append(kind or "?")
            kind = None
    proc.wait()
    res.seconds += time.monotonic() - t0
    res.execs += last_execs
    res.runs += 1


def run_target(target: str, seconds: int, nice: int) -> Result:
    res = Result(target)
    (CACHE / target).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    with open(CACHE / target / "fuzz.log", "w") as log:
        while (left := int(deadline - time.monotonic())) >= 5:
            _run_once(target, left, nice, res, log)
            if len(res.crashes) >= MAX_CRASHES:
                break
    return res


def table(results: list[Result]) -> str:
    head = ("target", "seconds", "execs", "exec/s", "cov start", "cov end", "new cov", "ft", "corpus", "crashes")
    rows = [head]
    for r in results:
        start = r.cov_start if r.cov_start is not None else 0
        rows.append((r.target, f"{r.seconds:.0f}", str(r.execs), f"{r.exec_per_s:.0f}", str(start),
                     str(r.cov_end), str(r.cov_end - start), str(r.ft_end), str(r.corpus), str(len(r.crashes))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        for path, kind in zip(r.crashes, r.kinds):
            lines.append(f"{r.target}: {kind}: {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", choices=[[], *TARGETS], default=[], metavar="TARGET")
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")))
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("FUZZ_JOBS", "2")))
    ap.add_argument("--nice", type=int, default=10)
    args = ap.parse_args(argv)
    targets = args.targets or list(TARGETS)
    results: dict[str, Result] = {}
    pending = list(targets)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                t = pending.pop(0)
            print(f"fuzz: {t}: {args.seconds}s", flush=True)
            r = run_target(t, args.seconds, args.nice)
            with lock:
                results[t] = r
                print(f"fuzz: {t}: done, {r.execs} execs, {r.exec_per_s:.0f}/s, cov {r.cov_start}->{r.cov_end}, "
                      f"{len(r.crashes)} crash(es)", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ordered = [results[t] for t in targets]
    print(table(ordered))
    CACHE.mkdir(parents=True, exist_ok=True)
    summary = CACHE / f"summary-{int(time.time())}.json"
    summary.write_text(json.dumps([dict(asdict(r), exec_per_s=r.exec_per_s) for r in ordered], indent=2))
    print(f"summary: {summary}")
    return 1 if any(r.crashes for r in ordered) else 0


if __name__ == "__main__":
    sys.exit(main())
