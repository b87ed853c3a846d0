"""Containment: what a hostile guest, front-end or local user can make the host pay.

Each section is one measurement from the attacker's side, against real
devices in the real jail (``tests.devices.hostile``: the device's seccomp
policy and its ``memory-limit=`` as RLIMIT_DATA), and returns rows of
(measure, value, unit, goal, whether the goal holds).  ``main`` runs every
section (or those named with ``--only``), prints one table and exits 1 if a
goal is missed.  Figures and the command are in benchmarks/README.md.

Device-side sections (this file's first part):

- ``block-bounce``: ``direct=true`` block device; requests that list one
  unaligned 1 MiB guest buffer 200 times, 4 in flight (the I/O threads serve
  them together), writes then reads.  Peak RSS growth of the device
  (VmHWM after ``clear_refs``), goal < 64 MiB.
- ``console-iov``: one transmit chain of ~2000 views (1000 descriptors that
  straddle two adjacent guest regions) aliasing one 256 KiB buffer: 250 MiB
  of output from 256 KiB of guest memory.  Peak RSS growth, goal < 64 MiB.
- ``console-flood``: the guest writes its console (``type=file``, defaults
  max-size=16M keep=2) as fast as it can for ``--seconds``; disk used by
  the output files, goal <= max-size x (keep + 1) = 48 MiB.

Supervisor-side sections (CPU under a stderr flood, a connect/garbage/close
storm, idle with 50k unrelated Unix sockets) are added below by their owner
in the same shape: a function taking the parsed args, registered in
``SECTIONS``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from devices.virtio_blk import T_IN, T_OUT
from frontend.hostile import (MiB, aliased_block_request, peak_rss, reset_peak, rss,
                                   start_jailed, stop_jailed, wait_all)


@dataclass
class Row:
    measure: str
    value: float
    unit: str
    goal: str
    ok: bool


Section = Callable[[argparse.Namespace], list[Row]]


# --------------------------------------------------------------------------
# Device memory: the O_DIRECT bounce under aliased buffers

BOUNCE_ALIASES = 200
BOUNCE_REQUESTS = 4
RSS_GOAL = 64 * MiB


def block_bounce(args: argparse.Namespace) -> list[Row]:
    rows = []
    work = tempfile.mkdtemp(prefix="contain-blk-", dir=args.dir)
    try:
        img = os.path.join(work, "big.img")
        with open(img, "wb") as f:
            f.truncate(BOUNCE_REQUESTS * BOUNCE_ALIASES * MiB)
        child, fe = start_jailed("block", {"path": img, "direct": "true"})
        try:
            fe.negotiate()
            fe.setup_memory(64 * MiB)
            q = fe.setup_queue(0, 1024)
            gpa, view = q.alloc(MiB + 4096, 4096)
            view[:] = b"\xa5" * len(view)
            pid = child.device_pid
            for op, label in ((T_OUT, "write"), (T_IN, "read")):
                before = rss(pid)
                reset_peak(pid)
                t0 = time.monotonic()
                heads, statuses = set(), []
                for i in range(BOUNCE_REQUESTS):
                    head, st = aliased_block_request(q, op, i * BOUNCE_ALIASES * MiB // 512, gpa + 1, MiB,
                                                     BOUNCE_ALIASES)
                    heads.add(head)
                    statuses.append(st)
                q.kick()
                wait_all(q, heads)
                secs = time.monotonic() - t0
                growth = peak_rss(pid) - before
                served = all(s[0] == 0 for s in statuses)
                rows.append(Row(f"block direct=true, {BOUNCE_REQUESTS} x {BOUNCE_ALIASES} MiB aliased "
                                f"{label}s ({secs:.1f} s, {'served' if served else 'NOT served'}): "
                                f"device peak RSS growth", growth / MiB, "MiB", "< 64", growth < RSS_GOAL
                                and served))
        finally:
            stop_jailed(child, fe)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------
# Device memory: a console chain longer than IOV_MAX

def console_iov(args: argparse.Namespace) -> list[Row]:
    work = tempfile.mkdtemp(prefix="contain-con-", dir=args.dir)
    try:
        out = os.path.join(work, "console.log")
        child, fe = start_jailed("console", {"type": "file", "path": out})
        try:
            fe.negotiate()
            half = 16 * MiB
            mem = fe.setup_memory(2 * half, gpa1=half)
            fe.setup_queue(0, 64)
            tx = fe.setup_queue(1, 1024)
            buf_len = 256 << 10
            start = half - buf_len // 2
            mem.view(start, buf_len // 2)[:] = b"a" * (buf_len // 2)
            mem.view(half, buf_len // 2)[:] = b"b" * (buf_len // 2)
            pid = child.device_pid
            before = rss(pid)
            reset_peak(pid)
            t0 = time.monotonic()
            head = tx.submit([(start, buf_len)] * 1000, [])
            tx.kick()
            wait_all(tx, {head})
            secs = time.monotonic() - t0
            growth = peak_rss(pid) - before
        finally:
            stop_jailed(child, fe)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [Row(f"console, one chain of 2000 views aliasing 256 KiB (250 MiB out, {secs:.1f} s): "
                f"device peak RSS growth", growth / MiB, "MiB", "< 64", growth < RSS_GOAL)]


# --------------------------------------------------------------------------
# Device disk: a console flood

def console_flood(args: argparse.Namespace) -> list[Row]:
    work = tempfile.mkdtemp(prefix="contain-flood-", dir=args.dir)
    try:
        out = os.path.join(work, "console.log")
        child, fe = start_jailed("console", {"type": "file", "path": out})
        try:
            fe.negotiate()
            fe.setup_memory(32 * MiB)
            fe.setup_queue(0, 64)
            tx = fe.setup_queue(1, 256)
            chunk = 64 << 10
            bufs = []
            for i in range(16):
                gpa, view = tx.alloc(chunk, 4096)
                view[:] = bytes([0x61 + i]) * (chunk - 1) + b"\n"
                bufs.append(gpa)
            pid = child.device_pid
            before = rss(pid)
            reset_peak(pid)
            sent = 0
            by_head = {tx.submit([(gpa, chunk)], []): gpa for gpa in bufs}
            tx.kick()
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                free = [by_head.pop(head) for head, _n in tx.wait_used(10.0)]
                sent += chunk * len(free)
                for gpa in free:   # after taking all in: a freed head may be reused at once
                    by_head[tx.submit([(gpa, chunk)], [])] = gpa
                tx.kick()
            secs = time.monotonic() - t0
            growth = peak_rss(pid) - before
        finally:
            stop_jailed(child, fe)
        names = sorted(n for n in os.listdir(work) if n.startswith("console.log"))
        sizes = [os.stat(os.path.join(work, n)) for n in names]
        used = sum(st.st_blocks * 512 for st in sizes)
        apparent = sum(st.st_size for st in sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    budget = 16 * MiB * 3
    return [
        Row(f"console flood, max-size=16M keep=2: guest wrote ({secs:.1f} s, "
            f"{sent / MiB / secs:.0f} MiB/s)", sent / MiB, "MiB", "-", True),
        Row(f"console flood: disk used by {len(names)} files ({apparent / MiB:.1f} MiB apparent)",
            used / MiB, "MiB", "<= 48", used <= budget and apparent <= budget),
        Row("console flood: device peak RSS growth", growth / MiB, "MiB", "< 64", growth < RSS_GOAL),
    ]


# --------------------------------------------------------------------------

SECTIONS: dict[str, Section] = {
    "block-bounce": block_bounce,
    "console-iov": console_iov,
    "console-flood": console_flood,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated sections (default all: {', '.join(SECTIONS)})")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the flood sections (5)")
    p.add_argument("--dir", default=None, help="directory for images and output files (default: $TMPDIR)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("containment benchmark: needs root (real jails, /proc/<pid>/clear_refs)", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    failed = False
    print(f"{'measure':<100} {'value':>9} {'unit':<5} {'goal':>6}  ok")
    for name in names:
        for row in SECTIONS[name](args):
            failed |= not row.ok
            print(f"{row.measure:<100} {row.value:>9.1f} {row.unit:<5} {row.goal:>6}  "
                  f"{'yes' if row.ok else 'NO'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
