"""Parser for seccomp policy files in minijail's syntax.

    # comment
    @include common.policy            (relative to the including file)
    read: 1                           (or: allow)
    ioctl: arg1 == FIONBIO || arg1 == TCGETS
    clone: arg0 & CLONE_THREAD        (any of these bits set)
    mmap: arg2 in ~PROT_EXEC          (no bit outside the mask)
    prctl: arg0 == PR_SET_NAME; return EPERM   (else return EPERM, not kill)
    open: return ENOENT
    socket: kill | kill-process | kill-thread | trap | log

Lines may be continued with a trailing backslash.  Rules for the same syscall
in several files are ORed (minijail's merge), so device policies can add
`ioctl:` cases on top of the shared includes.  The parser knows nothing of BPF;
`compiler.py` lowers the result with libseccomp.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .constants import CONSTANTS, errno_value

MAX_INCLUDE_DEPTH = 10
U64 = (1 << 64) - 1


class PolicyError(Exception):
    """A policy file is wrong; names the file and line."""

    def __init__(self, file: str, line: int, msg: str) -> None:
        self.file = file
        self.line = line
        self.msg = msg
        super().__init__(f"{file}:{line}: {msg}")


@dataclass(frozen=True)
class Action:
    """What happens to a matching syscall: allow, errno N, kill-process, ..."""

    kind: str
    errno: int = 0

    def __str__(self) -> str:
        if self.kind == "allow":
            return "1"
        if self.kind == "errno":
            return f"return {errno.errorcode.get(self.errno, self.errno)}"
        return self.kind


ALLOW = Action("allow")


@dataclass(frozen=True)
class Atom:
    """`argN OP value` as written (value already resolved to an integer)."""

    arg: int
    op: str
    value: int
    text: str = field(compare=False, default="")

    def __str__(self) -> str:
        return self.text or f"arg{self.arg} {self.op} {self.value:#x}"


Clause = tuple[Atom, ...]


@dataclass
class Source:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line}"


@dataclass
class SyscallRule:
    """Everything the policy says about one syscall, after merging files."""

    name: str
    unconditional: Action | None = None
    clauses: list[Clause] = field(default_factory=list)
    else_action: Action | None = None
    sources: list[Source] = field(default_factory=list)


@dataclass
class Policy:
    path: str
    files: list[str]
    rules: dict[str, SyscallRule]


_ACTION_WORDS = {
    "1": ALLOW, "allow": ALLOW, "kill": Action("kill-process"), "kill-process": Action("kill-process"),
    "kill-thread": Action("kill-thread"), "trap": Action("trap"), "log": Action("log"),
}
_SYSCALL_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_ATOM_RE = re.compile(r"^\s*arg([0-5])\s*(==|!=|<=|>=|<|>|&|in\b)\s*(.+?)\s*$")
_TOKEN_RE = re.compile(r"\s*(0x[0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*|[A-Za-z_][A-Za-z0-9_]*|[|~()])")


def _value(text: str, src: Source) -> int:
    """Evaluate `A|B`, `~A`, `(A|B)`, numbers and named constants."""

    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise PolicyError(src.file, src.line, f"bad value {text!r} at {text[pos:]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens:
        raise PolicyError(src.file, src.line, "missing value")
    idx = 0

    def peek() -> str | None:
        return tokens[idx] if idx < len(tokens) else None

    def take() -> str:
        nonlocal idx
        if idx >= len(tokens):
            raise PolicyError(src.file, src.line, f"value {text!r} ends early")
        idx += 1
        return tokens[idx - 1]

    def term() -> int:
        tok = take()
        if tok == "~":
            return ~term() & U64
        if tok == "(":
            v = orexpr()
            if take() != ")":
                raise PolicyError(src.file, src.line, f"missing ')' in {text!r}")
            return v
        if tok[0].isdigit():
            if len(tok) > 24:   # u64 needs at most 22 octal digits; also keeps int() within its digit limit
                raise PolicyError(src.file, src.line, f"number {tok[:24]}... does not fit in 64 bits")
            v = int(tok, 0) if not (tok.startswith("0") and len(tok) > 1 and tok[1] != "x") else int(tok, 8)
            if v > U64:
                raise PolicyError(src.file, src.line, f"number {tok} does not fit in 64 bits")
            return v
        if tok in CONSTANTS:
            return CONSTANTS[tok] & U64
        raise PolicyError(src.file, src.line, f"unknown constant {tok!r}")

    def orexpr() -> int:
        v = term()
        while peek() == "|":
            take()
            v |= term()
        return v

    result = orexpr()
    if idx != len(tokens):
        raise PolicyError(src.file, src.line, f"unexpected {tokens[idx]!r} in value {text!r}")
    return result


def _action(text: str, src: Source) -> Action:
    text = text.strip()
    if text in _ACTION_WORDS:
        return _ACTION_WORDS[text]
    m = re.fullmatch(r"return\s+(\S+)", text)
    if m:
        num = errno_value(m.group(1))
        if num is None:
            raise PolicyError(src.file, src.line, f"unknown errno {m.group(1)!r}")
        return Action("errno", num)
    raise PolicyError(src.file, src.line, f"unknown action {text!r}")


def _expression(text: str, src: Source) -> list[Clause]:
    clauses: list[Clause] = []
    for part in text.split("||"):
        atoms: list[Atom] = []
        for raw in part.split("&&"):
            m = _ATOM_RE.match(raw)
            if not m:
                raise PolicyError(src.file, src.line, f"bad argument expression {raw.strip()!r}")
            atoms.append(Atom(int(m.group(1)), m.group(2), _value(m.group(3), src), raw.strip()))
        clauses.append(tuple(atoms))
    return clauses


def _logical_lines(path: str) -> list[tuple[int, str]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        raw = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PolicyError(path, data.count(b"\n", 0, e.start) + 1,
                          f"not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
    out: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for num, line in enumerate(raw, 1):
        line = line.split("#", 1)[0].rstrip()
        if not pending:
            start = num
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            out.append((start, full))
    if pending.strip():
        out.append((start, pending.strip()))
    return out


def _merge(rules: dict[str, SyscallRule], name: str, clauses: list[Clause] | None, action: Action,
           else_action: Action | None, src: Source) -> None:
    rule = rules.setdefault(name, SyscallRule(name))
    rule.sources.append(src)
    if clauses is None:
        if rule.unconditional is not None and rule.unconditional != action:
            raise PolicyError(src.file, src.line,
                              f"{name}: '{action}' conflicts with '{rule.unconditional}' at {rule.sources[0]}")
        if action != ALLOW and rule.clauses:
            raise PolicyError(src.file, src.line, f"{name}: '{action}' conflicts with argument filters")
        rule.unconditional = action
        return
    if rule.unconditional is not None and rule.unconditional != ALLOW:
        raise PolicyError(src.file, src.line, f"{name}: argument filter conflicts with '{rule.unconditional}'")
    if else_action is not None:
        if rule.else_action is not None and rule.else_action != else_action:
            raise PolicyError(src.file, src.line, f"{name}: two different '; return' actions")
        rule.else_action = else_action
    for clause in clauses:
        if clause not in rule.clauses:
            rule.clauses.append(clause)


def _parse_file(path: str, rules: dict[str, SyscallRule], files: list[str], depth: int,
                stack: tuple[str, ...], known_syscall: Callable[[str], bool]) -> None:
    files.append(path)
    for num, line in _logical_lines(path):
        src = Source(path, num)
        if line.startswith("@"):
            word, _, arg = line.partition(" ")
            if word != "@include":
                raise PolicyError(path, num, f"unsupported directive {word!r}")
            inc = arg.strip()
            if not inc:
                raise PolicyError(path, num, "@include needs a path")
            inc_path = os.path.normpath(os.path.join(os.path.dirname(path), inc))
            if depth + 1 > MAX_INCLUDE_DEPTH:
                raise PolicyError(path, num, f"@include nested deeper than {MAX_INCLUDE_DEPTH}")
            if inc_path in stack:
                raise PolicyError(path, num, f"@include cycle through {inc}")
            if not os.path.isfile(inc_path):
                raise PolicyError(path, num, f"@include: no such file {inc_path}")
            _parse_file(inc_path, rules, files, depth + 1, stack + (inc_path,), known_syscall)
            continue
        name, sep, body = line.partition(":")
        name = name.strip()
        if not sep or not _SYSCALL_RE.match(name):
            raise PolicyError(path, num, f"expected 'syscall: filter', got {line!r}")
        if not known_syscall(name):
            raise PolicyError(path, num, f"unknown syscall {name!r}")
        body = body.strip()
        if not body:
            raise PolicyError(path, num, f"{name}: missing filter")
        if body.startswith("arg"):
            expr, semi, rest = body.partition(";")
            else_action = _action(rest, src) if semi else None
            if else_action is not None and else_action.kind != "errno":
                raise PolicyError(path, num, f"{name}: only '; return ERRNO' may follow an expression")
            _merge(rules, name, _expression(expr, src), ALLOW, else_action, src)
        else:
            _merge(rules, name, None, _action(body, src), None, src)


def parse_policy(path: str | os.PathLike[str], known_syscall: Callable[[str], bool] | None = None) -> Policy:
    """Parse a policy and its includes into one merged rule set.

    `known_syscall(name) -> bool` checks names (the compiler passes libseccomp's
    resolver); errors raise PolicyError(file, line, msg).
    """

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise PolicyError(path, 0, "no such policy file")
    rules: dict[str, SyscallRule] = {}
    files: list[str] = []
    _parse_file(path, rules, files, 0, (path,), known_syscall or (lambda _n: True))
    return Policy(path, files, rules)
