"""Policy syntax, merging, errors with file:line, lowering to libseccomp,
and static guarantees of the shipped policies."""

from __future__ import annotations

import errno
import os

import pyseccomp as sc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox import PolicyError, compile_policy, parse_policy
from sandbox.cli import policy_check, policy_show
from sandbox.compiler import MAX_CLAUSES, _negate_cmp, lower_clauses, negate, syscall_number
from sandbox.constants import CONSTANTS
from sandbox.policy import U64, Atom

from .helpers import POLICY_DIR

DEVICE_POLICIES = ["block.policy", "console.policy", "rng.policy"]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def parse(path):
    return parse_policy(path, known_syscall=lambda n: syscall_number(n) >= 0)


def test_syntax_and_merge_across_includes(tmp_path):
    write(tmp_path, "inc.policy", "ioctl: arg1 == TCGETS\nread: 1\n")
    main = write(tmp_path, "main.policy", """
# comment
@include inc.policy
ioctl: arg1 == FIONBIO || \\
       arg1 == 0x5421   # same value twice: merged
clone: arg0 & CLONE_THREAD
mmap: arg2 in ~PROT_EXEC
prctl: arg0 == PR_SET_NAME; return EPERM
open: return ENOENT
write: allow
""")
    p = parse(main)
    assert p.files == [main, str(tmp_path / "inc.policy")]
    ioctl = p.rules["ioctl"]
    assert [c[0].value for c in ioctl.clauses] == [CONSTANTS["TCGETS"], CONSTANTS["FIONBIO"]]
    assert p.rules["open"].unconditional.kind == "errno" and p.rules["open"].unconditional.errno == errno.ENOENT
    assert p.rules["prctl"].else_action.errno == errno.EPERM
    assert p.rules["mmap"].clauses[0][0].value == ~CONSTANTS["PROT_EXEC"] & U64
    assert p.rules["write"].unconditional.kind == "allow"
    assert compile_policy(main).bpf


@pytest.mark.parametrize("text,line,msg", [
    ("read: 1\nfrobnicate: 1\n", 2, "unknown syscall 'frobnicate'"),
    ("ioctl: arg1 == NOT_A_CONSTANT\n", 1, "unknown constant 'NOT_A_CONSTANT'"),
    ("open: return EWHATEVER\n", 1, "unknown errno"),
    ("read 1\n", 1, "expected 'syscall: filter'"),
    ("read: arg9 == 1\n", 1, "bad argument expression"),
    ("read: 1\nread: return EPERM\n", 2, "conflicts"),
    ("@frequency x\n", 1, "unsupported directive"),
    ("@include nowhere.policy\n", 1, "no such file"),
    ("write: sometimes\n", 1, "unknown action"),
    ("ioctl: arg1 >= 1 && arg1 <= 5\n", 1, "same argument"),
    ("ioctl: arg1 == 1 || arg1 == 2; return EPERM\n", 1, "same argument"),
])
def test_errors_name_file_and_line(tmp_path, text, line, msg):
    path = write(tmp_path, "bad.policy", text)
    with pytest.raises(PolicyError) as e:
        compile_policy(path)
    assert e.value.file == path and e.value.line == line
    assert msg in e.value.msg
    assert str(e.value).startswith(f"{path}:{line}: ")


def test_error_inside_an_include_names_the_included_file(tmp_path):
    inc = write(tmp_path, "inc.policy", "read: 1\n\nbogus_call: 1\n")
    main = write(tmp_path, "main.policy", "@include inc.policy\n")
    with pytest.raises(PolicyError) as e:
        compile_policy(main)
    assert (e.value.file, e.value.line) == (inc, 3)


def test_include_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.policy", "@include b.policy\n")
    write(tmp_path, "b.policy", "@include a.policy\n")
    with pytest.raises(PolicyError, match="cycle"):
        compile_policy(str(tmp_path / "a.policy"))


# --- lowering: the negation used for `; return ERRNO` is the exact complement

def _eval(cmp, args):
    a, op, x, y = cmp
    v = args[a]
    return {sc.EQ: v == x, sc.NE: v != x, sc.LT: v < x, sc.LE: v <= x, sc.GT: v > x, sc.GE: v >= x,
            sc.MASKED_EQ: (v & x) == y}[op]


def _dnf(dnf, args):
    return any(all(_eval(c, args) for c in clause) for clause in dnf)


_vals = st.sampled_from([0, 1, 2, 3, 4, 5, 0x10, 0x5421, 0xFF, U64, 1 << 40])
_atoms = st.builds(Atom, st.integers(0, 2), st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "&", "in"]), _vals)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_atoms, min_size=1, max_size=2), min_size=1, max_size=3),
       st.lists(_vals, min_size=3, max_size=3))
def test_negation_is_exact_complement(clauses, args):
    clauses = [tuple(c) for c in clauses if not any(a.op == "&" and a.value == 0 for a in c)]
    if not clauses:
        return
    dnf = lower_clauses(clauses)
    neg = negate(dnf)
    if len(neg) > MAX_CLAUSES:
        return  # the compiler refuses such a rule (PolicyError) rather than truncate it
    assert _dnf(dnf, args) != _dnf(neg, args)


def test_atom_semantics():
    amp = lower_clauses([(Atom(0, "&", 0b101),)])
    assert _dnf(amp, [0b100, 0, 0]) and _dnf(amp, [0b001, 0, 0]) and not _dnf(amp, [0b010, 0, 0])
    inn = lower_clauses([(Atom(0, "in", 0b011),)])
    assert _dnf(inn, [0b010, 0, 0]) and not _dnf(inn, [0b110, 0, 0])
    assert _negate_cmp((0, sc.MASKED_EQ, 0b11, 0b01)) == [(0, sc.MASKED_EQ, 1, 0), (0, sc.MASKED_EQ, 2, 2)]


# --- the shipped policies

@pytest.mark.parametrize("name", DEVICE_POLICIES + ["common.policy", "vhost_user.policy", "forwarder.policy"])
def test_shipped_policy_compiles(name):
    assert policy_check(os.path.join(POLICY_DIR, name)) == 0


@pytest.mark.parametrize("name", DEVICE_POLICIES)
def test_device_policy_guarantees(name):
    rules = parse(os.path.join(POLICY_DIR, name)).rules
    for forbidden in ("socket", "connect", "execve", "execveat", "ptrace", "mount", "umount2", "bpf",
                      "unshare", "setns", "setuid", "pivot_root", "chroot", "fork", "vfork", "kexec_load",
                      "init_module", "process_vm_writev", "perf_event_open", "keyctl", "userfaultfd"):
        assert forbidden not in rules, forbidden
    for name_ in ("open", "openat"):
        assert rules[name_].unconditional.kind == "errno" and rules[name_].unconditional.errno == errno.ENOENT
    clone = rules["clone"]
    assert clone.unconditional is None
    assert all(any(a.op == "&" and a.value == CONSTANTS["CLONE_THREAD"] for a in c) for c in clone.clauses)
    assert rules["clone3"].unconditional.kind == "errno"
    prot_exec = CONSTANTS["PROT_EXEC"]
    for name_ in ("mmap", "mprotect"):
        rule = rules[name_]
        assert rule.unconditional is None
        for clause in lower_clauses(rule.clauses):  # every allowed case forces the PROT_EXEC bit to 0
            assert any(a == 2 and op == sc.MASKED_EQ and x & prot_exec and not y & prot_exec
                       for a, op, x, y in clause)
    assert "pkey_mprotect" not in rules


def test_every_rule_is_commented():
    """Each rule line in the shipped policies says why it is there (a comment
    on the line, or on the line(s) just above)."""

    for fname in os.listdir(POLICY_DIR):
        lines = open(os.path.join(POLICY_DIR, fname)).read().splitlines()
        for i, line in enumerate(lines):
            if ":" in line.split("#")[0] and not line.startswith((" ", "@")):
                above = lines[i - 1] if i else ""
                cont = line.rstrip().endswith("\\") and "#" in lines[i + 1]
                assert "#" in line or above.lstrip().startswith("#") or cont, f"{fname}:{i + 1}: {line}"


def test_policy_show_and_check_output(capsys, tmp_path):
    assert policy_show(os.path.join(POLICY_DIR, "block.policy")) == 0
    out = capsys.readouterr().out
    assert "includes" in out and "common.policy" in out
    assert "open:" in out and "return ENOENT" in out
    assert "clone:" in out and "arg0 & CLONE_THREAD" in out
    bad = write(tmp_path, "bad.policy", "read: 1\nnope: 1\n")
    assert policy_check(bad) == 1
    assert f"{bad}:2: unknown syscall 'nope'" in capsys.readouterr().err
    assert policy_show(bad) == 1
