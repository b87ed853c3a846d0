"""Run cases against one environment and report: the table, and the JSON
report (kernel, policy hashes, the audit of every child, versions)."""

from __future__ import annotations

import os
import platform
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass
from typing import Any, TextIO

from .catalog import Case, CaseFailed

FAIL = "FAIL"
PASS = "pass"


@dataclass
class Result:
    case: Case
    verdict: str        # "pass" or "FAIL"
    observed: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        c = self.case
        return {"id": c.id, "class": c.cls, "device_type": c.device_type, "tries": c.tries,
                "expected": c.expected, "observed": self.observed, "verdict": self.verdict,
                "seconds": round(self.seconds, 4)}


def run_case(env: Any, case: Case) -> Result:
    """One case; any exception other than CaseFailed is a failure too (the
    defence could not be shown), with the exception as the observation."""
    t0 = time.monotonic()
    try:
        observed = case.fn(env)
        verdict = PASS
    except CaseFailed as e:
        observed, verdict = str(e), FAIL
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
        observed, verdict = f"check error {type(e).__name__}: {e}{where}", FAIL
    return Result(case, verdict, str(observed), time.monotonic() - t0)


def run_cases(env: Any, cases: list[Case], progress: TextIO | None = None) -> list[Result]:
    results = []
    for i, case in enumerate(cases, 1):
        r = run_case(env, case)
        results.append(r)
        if progress is not None:
            progress.write(f"[{i}/{len(cases)}] {case.id}: {r.verdict} ({r.seconds:.2f}s)\n")
            progress.flush()
    return results


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(results: list[Result], wide: bool = False) -> str:
    cols = [("id", 40), ("class", 10), ("type", 7), ("tries", 44), ("expected", 30), ("observed", 44),
            ("verdict", 7), ("time", 6)]
    if wide:
        cols = [(n, w * 3) for n, w in cols]
    lines = ["  ".join(n.ljust(w) for n, w in cols), "  ".join("-" * w for _, w in cols)]
    for r in results:
        c = r.case
        vals = [c.id, c.cls, c.device_type, c.tries, c.expected, r.observed, r.verdict, f"{r.seconds:.2f}"]
        lines.append("  ".join(_cut(v, w).ljust(w) for v, (_, w) in zip(vals, cols)))
    return "\n".join(lines)


def summary(results: list[Result], seconds: float) -> str:
    by_class: dict[str, list[int]] = {}
    for r in results:
        p = by_class.setdefault(r.case.cls, [0, 0])
        p[0 if r.verdict == PASS else 1] += 1
    parts = [f"{cls}: {p}/{p + f}" for cls, (p, f) in by_class.items()]
    passed = sum(1 for r in results if r.verdict == PASS)
    lines = [f"{passed}/{len(results)} cases passed in {seconds:.1f}s ({'; '.join(parts)})"]
    failed = [r for r in results if r.verdict == FAIL]
    if failed:
        lines.append(f"{len(failed)} failing case(s):")
        lines += ["  " + textwrap.shorten(f"{r.case.id}: {r.observed}", 200) for r in failed]
    return "\n".join(lines)


def versions() -> dict[str, Any]:
    from importlib import metadata
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("vhost-supervisor", "python-prctl", "psutil", "uvloop", "pyseccomp"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["libseccomp"] = _libseccomp_version()
    return out


def _libseccomp_version() -> str | None:
    """The C library the policies are compiled with (seccomp_version(3))."""
    import ctypes

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
        lib.seccomp_version.restype = ctypes.POINTER(Version)
        v = lib.seccomp_version().contents
        return f"{v.major}.{v.minor}.{v.micro}"
    except (OSError, AttributeError):
        return None


def build_report(env: Any, results: list[Result], seconds: float, audits: dict[str, Any]) -> dict[str, Any]:
    from .policies import policy_hashes
    u = os.uname()
    return {
        "ok": all(r.verdict == PASS for r in results),
        "passed": sum(1 for r in results if r.verdict == PASS),
        "failed": sum(1 for r in results if r.verdict != PASS),
        "seconds": round(seconds, 2),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds)),
        "host": {"kernel": u.release, "kernel_version": u.version, "machine": u.machine, "hostname": u.nodename},
        "policy_dir": env.policy_dir,
        "policies_sha256": policy_hashes(env.policy_dir),
        "versions": versions(),
        "audit": audits,
        "notes": list(getattr(env, "notes", [])),
        "cases": [r.as_dict() for r in results],
    }
