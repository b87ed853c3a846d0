"""The ``vhost-supervisor`` entry point: check that ``supervisor`` is ours, then run the CLI.

The project's top-level package names (``supervisor``, ``sandbox``, ...) are
fixed, and PyPI's ``supervisor`` (supervisord) installs a package with the
same name.  When both end up on ``sys.path`` (or one is installed over the
other in the same site-packages), ``import supervisor.cli`` would fail with an
obscure ModuleNotFoundError or, worse, run parts of the other project.  This
module has a name nobody else uses, so it can always start and say what is
wrong.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

DIST = "vhost-supervisor"
EXIT_CLASH = 3


def version() -> str:
    """The installed distribution's version, or a note that this is a source checkout."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed; running from a source tree)"


def supervisor_clash() -> str | None:
    """A message naming the foreign ``supervisor`` package, or None when ours is the one imported.

    Looks at the package on disk before executing any of it: a merged
    directory (supervisord installed over us) still has our cli.py but
    their ``supervisord.py`` and ``__init__.py``.
    """
    spec = importlib.util.find_spec("supervisor")
    if spec is None or not spec.submodule_search_locations:
        return (f"the 'supervisor' package of {DIST} is not importable (sys.path: {sys.path}); "
                f"reinstall {DIST}")
    where = list(spec.submodule_search_locations)[0]
    try:
        with open(os.path.join(where, "__init__.py"), encoding="utf-8", errors="replace") as f:
            ours = "IS_VHOST_SUPERVISOR = True" in f.read()
    except OSError:
        ours = False
    foreign = [n for n in ("supervisord.py", "supervisorctl.py") if os.path.exists(os.path.join(where, n))]
    if ours and not foreign:
        return None
    what = "PyPI's 'supervisor' (supervisord)" if foreign else "another package named 'supervisor'"
    return (f"'import supervisor' finds {what} at {where}, not {DIST}'s package of the same name. "
            f"Both install a top-level 'supervisor' package and cannot share one environment: "
            f"install {DIST} into its own virtual environment (python3 -m venv /opt/vhost-supervisor; "
            f"/opt/vhost-supervisor/bin/pip install {DIST}), or 'pip uninstall supervisor' and "
            f"reinstall {DIST} here.")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"{DIST} {version()}")
        clash = supervisor_clash()
        if clash:
            print(f"warning: {clash}", file=sys.stderr)
        return 0
    clash = supervisor_clash()
    if clash:
        print(f"vhost-supervisor: {clash}", file=sys.stderr)
        return EXIT_CLASH
    from supervisor.cli import main as cli_main
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
