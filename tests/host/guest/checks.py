"""Runs inside the booted Debian 12 guest (systemd 252 as PID 1, cgroup v2), as
host-test.service, with the venv python of the installed package.

Each check prints ``CHECK n PASS: ...`` or ``CHECK n FAIL: ...`` (details
indented) on the serial console; the host harness collects them.  The client
is the project's own front-end driver (connection.frontend).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib

from frontend.vhost_user import VhostUserFrontend
from frontend.virtio_blk import BlockDriver

UNIT = "vhost-supervisor.service"
SERVICE_USER = "vhost-supervisor"
RUN = "/run/vhost-supervisor"
STATE = "/var/lib/vhost-supervisor"
DEVICES = ("blk0", "blk1")
IMAGE_SIZE = 64 << 20
T0 = time.monotonic()


def say(text: str) -> None:
    print(text, flush=True)


def detail(text: str) -> None:
    for line in str(text).rstrip().splitlines():
        say(f"  {line}")


def sh(cmd: str, check: bool = True, timeout: float = 120) -> str:
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd!r} exited {p.returncode}: {p.stdout}{p.stderr}")
    return p.stdout


def show(*props: str) -> dict[str, str]:
    out = sh(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status() -> dict[str, dict]:
    out = sh("/opt/vhost-supervisor/bin/vhost-supervisor status --json")
    return {d["name"]: d for d in json.loads(out)["devices"]}


def wait_for(pred, timeout: float, what: str, interval: float = 0.2):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - a supervisor between lives
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout}s (last: {last!r})")


def journal(*match: str, since_cursor: str | None = None) -> list[dict]:
    cmd = f"journalctl -o json --no-pager -u {UNIT} " + " ".join(match)
    return [json.loads(ln) for ln in sh(cmd, check=False).splitlines() if ln.startswith("{")]


# ------------------------------------------------------------------ client


class Writer(threading.Thread):
    """A VMM-like client: write a pattern, read it back, verify; forever.

    It keeps its guest memory, queue and inflight region across back-end
    deaths and reconnects like QEMU with reconnect does, so a request in flight
    when the device dies is finished by the next child.  A failed request is one
    that completes with an error status or wrong data, or never completes.
    """

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True, name=f"writer-{name}")
        self.name_ = name
        self.path = f"{RUN}/{name}.sock"
        self.stop_flag = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.reconnects = 0
        self.fe: VhostUserFrontend | None = None

    def _connect(self) -> BlockDriver:
        fe = VhostUserFrontend.connect(self.path, timeout=60)
        fe.negotiate()
        fe.setup_memory(8 << 20)
        fe.get_inflight(1, 64)
        q = fe.setup_queue(0, 64)
        self.fe = fe
        return BlockDriver(q, depth=1, max_io=16 << 10, timeout=2.0)

    def _hung_up(self) -> bool:
        assert self.fe is not None
        p = select.poll()
        p.register(self.fe.sock.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        for _fd, ev in p.poll(0):
            if ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                return True
        return False

    def _reconnect(self, deadline: float) -> None:
        assert self.fe is not None
        while True:
            try:
                self.fe.reconnect(timeout=30)
                self.reconnects += 1
                return
            except Exception:  # noqa: BLE001 - the socket accepts before a child serves it
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _finish(self, drv: BlockDriver, slot) -> None:  # noqa: ANN001
        deadline = time.monotonic() + 120
        while slot.busy:
            try:
                drv.complete()
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                if self._hung_up():
                    self._reconnect(deadline)

    def request(self, drv: BlockDriver, op: str, offset: int, data: bytes) -> bytes:
        s = drv.free_slot()
        assert s is not None
        if op == "write":
            s.data[:len(data)] = data
            drv.submit_write(s, offset // 512, len(data))
        else:
            drv.submit_read(s, offset // 512, len(data))
        drv.queue.kick()
        self._finish(drv, s)
        return bytes(s.data[:len(data)])

    def run(self) -> None:
        try:
            drv = self._connect()
        except Exception as e:  # noqa: BLE001
            self.failed.append(f"connect: {e!r}")
            return
        i = 0
        while not self.stop_flag.is_set():
            offset = (i % 256) * 16384
            data = struct.pack("<QQ", i, zlib.crc32(self.name_.encode())) * 1024
            try:
                self.request(drv, "write", offset, data)
                got = self.request(drv, "read", offset, data)
                if got != data:
                    self.failed.append(f"request {i}: read back differs")
                else:
                    self.ok += 1
            except Exception as e:  # noqa: BLE001
                self.failed.append(f"request {i}: {type(e).__name__}: {e}")
                return
            i += 1

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(180)
        if self.fe is not None:
            try:
                self.fe.close()
            except Exception:  # noqa: BLE001
                pass


def wait_progress(writers: list[Writer], n: int = 3, timeout: float = 60) -> None:
    marks = [w.ok for w in writers]
    wait_for(lambda: all(w.ok >= m + n or w.failed for w, m in zip(writers, marks)), timeout,
             "writers making progress")


def drive_once(name: str) -> None:
    w = Writer(name)
    drv = w._connect()
    data = os.urandom(4096)
    w.request(drv, "write", 0, data)
    assert w.request(drv, "read", 0, data) == data
    w.fe.close()


# ------------------------------------------------------------------ checks


def setup() -> None:
    os.makedirs(STATE, exist_ok=True)
    os.makedirs("/etc/vhost-supervisor", exist_ok=True)
    for name in DEVICES:
        with open(f"{STATE}/{name}.img", "wb") as f:
            f.truncate(IMAGE_SIZE)
    # The operator's steps for the unit's service user (docs/operations.md):
    # systemd-sysusers made it at boot from the installed sysusers.d entry; the
    # images are its to read and write.
    sh(f"chown -R {SERVICE_USER}:{SERVICE_USER} {STATE}")
    with open("/etc/vhost-supervisor/config.toml", "w") as f:
        f.write('[supervisor]\nlog-format = "text"\n\n')
        f.write(f'[[device]]\ntype = "block"\nname = "blk0"\nvhost = "{RUN}/blk0.sock"\n'
                f'path = "{STATE}/blk0.img"\nmemory-max = "64M"\nmemory-swap-max = "0"\n'
                f'pids-max = "64"\ncpu-weight = "100"\n\n')
        f.write(f'[[device]]\ntype = "block"\nname = "blk1"\nvhost = "{RUN}/blk1.sock"\n'
                f'path = "{STATE}/blk1.img"\nmemory-max = "256M"\nmemory-swap-max = "0"\npids-max = "64"\n')
    sh("systemctl daemon-reload")
    sh("systemctl start " + " ".join(f"vhost-supervisor@{n}.socket" for n in DEVICES))


def check1() -> str:
    """systemctl start reaches active only after READY=1; exposure score."""
    t = time.monotonic()
    sh(f"systemctl start --no-block {UNIT}")
    # The supervisor sends STATUS= only with or after READY=1, and systemd applies
    # READY=1 and STATUS= of one datagram together: so "activating" must come with
    # an empty StatusText and "active" never without one.
    states: list[str] = []
    samples: list[tuple[str, str]] = []
    while time.monotonic() - t < 180:
        st = show("ActiveState", "SubState", "StatusText")
        samples.append((st["ActiveState"], st["StatusText"]))
        tag = f"{st['ActiveState']}/{st['SubState']}"
        if not states or states[-1] != tag:
            states.append(tag)
        if st["ActiveState"] in ("active", "failed"):
            break
        time.sleep(0.05)
    before_ready = [x for x in samples if x[0] == "activating"]
    ordered = (bool(before_ready) and all(not text for _, text in before_ready)
               and all(text for state, text in samples if state == "active"))
    took = time.monotonic() - t
    st = show("ActiveState", "StatusText", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
              "MainPID", "NRestarts")
    devs = status()
    ready = journal("EVENT=ready")
    started = [e for e in journal() if e.get("MESSAGE_ID") == "39f53479d3a045ac8e11786248231fbf"]
    score_out = sh(f"systemd-analyze security {UNIT} --no-pager", check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\S+)", score_out)
    score = float(m.group(1)) if m else None
    detail(f"states seen: {' -> '.join(states)} ({took:.1f}s, {len(samples)} samples, {len(before_ready)} "
           f"activating with no STATUS= yet); StatusText at active={st['StatusText']!r}")
    detail(f"devices at active: " + ", ".join(f"{n}={d['state']}" for n, d in devs.items()))
    ready_us = int(ready[-1]["__MONOTONIC_TIMESTAMP"]) if ready else None
    started_us = int(started[-1]["__MONOTONIC_TIMESTAMP"]) if started else None
    active_us = int(st["ActiveEnterTimestampMonotonic"])
    detail(f"journal (reception times, for information): supervisor 'ready' at {ready_us} us, systemd 'Started' "
           f"at {started_us} us; ExecMainStart {st['ExecMainStartTimestampMonotonic']} us, ActiveEnter {active_us} us")
    main_pid = int(st["MainPID"])
    proc_status = dict(ln.split(":\t", 1) for ln in open(f"/proc/{main_pid}/status").read().splitlines()
                       if ":\t" in ln)
    sup_uid = int(proc_status["Uid"].split()[1])
    service_uid = pwd.getpwnam(SERVICE_USER).pw_uid
    dev_uids = {n: int(open(f"/proc/{d['pid']}/status").read().split("Uid:\t")[1].split()[1])
                for n, d in devs.items() if d.get("pid")}
    identity_ok = (sup_uid == service_uid and int(proc_status["CapEff"], 16) == 0xc0
                   and len(set(dev_uids.values())) == len(devs) and service_uid not in dev_uids.values())
    detail(f"supervisor uid {sup_uid} ({SERVICE_USER}={service_uid}), CapEff {proc_status['CapEff']} "
           f"(CAP_SETUID|CAP_SETGID = 00000000000000c0), CapBnd {proc_status['CapBnd']}; device uids {dev_uids}")
    bad = [ln for ln in score_out.splitlines() if ln.startswith("✗")]
    detail(f"systemd-analyze security: exposure {score} {m.group(2) if m else '?'} "
           f"(goal <= 2.0: {'met' if score is not None and score <= 2.0 else 'NOT met'}); "
           f"{len(bad)} items open: " + "; ".join(re.split(r"\s{2,}", b)[0].lstrip("✗ ") for b in bad))
    ok = (states[0].startswith("activating") and st["ActiveState"] == "active" and ordered
          and all(d["state"] == "ready" for d in devs.values()) and ready_us is not None
          and identity_ok and score is not None and score <= 2.0)
    return ("PASS" if ok else "FAIL") + f": activating -> active after READY=1 ({took:.1f}s), " \
        f"exposure score {score} (goal <= 2.0), supervisor runs as {SERVICE_USER} with CAP_SETUID|CAP_SETGID only"


def check2() -> str:
    """systemctl restart under load: zero failed requests, same socket inodes."""
    inodes = {n: os.stat(f"{RUN}/{n}.sock").st_ino for n in DEVICES}
    old_pid = show("MainPID")["MainPID"]
    writers = [Writer(n) for n in DEVICES]
    for w in writers:
        w.start()
    wait_progress(writers)
    before = [w.ok for w in writers]
    t = time.monotonic()
    sh(f"systemctl restart {UNIT}")
    took = time.monotonic() - t
    wait_progress(writers, 5, 180)
    for w in writers:
        w.stop()
    after = {n: os.stat(f"{RUN}/{n}.sock").st_ino for n in DEVICES}
    new_pid = show("MainPID")["MainPID"]
    for w, b in zip(writers, before):
        detail(f"{w.name_}: {w.ok} requests verified ({w.ok - b} after the restart began), "
               f"{len(w.failed)} failed, {w.reconnects} reconnects" + (f": {w.failed[:3]}" if w.failed else ""))
    detail(f"supervisor pid {old_pid} -> {new_pid}; systemctl restart took {took:.1f}s; inodes {inodes} -> {after}")
    ok = (all(not w.failed and w.reconnects >= 1 for w in writers) and inodes == after and old_pid != new_pid)
    return ("PASS" if ok else "FAIL") + f": {sum(w.ok for w in writers)} verified requests on 2 devices, " \
        f"{sum(len(w.failed) for w in writers)} failed, socket inodes unchanged: {inodes == after}"


def check3() -> str:
    """A SIGSTOPped supervisor (no watchdog pings) is restarted by systemd."""
    st = show("MainPID", "NRestarts", "WatchdogUSec")
    pid = int(st["MainPID"])
    t = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    new = wait_for(lambda: (lambda s: s if s["MainPID"] not in ("0", str(pid)) and s["ActiveState"] == "active"
                            else None)(show("MainPID", "NRestarts", "ActiveState", "Result")),
                   120, "a new supervisor after the watchdog fired")
    took = time.monotonic() - t
    msgs = [e.get("MESSAGE", "") for e in journal()]
    wd = [m for m in msgs if isinstance(m, str) and "atchdog timeout" in m]
    wait_for(lambda: all(d["state"] == "ready" for d in status().values()), 60, "devices ready again")
    for n in DEVICES:
        drive_once(n)
    detail(f"WatchdogUSec={st['WatchdogUSec']}; pid {pid} stopped -> pid {new['MainPID']} active after {took:.1f}s; "
           f"NRestarts {st['NRestarts']} -> {new['NRestarts']}; journal: {wd[-1] if wd else 'no watchdog message'}")
    ok = bool(wd) and int(new["NRestarts"]) == int(st["NRestarts"]) + 1
    return ("PASS" if ok else "FAIL") + f": watchdog restarted the stopped supervisor after {took:.1f}s, " \
        "both devices serve again"


def _completed(fe: VhostUserFrontend, q, timeout: float) -> bool:  # noqa: ANN001
    """Wait for the request; False as soon as the back-end's end of the socket is gone."""
    deadline = time.monotonic() + timeout
    p = select.poll()
    p.register(fe.sock.sock.fileno(), select.POLLRDHUP)
    while time.monotonic() < deadline:
        try:
            q.wait_used(0.5)
            return True
        except TimeoutError:
            if any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _fd, ev in p.poll(0)):
                return False
    raise TimeoutError(f"no completion within {timeout}s and the back-end is still connected")


def check4() -> str:
    """A device over its memory budget is OOM-killed by its own cgroup; reported; the other keeps serving."""
    cg = sh("cat /proc/$(systemctl show -p MainPID --value vhost-supervisor)/cgroup").strip()
    cgdir = "/sys/fs/cgroup" + cg.split("::", 1)[1].rsplit("/", 1)[0]
    detail(f"supervisor cgroup {cg}; {cgdir}: " +
           ", ".join(d for d in sorted(os.listdir(cgdir)) if os.path.isdir(f"{cgdir}/{d}")))
    mem_max = open(f"{cgdir}/dev-blk0/memory.max").read().strip()
    detail(f"dev-blk0 memory.max={mem_max} memory.current={open(f'{cgdir}/dev-blk0/memory.current').read().strip()}"
           f" pids.max={open(f'{cgdir}/dev-blk0/pids.max').read().strip()}")
    before = status()
    w1 = Writer("blk1")
    w1.start()
    wait_progress([w1])
    blk1_pid = before["blk1"]["pid"]
    # A front-end with 512 MiB of guest RAM reads into fresh pages: each page
    # the device's preadv faults in is charged to the device's cgroup.
    fe = VhostUserFrontend.connect(f"{RUN}/blk0.sock", timeout=60)
    fe.negotiate()
    mem = fe.setup_memory(512 << 20)
    q = fe.setup_queue(0, 64)
    hdr_gpa, hdr = q.alloc(16, 16)
    st_gpa, st = q.alloc(1, 1)
    region = min(mem.regions, key=lambda r: r.gpa)
    base = (region._next + (1 << 20) - 1) & ~((1 << 20) - 1)   # past the rings: pages the driver never touched
    chunk = 128 << 10   # the driver's usual max_io: within the device's segment limits
    done_bytes = 0
    died = None
    t = time.monotonic()
    for i in range((region.size - base) // chunk):
        struct.pack_into("<IIQ", hdr, 0, 0, 0, (i * chunk // 512) % (IMAGE_SIZE // 512 - 512))
        st[0] = 0xFF
        q.submit([(hdr_gpa, 16)], [(region.gpa + base + i * chunk, chunk), (st_gpa, 1)])
        q.kick(force=True)
        if not _completed(fe, q, 30):
            died = "connection closed by the back-end"
            break
        done_bytes += chunk
    detail(f"blk0 front-end: {done_bytes >> 20} MiB read into fresh guest pages before the device died "
           f"({died}) after {time.monotonic() - t:.1f}s")
    try:
        fe.disconnect()
        fe.close()
    except Exception:  # noqa: BLE001
        pass
    d = wait_for(lambda: (lambda s: s if s["last_exit"] and s["state"] == "ready" and s["pid"] != before["blk0"]["pid"]
                          else None)(status()["blk0"]), 120, "blk0 restarted")
    ev = open(f"{cgdir}/dev-blk0/memory.events").read().split()
    entries = journal("DEVICE=blk0", "EXIT_KIND=oom")
    dmesg = [ln for ln in sh("dmesg", check=False).splitlines() if "oom" in ln.lower()][-2:]
    wait_progress([w1], 3)
    blk1_after = status()["blk1"]      # while w1 is still connected: the same child served it throughout
    serving = (blk1_after["state"], blk1_after["frontend"])
    w1.stop()
    drive_once("blk0")
    detail(f"blk0 status: state={d['state']} restarts={d['restarts']} last_exit={d['last_exit']['kind']} "
           f"({d['last_exit']['text']})")
    detail(f"journal DEVICE=blk0 EXIT_KIND=oom: {len(entries)} entries; "
           + (entries[-1].get("MESSAGE", "") if entries else ""))
    detail("kernel: " + " | ".join(dmesg))
    detail(f"new dev-blk0 memory.events: {' '.join(ev)}")
    detail(f"blk1 during it: {w1.ok} verified, {len(w1.failed)} failed, {w1.reconnects} reconnects; "
           f"pid {blk1_pid} -> {blk1_after['pid']}; status while connected: state={serving[0]} front-end={serving[1]}")
    ok = (d["last_exit"]["kind"] == "oom" and d["restarts"] > before["blk0"]["restarts"] and entries
          and not w1.failed and w1.reconnects == 0 and blk1_after["pid"] == blk1_pid
          and serving == ("serving", "yes"))
    return ("PASS" if ok else "FAIL") + ": blk0 over memory.max was OOM-killed in its cgroup, reported as oom " \
        "(status, journal) and restarted; blk1 kept serving"


def check5() -> str:
    """journalctl -o json shows DEVICE=, EVENT=, EXIT_KIND=, PID=."""
    entries = journal()
    with_fields = [e for e in entries if all(k in e for k in ("DEVICE", "EVENT", "EXIT_KIND", "PID"))]
    events = sorted({e["EVENT"] for e in entries if "EVENT" in e})
    ooms = [e for e in with_fields if e["EXIT_KIND"] == "oom"]
    sample = (ooms or with_fields or [{}])[-1]
    keep = {k: sample[k] for k in ("MESSAGE", "DEVICE", "EVENT", "EXIT_KIND", "PID", "PRIORITY",
                                    "SYSLOG_IDENTIFIER", "VHOST_UPTIME") if k in sample}
    detail(f"{len(entries)} entries, {len(with_fields)} exits with all four fields; events: {', '.join(events)}")
    detail("sample: " + json.dumps(keep))
    ok = bool(with_fields) and {"spawn", "exit", "ready", "listen"} <= set(events)
    return ("PASS" if ok else "FAIL") + f": {len(with_fields)} entries carry DEVICE, EVENT, EXIT_KIND and PID"


def main() -> int:
    say(f"=== TEST-START uptime {open('/proc/uptime').read().split()[0]}s")
    say(f"  {sh('uname -r').strip()}; {sh('systemctl --version').splitlines()[0]}; "
        f"{sh('stat -fc %T /sys/fs/cgroup').strip()}; "
        f"{sh('/opt/vhost-supervisor/bin/vhost-supervisor --version').strip()}")
    rc = 0
    try:
        setup()
    except Exception:  # noqa: BLE001
        say("CHECK 0 FAIL: setup")
        detail(traceback.format_exc())
        return 1
    for n, fn in enumerate((check1, check2, check3, check4, check5), 1):
        t = time.monotonic()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001
            result = f"FAIL: {type(e).__name__}: {e}"
            detail(traceback.format_exc())
        say(f"CHECK {n} {result} [{time.monotonic() - t:.1f}s]")
        if not result.startswith("PASS"):
            rc = 1
            detail("journal tail:\n" + sh(f"journalctl -u {UNIT} --no-pager -n 25 -o short-monotonic", check=False))
            if n == 1 and not all(d["state"] == "ready" for d in status().values()):
                for m in (2, 3, 4):
                    say(f"CHECK {m} FAIL: not run (the devices never served after check 1)")
                fns_left = [check5]
                break
    else:
        fns_left = []
    for fn in fns_left:
        say(f"CHECK 5 {fn()}")
    say(f"=== TEST-END rc={rc} uptime {open('/proc/uptime').read().split()[0]}s, checks {time.monotonic() - T0:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
