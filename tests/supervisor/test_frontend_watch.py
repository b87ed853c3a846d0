"""The supervisor keeps a duplicate of each front-end connection a child shows
it (supervisor/metrics.py).  That duplicate must never keep a connection alive
that its device has left: a front-end (QEMU with reconnect) learns that its
back-end died only from the hang-up.
"""

from __future__ import annotations

import os
import select
import signal

from frontend.vhost_user import VhostUserFrontend

from .conftest import SupervisorProc


def _hung_up(fe: VhostUserFrontend, timeout: float) -> bool:
    p = select.poll()
    p.register(fe.sock.sock.fileno(), select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP) for _fd, ev in p.poll(timeout * 1000))


def test_killed_device_hangs_up_its_frontend_although_the_supervisor_watched_it(sup: SupervisorProc) -> None:
    a, b = sup.path("a.sock"), sup.path("b.sock")
    sup.start("--rng", f"vhost={a}", "--rng", f"vhost={b}")
    with VhostUserFrontend.connect(a) as fe_a:
        fe_a.negotiate()
        da = sup.wait_state("rng-0", "serving", pred=lambda d: d["frontend"] == "yes")
        # B restarts while the supervisor holds A's connection: B's new child must not inherit it
        with VhostUserFrontend.connect(b) as fe_b:
            fe_b.negotiate()
            db = sup.wait_state("rng-1", "serving")
            os.kill(db["pid"], signal.SIGKILL)
            assert _hung_up(fe_b, 10), "rng-1's front-end never saw its device die"
        sup.wait_state("rng-1", "ready", pred=lambda d: d["pid"] not in (None, db["pid"]))
        os.kill(da["pid"], signal.SIGKILL)
        assert _hung_up(fe_a, 10), "rng-0's front-end never saw its device die"
    sup.wait_state("rng-0", "ready", pred=lambda d: d["pid"] not in (None, da["pid"]) and d["frontend"] == "no")
    assert sup.terminate() == 0


def test_device_that_ends_a_connection_hangs_it_up(sup: SupervisorProc) -> None:
    """A malformed message ends that connection at once, though the supervisor holds a duplicate."""
    a = sup.path("a.sock")
    sup.start("--rng", f"vhost={a}")
    with VhostUserFrontend.connect(a) as fe:
        fe.negotiate()
        sup.wait_state("rng-0", "serving", pred=lambda d: d["frontend"] == "yes")
        fe.sock.sock.sendall(b"\xff" * 12)     # request 0xffffffff: not a vhost-user request
        assert _hung_up(fe, 10), "the connection stayed open after the device ended it"
    assert sup.terminate() == 0
