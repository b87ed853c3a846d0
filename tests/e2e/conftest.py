"""Fixtures for the QEMU end-to-end cases.

The kernel and base initramfs are built once per session (and cached on disk across
sessions); every test gets a short private directory for sockets and logs, and a teardown
that ends, by pid, every process the harness started.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from frontend.guest import procs
from frontend.guest.initramfs import base_initramfs
from frontend.guest.kernel import GuestKernel, ensure_kernel
from frontend.guest.qemu import Qemu, choose_accel

log = logging.getLogger("e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is an e2e test, marked or not."""
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    return ensure_kernel()


@pytest.fixture(scope="session")
def base_initrd(guest_kernel: GuestKernel) -> Path:
    return base_initramfs(guest_kernel)


@pytest.fixture(scope="session")
def accel(guest_kernel: GuestKernel, base_initrd: Path) -> str:
    chosen = choose_accel(guest_kernel)
    log.warning("e2e guests run under %s", chosen)
    return chosen


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A short path (sockets have a 108-byte limit), kept on failure for the logs."""
    d = Path(tempfile.mkdtemp(prefix="e2e-", dir="/tmp"))
    yield d
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.passed:
        shutil.rmtree(d, ignore_errors=True)
    else:
        log.warning("e2e logs kept in %s", d)


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    yield
    left = procs.reap_all()
    if left:
        log.warning("teardown ended leftover pids %s", left)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def make_qemu(guest_kernel: GuestKernel, base_initrd: Path, accel: str, workdir: Path):
    """Factory: make_qemu(name=..., smp=..., mem_mb=...) -> Qemu, stopped at teardown."""
    made: list[Qemu] = []

    def factory(**kw) -> Qemu:
        q = Qemu(guest_kernel, workdir, accel=accel, base_initrd=base_initrd, **kw)
        made.append(q)
        return q

    yield factory
    for q in made:
        q.stop()
