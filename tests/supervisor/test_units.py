"""The pure parts: restart arithmetic, exit classification, log lines,
sd_notify datagrams, the status table, and the /proc/net/unix reading.

Why: the restart policy is timing-dependent, and testing it only through
real crashes would take a minute per case; here a fake clock drives it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket

from supervisor import logs
from supervisor.child import classify
from supervisor.metrics import frontend_state, is_accepted_connection
from supervisor.notify import Notifier
from supervisor.slot import ExitInfo, ExitKind, RestartTracker, should_restart
from supervisor.status import format_table, human_bytes, human_duration

CRASH = ExitInfo(ExitKind.SIGNALED, signal="SIGKILL")
BYE = ExitInfo(ExitKind.DISCONNECTED, code=0)


def test_backoff_doubles_to_ten_seconds_and_resets_after_a_minute_up() -> None:
    t = RestartTracker()
    delays = []
    now = 0.0
    for _ in range(9):
        now += 61  # spaced out: the breaker never trips, but uptime is short
        t.crashes.clear()
        delays.append(t.record_exit(CRASH, now, uptime=1.0)[1])
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    tripped, delay = t.record_exit(CRASH, now + 61, uptime=60.0)
    assert not tripped and delay == 0.1


def test_crash_loop_breaker_five_in_sixty_seconds() -> None:
    t = RestartTracker()
    results = [t.record_exit(CRASH, float(i), uptime=0.1) for i in range(5)]
    assert [r[0] for r in results] == [False, False, False, False, True]
    t.reset()
    assert t.record_exit(CRASH, 10.0, uptime=0.1) == (False, 0.1)
    # five crashes spread over more than 60 s do not trip it
    t = RestartTracker()
    assert not any(t.record_exit(CRASH, i * 16.0, uptime=0.1)[0] for i in range(8))


def test_disconnect_is_not_a_crash() -> None:
    t = RestartTracker()
    for i in range(20):
        assert t.record_exit(BYE, float(i), uptime=0.01) == (False, 0.0)
    assert not t.crashes
    requested = ExitInfo(ExitKind.SIGNALED, signal="SIGTERM", requested=True)
    assert t.record_exit(requested, 1.0, 0.1) == (False, 0.0)


def test_restart_policies() -> None:
    assert should_restart("always", BYE) and should_restart("always", CRASH)
    assert not should_restart("on-failure", BYE) and should_restart("on-failure", CRASH)
    assert not should_restart("never", BYE) and not should_restart("never", CRASH)


def test_classify_plain_wait_statuses() -> None:
    assert classify(0).kind is ExitKind.DISCONNECTED
    assert classify(3 << 8) == ExitInfo(ExitKind.ERROR, code=3)
    assert classify(signal.SIGKILL) == ExitInfo(ExitKind.SIGNALED, signal="SIGKILL")
    assert classify(signal.SIGSYS).kind is ExitKind.SECCOMP


def test_jailed_and_plain_exits_decode_alike() -> None:
    """One decoder (sandbox.exits) for both paths; the jailed device is pid 1,
    so its exit(128 + SIGTERM) is SIGTERM, and a set-up failure needs the
    jail's own message."""
    from sandbox.exits import ExitReason, decode_wait_status
    for status in (0, 3 << 8, signal.SIGKILL, signal.SIGSYS):
        assert ExitInfo.from_reason(decode_wait_status(status, pid1=True)) == classify(status)
    term = ExitInfo.from_reason(decode_wait_status((128 + signal.SIGTERM) << 8, pid1=True))
    assert term.kind is ExitKind.SIGNALED and term.signal == "SIGTERM"
    assert classify((128 + signal.SIGTERM) << 8) == ExitInfo(ExitKind.ERROR, code=128 + signal.SIGTERM)
    sc = ExitInfo.from_reason(decode_wait_status(signal.SIGKILL, violation="ptrace", pid1=True))
    assert sc.kind is ExitKind.SECCOMP and sc.syscall == "ptrace" and "ptrace" in sc.describe()
    jf = ExitInfo.from_reason(decode_wait_status(125 << 8, jail_error="jail step 'pivot_root' failed"))
    assert jf.kind is ExitKind.JAIL_FAILED and "pivot_root" in jf.describe()
    assert decode_wait_status(125 << 8) == ExitReason(ExitKind.ERROR, code=125)


def test_slot_transitions_follow_the_table() -> None:
    """Only the child moves a slot to ready, only the socket to serving."""
    import pytest

    from supervisor.slot import DeviceSlot, IllegalTransition, Request, State

    class Spec:
        name = "rng-0"

    slot = DeviceSlot(spec=Spec())
    child = object()
    assert not slot.frontend(True)                   # no child: nothing to serve
    slot.spawned(child, None, 1.0, 1.0)
    assert slot.state is State.STARTING and slot.spawns == 1 and slot.restarts == 0
    assert not slot.frontend(True)                   # not built yet
    assert not slot.built(object())                  # a stale child's message
    assert slot.built(child) and slot.state is State.READY and not slot.built(child)
    assert slot.frontend(True) and slot.state is State.SERVING
    assert slot.frontend(False) and slot.state is State.READY
    slot.request(Request.RESTART)
    assert slot.child_gone(BYE, 2.0) is Request.RESTART and slot.pending is None and slot.child is None
    slot.fail()
    with pytest.raises(IllegalTransition):
        slot._enter(State.READY)
    slot.spawned(child, None, 3.0, 3.0)
    assert slot.restarts == 1
    with pytest.raises(IllegalTransition):   # "stopped" while a process runs: never
        slot.stop()
    slot.request(Request.STOP)
    assert slot.state is State.STOPPING and not slot.built(child)
    slot.child_gone(BYE, 4.0)
    slot.stop()
    assert slot.state is State.STOPPED


def test_log_lines_text_and_json() -> None:
    buf = io.StringIO()
    logs.setup_logging("text", buf)
    logs.event("block-0", "exit", pid=12, reason="killed by SIGKILL")
    logging.getLogger("devices.block").warning("odd %s", "thing")
    text = buf.getvalue().splitlines()
    assert text[0].rsplit(" ts=", 1)[0] == 'device=block-0 event=exit pid=12 reason="killed by SIGKILL"'
    assert 'device=- event=log level=warning logger=devices.block msg="odd thing"' in text[1]
    buf = io.StringIO()
    logs.setup_logging("json", buf)
    logs.child_line("rng-0", 7, json.dumps({"level": "error", "logger": "vhost", "msg": "boom"}))
    logs.child_line("rng-0", 7, "Traceback (most recent call last):")
    a, b = (json.loads(x) for x in buf.getvalue().splitlines())
    assert a["device"] == "rng-0" and a["event"] == "log" and a["level"] == "error" and a["msg"] == "boom"
    assert b["event"] == "stderr" and b["msg"].startswith("Traceback") and b["pid"] == 7
    logs.setup_logging("text")


def test_notify_datagrams(tmp_path) -> None:
    path = "/tmp/vs-notify-test.sock"
    if os.path.exists(path):
        os.unlink(path)
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    try:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        assert n.enabled and n.watchdog_interval == 1.0
        assert n.ready("3 devices: 3 ready")
        assert rx.recv(100) == b"READY=1\nSTATUS=3 devices: 3 ready"
        n.watchdog()
        assert rx.recv(100) == b"WATCHDOG=1"
        for _ in range(2000):  # a receiver that never reads must not block us
            n.status("x" * 100)
        n.close()
    finally:
        rx.close()
        os.unlink(path)
    off = Notifier({})
    assert not off.enabled and not off.ready() and off.watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_status_table() -> None:
    reply = {"supervisor": {"pid": 1, "uptime": 3725, "sandbox": True, "summary": "1 devices: 1 backoff"},
             "devices": [{"name": "block-0", "type": "block", "socket": "/run/b.sock", "state": "backoff",
                          "backoff_remaining": 0.4, "pid": None, "restarts": 3,
                          "last_exit": {"text": "seccomp: ptrace"}, "uptime": None, "rss": None,
                          "frontend": "no"}]}
    out = format_table(reply)
    assert "up 1h02m" in out and "backoff (0.4s)" in out and "seccomp: ptrace" in out
    assert out.splitlines()[1].split()[:4] == ["NAME", "TYPE", "SOCKET", "STATE"]
    assert human_bytes(22 << 20) == "22.0M" and human_duration(59.94) == "59.9s" and human_duration(None) == "-"


def test_frontend_state_sees_queued_and_accepted() -> None:
    """The listener's accept queue, and an accepted connection shown to the
    parent (as a child's show_frontend does) until its peer hangs up."""
    path = "/tmp/vs-conn-test.sock"
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    lfd, lino = srv.fileno(), os.fstat(srv.fileno()).st_ino
    shown: list[int] = []
    try:
        assert not frontend_state(lfd, shown).connected
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        st = frontend_state(lfd, shown)
        assert st.queued == 1 and st.accepted == 0 and st.describe() == "queued"
        a, _ = srv.accept()
        dup = os.dup(a.fileno())
        assert is_accepted_connection(dup, path, lino)
        shown.append(dup)
        st = frontend_state(lfd, shown)
        assert st.accepted == 1 and st.queued == 0 and st.describe() == "yes"
        c.close()
        assert not frontend_state(lfd, shown).connected   # the peer hung up
        assert shown == []                                 # ... and the duplicate was closed
        a.close()
    finally:
        srv.close()
        os.unlink(path)


def test_only_an_accepted_connection_of_the_listener_counts() -> None:
    """What a hostile child could show instead: the listener itself, the client
    end, a socketpair, a socket of another path, a pipe, a hung-up connection."""
    path, other = "/tmp/vs-conn-test2.sock", "/tmp/vs-conn-test3.sock"
    for p in (path, other):
        if os.path.exists(p):
            os.unlink(p)
    srv, srv2 = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    srv2.bind(other)
    srv2.listen()
    lino = os.fstat(srv.fileno()).st_ino
    c, c2 = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    c.connect(path)
    c2.connect(other)
    a, _ = srv.accept()
    a2, _ = srv2.accept()
    sp1, sp2 = socket.socketpair()
    r, w = os.pipe()
    try:
        assert is_accepted_connection(a.fileno(), path, lino)
        for fd in (srv.fileno(), c.fileno(), a2.fileno(), sp1.fileno(), r):
            assert not is_accepted_connection(fd, path, lino), fd
        c.close()
        assert not is_accepted_connection(a.fileno(), path, lino)      # peer gone
    finally:
        for s_ in (srv, srv2, c2, a, a2, sp1, sp2):
            s_.close()
        os.close(r)
        os.close(w)
        for p in (path, other):
            os.unlink(p)


def test_log_budget_drops_a_flood_and_counts_it() -> None:
    b = logs.LogBudget(rate=10.0, burst=5.0, byte_rate=1000.0, byte_burst=100.0)
    allowed = sum(b.admit(b"x") for _ in range(100))
    assert allowed in (5, 6) and b.exhausted
    assert b.report_due(final=True) == (100 - allowed, 100 - allowed) and b.report_due(final=True) is None
    b.refill(b.stamp + 1.0)     # a second later the buckets have refilled (up to the bursts)
    assert sum(b.admit(b"x" * 30) for _ in range(10)) == 3      # 100 bytes of burst: three 30-byte lines
    assert b.total_dropped == 100 - allowed + 7


def test_clean_exits_burst_then_one_per_second() -> None:
    from supervisor.slot import CLEAN_BURST, CleanExitLimiter
    lim = CleanExitLimiter()
    assert [lim.delay(0.0) for _ in range(CLEAN_BURST)] == [0.0] * CLEAN_BURST
    now, starts = 0.0, []
    for _ in range(20):            # each next child starts when its delay is over
        now += lim.delay(now)
        starts.append(now)
    assert starts[-1] >= 19.0 and all(b - a >= 0.999 for a, b in zip(starts, starts[1:]))
    assert lim.summary_due(now) == (CLEAN_BURST + 20, 20) and lim.summary_due(now) is None


def test_crash_loop_backoff_doubles_to_five_minutes() -> None:
    from supervisor.slot import CRASH_LOOP_MAX
    t = RestartTracker()
    out = [t.record_exit(CRASH, float(i), uptime=0.1) for i in range(16)]
    assert [o[0] for o in out[:5]] == [False] * 4 + [True]
    assert out[4][1] == 1.6 and out[5][1] == 3.2           # past the breaker: still doubling
    assert out[-1] == (True, CRASH_LOOP_MAX)


def test_containment_options_parsed_and_bad_values_name_the_key(sup_dir: str) -> None:
    import pytest

    from supervisor.config import ConfigError, build_config, load_toml
    cfg = build_config(ordered_flags=[("rng", f"vhost={sup_dir}/a.sock,watchdog-sec=2.5,crash-loop=fail"),
                                      ("rng", f"vhost={sup_dir}/b.sock")], control_socket=f"{sup_dir}/c.sock")
    a, b = cfg.devices
    assert (a.watchdog_sec, a.crash_loop, a.jail_user) == (2.5, "fail", None)
    assert (b.watchdog_sec, b.crash_loop) == (5.0, "backoff") and cfg.uid_range is None
    for opt, key in (("watchdog-sec=soon", "watchdog-sec"), ("watchdog-sec=0.01", "watchdog-sec"),
                     ("crash-loop=panic", "crash-loop")):
        with pytest.raises(ConfigError) as ei:
            build_config(ordered_flags=[("rng", f"vhost={sup_dir}/a.sock,{opt}")], control_socket=f"{sup_dir}/c.sock")
        assert (ei.value.key, ei.value.device) == (key, "rng-0"), str(ei.value)
    path = os.path.join(sup_dir, "s.toml")
    for text in ('uid-range = "5-1"', 'uid-range = "100-200"', 'uid-range = "lots"'):
        with open(path, "w") as f:
            f.write(f"[supervisor]\n{text}\n")
        with pytest.raises(ConfigError) as ei:
            load_toml(path)
        assert ei.value.key == "uid-range", str(ei.value)
    with open(path, "w") as f:
        f.write('[supervisor]\nuid-range = "2000000000-2000000009"\n')
    assert load_toml(path).uid_range == (2000000000, 10)


def test_uid_allocation_one_id_per_device_skipping_fixed_ones() -> None:
    import pytest

    from sandbox.idrange import IdRange, IdRangeError, allocate, users_of
    rng = IdRange(5000, 4)
    got = allocate(rng, ["a", "b", "c", "d"], {"b": (5001, 5001)})
    assert got == {"a": (5000, 5000), "b": (5001, 5001), "c": (5002, 5002), "d": (5003, 5003)}
    with pytest.raises(IdRangeError):
        allocate(rng, ["a", "b", "c", "d", "e"], {})
    assert any("process" in u for u in users_of(IdRange(0, 1)))      # root runs processes
    assert any("'nobody'" in u for u in users_of(IdRange(65534, 1)))
