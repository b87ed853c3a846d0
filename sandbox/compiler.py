"""Lower a parsed policy to a BPF program with libseccomp (pyseccomp).

The output is raw BPF bytes, produced in the parent before fork: the jailed
child only hands them to seccomp(2), so it needs neither libseccomp nor the
policy files after pivot_root.

libseccomp ANDs the comparisons of one rule and ORs rules, but accepts at most
one comparison per argument in a rule; the lowering below reports an
expression it cannot express as a PolicyError naming the line instead of
compiling something different from what was written.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
from dataclasses import dataclass

import pyseccomp as sc

from .policy import U64, Action, Atom, Clause, Policy, PolicyError, Source, SyscallRule, _merge, parse_policy

DEFAULT_ACTIONS = ("kill-process", "notify", "log", "trap")
MAX_CLAUSES = 256

# A lowered comparison: (arg, libseccomp op, datum_a, datum_b)
Cmp = tuple[int, int, int, int]


@dataclass
class CompiledPolicy:
    """A policy ready to load: BPF bytes plus what it was made from."""

    policy: Policy
    default_action: str
    bpf: bytes

    @property
    def files(self) -> list[str]:
        return self.policy.files


_ARCH = sc.system_arch()


def syscall_number(name: str) -> int:
    """The native syscall number of `name`, or -1 (libseccomp's resolver)."""

    try:
        return int(sc.resolve_syscall(_ARCH, name))
    except Exception:
        return -1


def syscall_name(nr: int, arch: int | None = None) -> str:
    """Name of a syscall number for an AUDIT_ARCH token (default: native)."""

    try:
        raw = sc.resolve_syscall(arch if arch is not None else _ARCH, nr)
    except Exception:
        raw = b""
    return raw.decode() if raw else f"syscall#{nr}"


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(64) if mask >> i & 1]


def _lower_atom(atom: Atom) -> list[list[Cmp]]:
    """One source atom as a DNF of libseccomp comparisons."""

    a, v = atom.arg, atom.value & U64
    simple = {"==": sc.EQ, "!=": sc.NE, "<": sc.LT, "<=": sc.LE, ">": sc.GT, ">=": sc.GE}
    if atom.op in simple:
        return [[(a, simple[atom.op], v, 0)]]
    if atom.op == "&":  # any of these bits set
        return [[(a, sc.MASKED_EQ, b, b)] for b in _bits(v)]
    if atom.op == "in":  # no bit outside the mask
        return [[(a, sc.MASKED_EQ, ~v & U64, 0)]]
    raise AssertionError(atom.op)


def _negate_cmp(c: Cmp) -> list[Cmp]:
    """The negation of one comparison, as an OR of comparisons."""

    a, op, x, y = c
    flip = {sc.EQ: sc.NE, sc.NE: sc.EQ, sc.LT: sc.GE, sc.GE: sc.LT, sc.LE: sc.GT, sc.GT: sc.LE}
    if op in flip:
        return [(a, flip[op], x, 0)]
    # (arg & m) != y  <=>  some bit b of m differs from y's bit b
    return [(a, sc.MASKED_EQ, b, ~y & b) for b in _bits(x)]


def _dnf_and(left: list[list[Cmp]], right: list[list[Cmp]]) -> list[list[Cmp]]:
    return [l + r for l, r in itertools.product(left, right)]


def lower_clauses(clauses: list[Clause]) -> list[list[Cmp]]:
    out: list[list[Cmp]] = []
    for clause in clauses:
        dnf: list[list[Cmp]] = [[]]
        for atom in clause:
            dnf = _dnf_and(dnf, _lower_atom(atom))
        out.extend(dnf)
    return out


def negate(dnf: list[list[Cmp]]) -> list[list[Cmp]]:
    """not (C1 or C2 ...) as a DNF, expanded by distribution."""

    result: list[list[Cmp]] = [[]]
    for clause in dnf:
        alternatives = [[n] for c in clause for n in _negate_cmp(c)]
        result = _dnf_and(result, alternatives)
        if len(result) > MAX_CLAUSES:
            break
    return result


def _check_expressible(rule: SyscallRule, dnf: list[list[Cmp]], what: str) -> list[list[Cmp]]:
    src = rule.sources[-1]
    if len(dnf) > MAX_CLAUSES:
        raise PolicyError(src.file, src.line, f"{rule.name}: {what} expands to more than {MAX_CLAUSES} rules")
    cleaned: list[list[Cmp]] = []
    for clause in dnf:
        uniq = list(dict.fromkeys(clause))
        args = [c[0] for c in uniq]
        if len(set(args)) != len(args):
            raise PolicyError(src.file, src.line,
                              f"{rule.name}: {what} needs two comparisons of the same argument in one "
                              "rule, which libseccomp cannot express; rewrite it")
        if uniq not in cleaned:
            cleaned.append(uniq)
    return cleaned


def _sc_action(action: Action) -> int:
    return {
        "allow": sc.ALLOW, "kill-process": sc.KILL_PROCESS, "kill-thread": sc.KILL, "trap": sc.TRAP,
        "log": sc.LOG, "notify": sc.NOTIFY,
    }.get(action.kind, None) if action.kind != "errno" else sc.ERRNO(action.errno)


def _add(filt: sc.SyscallFilter, rule: SyscallRule, action: Action, cmps: list[Cmp]) -> None:
    args = [sc.Arg(a, op, x, y) for a, op, x, y in cmps]
    try:
        filt.add_rule_exactly(_sc_action(action), rule.name, *args)
    except OSError as e:
        src = rule.sources[-1]
        raise PolicyError(src.file, src.line, f"{rule.name}: libseccomp rejected the rule: {e}") from e


def build_filter(policy: Policy, default_action: str) -> sc.SyscallFilter:
    if default_action not in DEFAULT_ACTIONS:
        raise ValueError(f"default_action must be one of {DEFAULT_ACTIONS}")
    filt = sc.SyscallFilter(_sc_action(Action(default_action)))
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    filt.set_attr(sc.Attr.CTL_NNP, 0)  # the jail sets no_new_privs itself
    for rule in policy.rules.values():
        if rule.unconditional is not None:
            if rule.unconditional.kind == "allow" or not rule.clauses:
                _add(filt, rule, rule.unconditional, [])
                continue
        positive = _check_expressible(rule, lower_clauses(rule.clauses), "the expression")
        for clause in positive:
            _add(filt, rule, Action("allow"), clause)
        if rule.else_action is not None:
            for clause in _check_expressible(rule, negate(positive), "'; return' (the negated expression)"):
                _add(filt, rule, rule.else_action, clause)
    return filt


def export_bpf(filt: sc.SyscallFilter) -> bytes:
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            filt.export_bpf(f)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _add_extra(policy: Policy, extra_allow: tuple[tuple[str, int, int], ...]) -> Policy:
    """Copy of `policy` with `syscall: argN == value` allow rules ORed in."""

    if not extra_allow:
        return policy
    merged = copy.deepcopy(policy)
    for name, arg, value in extra_allow:
        atom = Atom(arg, "==", value, f"arg{arg} == {value}  (jail hand-over)")
        rule = merged.rules.get(name)
        if rule is not None and rule.unconditional is not None:
            continue
        _merge(merged.rules, name, [(atom,)], Action("allow"), None, Source("<jail>", 0))
    return merged


@functools.lru_cache(maxsize=64)
def _compile_cached(path: str, stamp: tuple, default_action: str,
                    extra_allow: tuple[tuple[str, int, int], ...]) -> CompiledPolicy:
    policy = parse_policy(path, known_syscall=lambda n: syscall_number(n) >= 0)
    _FILES[path] = policy.files
    policy = _add_extra(policy, extra_allow)
    return CompiledPolicy(policy, default_action, export_bpf(build_filter(policy, default_action)))


_FILES: dict[str, list[str]] = {}  # policy path -> the files it was made of, last time


def _stat_all(files: list[str]) -> tuple:
    out = []
    for f in files:
        st = os.stat(f)
        out.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _stamp(path: str) -> tuple:
    """Identity of a policy and its includes, cheap to recheck: a stat per file
    (a changed file means a re-parse, which also refreshes the include list)."""

    files = _FILES.get(path)
    if files is not None:
        try:
            return _stat_all(files)
        except OSError:
            pass
    files = parse_policy(path, known_syscall=lambda n: syscall_number(n) >= 0).files
    _FILES[path] = files
    return _stat_all(files)


def compile_policy(path: str | os.PathLike[str], default_action: str = "kill-process",
                   extra_allow: tuple[tuple[str, int, int], ...] = ()) -> CompiledPolicy:
    """Parse and compile a policy file; errors raise PolicyError(file, line, msg).

    `default_action` is what happens to a syscall no rule allows: kill-process
    (a jail without a listening parent), notify (spawn(): the parent learns the
    syscall and kills the child), log (writing policies) or trap.
    `extra_allow` ORs in `(syscall, arg, value)` equality rules the jail itself
    needs (the seccomp listener hand-over on one socket fd).
    """

    path = os.path.abspath(os.fspath(path))
    return _compile_cached(path, _stamp(path), default_action, tuple(extra_allow))
