"""Functions behind `vhost-supervisor policy check|show` and `audit`.

supervisor/cli.py wires them; they print to stdout/stderr and return the exit
status, so they are testable without the CLI.
"""

from __future__ import annotations

import sys
from typing import Any

from .compiler import CompiledPolicy, compile_policy, lower_clauses
from .policy import PolicyError, SyscallRule


def _compile_or_report(path: str) -> CompiledPolicy | None:
    """The compiled policy, or None after printing the error (file:line) on stderr."""
    try:
        return compile_policy(path)
    except PolicyError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {path}: {e}", file=sys.stderr)
    return None


def policy_check(path: str) -> int:
    """Compile a policy (and its includes); 0 if it is valid, 1 with file:line
    of the first error otherwise."""

    compiled = _compile_or_report(path)
    if compiled is None:
        return 1
    rules = compiled.policy.rules
    print(f"{path}: ok: {len(rules)} syscalls from {len(compiled.files)} file(s), "
          f"{len(compiled.bpf) // 8} BPF instructions")
    return 0


def _rule_text(rule: SyscallRule) -> str:
    if rule.unconditional is not None and (rule.unconditional.kind != "allow" or not rule.clauses):
        return str(rule.unconditional)
    text = " || ".join(" && ".join(str(a) for a in clause) for clause in rule.clauses)
    if rule.else_action is not None:
        text += f"; {rule.else_action}"
    return text


def policy_show(path: str) -> int:
    """Print the resolved rule set: every syscall once, its merged filter and
    the file:line of each line that contributed."""

    compiled = _compile_or_report(path)
    if compiled is None:
        return 1
    policy = compiled.policy
    print(f"# {policy.path}")
    for f in policy.files[1:]:
        print(f"#   includes {f}")
    print("# default action: kill-process (spawn(): user-notify -> parent kills and names the syscall)")
    width = max((len(n) for n in policy.rules), default=0) + 1
    for name in sorted(policy.rules):
        rule = policy.rules[name]
        where = ", ".join(str(s) for s in rule.sources)
        extra = ""
        if rule.clauses and (rule.unconditional is None):
            extra = f" [{len(lower_clauses(rule.clauses))} libseccomp rule(s)]"
        print(f"{name + ':':<{width}} {_rule_text(rule)}    # {where}{extra}")
    return 0


def _caps(value: int | None) -> str:
    return "?" if value is None else ("none" if value == 0 else f"{value:#x}")


def format_audit(a: dict[str, Any]) -> str:
    """Human-readable form of sandbox.audit(pid): one block per process (the
    forwarder, then the device it runs when audit() found one)."""

    text = _format_one(a, "forwarder" if "device" in a else "process")
    if "device" in a:
        text += "\n" + _format_one(a["device"], "device")
    return text


def _format_one(a: dict[str, Any], role: str) -> str:
    lines = [f"{role} pid {a['pid']} ({a.get('name')})"]
    nspid = a.get("nspid") or []
    if len(nspid) > 1:
        lines.append(f"  pid in its namespace: {nspid[-1]}")
    lines.append(f"  uid {a.get('uid')} gid {a.get('gid')} groups {a.get('groups')}")

    def fmt_map(m: Any) -> str:
        if m is None:
            return "?"
        return ", ".join(f"{r['inside']}->{r['outside']} x{r['count']}" for r in m) or "(none)"

    lines.append(f"  uid_map {fmt_map(a.get('uid_map'))}; gid_map {fmt_map(a.get('gid_map'))}; "
                 f"setgroups {a.get('setgroups')}")
    caps = a.get("capabilities") or {}
    lines.append("  capabilities " + " ".join(f"{k}={_caps(caps.get(k))}" for k in
                                              ("effective", "permitted", "inheritable", "bounding", "ambient")))
    mode = {0: "disabled", 1: "strict", 2: "filter"}.get(a.get("seccomp_mode"), "?")
    lines.append(f"  no_new_privs {a.get('no_new_privs')}; seccomp {mode} "
                 f"({a.get('seccomp_filters')} filter(s))")
    ns = a.get("namespaces") or {}
    lines.append("  namespaces " + " ".join(
        f"{k}={'own' if v.get('separate') else ('shared' if v.get('separate') is False else '?')}"
        for k, v in ns.items()))
    root = a.get("root") or {}
    if root.get("same_as_caller") is None:
        lines.append("  root ?")
    else:
        lines.append(f"  root {'host /' if root['same_as_caller'] else 'own'}: {root.get('entries')}")
    lim = a.get("rlimits") or {}
    picked = [("Max open files", "nofile"), ("Max core file size", "core"), ("Max processes", "nproc"),
              ("Max data size", "data"), ("Max address space", "as"), ("Max locked memory", "memlock")]
    lines.append("  rlimits " + " ".join(f"{short}={lim[k]['soft']}/{lim[k]['hard']}" for k, short in picked if k in lim))
    fds = a.get("fds")
    if fds is None:
        lines.append("  fds ?")
    else:
        lines.append(f"  fds ({len(fds)}):")
        lines.extend(f"    {n} -> {t}" for n, t in fds.items())
    return "\n".join(lines)
