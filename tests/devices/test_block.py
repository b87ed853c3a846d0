"""The block device driven through VhostUserFrontend, as a VMM would."""

from __future__ import annotations

import os
import random
import threading

import pytest

from frontend.vhost_user import DEVICE_FEATURE_MASK, DRIVER_FEATURES, VhostUserFrontend
from frontend.virtio_blk import BlockDriver, BlockError, decode_blk_config
from connection.protocol import VirtioFeature
from devices.block import BlockBuilder
from devices.virtio_blk import HEADER, S_IOERR, S_UNSUPP, T_OUT
from tests.conftest import wait_broken

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(8 * MiB))
    return str(path)


def connect(dev, queues=1, qsize=256):
    fe = VhostUserFrontend.connect(dev.path)
    fe.negotiate()
    fe.setup_memory(64 * MiB)
    qs = [fe.setup_queue(i, qsize) for i in range(queues)]
    return fe, qs


def test_integrity_many_queues(run_device, image):
    nq = 4
    dev = run_device(BlockBuilder.from_options("blk", {"path": image, "num-queues": str(nq)}))
    fe, qs = connect(dev, nq)
    assert fe.queue_num == nq
    cfg = decode_blk_config(fe.get_config(0, 60))
    assert cfg["capacity"] == 8 * MiB // 512 and cfg["num_queues"] == nq
    expected = bytearray(open(image, "rb").read())
    size = len(expected)
    stripe = size // nq
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            rnd = random.Random(i)
            drv = BlockDriver(qs[i], depth=16, max_io=128 << 10)
            ops = []
            for _ in range(300):
                length = rnd.choice((512, 4096, 8192, 65536, 131072))
                off = stripe * i + rnd.randrange(0, (stripe - length) // 512) * 512
                if rnd.random() < 0.6:
                    data = rnd.randbytes(length)
                    ops.append(("write", off, data))
                else:
                    ops.append(("read", off, length))
            # Requests in flight together may complete in any order, so a
            # batch with overlapping ranges runs one request at a time.
            for k in range(0, len(ops), 16):
                batch = ops[k:k + 16]
                spans = [(o, o + (len(a) if isinstance(a, bytes) else a)) for _, o, a in batch]
                overlap = any(s1 < e2 and s2 < e1 for x, (s1, e1) in enumerate(spans)
                              for (s2, e2) in spans[x + 1:])
                if overlap:
                    results = [drv.run([op])[0] for op in batch]
                else:
                    results = drv.run(batch)
                for (op, off, arg), res in zip(batch, results):
                    if op == "write":
                        expected[off:off + len(arg)] = arg
                    else:
                        assert res == bytes(expected[off:off + arg]), f"queue {i} read at {off}"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nq)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    # whole image back through queue 0, and the file itself
    drv = BlockDriver(qs[0], depth=4, max_io=128 << 10)
    got = b"".join(drv.run([("read", off, 128 << 10) for off in range(0, size, 128 << 10)]))
    assert got == bytes(expected)
    drv.flush()
    fe.close()
    dev.join()
    assert open(image, "rb").read() == bytes(expected)


def test_read_only_and_get_id(run_device, image):
    before = open(image, "rb").read()
    dev = run_device(BlockBuilder.from_options("blk", {"path": image, "ro": "true", "id": "disk-7"}))
    fe, (q,) = connect(dev)
    assert fe.acked_features & (1 << 5)
    drv = BlockDriver(q, depth=2)
    assert drv.read(4096, 4096) == before[4096:8192]
    with pytest.raises(BlockError) as info:
        drv.write(0, b"x" * 512)
    assert info.value.status == S_IOERR
    assert drv.get_id() == b"disk-7"
    fe.close()
    dev.join()
    assert open(image, "rb").read() == before


def test_discard_write_zeroes(run_device, image):
    dev = run_device(BlockBuilder.from_options("blk", {"path": image}))
    fe, (q,) = connect(dev)
    drv = BlockDriver(q, depth=2)
    drv.discard(1 * MiB, 64 << 10)
    drv.write_zeroes(2 * MiB, 64 << 10)
    drv.write_zeroes(3 * MiB, 64 << 10, unmap=True)
    with pytest.raises(BlockError) as info:
        drv.discard(0, 4096, unmap=True)
    assert info.value.status == S_UNSUPP
    for off in (1 * MiB, 2 * MiB, 3 * MiB):
        assert drv.read(off, 64 << 10) == bytes(64 << 10)
    fe.close()
    dev.join()
    fd = os.open(image, os.O_RDONLY)
    try:
        for off in (1 * MiB, 3 * MiB):  # punched: a hole starts there
            assert os.lseek(fd, off, os.SEEK_HOLE) == off
    finally:
        os.close(fd)


def test_out_of_range_and_malformed(run_device, image):
    dev = run_device(BlockBuilder.from_options("blk", {"path": image, "num-queues": "2"}))
    fe, (q0, q1) = connect(dev, 2)
    drv = BlockDriver(q0, depth=2)
    with pytest.raises(BlockError) as info:
        drv.read(8 * MiB, 4096)
    assert info.value.status == S_IOERR
    with pytest.raises(BlockError) as info:
        drv.read(8 * MiB - 512, 1024)
    assert info.value.status == S_IOERR
    # unknown type
    hdr_gpa, hdr = q0.alloc(16)
    st_gpa, st = q0.alloc(1)
    HEADER.pack_into(hdr, 0, 77, 0, 0)
    st[0] = 0xFF
    q0.submit([(hdr_gpa, 16)], [(st_gpa, 1)])
    q0.kick()
    (head, length), = q0.wait_used(5)
    assert st[0] == S_UNSUPP and length == 1
    # a request with no status byte breaks queue 1 only
    hdr2_gpa, hdr2 = q1.alloc(16)
    data_gpa, _ = q1.alloc(512)
    HEADER.pack_into(hdr2, 0, T_OUT, 0, 0)
    q1.submit([(hdr2_gpa, 16), (data_gpa, 512)], [])
    q1.kick()
    wait_broken(q1)
    assert drv.read(0, 4096) == open(image, "rb").read()[:4096]
    fe.disconnect()
    dev.join()


def test_indirect_and_no_event_idx(run_device, image):
    dev = run_device(BlockBuilder.from_options("blk", {"path": image}))
    fe = VhostUserFrontend.connect(dev.path)
    fe.negotiate(features=fe_features_without_event_idx())
    fe.setup_memory(64 * MiB)
    q = fe.setup_queue(0, 128)
    drv = BlockDriver(q, depth=8, indirect=True)
    data = os.urandom(64 << 10)
    drv.write(512 * 3, data)
    assert drv.read(512 * 3, 64 << 10) == data
    fe.close()
    dev.join()


def fe_features_without_event_idx() -> int:
    return (DRIVER_FEATURES | DEVICE_FEATURE_MASK) & ~VirtioFeature.RING_EVENT_IDX


def test_direct_io_threads(run_device, tmp_path):
    """direct=true serves through I/O threads, completing out of order."""
    img = tmp_path / "direct.img"
    img.write_bytes(os.urandom(8 * MiB))
    expected = bytearray(img.read_bytes())
    dev = run_device(BlockBuilder.from_options("blk", {"path": str(img), "direct": "true"}))
    fe, (q,) = connect(dev)
    drv = BlockDriver(q, depth=16, max_io=64 << 10)
    rnd = random.Random(5)
    ops = []
    for k in range(256):
        off = (k % 128) * (64 << 10)
        if k < 128:
            data = rnd.randbytes(64 << 10)
            expected[off:off + len(data)] = data
            ops.append(("write", off, data))
        else:
            ops.append(("read", off, 64 << 10))
    results = drv.run(ops)
    for (op, off, arg), res in zip(ops, results):
        if op == "read":
            assert res == bytes(expected[off:off + arg])
    drv.flush()
    fe.close()
    dev.join()
    assert img.read_bytes() == bytes(expected)


@pytest.mark.parametrize("direct", ["false", "true"])
def test_stop_completes_everything_fetched(run_device, tmp_path, direct):
    """GET_VRING_BASE right after a burst: every request the device fetched
    is in the used ring by the time the reply arrives (no thread still
    writing guest memory), and the rest is served after a restart."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8 * MiB))
    dev = run_device(BlockBuilder.from_options("blk", {"path": str(img), "direct": direct}))
    fe, (q,) = connect(dev)
    drv = BlockDriver(q, depth=64, max_io=64 << 10)
    for k, s in enumerate(drv.slots):
        s.data[:] = bytes([k]) * (64 << 10)
        drv.submit_write(s, k * 128, 64 << 10)
    q.kick()
    base = fe.stop_queue(0)
    assert q.used_idx == base, (q.used_idx, base)
    fe.disconnect()
    dev.join()
