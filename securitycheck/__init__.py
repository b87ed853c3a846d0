"""``vhost-supervisor security-check``: the security test suite as a product.

It starts its own temporary supervisor with real jailed devices of every type,
runs an attack catalog against them (six classes: jail, hostile front-end,
hostile guest, resource exhaustion, local unprivileged user, control plane),
stops everything, removes what it made, and reports per case what was tried,
what was expected, what was observed.  See docs/security.md.
"""

from .catalog import CLASSES, Case, CaseFailed, all_cases

__all__ = ["CLASSES", "Case", "CaseFailed", "all_cases"]
