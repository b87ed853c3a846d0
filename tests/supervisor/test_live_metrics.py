"""Prometheus metrics (issue 12), scraped and parsed as Prometheus would.

Why: alerting is only as good as the numbers; each value checked here is
one the test caused (requests it sent, a crash it caused, a reconnect, a
control request), read back through prometheus_client's own text parser
from a real scrape of ``--metrics-listen``, with jailed children (the
counters page crosses the jail).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from frontend.exercise import drive_rng
from frontend.vhost_user import VhostUserFrontend
from frontend.virtio_blk import BlockDriver

from .conftest import REPO, SupervisorProc

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_tcp(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def scrape_unix(path: str) -> Samples:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return parse(body.decode())


def val(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels}; have {[k for k in samples if k[0] == name]}"
    return samples[key]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_metrics_match_what_was_done(sup: SupervisorProc) -> None:
    img = sup.image()
    blk, rng = sup.path("b.sock"), sup.path("r.sock")
    port = free_port()
    # jailed, with a uid-range of its own (other supervisors on this host may use the default)
    conf = sup.path("sup.toml")
    start = 1879048192 + 65536 * random.randrange(1, 1000)
    with open(conf, "w") as f:
        f.write(f'[supervisor]\nuid-range = "{start}-{start + 255}"\n')
    sup.start("--config", conf, "--block", f"vhost={blk},path={img}", "--rng", f"vhost={rng}",
              "--metrics-listen", f"127.0.0.1:{port}")
    m = scrape_tcp(port)
    B = {"device": "block-0", "type": "block"}
    Q = dict(B, queue="0")
    assert val(m, "vhost_supervisor_device_up", **B) == 1
    assert val(m, "vhost_supervisor_device_state", state="ready", **B) == 1
    assert val(m, "vhost_supervisor_device_state", state="serving", **B) == 0
    assert val(m, "vhost_supervisor_devices", state="ready") == 2
    assert val(m, "vhost_supervisor_device_reported_requests_total", **Q) == 0
    assert val(m, "vhost_supervisor_device_resident_memory_bytes", **B) > 0
    assert val(m, "vhost_supervisor_device_open_fds", **B) > 0
    build = [k for k in m if k[0] == "vhost_supervisor_build_info"]
    assert len(build) == 1 and m[build[0]] == 1

    # 10 writes, 10 reads, 1 flush through one connection: 21 requests, one error
    writes, reads = 10, 10
    with VhostUserFrontend.connect(blk, timeout=10) as fe:
        fe.negotiate()
        fe.setup_memory(16 << 20)
        drv = BlockDriver(fe.setup_queue(0, 128))
        for i in range(writes):
            drv.write(i * 4096, bytes([i]) * 4096)
        for i in range(reads):
            assert drv.read(i * 4096, 4096) == bytes([i]) * 4096
        drv.flush()
        try:
            drv.read(img_size(img), 4096)        # past the end: IOERR
        except Exception:  # noqa: BLE001
            pass
        else:
            raise AssertionError("a read past the end succeeded")
        sup.wait_state("block-0", "serving")
        m = scrape_tcp(port)
        assert val(m, "vhost_supervisor_device_frontend_connected", **B) == 1
        assert val(m, "vhost_supervisor_device_state", state="serving", **B) == 1
    n = writes + reads + 2
    sup.wait_state("block-0", "ready", pred=lambda d: d["reconnects"] == 1)
    m = scrape_tcp(port)
    assert val(m, "vhost_supervisor_device_reported_requests_total", **Q) == n
    assert val(m, "vhost_supervisor_device_reported_errors_total", **Q) == 1
    # latency is sampled (the first batch of a drain that starts with the request count a
    # multiple of LATENCY_SAMPLE, the very first included): at least one, at most all
    timed = val(m, "vhost_supervisor_device_reported_latency_seconds_count", **Q)
    assert 1 <= timed <= n, (timed, n)
    les = ["5e-05", "0.0002", "0.001", "0.005", "0.025", "+Inf"]
    cumulative = [val(m, "vhost_supervisor_device_reported_latency_seconds_bucket", le=le, **Q) for le in les]
    assert cumulative == sorted(cumulative), cumulative
    assert val(m, "vhost_supervisor_device_reported_latency_seconds_bucket", le="+Inf", **Q) == timed
    assert val(m, "vhost_supervisor_device_reported_latency_seconds_sum", **Q) > 0
    # data + header + status bytes: each write moves 4096 + 16 + 1, each read the same, flush 17, the bad read 17
    assert val(m, "vhost_supervisor_device_reported_bytes_total", **Q) == (writes + reads) * 4113 + 17 + 17
    assert val(m, "vhost_supervisor_device_reconnects_total", **B) == 1
    assert val(m, "vhost_supervisor_device_crashes_total", kind="signaled", **B) == 0

    # the rng device reports its requests too (one of 64 bytes)
    R = {"device": "rng-0", "type": "rng"}
    assert len(drive_rng(rng)) == 64
    sup.wait_state("rng-0", "ready", pred=lambda d: d["reconnects"] == 1)
    m = scrape_tcp(port)
    assert val(m, "vhost_supervisor_device_reported_requests_total", queue="0", **R) == 1
    assert val(m, "vhost_supervisor_device_reported_bytes_total", queue="0", **R) == 64
    assert not [k for k in m if k[0].startswith("vhost_supervisor_device_reported_latency") and
                dict(k[1]).get("device") == "rng-0"]

    # a crash: SIGKILL the rng child; counted by kind, apart from reconnects
    pid = sup.status()["rng-0"]["pid"]
    os.kill(pid, signal.SIGKILL)
    sup.wait_state("rng-0", "ready", pred=lambda d: d["pid"] not in (None, pid))
    m = scrape_tcp(port)
    assert val(m, "vhost_supervisor_device_crashes_total", kind="signaled", **R) == 1
    assert val(m, "vhost_supervisor_device_crashes_total", kind="seccomp", **R) == 0
    assert val(m, "vhost_supervisor_device_reconnects_total", **R) == 1
    assert val(m, "vhost_supervisor_device_recent_crashes", **R) == 1
    assert val(m, "vhost_supervisor_device_crash_looping", **R) == 0
    assert val(m, "vhost_supervisor_device_requested_exits_total", **R) == 0
    st = sup.status()["rng-0"]
    assert st["crashes"] == {"signaled": 1} and st["reconnects"] == 1
    # the device's counters survive its crash (one page per device, not per child)
    assert val(m, "vhost_supervisor_device_reported_requests_total", **Q) == n

    # control requests are counted by command and result
    sup.request("restart", name="block-0")
    sup.request("restart", name="no-such-device")
    m = scrape_tcp(port)
    assert val(m, "vhost_supervisor_control_requests_total", command="restart", result="ok") == 1
    assert val(m, "vhost_supervisor_control_requests_total", command="restart", result="error") == 1
    assert val(m, "vhost_supervisor_device_requested_exits_total", **B) == 1
    assert abs(val(m, "vhost_supervisor_start_time_seconds") - os.stat(sup.log_path).st_ctime) < 3600
    # removed devices leave the exposition
    sup.request("remove", name="rng-0")
    m = scrape_tcp(port)
    assert not [k for k in m if dict(k[1]).get("device") == "rng-0"]
    assert sup.terminate() == 0


def img_size(path: str) -> int:
    return os.path.getsize(path)


def test_metrics_on_a_unix_socket_and_errors(sup: SupervisorProc) -> None:
    path = sup.path("metrics.sock")
    sup.start("--disable-sandbox", "--rng", f"vhost={sup.path('r.sock')}", "--metrics-listen", path)
    m = scrape_unix(path)
    assert val(m, "vhost_supervisor_device_up", device="rng-0", type="rng") == 1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"GET /nothing HTTP/1.1\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 404")
    s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"\x00garbage\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()
    assert sup.status()["rng-0"]["state"] == "ready"
    assert sup.terminate() == 0
    assert not os.path.exists(path), "the metrics socket file was left behind"


def test_metrics_listen_refuses_non_loopback(sup: SupervisorProc) -> None:
    for bad in ("10.1.2.3:9100", "0.0.0.0:9100", "[2001:db8::1]:9100", "example.com:9100", "127.0.0.1:http"):
        r = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "-s", sup.control, "--disable-sandbox",
                            "--rng", f"vhost={sup.path('r.sock')}", "--metrics-listen", bad],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 2, (bad, r.stderr)
        assert "metrics-listen" in r.stderr and bad in r.stderr, r.stderr
        assert not os.path.exists(sup.path("r.sock"))
