"""Where the installed package keeps its data files (the seccomp policies).

The policies live in the repository's top-level ``seccomp/`` directory; the
package ships them as ``sandbox/policies`` (a symlink in the source tree,
package data in the wheel), so one ``importlib.resources`` lookup finds them
in a checkout, an editable install and an installed wheel alike.  They must
be real files: the compiler follows ``@include`` relative to the policy file.
"""

from __future__ import annotations

import importlib.resources
import pathlib


class DataError(RuntimeError):
    """The package's data files are not where an installed package keeps them."""


def policy_dir() -> str:
    """The directory holding ``block.policy``, ``common.policy``, ...

    Raises DataError when the package is imported from somewhere that is not
    a filesystem (a zip) or was installed without its data files.
    """
    res = importlib.resources.files("sandbox") / "policies"
    if not isinstance(res, pathlib.Path):
        raise DataError(f"sandbox is imported from {res!r}, not a directory: install the wheel unpacked")
    if not (res / "common.policy").is_file():
        raise DataError(f"{res}/common.policy is missing: the package was installed without its seccomp policies")
    return str(res)
