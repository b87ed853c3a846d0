"""``parse_request``: a chain becomes one typed ``BlockRequest`` (type, sector,
data views, length, status view), whatever way the driver cut its buffers.

Why: every block handler reads the request from this one value, so the
shapes a driver may legally produce (header alone or followed by data in
one buffer, header split anywhere, status sharing a buffer with IN data)
must all come out the same here.
"""

from __future__ import annotations

import pytest

from connection.virtqueue import DescriptorChain
from devices.block import T_SHORT_HEADER, BlockRequest, parse_request
from devices.virtio_blk import HEADER, T_DISCARD, T_GET_ID, T_IN, T_OUT


def _chain(readable: list[bytes], writable: list[int]) -> tuple[DescriptorChain, list[memoryview]]:
    r = [memoryview(bytearray(b)) for b in readable]
    w = [memoryview(bytearray(n)) for n in writable]
    return DescriptorChain(0, r, w, sum(map(len, r)), sum(map(len, w))), w


def _joined(views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


@pytest.mark.parametrize("cut", [None, 1, 7, 15])
def test_out_header_alone_or_cut_anywhere(cut):
    head = HEADER.pack(T_OUT, 0, 42)
    data = bytes(range(256)) * 4
    readable = [head + data[:100], data[100:]] if cut is None else [head[:cut], head[cut:] + data[:3], data[3:]]
    chain, w = _chain(readable, [1])
    req = parse_request(chain)
    assert isinstance(req, BlockRequest)
    assert (req.type, req.sector, req.length) == (T_OUT, 42, len(data))
    assert _joined(req.data) == data
    req.status[0] = 7
    assert w[0][0] == 7 and len(req.status) == 1


@pytest.mark.parametrize("rtype", [T_IN, T_GET_ID])
def test_in_data_is_the_writable_part_before_the_status(rtype):
    chain, w = _chain([HEADER.pack(rtype, 0, 9)], [512, 513])   # status shares the last buffer
    req = parse_request(chain)
    assert (req.type, req.sector, req.length) == (rtype, 9, 1024)
    assert [len(v) for v in req.data] == [512, 512]
    req.status[0] = 5
    assert w[1][512] == 5 and w[1][511] == 0


def test_discard_segments_are_readable_data():
    seg = bytes(16)
    chain, _ = _chain([HEADER.pack(T_DISCARD, 0, 0), seg], [1])
    req = parse_request(chain)
    assert req.type == T_DISCARD and req.length == 16 and _joined(req.data) == seg


def test_short_header_and_missing_status():
    chain, _ = _chain([bytes(10)], [1])
    req = parse_request(chain)
    assert req is not None and req.type == T_SHORT_HEADER and req.length == 10
    chain, _ = _chain([HEADER.pack(T_IN, 0, 0)], [])
    assert parse_request(chain) is None
