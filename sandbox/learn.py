"""Writing policies: run a jailed target in log mode and list what it used.

In log mode the filter's default action is SECCOMP_RET_LOG: every syscall the
policy does not allow still runs, and the kernel writes an audit record
(type=1326) to the kernel log.  This module reads those records for the
child's pids from /dev/kmsg and names the syscalls, so a policy is grown from
what a device really does under load (minijail's generate_seccomp_policy idea,
with the audit log as the source instead of strace).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator

from .compiler import syscall_name
from .config import JailConfig
from .spawn import spawn

_RECORD = re.compile(r"type=1326 .*?\bpid=(\d+)\b.*?\barch=([0-9a-f]+)\b.*?\bsyscall=(\d+)\b")


@contextlib.contextmanager
def unlimited_kernel_log() -> Iterator[None]:
    """Lift printk rate limiting while learning: without auditd, audit records
    reach the kernel log through printk_ratelimit() (10 per 5 s by default),
    which would silently drop most of what a device does."""

    path = "/proc/sys/kernel/printk_ratelimit"
    try:
        with open(path) as f:
            old = f.read().strip()
        with open(path, "w") as f:
            f.write("0")
    except OSError:
        old = None
    try:
        yield
    finally:
        if old is not None:
            with open(path, "w") as f:
                f.write(old)


def read_kmsg_records(fd: int) -> list[tuple[int, int, int]]:
    """(pid, arch, nr) of the SECCOMP audit records queued on a /dev/kmsg fd."""

    out = []
    while True:
        try:
            rec = os.read(fd, 8192).decode(errors="replace")
        except BlockingIOError:
            return out
        except OSError:  # EPIPE: records were overwritten; keep reading
            continue
        m = _RECORD.search(rec)
        if m:
            out.append((int(m.group(1)), int(m.group(2), 16), int(m.group(3))))


def learn(config: JailConfig, target: Callable[[], int], timeout: float = 30.0) -> collections.Counter[str]:
    """Run target() jailed with config's policy in log mode; return the names
    (with counts) of the syscalls the policy would have refused."""

    kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with unlimited_kernel_log():
            return _learn(kmsg, config, target, timeout)
    finally:
        os.close(kmsg)


def _learn(kmsg: int, config: JailConfig, target: Callable[[], int], timeout: float) -> collections.Counter[str]:
    """learn() with the kernel log open.  Records are read after the run: fine
    for a short target; a long load should drain /dev/kmsg while it runs (see
    tests/sandbox/device_load.py), the ring buffer is small."""

    os.lseek(kmsg, 0, os.SEEK_END)
    log_config = JailConfig(**{**config.__dict__, "seccomp_log": True})
    child = spawn(log_config, target)
    pids = {child.pid}
    if child.device_pid:
        pids.add(child.device_pid)
    deadline = time.monotonic() + timeout
    while True:
        done, _status = os.waitpid(child.pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if not done:
        child.kill()
        os.waitpid(child.pid, 0)
    child.close()
    time.sleep(0.1)  # let kauditd flush
    counts: collections.Counter[str] = collections.Counter()
    for pid, arch, nr in read_kmsg_records(kmsg):
        if pid in pids:  # audit records carry the thread group id
            counts[syscall_name(nr, arch)] += 1
    return counts

