"""The block device's kick coalescing, end to end: a real socket, a device
thread, and a driver that obeys EVENT_IDX (frontend.vhost_user).

Why: coalescing changes what the device asks of the driver (``avail_event``
ahead of the ring).  A driver that keeps several requests coming must then
kick about once per four requests and still get every request served with
the right data; with ``coalesce-kicks=false`` it kicks once per request
that finds the device asleep; a bad value is a configuration error naming
the key.  The driver here never races the device's timer: it publishes its
four requests back to back, and waits for the device to sleep again only
after a kick.
"""

from __future__ import annotations

import time

import pytest

from connection.kick import COALESCE_PROBE_MIN
from devices import ConfigError
from devices.block import BlockBuilder
from devices.virtio_blk import S_OK, T_IN

from .test_block_requests import Chain, blk, hdr, image, run  # noqa: F401 - fixtures

SECTOR = 512


def _read(q, sector: int) -> Chain:
    return Chain(q, [hdr(T_IN, sector)], [SECTOR, 1])


def _sectors(image) -> list[bytes]:
    with open(image, "rb") as f:
        data = f.read()
    return [data[i:i + SECTOR] for i in range(0, len(data), SECTOR)]


def _settle(q, chains: list[Chain]) -> None:
    """Wait for ``chains`` and for the device to be asleep again (kicks
    re-armed: ``avail_event`` at or past the ring's index)."""
    by_head = {c.head: c for c in chains if c.used is None}
    deadline = time.monotonic() + 5
    while by_head:
        for head, length in q.wait_used(max(0.0, deadline - time.monotonic())):
            by_head.pop(head).used = length
    while (q.avail_event - q.avail_idx) & 0xFFFF >= 0x8000:
        assert time.monotonic() < deadline, "the device did not re-arm kicks"
        time.sleep(0.0001)


def _rounds_of_four(q, sectors: list[bytes], rounds: int) -> list[tuple[int, int]]:
    """``rounds`` rounds of 4 reads: (kicks, how far ``avail_event`` was
    ahead of the ring when the round began) per round.  Each read is
    published and ``kick()``ed (a kick only where EVENT_IDX asks for one);
    after a kick the driver waits for what it published and for the device
    to sleep again, so without coalescing every read finds the device
    asleep and kicks.  Every read must return its sector."""
    out = []
    for r in range(rounds):
        k0 = q.kicks
        ahead = (q.avail_event - q.avail_idx) & 0xFFFF
        chains = []
        for j in range(4):
            c = _read(q, (4 * r + j) % len(sectors))
            c.submit(q)
            chains.append(c)
            if q.kick():
                _settle(q, chains)
        _settle(q, chains)
        for j, c in enumerate(chains):
            assert c.status == S_OK and c.used == SECTOR + 1
            assert bytes(c.w[0].view) == sectors[(4 * r + j) % len(sectors)]
        out.append((q.kicks - k0, ahead))
    assert not q.broken()
    return out


def _past_the_first_probe(q) -> None:
    """Queue depth 1 for more sleeps than the first probe waits for: the
    probe's request waits for the timer, and coalescing starts at the next
    probe only if a deeper driver makes the kick come first."""
    for i in range(COALESCE_PROBE_MIN + 4):
        c = _read(q, i % 64)
        run(q, c)
        assert c.status == S_OK


def _patterned(image) -> list[bytes]:
    with open(image, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(0)
        f.write(bytes((i * 7 + i // SECTOR) & 0xFF for i in range(size)))
    return _sectors(image)


def test_a_driver_that_keeps_requests_coming_kicks_once_per_four(blk, image):
    """Rounds of four until the device has asked for its kick three requests
    late for 20 rounds in a row (a probe that starts mid-round can fail:
    its tail waits for the timer, and coalescing backs off; a later probe
    lines up).  In those rounds the driver kicks once per four requests."""
    sectors = _patterned(image)
    rig = blk(image, **{"poll-us": "0"})
    q = rig.queues[0]
    _past_the_first_probe(q)
    seen = []
    while len(seen) < 200 and not (len(seen) >= 20 and all(a == 3 for _, a in seen[-20:])):
        seen += _rounds_of_four(q, sectors, 10)
    settled = seen[-20:]
    assert all(a == 3 for _, a in settled), f"(kicks, ahead) per round: {seen}"
    assert [k for k, _ in settled] == [1] * 20, f"(kicks, ahead) per round: {seen}"


def test_without_coalescing_each_request_kicks(blk, image):
    """The control: the same driver, coalescing off: each request finds the
    device asleep with kicks armed for it."""
    sectors = _patterned(image)
    rig = blk(image, **{"poll-us": "0", "coalesce-kicks": "false"})
    q = rig.queues[0]
    _past_the_first_probe(q)
    seen = _rounds_of_four(q, sectors, 60)
    assert seen == [(4, 0)] * 60, f"(kicks, ahead) per round: {seen}"


def test_coalesce_kicks_option_errors_name_key_and_value(image):
    for bad in ("maybe", "2"):
        with pytest.raises(ConfigError, match=f"key 'coalesce-kicks', value '{bad}'"):
            BlockBuilder.from_options("blk", {"path": image, "coalesce-kicks": bad})
    b = BlockBuilder.from_options("blk", {"path": image, "coalesce-kicks": "off"})
    try:
        assert b.coalesce_kicks is False
    finally:
        b.close()
