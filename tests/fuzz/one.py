"""Run one fuzz target under atheris/libFuzzer:
``python -m tests.fuzz.one TARGET [libFuzzer flags] [corpus dirs]``.

The project's packages are imported inside ``atheris.instrument_imports``
so libFuzzer sees their branch coverage; the harness itself is not
instrumented.  ``run.py`` (``make fuzz``) starts this once per target.
"""

from __future__ import annotations

import importlib
import sys

PROJECT_PACKAGES = ["connection", "devices", "sandbox", "supervisor"]


def main() -> None:
    import atheris  # the optional ``fuzz`` extra

    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m tests.fuzz.one TARGET [libFuzzer args]")
    name = sys.argv[1]
    with atheris.instrument_imports(include=PROJECT_PACKAGES):
        for pkg in PROJECT_PACKAGES:   # the whole package, not only what the target touches first
            importlib.import_module(pkg)
        target = importlib.import_module(f"tests.fuzz.targets.{name}")
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
