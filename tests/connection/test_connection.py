"""VhostUserListener, VhostUserStream, ParentResources and the serve loop.

Real sockets and real forks: the supervisor's flow (bind in the parent,
serve in a forked child, keep the listening socket and the unlink guard in
the parent) is run as it will be, minus the jail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Iterator

import pytest

from connection.connection import (ParentResources, VhostUserConnection, VhostUserListener,
                                   VhostUserStream)
from connection.errors import ConnectionClosed, ProtocolError
from connection.executor import Executor
from frontend.vhost_user import VhostUserFrontend
from connection.handler import Backend, RequestRefused
from connection.protocol import (FLAG_REPLY, HEADER, VERSION, FrontendReq, Message,
                                 decode_u64, encode_u64)
from tests.conftest import open_fds
from tests.connection.support import LoopThread, RawFrontend, XorBuilder, XorDevice

R = FrontendReq


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt


# --------------------------------------------------------------------------
# Listener: binding

def test_listener_binds_a_0600_socket(sock_path: str) -> None:
    with VhostUserListener(sock_path) as lst:
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)            # listening already: connect succeeds before any accept
        s.close()
        assert os.fstat(lst.fileno()).st_ino != 0
    assert not os.path.exists(sock_path), "closing the listener (resources not taken) unlinks"


def test_listener_mode_option(sock_path: str) -> None:
    with VhostUserListener(sock_path, mode=0o660):
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o660


def test_stale_socket_is_replaced(sock_path: str) -> None:
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(sock_path)
    old.close()                          # a dead socket file left behind
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ConnectionRefusedError):
        probe.connect(sock_path)
    probe.close()
    with VhostUserListener(sock_path):
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(sock_path)         # the new socket listens
        probe.close()


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_non_socket_at_path_is_an_error_naming_it(sock_path: str, kind: str) -> None:
    if kind == "file":
        with open(sock_path, "w") as f:
            f.write("precious")
    elif kind == "dir":
        os.mkdir(sock_path)
    else:
        os.symlink("/etc/hostname", sock_path)
    with pytest.raises(FileExistsError) as exc:
        VhostUserListener(sock_path)
    assert sock_path in str(exc.value)
    assert os.path.lexists(sock_path), "never removed"
    if kind == "file":
        assert open(sock_path).read() == "precious"


def test_bind_failure_leaves_nothing_open(sock_dir: str) -> None:
    before = open_fds()
    with pytest.raises(OSError):
        VhostUserListener(os.path.join(sock_dir, "missing-dir", "x.sock"))
    assert open_fds() == before


# --------------------------------------------------------------------------
# ParentResources

def test_parent_resources_unlink_only_our_socket(sock_path: str) -> None:
    lst = VhostUserListener(sock_path)
    res = lst.take_parent_process_resources()
    assert isinstance(res, ParentResources)
    assert lst.take_parent_process_resources() is None, "taken once"
    lst.close()
    assert os.path.exists(sock_path), "once taken, the listener never unlinks"
    with res:
        pass
    assert not os.path.exists(sock_path)
    assert res.closed
    res.close()                          # idempotent


@pytest.mark.parametrize("replacement", ["file", "socket"])
def test_parent_resources_leave_a_different_file_alone(sock_path: str, replacement: str) -> None:
    lst = VhostUserListener(sock_path)
    res = lst.take_parent_process_resources()
    assert res is not None
    os.unlink(sock_path)
    other = None
    if replacement == "file":
        with open(sock_path, "w") as f:
            f.write("someone else's")
    else:
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(sock_path)
    res.close()
    assert os.path.lexists(sock_path), "a different inode at the path is not ours"
    lst.close()
    assert os.path.lexists(sock_path)
    if other is not None:
        other.close()


def test_listener_close_leaves_a_different_file_alone(sock_path: str) -> None:
    lst = VhostUserListener(sock_path)
    os.unlink(sock_path)
    with open(sock_path, "w") as f:
        f.write("x")
    lst.close()
    assert os.path.exists(sock_path)


def _wait_child(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_after_fork_child_drops_its_copy_without_unlinking(sock_path: str) -> None:
    lst = VhostUserListener(sock_path)
    res = lst.take_parent_process_resources()
    assert res is not None
    pid = os.fork()
    if pid == 0:                         # child: drop everything, as a jailed child would
        try:
            res.close()
            lst.close()
            del res
            os._exit(0)
        finally:
            os._exit(1)
    assert _wait_child(pid) == 0
    assert os.path.exists(sock_path), "the child never unlinks"
    lst.close()
    assert os.path.exists(sock_path)
    res.close()
    assert not os.path.exists(sock_path), "the parent's close() unlinks"


def test_after_fork_untaken_listener_is_not_unlinked_by_the_child(sock_path: str) -> None:
    lst = VhostUserListener(sock_path)
    pid = os.fork()
    if pid == 0:
        try:
            lst.close()
            os._exit(0)
        finally:
            os._exit(1)
    assert _wait_child(pid) == 0
    assert os.path.exists(sock_path)
    lst.close()
    assert not os.path.exists(sock_path)


def _child_run_device(lst: VhostUserListener, key: int) -> None:
    """The body of a forked device child (without the jail)."""
    code = 1
    try:
        ex = Executor()
        lst.run_device(ex, XorBuilder(key=key, queues=1))
        code = 0
    finally:
        os._exit(code)


def _xor_roundtrip(path: str, data: bytes) -> bytes:
    with VhostUserFrontend.connect(path) as fe:
        fe.negotiate()
        fe.setup_memory(2 << 20)
        q = fe.setup_queue(0, 16)
        src, sv = q.alloc(len(data))
        sv[:] = data
        dst, dv = q.alloc(len(data))
        head = q.submit([(src, len(data))], [(dst, len(data))])
        q.kick()
        assert q.wait_used(5) == [(head, len(data))]
        return bytes(dv)


def test_supervisor_flow_children_served_one_after_another(sock_path: str) -> None:
    """Parent binds and keeps the socket; each forked child serves one
    front-end with run_device and exits 0; the next child serves the next."""
    lst = VhostUserListener(sock_path)
    res = lst.take_parent_process_resources()
    assert res is not None
    try:
        for key in (0x11, 0x22):
            pid = os.fork()
            if pid == 0:
                _child_run_device(lst, key)
            out = _xor_roundtrip(sock_path, b"hello")
            assert out == bytes(b ^ key for b in b"hello")
            assert _wait_child(pid) == 0
            # the listening socket is still open in the parent and still bound
            assert os.fstat(lst.fileno())
            assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    finally:
        lst.close()
        res.close()
    assert not os.path.exists(sock_path)


# --------------------------------------------------------------------------
# run_device, run_backend

def test_run_device_builds_on_the_loop_and_returns_on_disconnect(sock_path: str, lt: LoopThread) -> None:
    with VhostUserListener(sock_path) as lst:
        builder = XorBuilder(queues=1)
        ex = Executor()
        import threading
        t = threading.Thread(target=lst.run_device, args=(ex, builder))
        t.start()
        try:
            assert _xor_roundtrip(sock_path, b"abc") == bytes(b ^ 0x5A for b in b"abc")
        finally:
            t.join(5)
            ex.close()
        assert not t.is_alive()
        assert builder.built is not None and builder.built.served == 1


def test_run_device_build_failure_is_logged_and_raised(sock_path: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with VhostUserListener(sock_path) as lst, Executor() as ex:
        with pytest.raises(RuntimeError, match="builder asked to fail"):
            lst.run_device(ex, XorBuilder(fail=True))
    assert any("device build failed" in r.getMessage() and "builder asked to fail" in r.getMessage()
               for r in caplog.records)


def test_run_device_protocol_error_returns_with_reason_logged(sock_path: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import threading
    caplog.set_level(logging.INFO, "vhost.connection")
    with VhostUserListener(sock_path) as lst, Executor() as ex:
        t = threading.Thread(target=lst.run_device, args=(ex, XorBuilder()))
        t.start()
        fe = RawFrontend(sock_path)
        fe.sock.sock.sendall(HEADER.pack(R.SET_FEATURES, VERSION, 3))   # wrong size for SET_FEATURES
        fe.assert_closed()
        fe.close()
        t.join(5)
        assert not t.is_alive()
    assert any("malformed message" in r.getMessage() and "SET_FEATURES" in r.getMessage()
               for r in caplog.records), caplog.text


def test_accept_does_not_block_the_loop(sock_path: str) -> None:
    with VhostUserListener(sock_path) as lst, Executor() as ex:
        ticks = []

        async def main() -> None:
            serve = ex.spawn(lst.run_backend(XorDevice(ex), ex))
            for i in range(5):
                await asyncio.sleep(0.005)
                ticks.append(i)
            assert not serve.done()
            serve.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serve

        ex.run_until_complete(main())
        assert ticks == [0, 1, 2, 3, 4]


def test_malformed_message_ends_that_connection_and_the_next_is_served(sock_path: str,
                                                                       lt: LoopThread) -> None:
    with VhostUserListener(sock_path) as lst:
        for bad in (HEADER.pack(R.SET_VRING_NUM, VERSION, 4096 * 2),       # over the cap
                    HEADER.pack(R.GET_FEATURES, 0x2, 0),                    # version 2
                    HEADER.pack(R.SET_MEM_TABLE, VERSION, 9)):              # impossible size
            fut = lt.submit(lst.run_backend(XorDevice(lt.ex), lt.ex))
            fe = RawFrontend(sock_path)
            fe.sock.sock.sendall(bad)
            fe.assert_closed()
            fe.close()
            fut.result(5)
            fut = lt.submit(lst.run_backend(XorDevice(lt.ex, queues=1), lt.ex))
            assert _xor_roundtrip(sock_path, b"next") == bytes(b ^ 0x5A for b in b"next")
            fut.result(5)


# --------------------------------------------------------------------------
# Stream

def test_stream_from_socket_and_from_fd(lt: LoopThread) -> None:
    for as_fd in (False, True):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        conn = VhostUserStream(b.detach() if as_fd else b)
        assert conn.take_parent_process_resources() is None
        fut = lt.submit(conn.run_backend(XorDevice(lt.ex), lt.ex))
        fe = VhostUserFrontend(a)
        fe.negotiate()
        assert fe.queue_num == 2
        fe.close()
        fut.result(5)
        with pytest.raises(ConnectionClosed):
            lt.submit(conn.run_backend(XorDevice(lt.ex), lt.ex)).result(5)


def test_stream_rejects_what_is_not_a_unix_stream_socket() -> None:
    r, w = os.pipe()
    dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(ProtocolError, match=f"fd {r} is not a socket"):
            VhostUserStream(r)
        with pytest.raises(ProtocolError, match="expected AF_UNIX stream"):
            VhostUserStream(dgram_a.fileno())
        with pytest.raises(ProtocolError, match="expected AF_UNIX stream"):
            VhostUserStream(tcp)
        # a rejected fd stays the caller's
        os.fstat(r)
        os.fstat(dgram_a.fileno())
    finally:
        for fd in (r, w):
            os.close(fd)
        for s in (dgram_a, dgram_b, tcp):
            s.close()


# --------------------------------------------------------------------------
# The serve loop with a plain Backend

class EchoBackend(Backend):
    """Replies to GET_FEATURES; SET_OWNER ok; SET_FEATURES raises ProtocolError;
    SET_CONFIG is refused; RESET_OWNER is a bug (ValueError)."""

    def __init__(self, reply_ack: bool) -> None:
        self._ack = reply_ack
        self.disconnected = 0
        self.seen: list[int] = []

    @property
    def reply_ack_enabled(self) -> bool:
        return self._ack

    async def handle(self, msg: Message) -> tuple[bytes, list[int]] | None:
        self.seen.append(msg.request)
        if msg.request == R.GET_FEATURES:
            return encode_u64(42), []
        if msg.request == R.SET_FEATURES:
            raise ProtocolError("SET_FEATURES: no")
        if msg.request == R.SET_CONFIG:
            raise RequestRefused("SET_CONFIG: read-only")
        if msg.request == R.RESET_OWNER:
            raise ValueError("a bug in the backend")
        return None

    def on_disconnect(self) -> None:
        self.disconnected += 1


def _serve_echo(lt: LoopThread, reply_ack: bool) -> tuple[EchoBackend, RawFrontend, object, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = EchoBackend(reply_ack)
    fut = lt.submit(VhostUserStream(b).run_req_handler(backend, lt.ex))
    fe = RawFrontend.__new__(RawFrontend)
    from connection.transport import MessageSocket
    a.settimeout(5)
    fe.sock = MessageSocket(a)
    return backend, fe, fut, a


def test_serve_loop_acks(lt: LoopThread) -> None:
    backend, fe, fut, _ = _serve_echo(lt, reply_ack=True)
    assert fe.ack(R.SET_OWNER) == 0
    assert fe.ack(R.SET_FEATURES, encode_u64(1)) == 1          # ProtocolError, ack asked: continues
    assert fe.ack(R.SET_CONFIG, bytes(13)) == 1                # refused
    fe.send(R.SET_CONFIG, bytes(13))                          # refused, no ack: logged, continues
    fe.send(R.GET_FEATURES, need_reply=True)                  # explicit reply, never an extra ack
    msg = fe.recv()
    assert msg.flags == VERSION | FLAG_REPLY and decode_u64(R.GET_FEATURES, msg.payload) == 42
    fe.send(R.SET_FEATURES, encode_u64(1))                    # no ack asked: ends
    fe.assert_closed()
    fut.result(5)
    assert backend.disconnected == 1


def test_serve_loop_without_reply_ack(lt: LoopThread) -> None:
    backend, fe, fut, _ = _serve_echo(lt, reply_ack=False)
    fe.send(R.SET_OWNER, need_reply=True)                     # not negotiated: no ack
    assert fe.u64(R.GET_FEATURES) == 42
    fe.send(R.SET_FEATURES, encode_u64(1), need_reply=True)   # cannot ack: ends
    fe.assert_closed()
    fut.result(5)
    assert backend.seen == [R.SET_OWNER, R.GET_FEATURES, R.SET_FEATURES]


def test_serve_loop_internal_error_is_logged_and_ends(lt: LoopThread, caplog: pytest.LogCaptureFixture) -> None:
    backend, fe, fut, _ = _serve_echo(lt, reply_ack=True)
    fe.send(R.RESET_OWNER, need_reply=True)
    fe.assert_closed()
    assert fut.result(5) is None, "nothing escapes run_req_handler"
    assert backend.disconnected == 1
    assert any("internal error" in r.getMessage() and "RESET_OWNER" in r.getMessage() for r in caplog.records)


def test_serve_loop_peer_reset_is_a_disconnect(lt: LoopThread) -> None:
    backend, fe, fut, a = _serve_echo(lt, reply_ack=True)
    assert fe.u64(R.GET_FEATURES) == 42
    # send a request and vanish before reading the reply (RST on close with unread data)
    fe.send(R.GET_FEATURES)
    fe.send(R.GET_FEATURES)
    a.close()
    assert fut.result(5) is None
    assert backend.disconnected == 1


def test_front_end_that_stops_reading_is_dropped(lt: LoopThread, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Replies never block the device's loop for long: a front-end that sends
    requests but reads no reply is disconnected after SEND_TIMEOUT."""
    import connection.transport as transport
    monkeypatch.setattr(transport, "SEND_TIMEOUT", 0.2)
    caplog.set_level(logging.INFO, "vhost.connection")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    backend = EchoBackend(reply_ack=False)
    fut = lt.submit(VhostUserStream(b).run_req_handler(backend, lt.ex))
    a.settimeout(3)
    request = HEADER.pack(R.GET_FEATURES, VERSION, 0)
    try:
        for _ in range(5000):
            a.sendall(request)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert fut.result(5) is None
    assert backend.disconnected == 1
    assert any("stopped reading" in r.getMessage() for r in caplog.records), caplog.text
    a.close()


def test_package_reexports_the_public_names() -> None:
    import connection
    for name in ("VhostUserConnection", "VhostUserListener", "VhostUserStream", "ParentResources",
                 "Backend", "DeviceRequestHandler", "Executor", "VhostUserDevice", "VhostUserDeviceBuilder",
                 "GuestMemory", "Virtqueue", "InflightRegion", "ProtocolError", "VhostUserError"):
        assert getattr(connection, name) is not None
        assert name in connection.__all__


def test_connection_abc_defaults() -> None:
    class Minimal(VhostUserConnection):
        async def run_req_handler(self, handler: Backend, ex: Executor) -> None:
            return None

    assert Minimal().take_parent_process_resources() is None
    with pytest.raises(TypeError):
        VhostUserConnection()  # type: ignore[abstract]
