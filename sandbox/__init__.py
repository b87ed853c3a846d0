"""A minijail-style jail for each device child.

Knows nothing of vhost-user: a JailConfig in, a jailed process out.  See
docs/sandbox.md for the threat model, the process layout and policy syntax.
"""

from .audit import audit
from .compiler import CompiledPolicy, compile_policy
from .config import JAIL_SETUP_FAILED, BindMount, JailConfig, JailError
from .idrange import IdRange, IdRangeError
from .jail import enter_jail
from .policy import PolicyError, parse_policy
from .exits import ExitKind, ExitReason, decode_wait_status
from .spawn import JailedChild, spawn

__all__ = [
    "BindMount", "JailConfig", "JailError", "JAIL_SETUP_FAILED", "JailedChild", "ExitReason", "ExitKind",
    "decode_wait_status", "spawn", "IdRange", "IdRangeError",
    "enter_jail", "audit", "compile_policy", "CompiledPolicy", "parse_policy", "PolicyError",
]
