"""Target: the seccomp policy parser and its lowering (sandbox/policy.py,
sandbox/compiler.py).

The input is the text of a policy file and of a file it may include
(``@include inc.policy``; the real ``common.policy`` may be included too),
written to a private directory; it is parsed with libseccomp's syscall
resolver, lowered to a libseccomp filter and, for some inputs, exported as
BPF.  Every argument value that parses must be a u64 (nothing silently
truncated).  Fine: PolicyError (naming file and line).  A bug: anything else.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from sandbox.compiler import DEFAULT_ACTIONS, build_filter, export_bpf, syscall_number
from sandbox.policy import U64, PolicyError, parse_policy

from ..data import Data
from ..harness import FuzzBug

_dir: str | None = None


def _workdir() -> str:
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="fuzz-policy-")
        atexit.register(shutil.rmtree, _dir, True)
        common = os.path.join(os.path.dirname(__file__), "..", "..", "..", "seccomp", "common.policy")
        shutil.copy(common, os.path.join(_dir, "common.policy"))
    return _dir


def _known(name: str) -> bool:
    return syscall_number(name) >= 0


def one_input(buf: bytes) -> None:
    d = Data(buf)
    mode = d.u8()
    split = d.u16()
    rest = d.rest()
    main, inc = rest[:split % (len(rest) + 1)], rest[split % (len(rest) + 1):]
    work = _workdir()
    path = os.path.join(work, "main.policy")
    with open(path, "wb") as f:
        f.write(main)
    with open(os.path.join(work, "inc.policy"), "wb") as f:
        f.write(inc)
    try:
        policy = parse_policy(path, _known)
        for rule in policy.rules.values():
            for clause in rule.clauses:
                for atom in clause:
                    if not 0 <= atom.value <= U64:
                        raise FuzzBug(f"{rule.name}: {atom.text!r} parsed to {atom.value:#x}, not a u64")
        filt = build_filter(policy, DEFAULT_ACTIONS[mode % len(DEFAULT_ACTIONS)])
        if mode & 0x10:
            export_bpf(filt)
    except PolicyError:
        pass
