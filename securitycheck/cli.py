"""``vhost-supervisor security-check``: run the attack catalog on this host.

Exit status: 0 every case passed, 1 at least one failed, 2 usage error or
the check could not start (nothing is left behind either way).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from .catalog import CLASSES, all_cases


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .devtypes import TYPES
    p.add_argument("--json", metavar="FILE", help="write the full report (JSON) to FILE")
    p.add_argument("--class", dest="classes", action="append", choices=CLASSES, metavar="C",
                   help=f"only this class of attack ({', '.join(CLASSES)}); repeatable")
    p.add_argument("--device-type", dest="device_types", action="append", choices=sorted(TYPES), metavar="T",
                   help=f"only devices of this type ({', '.join(sorted(TYPES))}); repeatable")
    p.add_argument("--seccomp-policy-dir", metavar="DIR",
                   help="the policies to attack (default: the supervisor's own, as `run` would load them)")
    p.add_argument("--case", dest="cases", action="append", metavar="ID",
                   help="only the case with this id (or id prefix); repeatable")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--wide", action="store_true", help="do not shorten the table's columns")


def run(args: argparse.Namespace) -> int:
    from .env import Environment
    from .runner import FAIL, build_report, format_table, run_cases, summary
    try:
        cases = all_cases(args.classes, args.device_types)
    except ValueError as e:
        print(f"vhost-supervisor security-check: {e}", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(f"{c.id}\t{c.cls}\t{c.device_type}\t{c.tries}\t{c.expected}")
        print(f"{len(cases)} cases", file=sys.stderr)
        return 0
    if os.geteuid() != 0:
        print("vhost-supervisor security-check: run as root (the check starts jailed devices "
              "and plays an unprivileged user with setuid)", file=sys.stderr)
        return 2
    if args.cases:
        cases = [c for c in cases if any(c.id == p or c.id.startswith(p) for p in args.cases)]
    t0 = time.monotonic()
    env = Environment(args.device_types, policy_dir=args.seccomp_policy_dir)
    audits: dict = {}
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the temporary supervisor and files go too
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        try:
            env.start()
        except Exception as e:  # noqa: BLE001 - could not even set up: say why, leave nothing
            print(f"vhost-supervisor security-check: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
            if env.sup is not None:
                print(env.log()[-3000:], file=sys.stderr)
            return 2
        results = run_cases(env, cases, None if args.quiet else sys.stderr)
        audits = env.audits()
    except KeyboardInterrupt:
        print("vhost-supervisor security-check: interrupted; cleaning up", file=sys.stderr)
        return 2
    finally:
        env.close()
    seconds = time.monotonic() - t0
    print(format_table(results, args.wide))
    print()
    print(summary(results, seconds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(build_report(env, results, seconds, audits), f, indent=2, default=str)
        print(f"report: {args.json}")
    return 1 if any(r.verdict == FAIL for r in results) else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhost-supervisor security-check",
                                description="Attack a temporary supervisor with real jailed devices and report.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
