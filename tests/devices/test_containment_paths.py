"""Finding 4, from a second local user's side: someone who can write a
directory the operator named (world-writable, sticky or not) plants a
symbolic link there pointing at a root-owned file.  The supervisor, as root,
must neither append console output to that file, nor feed it to the guest
as console input, nor serve it as a disk: the builder refuses with a
ConfigError naming the device, the key and the path, and the file is
untouched.  The attacker is a forked process that setuid()s to an
unprivileged uid."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from devices import ConfigError
from devices.block import BlockBuilder
from devices.console import ConsoleBuilder

ATTACKER = 43210          # no account needed: the kernel only knows numbers
SECRET = b"root-owned contents\n" * 100


def as_attacker(fn) -> None:
    """Run ``fn`` in a forked child that dropped to uid/gid ATTACKER."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(ATTACKER)
            os.setuid(ATTACKER)
            fn()
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001
            os.write(2, f"attacker failed: {exc!r}\n".encode())
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacker could not plant its link"


@pytest.fixture(params=[0o1777, 0o777], ids=["sticky", "not-sticky"])
def shared_dir(request):
    """A world-writable directory (like /tmp, or a badly set up log dir)."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root: the supervisor opens files as root and the attacker is a setuid child")
    path = tempfile.mkdtemp(prefix="shared-", dir="/tmp")
    os.chmod(path, request.param)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def precious():
    """A root-owned file outside the shared directory (think /etc/shadow)."""
    d = tempfile.mkdtemp(prefix="rootonly-", dir="/tmp")
    os.chmod(d, 0o755)
    path = os.path.join(d, "precious")
    with open(path, "wb") as f:
        f.write(SECRET)
    os.chmod(path, 0o644)
    st = os.stat(path)
    yield path
    after = os.stat(path)
    with open(path, "rb") as f:
        assert f.read() == SECRET, "the root-owned file was modified"
    assert (after.st_size, after.st_mtime_ns, after.st_uid) == (st.st_size, st.st_mtime_ns, 0)
    shutil.rmtree(d, ignore_errors=True)


def plant(link: str, target: str) -> None:
    as_attacker(lambda: os.symlink(target, link))
    assert os.lstat(link).st_uid == ATTACKER


def test_console_output_symlink_refused(shared_dir, precious):
    link = os.path.join(shared_dir, "console.log")
    plant(link, precious)
    with pytest.raises(ConfigError) as err:
        ConsoleBuilder.from_options("con0", {"type": "file", "path": link})
    msg = str(err.value)
    assert msg.startswith("device 'con0', key 'path', value ") and repr(link) in msg and "symbolic link" in msg, msg


def test_console_rotation_file_symlink_refused(shared_dir, precious):
    """path.1 is as much the supervisor's file as path."""
    link = os.path.join(shared_dir, "console.log.1")
    plant(link, precious)
    with pytest.raises(ConfigError, match=r"device 'con0', key 'path', value '.*console\.log\.1': refused: .* symbolic link"):
        ConsoleBuilder.from_options("con0", {"type": "file", "path": os.path.join(shared_dir, "console.log")})
    assert not os.path.exists(os.path.join(shared_dir, "console.log.2"))


def test_console_output_through_planted_directory_link_refused(shared_dir, precious):
    """A link planted as an intermediate directory is refused too."""
    link = os.path.join(shared_dir, "logs")
    plant(link, os.path.dirname(precious))
    path = os.path.join(link, "precious")
    with pytest.raises(ConfigError, match=r"device 'con0', key 'path', value '.*/logs/precious': refused: .*/logs is a symbolic "
                                          rf"link owned by uid {ATTACKER}"):
        ConsoleBuilder.from_options("con0", {"type": "file", "path": path})


def test_console_output_owned_by_attacker_refused(shared_dir):
    path = os.path.join(shared_dir, "console.log")

    def create() -> None:
        with open(path, "wb") as f:
            f.write(b"mine\n")

    as_attacker(create)
    with pytest.raises(ConfigError, match=rf"device 'con0', key 'path', value '.*': refused: .* is owned by uid {ATTACKER}, not root"):
        ConsoleBuilder.from_options("con0", {"type": "file", "path": path})
    with open(path, "rb") as f:
        assert f.read() == b"mine\n"


def test_console_output_hard_link_refused(shared_dir, precious):
    path = os.path.join(shared_dir, "console.log")
    os.link(precious, path)      # (the kernel's protected_hardlinks stops the attacker making it)
    with pytest.raises(ConfigError, match=r"device 'con0', key 'path', value '.*': refused: .* has 2 hard links"):
        ConsoleBuilder.from_options("con0", {"type": "file", "path": path})


def test_console_input_symlink_refused(shared_dir, precious):
    link = os.path.join(shared_dir, "input")
    plant(link, precious)
    with pytest.raises(ConfigError) as err:
        ConsoleBuilder.from_options("con0", {"type": "sink", "input": link})
    msg = str(err.value)
    assert msg.startswith("device 'con0', key 'input', value ") and repr(link) in msg and f"owned by uid {ATTACKER}" in msg, msg


def test_console_input_hard_link_refused(shared_dir, precious):
    path = os.path.join(shared_dir, "input")
    os.link(precious, path)      # what an attacker could do where protected_hardlinks is off
    with pytest.raises(ConfigError, match=r"device 'con0', key 'input', value '.*': refused: .* has 2 hard links"):
        ConsoleBuilder.from_options("con0", {"type": "sink", "input": path})


def test_block_image_symlink_refused(shared_dir, precious):
    link = os.path.join(shared_dir, "disk.img")
    plant(link, precious)
    with pytest.raises(ConfigError) as err:
        BlockBuilder.from_options("blk0", {"path": link})
    msg = str(err.value)
    assert msg.startswith("device 'blk0', key 'path', value ") and repr(link) in msg and f"owned by uid {ATTACKER}" in msg, msg


def test_root_links_followed_and_image_resolved_once(shared_dir, tmp_path):
    """Links root made (like /dev/disk/by-id/*) are followed; the image is
    resolved once, the builder keeps the resolved path and its fd, and a
    link planted later at the configured path changes nothing."""
    real = tmp_path / "real.img"
    real.write_bytes(bytes(1 << 20))
    link = os.path.join(shared_dir, "disk.img")
    os.symlink(real, link)                     # made by root: followed
    b = BlockBuilder.from_options("blk0", {"path": link})
    try:
        assert b.path == str(real)
        ino = os.fstat(b.fd).st_ino
        os.unlink(link)                        # root's link goes; the attacker's arrives
        plant(link, "/etc/passwd")
        assert os.fstat(b.fd).st_ino == ino == real.stat().st_ino
    finally:
        b.close()


def test_output_created_in_shared_dir_is_roots(shared_dir):
    path = os.path.join(shared_dir, "console.log")
    b = ConsoleBuilder.from_options("con0", {"type": "file", "path": path, "keep": "1"})
    try:
        for p in (path, path + ".1"):
            st = os.lstat(p)
            assert st.st_uid == 0 and st.st_nlink == 1 and (st.st_mode & 0o777) & 0o002 == 0
    finally:
        b.close()


def test_supervisor_config_error_names_device_key_path(shared_dir, precious):
    """Through the supervisor's config loading: the planted link stops the
    start-up with a ConfigError naming the device, the key and the path,
    and no fd is left open."""
    from supervisor.config import ConfigError as SupervisorConfigError
    from supervisor.config import build_config, open_builders

    link = os.path.join(shared_dir, "serial.log")
    plant(link, precious)
    cfg = build_config(ordered_flags=[("serial", f"vhost={shared_dir}/c.sock,type=file,path={link},name=con0")],
                       control_socket=f"{shared_dir}/ctl.sock")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(SupervisorConfigError) as err:
        open_builders(cfg)
    msg = str(err.value)
    assert err.value.device == "con0" and f"key 'path', value {link!r}: refused" in msg and "symbolic link" in msg, msg
    assert set(os.listdir("/proc/self/fd")) == before
