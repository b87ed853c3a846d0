"""Console and rng through VhostUserFrontend."""

from __future__ import annotations

import os
import socket
import time


from frontend.vhost_user import VhostUserFrontend
from devices.console import ConsoleBuilder
from devices.rng import RngBuilder

MiB = 1 << 20


def connect(dev, queues):
    fe = VhostUserFrontend.connect(dev.path)
    fe.negotiate()
    fe.setup_memory(16 * MiB)
    return fe, [fe.setup_queue(i, 64) for i in range(queues)]


def transmit(q, data: bytes) -> None:
    gpa, buf = q.alloc(len(data))
    buf[:] = data
    q.submit([(gpa, len(data))], [])
    q.kick()
    done = q.wait_used(5)
    assert done[0][1] == 0


def post_rx(q, n: int, size: int):
    bufs = []
    for _ in range(n):
        gpa, buf = q.alloc(size)
        head = q.submit([], [(gpa, size)])
        bufs.append((head, buf))
    q.kick()
    return dict(bufs)


def receive(q, bufs, want: int, timeout: float = 5.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < want:
        for head, length in q.wait_used(max(0.01, deadline - time.monotonic())):
            got += bytes(bufs[head][:length])
    return got


def test_console_unix_socket_round_trip(run_device, tmp_path):
    path = str(tmp_path / "console.sock")
    dev = run_device(ConsoleBuilder.from_options("con", {"type": "unix", "path": path,
                                                         "cols": "80", "rows": "25"}))
    fe, (rx, tx) = connect(dev, 2)
    assert fe.acked_features & 1  # SIZE
    assert fe.get_config(0, 4) == (80).to_bytes(2, "little") + (25).to_bytes(2, "little")
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.settimeout(5)
    # host to guest first: the device reads a client only once it accepted it,
    # so the message arriving is the accept (guest output sent earlier is dropped)
    bufs = post_rx(rx, 8, 16)
    message = b"typed on the host, longer than one rx buffer"
    client.sendall(message)
    assert receive(rx, bufs, len(message)) == message
    transmit(tx, b"hello from the guest\n")
    assert client.recv(100) == b"hello from the guest\n"
    # a new client replaces the old one: accepting it closes the old one
    client2 = socket.socket(socket.AF_UNIX)
    client2.connect(path)
    client2.settimeout(5)
    assert client.recv(100) == b""
    transmit(tx, b"second")
    assert client2.recv(100) == b"second"
    client.close()
    client2.close()
    fe.close()
    dev.join()


def test_console_file_output_and_input(run_device, tmp_path):
    out = tmp_path / "out.txt"
    inp = tmp_path / "in.txt"
    inp.write_bytes(b"x" * 5000)
    dev = run_device(ConsoleBuilder.from_options("con", {"type": "file", "path": str(out), "input": str(inp)}))
    fe, (rx, tx) = connect(dev, 2)
    transmit(tx, b"line one\n")
    transmit(tx, b"line two\n")
    bufs = post_rx(rx, 10, 1024)
    assert receive(rx, bufs, 5000) == b"x" * 5000
    fe.close()
    dev.join()
    assert out.read_bytes() == b"line one\nline two\n"


def test_console_fifo_input_and_sink(run_device, tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    dev = run_device(ConsoleBuilder.from_options("con", {"type": "sink", "input": str(fifo)}))
    fe, (rx, tx) = connect(dev, 2)
    transmit(tx, b"dropped")
    bufs = post_rx(rx, 4, 64)
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, b"abc")
    os.close(fd)  # the writer leaving is not end of input
    assert receive(rx, bufs, 3) == b"abc"
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, b"def")
    os.close(fd)
    assert receive(rx, bufs, 3) == b"def"
    fe.close()
    dev.join()


def test_rng(run_device):
    dev = run_device(RngBuilder.from_options("rng", {}))
    fe, (q,) = connect(dev, 1)
    seen = []
    for size in (1, 16, 64, 4096, 100_000):
        gpa, buf = q.alloc(size)
        buf[:] = bytes(size)
        q.submit([], [(gpa, size)])
        q.kick()
        (head, length), = q.wait_used(5)
        assert 1 <= length <= size
        if size >= 4096:
            data = bytes(buf[:length])
            assert len(set(data)) > 200   # all byte values show up
            seen.append(data)
    assert seen[0] != seen[1][:len(seen[0])]
    # a request with nothing writable gets 0 bytes, the queue keeps serving
    gpa, buf = q.alloc(16)
    q.submit([(gpa, 16)], [])
    q.kick()
    (head, length), = q.wait_used(5)
    assert length == 0
    gpa, buf = q.alloc(32)
    q.submit([], [(gpa, 32)])
    q.kick()
    (head, length), = q.wait_used(5)
    assert length == 32
    fe.close()
    dev.join()
