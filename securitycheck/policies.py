"""Where the seccomp policies come from: the one place the check asks.

The supervisor looks its policies up through ``supervisor.config``; the
check uses the same lookup so that it attacks exactly what a production
supervisor would load (and hashes those files for the report).
"""

from __future__ import annotations

import hashlib
import os


def policy_dir(override: str | None = None) -> str:
    """The directory the check's supervisor loads policies from: the
    operator's ``--seccomp-policy-dir`` or the supervisor's own default."""
    if override:
        return os.path.abspath(override)
    from supervisor.config import default_policy_dir
    return str(default_policy_dir())


def policy_hashes(directory: str | None = None) -> dict[str, str]:
    """sha256 of every ``*.policy`` file the supervisor would load."""
    d = directory or policy_dir()
    out: dict[str, str] = {}
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".policy"))
    except OSError as e:
        return {"error": f"{d}: {e.strerror or e}"}
    for n in names:
        with open(os.path.join(d, n), "rb") as f:
            out[n] = hashlib.sha256(f.read()).hexdigest()
    return out
