"""systemd unit files shipped with the package.

``vhost-supervisor systemd-units`` prints them and ``--install DIR`` writes
them, with ``ExecStart=`` pointing at the ``vhost-supervisor`` command of the
environment they are printed from (so a venv install gets its own path).
"""

from __future__ import annotations

import importlib.resources
import os
import sys
import sysconfig

UNITS = ("vhost-supervisor.service", "vhost-supervisor@.socket")


def default_bindir() -> str:
    """The directory holding this environment's ``vhost-supervisor`` script."""
    here = os.path.dirname(os.path.abspath(sys.argv[0] or ""))
    if os.path.isfile(os.path.join(here, "vhost-supervisor")):
        return here
    return sysconfig.get_path("scripts")


def render(bindir: str | None = None) -> dict[str, str]:
    """Unit name -> text, with ``@BINDIR@`` filled in."""
    bindir = os.path.abspath(bindir or default_bindir())
    files = importlib.resources.files(__name__)
    return {name: (files / name).read_text(encoding="utf-8").replace("@BINDIR@", bindir) for name in UNITS}


def install(directory: str, bindir: str | None = None) -> list[str]:
    """Write every unit into ``directory`` (0644); returns the paths written."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    written = []
    for name, text in render(bindir).items():
        path = os.path.join(directory, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    return written
