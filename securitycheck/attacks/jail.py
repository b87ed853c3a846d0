"""Class 1, jail: a compromised device child tries to get out.

Each attack runs inside a device child spawned by the supervisor's own code
path (``JailProber``): same jail arguments, same resources, same seccomp
policy as the device type in production.  Two layers are attacked apart:
with the device's policy, a forbidden system call must kill the child and be
reported with its name; with the policy taken away, the namespaces, empty
read-only root, dropped privileges and a network with nothing up must still
deny each attempt (each layer holds on its own).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from ..catalog import CaseFailed, check, register, Case
from ..devtypes import TYPES

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

# x86_64 system call numbers (the check runs where the supervisor runs)
NR = {"ptrace": 101, "bpf": 321, "open_by_handle_at": 304, "finit_module": 313, "keyctl": 250,
      "perf_event_open": 298, "userfaultfd": 323, "chroot": 161, "pivot_root": 155, "setns": 308,
      "process_vm_writev": 311, "kexec_load": 246, "personality": 135, "name_to_handle_at": 303,
      "init_module": 175, "iopl": 172, "syslog": 103, "sethostname": 170, "clone": 56,
      "io_uring_setup": 425, "clone3": 435, "kill": 62, "reboot": 169, "setuid": 105,
      "add_key": 248, "capset": 126, "mount": 165, "umount2": 166, "unshare": 272,
      "madvise": 28, "socket": 41, "socketpair": 53, "setsockopt": 54, "ioctl": 16, "tgkill": 234}


def _sys(name: str, *args: int) -> int:
    """A raw system call; OSError with the errno when it fails."""
    cargs = [ctypes.c_long(a) for a in args]
    res = _libc.syscall(ctypes.c_long(NR[name]), *cargs)
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


def _listener_fd() -> int:
    """The inherited listening vhost-user socket (the only socket a device holds)."""
    for fd in range(3, 256):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
        except OSError:
            continue
    return -1


def _mprotect_exec() -> None:
    m = mmap.mmap(-1, 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    _libc.mprotect(addr, 4096, mmap.PROT_READ | mmap.PROT_EXEC)


def _connect_inet_on_listener() -> None:
    fd = _listener_fd()
    addr = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(80), socket.inet_aton("127.0.0.1"))
    _libc.connect(fd, addr, len(addr))


#: system call -> (what it tries, the attempt); each must kill the child under every device policy.
SECCOMP_KILLS: dict[str, tuple[str, Callable[[], Any]]] = {
    "socket": ("open an IPv4 socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
    "execve": ("execute /bin/sh", lambda: os.execv("/bin/sh", ["sh"])),
    "ptrace": ("PTRACE_ATTACH to pid 1", lambda: _sys("ptrace", 16, 1, 0, 0)),
    "mount": ("mount a tmpfs over /", lambda: _sys("mount", 0, 0, 0, 0, 0)),
    "bpf": ("load a BPF program", lambda: _sys("bpf", 5, 0, 0)),
    "clone": ("fork a process (clone without CLONE_THREAD)", lambda: os.fork()),
    "mmap": ("map executable memory", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)),
    "mprotect": ("make a mapping executable", _mprotect_exec),
    "setuid": ("setuid(0)", lambda: _sys("setuid", 0)),
    "unshare": ("unshare a new user namespace", lambda: _sys("unshare", 0x10000000)),
    "ioctl": ("TIOCSTI: type into the controlling terminal", lambda: _libc.ioctl(2, 0x5412, ctypes.c_char_p(b"x"))),
    "connect": ("connect the inherited listener to 127.0.0.1:80", _connect_inet_on_listener),
    "kill": ("signal every process it can see", lambda: _sys("kill", -1, 0)),
    "tgkill": ("SIGKILL a thread of pid 1 (not a fatal-signal re-raise)", lambda: _sys("tgkill", 1, 1, 9)),
    "open_by_handle_at": ("open a file by handle (the shocker escape)", lambda: _sys("open_by_handle_at", 3, 0, 0)),
    "name_to_handle_at": ("get a file handle of /", lambda: _sys("name_to_handle_at", -100, 0, 0, 0, 0)),
    "finit_module": ("load a kernel module", lambda: _sys("finit_module", 0, 0, 0)),
    "keyctl": ("join a kernel keyring", lambda: _sys("keyctl", 1, 0)),
    "add_key": ("add a key to a kernel keyring", lambda: _sys("add_key", 0, 0, 0, 0, 0)),
    "perf_event_open": ("open a perf event", lambda: _sys("perf_event_open", 0, 0, -1, -1, 0)),
    "userfaultfd": ("create a userfaultfd (race amplifier)", lambda: _sys("userfaultfd", 0)),
    "chroot": ("chroot", lambda: _sys("chroot", 0)),
    "pivot_root": ("pivot_root", lambda: _sys("pivot_root", 0, 0)),
    "setns": ("join another namespace", lambda: _sys("setns", 0, 0)),
    "process_vm_writev": ("write another process's memory", lambda: _sys("process_vm_writev", 1, 0, 0, 0, 0, 0)),
    "kexec_load": ("load a new kernel", lambda: _sys("kexec_load", 0, 0, 0, 0)),
    "personality": ("change the execution domain (READ_IMPLIES_EXEC)", lambda: _sys("personality", 0x0400000)),
    "socketpair": ("create an IPv4 socket pair", lambda: _sys("socketpair", socket.AF_INET, socket.SOCK_STREAM, 0, 0)),
    "setsockopt": ("set a TCP option on the listener", lambda: _sys("setsockopt", _listener_fd(), 6, 1, 0, 0)),
    "madvise": ("MADV_HWPOISON a page", lambda: _sys("madvise", 0, 4096, 100)),
}


def _seccomp_case(type_name: str, syscall: str, tries: str, attempt: Callable[[], Any]) -> Case:
    def run(env: Any) -> str:
        res = env.probe().run(type_name, attempt)
        if res.exit_kind == "seccomp" and res.syscall == syscall:
            return f"child {res.exit_text}"
        raise CaseFailed(f"not killed by seccomp for {syscall}: {res.exit_text}; attempt returned {res.result}")
    return Case(f"jail.seccomp.{syscall}.{type_name}", "jail", type_name, f"{tries} under {type_name}.policy",
                f"killed by seccomp: {syscall}", run)


# ---------------------------------------------------------------------------
# The errno answers of the policy (the child lives on, the call fails).

def _errno_of(fn: Callable[[], Any]) -> Any:
    try:
        fn()
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, e.errno)


POLICY_ERRNOS: dict[str, tuple[str, Callable[[], Any], tuple[str, ...]]] = {
    "open-host-files": ("open /etc/shadow, /etc/passwd, /proc/self/mem, /proc/self/status, /dev/mem, /dev/null, "
                        "/sys/kernel, /",
                        lambda: sorted({_errno_of(lambda p=p: os.close(os.open(p, os.O_RDONLY)))
                                        for p in ("/etc/shadow", "/etc/passwd", "/proc/self/mem", "/proc/self/status",
                                                  "/dev/mem", "/dev/null", "/sys/kernel", "/")}),
                        ("ENOENT",)),
    "io_uring": ("set up an io_uring (kernel attack surface)", lambda: _errno_of(lambda: _sys("io_uring_setup", 8, 0)),
                 ("ENOSYS",)),
    "clone3": ("clone3 (flags behind a pointer seccomp cannot read)", lambda: _errno_of(lambda: _sys("clone3", 0, 0)),
               ("ENOSYS",)),
}


def _policy_errno_case(type_name: str, key: str, tries: str, fn: Callable[[], Any], want: tuple[str, ...]) -> Case:
    def run(env: Any) -> str:
        res = env.probe().run(type_name, fn)
        got = res.result.get("ok") if isinstance(res.result, dict) else res.result
        if isinstance(got, list):
            ok = set(got) <= set(want)
        else:
            ok = got in want
        check(res.exit_kind == "disconnected" and ok,
              f"attempt returned {got}, child {res.exit_text}")
        return f"{got}; child lives on ({res.exit_text})"
    return Case(f"jail.policy.{key}.{type_name}", "jail", type_name, f"{tries} under {type_name}.policy",
                f"fails with {'/'.join(want)}, child not killed", run)


# ---------------------------------------------------------------------------
# The jail without its seccomp filter: every other layer on its own.

_HOST_ABSTRACT = b"\0vhost-seccheck-host-%d" % os.getpid()


def _socket_errno(family: int, kind: int, addr: Any) -> Any:
    s = socket.socket(family, kind)
    s.settimeout(1.0)
    try:
        s.connect(addr)
        return "connected"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    finally:
        s.close()


def _lo_up() -> Any:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        import fcntl
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH14x", b"lo", 1))   # SIOCSIFFLAGS IFF_UP
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, e.errno)
    finally:
        s.close()


def _escape_root() -> Any:
    os.chdir("/")
    for _ in range(8):
        os.chdir("..")
    return sorted(os.listdir("."))


def _raise_caps() -> Any:
    import prctl
    try:
        prctl.cap_effective.sys_admin = True
        return "allowed"
    except (OSError, ValueError) as e:
        return errno.errorcode.get(getattr(e, "errno", 0) or 0, "EPERM")


#: key -> (class of attack, what it tries, attempt, acceptable answers)
LAYER_ATTACKS: dict[str, tuple[str, Callable[[], Any], tuple[Any, ...]]] = {
    # files
    "files.read-host-passwd": ("read /etc/passwd", lambda: _errno_of(lambda: open("/etc/passwd").read()), ("ENOENT",)),
    "files.list-root": ("list / for host files", lambda: sorted(os.listdir("/")), ([],)),
    "files.write-root": ("create a file in /", lambda: _errno_of(lambda: open("/planted", "w").close()), ("EROFS",)),
    "files.mknod-disk": ("create a block device node for the host disk",
                         lambda: _errno_of(lambda: os.mknod("/sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))),
                         ("EROFS", "EPERM")),
    "files.symlink": ("plant a symlink in /", lambda: _errno_of(lambda: os.symlink("/etc", "/etc-link")), ("EROFS",)),
    "files.dotdot-escape": ("chdir('..') out of the pivoted root", _escape_root, ([],)),
    "files.proc-mem": ("open /proc/1/mem", lambda: _errno_of(lambda: os.open("/proc/1/mem", os.O_RDWR)), ("ENOENT",)),
    # network
    "net.tcp-host": ("connect to 127.0.0.1:22 on the host", lambda: _socket_errno(socket.AF_INET, socket.SOCK_STREAM,
                                                                                ("127.0.0.1", 22)),
                     ("ENETUNREACH", "ECONNREFUSED", "EHOSTUNREACH")),
    "net.udp-out": ("send a UDP datagram to 8.8.8.8:53", lambda: _errno_of(
        lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))), ("ENETUNREACH",)),
    "net.abstract-unix": ("connect to a host abstract Unix socket the check listens on",
                          lambda: _socket_errno(socket.AF_UNIX, socket.SOCK_STREAM, _HOST_ABSTRACT), ("ECONNREFUSED",)),
    "net.lo-up": ("bring the loopback interface up", _lo_up, ("EPERM",)),
    "net.packet-socket": ("open a raw packet socket", lambda: _errno_of(
        lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)), ("EPERM", "EAFNOSUPPORT")),
    "net.interfaces": ("find an interface other than lo", lambda: [n for _, n in socket.if_nameindex()], (["lo"],)),
    # processes
    "proc.signal-host-pid": ("signal the check's own host pid", lambda: _errno_of(lambda: os.kill(_HOST_PID, 0)),
                             ("ESRCH",)),
    "proc.signal-all": ("kill(-1): signal every visible process", lambda: _errno_of(lambda: os.kill(-1, 0)), ("ESRCH",)),
    "proc.ptrace-self-parent": ("PTRACE_ATTACH to its parent (the forwarder)",
                                lambda: _errno_of(lambda: _sys("ptrace", 16, os.getppid() or 1, 0, 0)),
                                ("ESRCH", "EPERM")),
    # privilege
    "priv.setuid-root": ("setuid(0)", lambda: _errno_of(lambda: os.setuid(0)), ("EPERM", "EINVAL")),
    "priv.setgroups": ("setgroups([0])", lambda: _errno_of(lambda: os.setgroups([0])), ("EPERM",)),
    "priv.capset": ("raise CAP_SYS_ADMIN", _raise_caps, ("EPERM",)),
    "priv.sethostname": ("set the hostname", lambda: _errno_of(lambda: _sys("sethostname", 0, 0)), ("EPERM",)),
    # namespaces
    "ns.unshare-user": ("unshare a nested user namespace", lambda: _errno_of(lambda: _sys("unshare", 0x10000000)),
                        ("EPERM", "EUSERS", "ENOSPC")),
    "ns.unshare-mount": ("unshare a mount namespace", lambda: _errno_of(lambda: _sys("unshare", 0x00020000)),
                         ("EPERM",)),
    "ns.mount-tmpfs": ("mount a tmpfs over /", lambda: _errno_of(lambda: _libc_call("mount", b"tmpfs", b"/", b"tmpfs", 0, None)),
                       ("EPERM",)),
    "ns.umount-root": ("unmount / to reveal what is below", lambda: _errno_of(
        lambda: _libc_umount("/")), ("EPERM", "EINVAL")),
    # kernel attack surface
    "kernel.bpf": ("create a BPF map", lambda: _errno_of(lambda: _bpf_map_create()), ("EPERM",)),
    "kernel.module": ("load a kernel module", lambda: _errno_of(lambda: _sys("finit_module", 0, 0, 0)),
                      ("EPERM", "EBADF", "ENOSYS")),   # ENOSYS: no module support at all
    "kernel.userfaultfd": ("create a userfaultfd", lambda: _errno_of(lambda: _sys("userfaultfd", 0)), ("EPERM",)),
    "kernel.syslog": ("read the kernel log", lambda: _errno_of(lambda: _sys("syslog", 3, 0, 0)), ("EPERM",)),
    "kernel.iopl": ("raise the I/O privilege level", lambda: _errno_of(lambda: _sys("iopl", 3)), ("EPERM", "ENOSYS")),
}

_HOST_PID = os.getpid()


def _libc_umount(path: str) -> None:
    _libc_call("umount2", path.encode(), 2)   # MNT_FORCE


def _libc_call(name: str, *args: Any) -> int:
    res = getattr(_libc, name)(*args)
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


_BPF_ATTR = ctypes.create_string_buffer(struct.pack("=IIII", 2, 4, 4, 1) + bytes(112))   # an array map


def _bpf_map_create() -> None:
    _sys("bpf", 0, ctypes.addressof(_BPF_ATTR), 128)


def _all_layer_attacks() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (_tries, fn, _ok) in LAYER_ATTACKS.items():
        t0 = time.monotonic()
        try:
            out[key] = fn()
        except Exception as e:  # noqa: BLE001
            out[key] = f"raised {type(e).__name__}: {e}"
        out[key + "#t"] = time.monotonic() - t0
    return out


def _layer_results(env: Any, type_name: str) -> dict[str, Any]:
    cache = env.cache.setdefault("jail.layers", {})
    if type_name not in cache:
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            host.bind(_HOST_ABSTRACT)
            host.listen(1)
            res = env.probe().run(type_name, _all_layer_attacks, seccomp=False)
        finally:
            host.close()
        if not isinstance(res.result, dict) or "ok" not in res.result:
            raise CaseFailed(f"the unfiltered jail child did not report: {res.exit_text}, {res.result}")
        cache[type_name] = res.result["ok"]
    return cache[type_name]


def _layer_case(type_name: str, key: str, tries: str, want: tuple[Any, ...]) -> Case:
    def run(env: Any) -> str:
        got = _layer_results(env, type_name)[key]
        check(got in want, f"{got!r} (wanted one of {want})")
        return f"{got}"
    kind = key.split(".", 1)[0]
    return Case(f"jail.layer.{key}.{type_name}", "jail", type_name,
                f"{tries} ({kind}; {type_name} jail without its seccomp filter)",
                " or ".join(str(w) for w in want), run)


for _t in TYPES:
    for _sc, (_tries, _fn) in SECCOMP_KILLS.items():
        register(_seccomp_case(_t, _sc, _tries, _fn))
    for _k, (_tries, _fn, _want) in POLICY_ERRNOS.items():
        register(_policy_errno_case(_t, _k, _tries, _fn, _want))
    for _k, (_tries, _fn, _want) in LAYER_ATTACKS.items():
        register(_layer_case(_t, _k, _tries, _want))
