"""Builders validate options in the parent, name the key in every error,
and keep exactly the fds the child needs."""

from __future__ import annotations

import os
import socket

import pytest

import devices
from devices import BUILDERS, ConfigError
from devices.block import BlockBuilder
from devices.console import ConsoleBuilder
from devices.net import NetBuilder
from devices.rng import RngBuilder


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return str(path)


def test_registry():
    assert BUILDERS == {"block": BlockBuilder, "console": ConsoleBuilder, "rng": RngBuilder, "net": NetBuilder}
    for cls in BUILDERS.values():
        assert issubclass(cls, devices.DeviceBuilder)
        assert cls.seccomp_policy.endswith(".policy")
        assert cls.device_type in BUILDERS


@pytest.mark.parametrize("opts,key,value", [
    ({}, "path", None),
    ({"path": "/nonexistent/disk.img"}, "path", "/nonexistent/disk.img"),
    ({"ro": "maybe"}, "ro", "maybe"),
    ({"ro": ""}, "ro", ""),
    ({"block-size": "1000"}, "block-size", "1000"),
    ({"block-size": "256"}, "block-size", "256"),
    ({"num-queues": "17"}, "num-queues", "17"),
    ({"num-queues": "x"}, "num-queues", "x"),
    ({"id": "a" * 21}, "id", "a" * 21),
    ({"readonly": "true"}, "readonly", "true"),
    ({"packed-queue": "true"}, "packed-queue", "true"),
    ({"ro": "true", "read-only": "true"}, "read-only", "true"),
])
def test_block_config_errors(image, opts, key, value):
    """Every error carries the device, the key as written and the value,
    and its message names all three."""
    if "path" not in opts and opts:
        opts = {"path": image, **opts}
    with pytest.raises(ConfigError) as info:
        BlockBuilder.from_options("blk0", opts)
    err = info.value
    assert (err.device, err.key, err.value) == ("blk0", key, value), str(err)
    assert "'blk0'" in str(err) and repr(key) in str(err)
    if value is not None:
        assert f"value {value!r}" in str(err)


def test_block_lock(image):
    a = BlockBuilder.from_options("a", {"path": image})
    try:
        with pytest.raises(ConfigError) as info:
            BlockBuilder.from_options("b", {"path": image})
        msg = str(info.value)
        assert info.value.key == "lock" and image in msg and f"pid {os.getpid()}" in msg
        with pytest.raises(ConfigError):
            BlockBuilder.from_options("c", {"path": image, "ro": "true"})
        BlockBuilder.from_options("d", {"path": image, "lock": "false"}).close()
    finally:
        a.close()
    # readers share
    r1 = BlockBuilder.from_options("r1", {"path": image, "ro": "true"})
    r2 = BlockBuilder.from_options("r2", {"path": image, "ro": "true"})
    with pytest.raises(ConfigError):
        BlockBuilder.from_options("w", {"path": image})
    r1.close()
    r2.close()
    BlockBuilder.from_options("w", {"path": image}).close()


def test_block_keep_fds_and_close(image):
    b = BlockBuilder.from_options("blk", {"path": image, "vhost": "/x.sock", "bootindex": "1"})
    fds = b.keep_fds()
    assert len(fds) == 1 and os.fstat(fds[0])
    assert b.bind_mounts() == []
    b.close()
    with pytest.raises(OSError):
        os.fstat(fds[0])
    assert b.keep_fds() == []


def test_console_options(tmp_path):
    with pytest.raises(ConfigError, match="key 'type', value 'syslog'"):
        ConsoleBuilder.from_options("con", {"type": "syslog"})
    with pytest.raises(ConfigError, match="needs path="):
        ConsoleBuilder.from_options("con", {"type": "file"})
    with pytest.raises(ConfigError, match="mutually exclusive"):
        ConsoleBuilder.from_options("con", {"input": str(tmp_path / "x"), "stdin": "true"})
    with pytest.raises(ConfigError, match="key 'input', value '"):
        ConsoleBuilder.from_options("con", {"input": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="key 'cols', value '70000'"):
        ConsoleBuilder.from_options("con", {"cols": "70000"})
    sink = ConsoleBuilder.from_options("con", {})
    assert sink.keep_fds() == []
    out = tmp_path / "out.txt"
    f = ConsoleBuilder.from_options("con", {"type": "file", "path": str(out), "hardware": "virtio-console"})
    assert len(f.keep_fds()) == 3 and out.exists()   # path, and path.1, path.2 for rotation (keep=2)
    f.close()
    sock_path = tmp_path / "con.sock"
    u = ConsoleBuilder.from_options("con", {"type": "unix", "path": str(sock_path)})
    assert len(u.keep_fds()) == 1 and sock_path.exists()
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(sock_path))   # bound and listening in the parent already
    c.close()
    u.close()
    assert not sock_path.exists()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        ConsoleBuilder.from_options("con", {"type": "unix", "path": str(tmp_path / "plain")})


def test_rng_options():
    assert RngBuilder.from_options("rng", {}).keep_fds() == []
    with pytest.raises(ConfigError, match="key 'bogus', value '1'"):
        RngBuilder.from_options("rng", {"bogus": "1"})


def test_block_poll_us_bounds_the_queue_polling(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    default = BlockBuilder.from_options("blk", {"path": str(img)})
    off = BlockBuilder.from_options("blk2", {"path": str(img), "poll-us": "0", "lock": "false"})
    try:
        assert default.poll_max_ns == 200_000 and off.poll_max_ns == 0
    finally:
        default.close()
        off.close()
    with pytest.raises(ConfigError, match="key 'poll-us', value '5000'"):
        BlockBuilder.from_options("blk", {"path": str(img), "poll-us": "5000"})
