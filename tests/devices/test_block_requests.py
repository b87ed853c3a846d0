"""The block device's request logic on fake chains: status codes, data
placement, discard and write-zeroes on a real file, malformed requests."""

from __future__ import annotations

import os
import struct

import pytest

from devices.block import (BlockBuilder, CONFIG, S_IOERR, S_OK, S_UNSUPP, T_DISCARD,
                           T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES)
from connection.executor import Executor

from .fakes import FakeChain, FakeQueue, views

HDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")
SIZE = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    return str(path)


@pytest.fixture
def ex():
    e = Executor()
    yield e
    e.close()


def make(ex, image, **opts):
    b = BlockBuilder.from_options("blk", {"path": image, **opts})
    dev = b.build(ex)
    dev.ack_features(dev.features())
    return b, dev


def hdr(rtype, sector=0):
    return HDR.pack(rtype, 0, sector)


def run(dev, ex, chains):
    q = FakeQueue(chains)
    ex.run_until_complete(dev._serve(0, q))
    return q


def test_read_write_split_views(ex, image):
    b, dev = make(ex, image)
    data = os.urandom(8192)
    # header in its own view, data split oddly across three views, status alone
    w = FakeChain(1, views(hdr(T_OUT, 8), data[:1000], data[1000:5000], data[5000:]), views(1))
    # read: data views plus the status byte in the last data view
    r = FakeChain(2, views(hdr(T_IN, 8)), views(4096, 4097))
    q = run(dev, ex, [w, r])
    assert q.used == [(1, 1), (2, 8193)]
    assert w.writable[0][0] == S_OK and r.writable[-1][-1] == S_OK
    assert bytes(r.writable[0]) + bytes(r.writable[1][:4096]) == data
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(8192) == data
    assert q.flushes == 1
    b.close()


def test_header_with_data_in_one_view_and_split_header(ex, image):
    b, dev = make(ex, image)
    data = os.urandom(1024)
    w = FakeChain(0, views(hdr(T_OUT, 3) + data), views(1))
    full = hdr(T_IN, 3)
    r = FakeChain(1, views(full[:5], full[5:]), views(1025))
    w2 = FakeChain(2, views(full[:7], (hdr(T_OUT, 3) + data)[7:]), views(1))  # split OUT header
    q = run(dev, ex, [w, r, w2])
    assert [u for u in q.used] == [(0, 1), (1, 1025), (2, 1)]
    assert bytes(r.writable[0][:1024]) == data and r.writable[0][1024] == S_OK
    assert w2.writable[0][0] == S_OK
    b.close()


@pytest.mark.parametrize("rtype,sector,length,status", [
    (T_IN, SIZE // 512, 512, S_IOERR),          # one past the end
    (T_IN, SIZE // 512 - 1, 1024, S_IOERR),     # straddles the end
    (T_IN, 0, 100, S_IOERR),                    # not a sector multiple
    (T_OUT, SIZE // 512, 512, S_IOERR),
    (T_OUT, (1 << 64) - 1, 512, S_IOERR),       # huge sector
    (T_OUT, 0, 700, S_IOERR),
    (99, 0, 0, S_UNSUPP),                       # unknown type
    (10, 0, 0, S_UNSUPP),                       # GET_LIFETIME: not offered
])
def test_bad_requests_get_status(ex, image, rtype, sector, length, status):
    b, dev = make(ex, image)
    before = open(image, "rb").read()
    if rtype == T_OUT:
        chain = FakeChain(5, views(hdr(rtype, sector), length), views(1))
    else:
        chain = FakeChain(5, views(hdr(rtype, sector)), views(length + 1))
    q = run(dev, ex, [chain])
    assert q.used == [(5, 1)]
    assert chain.writable[-1][-1] == status
    assert not q.broken
    assert open(image, "rb").read() == before
    b.close()


def test_no_status_byte_breaks_queue(ex, image):
    b, dev = make(ex, image)
    bad = FakeChain(0, views(hdr(T_OUT, 0), 512), [])
    good = FakeChain(1, views(hdr(T_IN, 0)), views(513))
    q = run(dev, ex, [bad, good])
    assert q.broken and "status" in q.reason
    assert q.used == []
    b.close()


def test_short_header_is_ioerr(ex, image):
    b, dev = make(ex, image)
    c1 = FakeChain(0, views(b"\0" * 10), views(1))
    c2 = FakeChain(1, [], views(1))
    q = run(dev, ex, [c1, c2])
    assert q.used == [(0, 1), (1, 1)]
    assert c1.writable[0][0] == S_IOERR and c2.writable[0][0] == S_IOERR
    b.close()


def test_read_only(ex, image):
    b, dev = make(ex, image, ro="true")
    assert dev.features() & (1 << 5)
    assert not dev.features() & ((1 << 13) | (1 << 14))
    before = open(image, "rb").read()
    w = FakeChain(0, views(hdr(T_OUT, 0), os.urandom(512)), views(1))
    d = FakeChain(1, views(hdr(T_DISCARD), SEG.pack(0, 8, 0)), views(1))
    z = FakeChain(2, views(hdr(T_WRITE_ZEROES), SEG.pack(0, 8, 0)), views(1))
    r = FakeChain(3, views(hdr(T_IN, 0)), views(512, 1))
    f = FakeChain(4, views(hdr(T_FLUSH)), views(1))
    q = run(dev, ex, [w, d, z, r, f])
    assert [c.writable[-1][-1] for c in (w, d, z, r, f)] == [S_IOERR, S_IOERR, S_IOERR, S_OK, S_OK]
    assert bytes(r.writable[0]) == before[:512]
    assert open(image, "rb").read() == before
    b.close()


def _holes(path):
    """(offset, end) data extents via SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out, pos, size = [], 0, os.fstat(fd).st_size
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h))
            pos = h
        return out
    finally:
        os.close(fd)


def test_discard_and_write_zeroes_on_file(ex, image):
    b, dev = make(ex, image)
    assert dev.features() & (1 << 13) and dev.features() & (1 << 14)
    # discard 64 KiB at 128 KiB, write-zeroes (unmap) 64 KiB at 512 KiB, write-zeroes 8 KiB at 4 KiB
    d = FakeChain(0, views(hdr(T_DISCARD), SEG.pack(256, 128, 0)), views(1))
    z1 = FakeChain(1, views(hdr(T_WRITE_ZEROES), SEG.pack(1024, 128, 1)), views(1))
    z2 = FakeChain(2, views(hdr(T_WRITE_ZEROES), SEG.pack(8, 16, 0) + SEG.pack(40, 1, 0)), views(1))
    q = run(dev, ex, [d, z1, z2])
    assert [c.writable[0][0] for c in (d, z1, z2)] == [S_OK] * 3
    content = open(image, "rb").read()
    assert content[128 << 10:192 << 10] == bytes(64 << 10)
    assert content[512 << 10:576 << 10] == bytes(64 << 10)
    assert content[4096:12288] == bytes(8192)
    assert content[40 * 512:41 * 512] == bytes(512)
    assert content[12288:40 * 512] != bytes(40 * 512 - 12288)
    extents = _holes(image)
    # the punched ranges are holes: no data extent covers them
    for lo, hi in ((128 << 10, 192 << 10), (512 << 10, 576 << 10)):
        assert not any(s < hi and e > lo for s, e in extents), extents
    assert os.path.getsize(image) == SIZE
    b.close()


@pytest.mark.parametrize("rtype,seg,status", [
    (T_DISCARD, SEG.pack(0, 8, 1), S_UNSUPP),             # unmap on discard
    (T_DISCARD, SEG.pack(0, 8, 4), S_UNSUPP),             # unknown flag
    (T_WRITE_ZEROES, SEG.pack(0, 8, 2), S_UNSUPP),
    (T_DISCARD, SEG.pack(SIZE // 512 - 1, 8, 0), S_IOERR),  # out of range
    (T_WRITE_ZEROES, SEG.pack(0, 8, 0)[:10], S_IOERR),    # not a whole segment
    (T_DISCARD, SEG.pack(0, 1, 0) * 33, S_IOERR),         # too many segments
])
def test_bad_discard(ex, image, rtype, seg, status):
    b, dev = make(ex, image)
    before = open(image, "rb").read()
    c = FakeChain(0, views(hdr(rtype), seg), views(1))
    run(dev, ex, [c])
    assert c.writable[0][0] == status
    assert open(image, "rb").read() == before
    b.close()


def test_not_sparse_refuses_discard(ex, image):
    b, dev = make(ex, image, sparse="false")
    assert not dev.features() & ((1 << 13) | (1 << 14))
    c = FakeChain(0, views(hdr(T_DISCARD), SEG.pack(0, 8, 0)), views(1))
    run(dev, ex, [c])
    assert c.writable[0][0] == S_UNSUPP
    b.close()


def test_get_id_and_flush(ex, image):
    b, dev = make(ex, image, id="serial-123")
    c = FakeChain(0, views(hdr(T_GET_ID)), views(20, 1))
    f = FakeChain(1, views(hdr(T_FLUSH)), views(1))
    q = run(dev, ex, [c, f])
    assert bytes(c.writable[0]) == b"serial-123".ljust(20, b"\0")
    assert q.used == [(0, 21), (1, 1)]
    b.close()
    b2, dev2 = make(ex, image, lock="false")
    c = FakeChain(0, views(hdr(T_GET_ID)), views(21))
    run(dev2, ex, [c])
    assert c.writable[0][20] == S_UNSUPP
    b2.close()


def test_config_space(ex, image):
    b, dev = make(ex, image, **{"block-size": "4096", "num-queues": "4"})
    cfg = dev.read_config(0, 60)
    fields = CONFIG.unpack(cfg)
    assert fields[0] == SIZE // 512       # capacity
    assert fields[6] == 4096              # blk_size
    assert fields[13] == 4                # num_queues
    assert dev.read_config(0, 8) == cfg[:8]
    assert dev.read_config(60, 36) == bytes(36)
    with pytest.raises(ValueError):
        dev.read_config(250, 10)
    assert dev.max_queue_num() == 4
    b.close()


def test_writethrough_without_flush_feature(ex, image):
    b, dev = make(ex, image)
    dev.ack_features(dev.features() & ~(1 << 9))
    assert dev.writethrough
    dev.ack_features(dev.features())
    assert not dev.writethrough
    b.close()


def test_direct_io(ex, tmp_path):
    path = tmp_path / "direct.img"
    path.write_bytes(bytes(SIZE))
    b, dev = make(ex, str(path), direct="true")
    # guest buffers at odd alignment force the bounce path
    raw = bytearray(4096 + 1 + 1)
    data = os.urandom(4096)
    raw[1:4097] = data
    w = FakeChain(0, views(hdr(T_OUT, 16)) + [memoryview(raw)[1:4097]], views(1))
    rbuf = bytearray(4098)
    r = FakeChain(1, views(hdr(T_IN, 16)), [memoryview(rbuf)[1:4098]])
    run(dev, ex, [w, r])
    assert w.writable[0][0] == S_OK and rbuf[4097] == S_OK
    assert bytes(rbuf[1:4097]) == data
    b.close()
    assert path.read_bytes()[16 * 512:16 * 512 + 4096] == data


from hypothesis import given, settings, strategies as st


@pytest.fixture(scope="module")
def fuzz_dev(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "disk.img"
    path.write_bytes(bytes(SIZE))
    ex = Executor()
    b = BlockBuilder.from_options("fuzz", {"path": str(path), "lock": "false"})
    dev = b.build(ex)
    dev.ack_features(dev.features())
    yield dev
    b.close()
    ex.close()


@settings(max_examples=300, deadline=None)
@given(rtype=st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 3, 10, 0xFFFFFFFF]),
       sector=st.one_of(st.integers(0, SIZE // 512 + 4), st.integers(0, (1 << 64) - 1)),
       split=st.integers(0, 16),
       readable=st.lists(st.integers(1, 3000), max_size=4),
       writable=st.lists(st.integers(1, 3000), max_size=4),
       payload=st.binary(max_size=64))
def test_fuzz_never_raises(fuzz_dev, rtype, sector, split, readable, writable, payload):
    """Whatever the guest puts in a chain, the device answers with a status
    (or breaks the queue when there is no status byte) and never raises."""
    head = hdr(rtype, sector) + payload
    parts = [head[:split], head[split:]] if 0 < split < len(head) else [head]
    wviews = views(*writable)
    chain = FakeChain(3, views(*parts) + views(*readable), wviews)
    written = fuzz_dev._handle(chain, 0)
    if not writable:
        assert written == -1
    else:
        assert 1 <= written <= chain.writable_len
        assert wviews[-1][-1] in (S_OK, S_IOERR, S_UNSUPP)
