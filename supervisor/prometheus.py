"""Prometheus metrics: what a fleet's monitoring reads, on ``--metrics-listen``.

Why not ``status --json``: Prometheus scrapes HTTP, and a control socket is
root's alone.  The exposition is built by prometheus_client (its text format
and escaping), from a collector that reads the supervisor's own state at
scrape time: nothing is updated on the supervision path, and a scrape costs
what the device count says.  The HTTP side is a few lines on the
supervisor's event loop, not prometheus_client's server: that one runs a
thread, and the supervisor forks children (it refuses to fork while a
second thread exists).

Device I/O counters come from each device's shared page
(``connection.counters``); they are what the device *says*, exported under
``vhost_supervisor_device_reported_*`` and never used for a decision.
Metric names and alert examples: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import platform
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from connection.counters import LATENCY_BOUNDS_NS
from devices import ConfigError
from sandbox.exits import ExitKind

from .slot import CRASH_LIMIT, CRASH_WINDOW, RUNNING, State

if TYPE_CHECKING:
    from .supervision import Supervisor

PREFIX = "vhost_supervisor"
MAX_REQUEST = 8192          # bytes of request line + headers we read from a scraper
REQUEST_TIMEOUT = 5.0


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("vhost-supervisor")
    except Exception:  # noqa: BLE001 - not installed: a source checkout
        return "unknown"


# ------------------------------------------------------------------ address


@dataclass(frozen=True)
class ListenAddress:
    """Where metrics are served: a Unix socket path, or a loopback TCP address."""

    text: str
    path: str | None = None
    host: str | None = None
    port: int | None = None


def parse_listen(value: Any) -> ListenAddress:
    """``/run/x/metrics.sock``, ``unix:PATH``, ``127.0.0.1:9101``, ``[::1]:9101``,
    ``localhost:9101``.  Anything that is not loopback is refused: the
    metrics name every device and socket of the host, and this server has
    no authentication."""
    text = str(value).strip()
    key = "metrics-listen"
    if not text:
        raise ConfigError("is empty (a Unix socket path or a loopback HOST:PORT)", key, value=text)
    if text.startswith("unix:") or text.startswith("/") or text.startswith("."):
        path = os.path.abspath(text[5:] if text.startswith("unix:") else text)
        if len(os.fsencode(path)) > 107:
            raise ConfigError("longer than 107 bytes (sun_path)", key, value=path)
        if not os.path.isdir(os.path.dirname(path)):
            raise ConfigError(f"directory {os.path.dirname(path)!r} does not exist", key, value=path)
        return ListenAddress(text=f"unix:{path}", path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError("not a Unix socket path or HOST:PORT", key, value=text)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError("port out of range 1..65535", key, value=text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError("not an IP address or localhost (give a loopback address)", key, value=text) from None
    if not ip.is_loopback:
        raise ConfigError(f"{host} is not a loopback address (metrics have no authentication; "
                          "use 127.0.0.1, ::1 or a Unix socket)", key, value=text)
    return ListenAddress(text=text, host=str(ip), port=port)


# ------------------------------------------------------------------ collector


def _proc_figures(proc: psutil.Process | None) -> dict[str, float]:
    if proc is None:
        return {}
    try:
        with proc.oneshot():
            mem = proc.memory_info()
            cpu = proc.cpu_times()
            out = {"rss": float(mem.rss), "cpu": cpu.user + cpu.system, "fds": float(proc.num_fds())}
        try:
            soft, _ = proc.rlimit(psutil.RLIMIT_NOFILE)
            if soft > 0:
                out["max_fds"] = float(soft)
        except (psutil.Error, OSError, AttributeError):
            pass
        return out
    except (psutil.Error, OSError):
        return {}


class SupervisorCollector:
    """Reads the supervisor at scrape time (prometheus_client's custom collector)."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup

    def describe(self) -> list[Metric]:
        return []       # no fixed set: devices come and go

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        conns = sup.refresh_frontends()
        now = time.monotonic()
        L = ["device", "type"]
        state = GaugeMetricFamily(f"{PREFIX}_device_state", "1 for the state the device is in", labels=L + ["state"])
        up = GaugeMetricFamily(f"{PREFIX}_device_up", "1 while a built child serves or waits for a front-end",
                               labels=L)
        conn = GaugeMetricFamily(f"{PREFIX}_device_frontend_connected",
                                 "1 while a front-end is connected (or waiting in the accept queue)", labels=L)
        recon = CounterMetricFamily(f"{PREFIX}_device_reconnects",
                                    "clean front-end disconnects, each followed by a fresh child", labels=L)
        crashes = CounterMetricFamily(f"{PREFIX}_device_crashes",
                                      "children that ended unrequested and not cleanly, by exit kind",
                                      labels=L + ["kind"])
        requested = CounterMetricFamily(f"{PREFIX}_device_requested_exits",
                                        "children stopped by request (stop, restart, remove, reload)", labels=L)
        looping = GaugeMetricFamily(f"{PREFIX}_device_crash_looping",
                                    "1 while the crash-loop breaker holds the device (crash-looping or failed)",
                                    labels=L)
        loops = CounterMetricFamily(f"{PREFIX}_device_crash_loops", "times the crash-loop breaker tripped",
                                    labels=L)
        recent = GaugeMetricFamily(f"{PREFIX}_device_recent_crashes",
                                   f"crashes in the last {CRASH_WINDOW:g}s (the breaker trips at "
                                   f"{PREFIX}_crash_loop_limit)", labels=L)
        uptime = GaugeMetricFamily(f"{PREFIX}_device_uptime_seconds", "age of the current child", labels=L)
        rss = GaugeMetricFamily(f"{PREFIX}_device_resident_memory_bytes", "the child's RSS", labels=L)
        cpu = CounterMetricFamily(f"{PREFIX}_device_cpu_seconds", "the current child's user+system CPU time",
                                  labels=L)
        fds = GaugeMetricFamily(f"{PREFIX}_device_open_fds", "the child's open file descriptors", labels=L)
        maxfds = GaugeMetricFamily(f"{PREFIX}_device_max_fds", "the child's RLIMIT_NOFILE (soft)", labels=L)
        dropped = CounterMetricFamily(f"{PREFIX}_device_log_dropped_lines",
                                      "stderr lines dropped over the log budget", labels=L)
        LQ = L + ["queue"]
        r_req = CounterMetricFamily(f"{PREFIX}_device_reported_requests",
                                    "requests completed, as reported by the device (untrusted)", labels=LQ)
        r_bytes = CounterMetricFamily(f"{PREFIX}_device_reported_bytes",
                                      "bytes moved, as reported by the device (untrusted)", labels=LQ)
        r_err = CounterMetricFamily(f"{PREFIX}_device_reported_errors",
                                    "requests answered with an error, as reported by the device (untrusted)",
                                    labels=LQ)
        r_lat = HistogramMetricFamily(f"{PREFIX}_device_reported_latency_seconds",
                                      "device-side latency of completed requests, as reported by the device "
                                      "(untrusted; block only)", labels=LQ)
        by_state: dict[str, int] = {s.value: 0 for s in State}
        for slot in list(sup.slots.values()):
            lv = [slot.name, slot.spec.type]
            by_state[slot.state.value] += 1
            for s in State:
                state.add_metric(lv + [s.value], 1.0 if slot.state is s else 0.0)
            up.add_metric(lv, 1.0 if slot.state in (State.READY, State.SERVING) else 0.0)
            fe = conns.get(slot.spec.socket)
            conn.add_metric(lv, 1.0 if fe is not None and fe.connected else 0.0)
            recon.add_metric(lv, slot.reconnects)
            for kind in ExitKind:
                if kind is not ExitKind.DISCONNECTED:
                    crashes.add_metric(lv + [kind.value], slot.crashes.get(kind.value, 0))
            requested.add_metric(lv, slot.requested_exits)
            looping.add_metric(lv, 1.0 if slot.state in (State.CRASH_LOOPING, State.FAILED) else 0.0)
            loops.add_metric(lv, slot.crash_loops)
            recent.add_metric(lv, sum(1 for t in slot.tracker.crashes if now - t <= CRASH_WINDOW))
            uptime.add_metric(lv, now - slot.started_at if slot.child is not None and slot.started_at else 0.0)
            dropped.add_metric(lv, slot.log_budget.total_dropped)
            figs = _proc_figures(slot.proc) if slot.child is not None and slot.state in RUNNING else {}
            if figs:
                rss.add_metric(lv, figs["rss"])
                cpu.add_metric(lv, figs["cpu"])
                fds.add_metric(lv, figs["fds"])
                if "max_fds" in figs:
                    maxfds.add_metric(lv, figs["max_fds"])
            rep = slot.counters.read() if slot.counters is not None else None
            if rep is None:
                continue
            for qi, q in enumerate(rep.per_queue):
                qv = lv + [str(qi)]
                r_req.add_metric(qv, q.requests)
                r_bytes.add_metric(qv, q.bytes)
                r_err.add_metric(qv, q.errors)
                if slot.spec.type == "block":
                    acc = 0
                    buckets = []
                    for bound, n in zip(LATENCY_BOUNDS_NS + (None,), q.buckets):
                        acc += n
                        buckets.append(("+Inf" if bound is None else f"{bound / 1e9:g}", float(acc)))
                    r_lat.add_metric(qv, buckets, q.latency_sum_ns / 1e9)
        yield from (state, up, conn, recon, crashes, requested, looping, loops, recent, uptime, rss, cpu, fds,
                    maxfds, dropped, r_req, r_bytes, r_err, r_lat)
        devs = GaugeMetricFamily(f"{PREFIX}_devices", "devices by state", labels=["state"])
        for k, n in by_state.items():
            devs.add_metric([k], n)
        yield devs
        ctl = CounterMetricFamily(f"{PREFIX}_control_requests", "control socket requests by command and result",
                                  labels=["command", "result"])
        for (cmd, result), n in sorted(sup.control_counts.items()):
            ctl.add_metric([cmd, result], n)
        yield ctl
        rel = CounterMetricFamily(f"{PREFIX}_reloads", "configuration reloads by result", labels=["result"])
        for result in ("applied", "error"):
            rel.add_metric([result], sup.reload_counts.get(result, 0))
        yield rel
        yield GaugeMetricFamily(f"{PREFIX}_start_time_seconds", "when the supervisor started (Unix time)",
                                value=sup.started_wall)
        yield GaugeMetricFamily(f"{PREFIX}_crash_loop_limit",
                                f"crashes within {CRASH_WINDOW:g}s that trip the crash-loop breaker",
                                value=CRASH_LIMIT)
        uid_start, uid_count = sup.uid_range
        used = sum(1 for s in sup.slots.values() if s.uid is not None and uid_start <= s.uid < uid_start + uid_count)
        yield GaugeMetricFamily(f"{PREFIX}_uid_range_size", "ids in uid-range", value=uid_count)
        yield GaugeMetricFamily(f"{PREFIX}_uid_range_used", "ids of uid-range given to devices", value=used)
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "version of the supervisor (value 1)",
                                 labels=["version", "python"])
        info.add_metric([_version(), platform.python_version()], 1.0)
        yield info


# ------------------------------------------------------------------ server


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x on the supervisor's loop; one response per connection."""

    def __init__(self, sup: "Supervisor", address: ListenAddress) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SupervisorCollector(sup))  # type: ignore[arg-type]
        self.server: asyncio.AbstractServer | None = None
        self.inode: int | None = None
        self.scrapes = 0

    def bind(self) -> socket.socket:
        """Bind before any fork (a config error stops the start, like a device socket)."""
        a = self.address
        if a.path is not None:
            from connection.unixsock import bind_unix_listener
            from .control import socket_in_use
            if os.path.exists(a.path):
                if socket_in_use(a.path):
                    raise ConfigError(f"{a.path!r} is in use", "metrics-listen", value=a.text)
                import stat
                if not stat.S_ISSOCK(os.lstat(a.path).st_mode):
                    raise ConfigError("exists and is not a socket", "metrics-listen", value=a.text)
                os.unlink(a.path)
            sock, _ = bind_unix_listener(a.path, mode=0o660, backlog=16)
            self.inode = os.stat(a.path).st_ino
        else:
            family = socket.AF_INET6 if ":" in (a.host or "") else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((a.host, a.port))
            except OSError as e:
                sock.close()
                raise ConfigError(f"cannot listen: {e.strerror or e}", "metrics-listen", value=a.text) from None
            sock.listen(16)
        sock.setblocking(False)
        sock.set_inheritable(False)
        self._sock = sock
        return sock

    async def start(self) -> None:
        if self.address.path is not None:
            self.server = await asyncio.start_unix_server(self._serve, sock=self._sock, limit=MAX_REQUEST)
        else:
            self.server = await asyncio.start_server(self._serve, sock=self._sock, limit=MAX_REQUEST)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
                return self._reply(writer, 400, b"bad request\n")
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                return self._reply(writer, 400, b"bad request\n")
            method, target = parts[0], parts[1].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                return self._reply(writer, 405, b"method not allowed\n")
            if target not in (b"/metrics", b"/"):
                return self._reply(writer, 404, b"not found: try /metrics\n")
            self.scrapes += 1
            body = generate_latest(self.registry)
            self._reply(writer, 200, body if method == b"GET" else b"", CONTENT_TYPE_LATEST, len(body))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
               length: int | None = None) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[code]
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
                     .encode() + body)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
            self.server = None
        else:
            try:
                self._sock.close()
            except AttributeError:
                pass
        path = self.address.path
        if path is not None and self.inode is not None:
            try:
                if os.stat(path).st_ino == self.inode:
                    os.unlink(path)
            except OSError:
                pass
