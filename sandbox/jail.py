"""enter_jail(): the in-child sequence, and the pid-namespace forwarder.

Process layout with namespaces (the default):

    supervisor (P) --fork--> forwarder (F) --fork--> device (D, pid 1 of its pid ns)

F unshares user+pid+mount+net+ipc+uts+cgroup namespaces; P writes F's uid/gid
maps (pipe handshake over a SEQPACKET socketpair); F forks D, which is pid 1 of
the new pid namespace and finishes the jail (mounts, pivot_root, ids, caps,
prctl flags, rlimits, fds, seccomp last).  F stays outside that pid namespace
as a minimal forwarder: it forwards SIGTERM & co to D, reaps it, and exits with
D's status (same exit code, or dies of the same signal), so the pid/pidfd the
supervisor holds is a process whose exit status is the device's.  Why not let
P be a child subreaper: it would change reaping for the whole supervisor, and
D could not set PDEATHSIG against a parent that exits on purpose.

Everything used after pivot_root (this module's imports, the BPF programs, the
/dev/null fd) is prepared before fork.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from . import fds, libc, limits, mounts, privileges, userns
from .compiler import compile_policy
from .config import JailConfig, JailError
from .data import policy_dir

NS_FLAGS = (libc.CLONE_NEWUSER | libc.CLONE_NEWPID | libc.CLONE_NEWNS | libc.CLONE_NEWNET
            | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS | libc.CLONE_NEWCGROUP)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
POLICY_DIR = policy_dir()
FORWARDER_POLICY = os.path.join(POLICY_DIR, "forwarder.policy")

# handshake messages on the SEQPACKET channel
MSG_UNSHARED = b"unshared"
MSG_MAPPED = b"mapped"
MSG_READY = b"ready"
MSG_DEVICE = b"device:"
MSG_ERROR = b"error:"


@dataclass
class Prepared:
    """Everything computed before fork, so nothing is loaded after pivot_root."""

    config: JailConfig
    ids: userns.IdMap
    limits: dict[int, int]
    device_bpf: bytes | None
    notify: bool
    forwarder_bpf: bytes | None
    parent_pid: int
    devnull: int = -1
    keep: set[int] = field(default_factory=set)


def prepare(config: JailConfig, notify: bool, channel_fd: int | None) -> Prepared:
    """Compile the filters and plan ids/limits in the parent (may raise PolicyError)."""

    device_bpf = forwarder_bpf = None
    notify = notify and config.seccomp_policy is not None and not config.seccomp_log
    if config.seccomp_policy is not None:
        mode = "log" if config.seccomp_log else ("notify" if notify else "kill-process")
        extra = (("sendmsg", 0, channel_fd),) if notify and channel_fd is not None else ()
        device_bpf = compile_policy(config.seccomp_policy, mode, extra).bpf
        if config.namespaces:
            forwarder_bpf = compile_policy(FORWARDER_POLICY, "log" if config.seccomp_log else "kill-process").bpf
    return Prepared(config, userns.plan_ids(config), limits.planned_limits(config), device_bpf, notify,
                    forwarder_bpf, os.getpid())


def _send(ch: socket.socket | None, msg: bytes) -> None:
    if ch is not None:
        try:
            ch.send(msg)
        except OSError:
            pass


def report_error(ch: socket.socket | None, err: BaseException) -> None:
    """Best effort: the parent learns why set-up failed, not only the status."""

    _send(ch, MSG_ERROR + str(err).encode(errors="replace")[:3000])


def _recv_expect(ch: socket.socket, expected: bytes, step: str) -> None:
    msg = ch.recv(4096)
    if msg == expected:
        return
    if msg.startswith(MSG_ERROR):
        text = msg[len(MSG_ERROR):].decode(errors="replace")
        raise JailError(step, 0, text.removeprefix(f"jail step {step!r} failed: "))
    raise JailError(step, errno.EPROTO, f"handshake: expected {expected!r}, got {msg!r}")


DEVICE_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _device_signal_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def install_device_signal_handlers() -> None:
    """SIGTERM/SIGINT/SIGHUP raise SystemExit(128+sig) in the device.

    The device is pid 1 of its pid namespace: a signal without a handler is
    dropped there, even when sent from outside, so the forwarded SIGTERM would
    do nothing.  The handler unwinds (finally blocks run); a device may
    install its own (e.g. loop.add_signal_handler).
    """

    for sig in DEVICE_EXIT_SIGNALS:
        signal.signal(sig, _device_signal_exit)


def _reset_signal_state() -> None:
    """A fork inherits the parent's blocked-signal mask and signal wakeup fd
    (a supervisor blocking SIGTERM for its own loop would leave the device
    deaf to it, and the wakeup fd number now names some other descriptor)."""

    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread: nothing was set from here
        pass
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _common_start(prep: Prepared, ch: socket.socket | None) -> None:
    """First steps in the forked child: parent-death signal, stdio, fd hygiene."""

    cfg = prep.config
    privileges.set_parent_death_signal(prep.parent_pid)
    _reset_signal_state()
    prep.devnull = fds.open_devnull()
    keep = set(cfg.keep_fds)
    fds.setup_stdio(prep.devnull, cfg.log_fd, keep)
    internal = {0, 1, 2, prep.devnull} | ({ch.fileno()} if ch is not None else set())
    fds.close_all_except(keep | internal)
    prep.keep = keep
    os.chdir("/")


def _drop_privileges(prep: Prepared, name: str) -> None:
    privileges.drop_capabilities()
    privileges.set_process_flags(name)


def _finish_device(prep: Prepared, ch: socket.socket | None) -> None:
    """Last steps of the device: rlimits, close everything else, seccomp."""

    limits.apply_limits(prep.limits)
    os.close(prep.devnull)
    extra = {ch.fileno()} if ch is not None else set()
    fds.close_all_except(prep.keep | {0, 1, 2} | extra)
    if prep.device_bpf is None:
        _send(ch, MSG_READY)
        if ch is not None:
            ch.close()
        return
    listener = libc.seccomp_load(prep.device_bpf, new_listener=prep.notify)
    # From here on only the policy (plus sendmsg on the channel) is allowed.
    if prep.notify and ch is not None:
        socket.send_fds(ch, [MSG_READY], [listener])
        os.close(listener)  # the device must never answer its own notifications
    else:
        _send(ch, MSG_READY)
    if ch is not None:
        ch.close()


def _forbid_nested_user_namespaces() -> None:
    """The jail's own user namespace gets a zero limit on nested ones.

    unshare(CLONE_NEWUSER) needs no capability, and a fresh user namespace
    hands its creator every capability inside it (more kernel surface to
    reach).  The seccomp policies refuse unshare/clone flags anyway; this
    holds even for a jail without a policy.  /proc/sys/user/* is per user
    namespace and still the host's /proc here, before pivot_root.
    """

    try:
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0\n")
    except OSError as e:
        raise JailError("max_user_namespaces", e.errno or 0, str(e)) from e


def _device_in_namespaces(prep: Prepared, ch: socket.socket | None, alive_r: int,
                          root_fd: int | None, sources: list) -> None:
    cfg = prep.config
    privileges.lock_securebits()
    privileges.switch_ids(prep.ids.inner_uid, prep.ids.inner_gid)
    # after the id switch: commit_creds() clears PDEATHSIG on uid/gid changes
    privileges.set_parent_death_signal(None, alive_r)
    os.close(alive_r)
    _forbid_nested_user_namespaces()
    mounts.build_and_pivot(cfg, root_fd, sources)
    os.umask(0o077)  # anything a device creates in a writable bind mount is private
    libc.sethostname(cfg.name)
    _drop_privileges(prep, cfg.name)
    _finish_device(prep, ch)


def _mirror_exit(status: int) -> None:
    """Leave with the device's status: same code, or die of the same signal."""

    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these cannot be caught or blocked anyway
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # only if the signal could not kill us (SIGSTOP & co)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _forwarder(prep: Prepared, device_pid: int, alive_w: int) -> None:
    """F after forking D: confine itself too, then forward signals and reap."""

    cfg = prep.config

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(device_pid, signum)
        except OSError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    privileges.lock_securebits()
    privileges.switch_ids(prep.ids.inner_uid, prep.ids.inner_gid)
    privileges.set_parent_death_signal(prep.parent_pid)
    _drop_privileges(prep, ("i:" + cfg.name)[:15])
    os.close(prep.devnull)
    fds.close_all_except({0, 1, 2, alive_w})  # alive_w: D's proof that F lives
    limits.apply_limits(limits.forwarder_limits(prep.limits))
    if prep.forwarder_bpf is not None:
        libc.seccomp_load(prep.forwarder_bpf, new_listener=False)
    while True:
        try:
            _pid, status = os.waitpid(device_pid, 0)
        except ChildProcessError:
            os._exit(1)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            _mirror_exit(status)


def _enter_namespaces(prep: Prepared, ch: socket.socket, helper: int | None) -> None:
    """F: unshare, get mapped (by the parent or a helper), fork D.  Returns only in D."""

    cfg = prep.config
    privileges.drop_supplementary_groups()
    # An ordinary-user parent can only write /proc/F/uid_map if F is dumpable
    # (a parent that switched uids left it 0); it is cleared again before the
    # device code runs.
    libc.prctl(libc.PR_SET_DUMPABLE, 1, step="dumpable")
    libc.unshare(NS_FLAGS)
    # after unshare (a bind source must belong to our mount namespace), while F
    # still has the parent's file-system identity
    root_fd, sources = mounts.open_sources(cfg)
    ch.send(MSG_UNSHARED)
    _recv_expect(ch, MSG_MAPPED, "uid_map")
    device_ch: socket.socket | None = ch
    if helper is not None:
        os.waitpid(helper, 0)
        ch.close()
        device_ch = None
    alive_r, alive_w = os.pipe()
    # Signals for the device that reach F before its forwarding handlers are
    # installed stay pending instead of killing F, then get forwarded.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    pid = os.fork()
    if pid == 0:
        # After the fork: at-fork hooks of the embedding program may have
        # reset dispositions in this child.
        install_device_signal_handlers()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        os.close(alive_w)
        _device_in_namespaces(prep, device_ch, alive_r, root_fd, sources)
        return
    # forwarder: never returns into the caller's code
    try:
        os.close(alive_r)
        if device_ch is not None:
            _send(device_ch, MSG_DEVICE + str(pid).encode())
            device_ch.close()
        _forwarder(prep, pid, alive_w)
    except BaseException as e:
        try:
            sys.stderr.write(f"{cfg.name}: forwarder: {e}\n")
            sys.stderr.flush()
        finally:
            os.kill(pid, signal.SIGKILL)
            os._exit(1)
    os._exit(1)


def run_jail(prep: Prepared, ch: socket.socket | None, helper: int | None = None) -> None:
    """The whole in-child sequence; returns in the jailed device process."""

    _common_start(prep, ch)
    if prep.config.namespaces:
        assert ch is not None
        _enter_namespaces(prep, ch, helper)
        return
    # No namespaces (debugging): ids, caps, flags, limits, fds, seccomp only.
    privileges.drop_supplementary_groups()
    if os.geteuid() == 0:
        privileges.lock_securebits()
        privileges.switch_ids(prep.ids.inner_uid, prep.ids.inner_gid)
        privileges.set_parent_death_signal(prep.parent_pid)
    _drop_privileges(prep, prep.config.name)
    _finish_device(prep, ch)


def _map_helper(sock: socket.socket, target_pid: int, ids: userns.IdMap) -> None:
    """Stand-alone enter_jail: a helper child plays the parent's map-writer role."""

    try:
        if sock.recv(64) != MSG_UNSHARED:
            os._exit(1)
        try:
            userns.write_maps(target_pid, ids)
        except JailError as e:
            sock.send(MSG_ERROR + str(e).encode())
            os._exit(1)
        sock.send(MSG_MAPPED)
    finally:
        os._exit(0)


def enter_jail(config: JailConfig) -> None:
    """Jail the calling (freshly forked, single-threaded) process.

    Stand-alone use: seccomp violations kill the process (no parent listens)
    and a helper child writes the id maps.  With namespaces the calling process
    becomes the forwarder and never returns; enter_jail returns in the device,
    pid 1 of the new pid namespace.
    """

    prep = prepare(config, notify=False, channel_fd=None)
    prep.parent_pid = os.getppid()
    if not config.namespaces:
        run_jail(prep, None)
        return
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    me = os.getpid()
    helper = os.fork()
    if helper == 0:
        mine.close()
        _map_helper(theirs, me, prep.ids)
    theirs.close()
    run_jail(prep, mine, helper)
