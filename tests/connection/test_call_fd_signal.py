"""SET_VRING_CALL signals the new call fd once, as libvhost-user does "in
case of I/O hang after reconnecting": a completion the back-end published
before it crashed (or before the front-end swapped the fd) may have lost its
notification, and a driver waiting for that interrupt would wait forever.
QEMU's vhost-user-blk qtest "idx" waits for exactly that interrupt.

Real listener, real handler on a loop thread, real eventfds."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from frontend.vhost_user import VhostUserFrontend
from connection.protocol import FrontendReq as R, vring_fd_payload
from tests.connection.support import LoopThread, RawFrontend
from tests.connection.test_handler import Server, _negotiate


@pytest.fixture
def server(sock_path: str) -> Iterator[Server]:
    with LoopThread() as lt:
        s = Server(lt, sock_path)
        yield s
        s.close()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _count(fd: int) -> int:
    """The eventfd counter (0 when nothing was signalled); resets it."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_new_call_fd_is_signalled_once(server: Server) -> None:
    raw = RawFrontend(server.path)
    first, second = _eventfd(), _eventfd()
    try:
        _negotiate(raw)
        assert raw.ack(R.SET_VRING_CALL, vring_fd_payload(0), [first]) == 0
        assert _count(first) == 1
        # a replacement fd (the front-end reconnected, or moved the
        # interrupt) gets its own signal; the old one is not signalled again
        assert raw.ack(R.SET_VRING_CALL, vring_fd_payload(0), [second]) == 0
        assert _count(second) == 1
        assert _count(first) == 0
        # setting it again signals again: once per SET_VRING_CALL, no more
        assert raw.ack(R.SET_VRING_CALL, vring_fd_payload(0), [second]) == 0
        assert _count(second) == 1
        # NOFD (in-band notifications or polling): nothing to signal, no error
        assert raw.ack(R.SET_VRING_CALL, vring_fd_payload(0, nofd=True)) == 0
        assert _count(second) == 0
    finally:
        raw.close()
        os.close(first)
        os.close(second)


def test_refused_call_fd_is_not_signalled(server: Server) -> None:
    """A SET_VRING_CALL the handler refuses (vring out of range) neither
    keeps nor signals the fd."""
    raw = RawFrontend(server.path)
    fd = _eventfd()
    try:
        _negotiate(raw)
        assert raw.ack(R.SET_VRING_CALL, vring_fd_payload(200), [fd]) == 1
        assert _count(fd) == 0
    finally:
        raw.close()
        os.close(fd)


def test_driver_sees_a_completion_whose_interrupt_was_lost(server: Server) -> None:
    """The case the signal exists for: a request completes and its
    interrupt is lost (here: swallowed before the driver looks, as if it had
    gone to a crashed back-end's fd); once the front-end hands over its call
    fd again, as it does after a reconnect, the driver is woken and finds
    the completion with no further request needed."""
    fe = VhostUserFrontend.connect(server.path)
    try:
        fe.negotiate()
        fe.setup_memory(1 << 24)
        q = fe.setup_queue(0, 64)
        gpa, buf = q.alloc(16)
        buf[:] = bytes(range(16))
        out_gpa, _out = q.alloc(16)
        head = q.submit([(gpa, 16)], [(out_gpa, 16)])
        q.kick()
        deadline = time.monotonic() + 10
        while q.used_idx == q.last_used_idx:
            assert time.monotonic() < deadline, "the device did not complete the request"
            time.sleep(0.001)
        _count(q.call_fd)   # the interrupt is lost
        fe.request(R.SET_VRING_CALL, vring_fd_payload(0), fds=[q.call_fd], ack=True)
        assert _count(q.call_fd) == 1
        assert [h for h, _ in q.poll_used()] == [head]
    finally:
        fe.close()
