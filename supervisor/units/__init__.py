"""systemd unit files shipped with the package.

``vhost-supervisor systemd-units`` prints them and ``--install DIR`` writes
them, with ``ExecStart=`` pointing at the ``vhost-supervisor`` command of the
environment they are printed from (so a venv install gets its own path), plus
the sysusers.d entry for the service user the unit runs as.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
import sysconfig

UNITS = ("vhost-supervisor.service", "vhost-supervisor@.socket")
SYSUSERS = "vhost-supervisor.sysusers"          # installed as sysusers.d/vhost-supervisor.conf
SERVICE_USER = "vhost-supervisor"


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


def sysusers_entry() -> str:
    """The sysusers.d(5) line that creates the unit's ``User=``."""
    return (importlib.resources.files(__name__) / SYSUSERS).read_text(encoding="utf-8")


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def install(directory: str, bindir: str | None = None, sysusers_dir: str | None = "/etc/sysusers.d") -> list[str]:
    """Write every unit into ``directory`` and the service user's entry into
    ``sysusers_dir`` (created if missing; None skips it), all 0644; returns the
    paths written.  ``systemd-sysusers`` (run at every boot, or by hand) then
    creates the user."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    written = []
    for name, text in render(bindir).items():
        path = os.path.join(directory, name)
        _write(path, text)
        written.append(path)
    if sysusers_dir is not None:
        os.makedirs(sysusers_dir, mode=0o755, exist_ok=True)
        path = os.path.join(sysusers_dir, "vhost-supervisor.conf")
        _write(path, sysusers_entry())
        written.append(path)
    return written
