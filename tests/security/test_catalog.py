"""Every case of the security-check catalog, as a test (so `make test` runs
the same attacks as `vhost-supervisor security-check`).

One temporary supervisor serves the whole session; every case must pass.
"""

from __future__ import annotations

import os

import pytest

from securitycheck import all_cases
from securitycheck.env import Environment
from securitycheck.runner import PASS, run_case

CASES = all_cases()


@pytest.fixture(scope="session")
def seccheck_env():
    assert os.geteuid() == 0, "the security catalog needs root (jailed devices, setuid to other users)"
    env = Environment()
    env.start()
    try:
        yield env
    finally:
        env.close()


def test_catalog_size_and_classes():
    by_class: dict[str, int] = {}
    for c in CASES:
        by_class[c.cls] = by_class.get(c.cls, 0) + 1
    assert len(CASES) >= 120 and len(by_class) == 6, by_class


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(seccheck_env, case):
    r = run_case(seccheck_env, case)
    assert r.verdict == PASS, f"tried: {case.tries}\nexpected: {case.expected}\nobserved: {r.observed}"
