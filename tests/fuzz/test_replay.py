"""Replays every checked-in fuzz input: the seed corpora and the regression
inputs of bugs the fuzzers found (``make test``; CI replays, it does not fuzz).

Each input goes through its target's ``one_input`` exactly as under atheris:
an expected, typed error is caught inside the target, so anything that
escapes here (an exception, a broken invariant, a leaked fd) is the bug
coming back.  Needs no atheris.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from .targets import TARGETS

HERE = Path(__file__).resolve().parent
KINDS = ("corpus", "regressions")


def _inputs() -> list[tuple[str, Path]]:
    return [(t, p) for kind in KINDS for t in TARGETS
            for p in sorted((HERE / kind / t).glob("*")) if p.is_file()]


@pytest.mark.parametrize("target,path", _inputs(),
                         ids=lambda v: v if isinstance(v, str) else f"{v.parent.parent.name}/{v.name}")
def test_input_replays_clean(target: str, path: Path) -> None:
    module = importlib.import_module(f"tests.fuzz.targets.{target}")
    module.one_input(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_has_a_seed(target: str) -> None:
    seeds = [p for p in (HERE / "corpus" / target).glob("*") if p.is_file()]
    assert seeds, f"tests/fuzz/corpus/{target}/ has no seed input"


def test_no_inputs_for_unknown_targets() -> None:
    dirs = {p.name for kind in KINDS if (HERE / kind).is_dir() for p in (HERE / kind).iterdir()}
    assert dirs <= set(TARGETS), f"input directories without a target: {dirs - set(TARGETS)}"


def test_empty_input_is_fine_for_every_target() -> None:
    for target in TARGETS:
        importlib.import_module(f"tests.fuzz.targets.{target}").one_input(b"")
