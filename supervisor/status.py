"""``vhost-supervisor status``: the control socket's status reply as a table."""

from __future__ import annotations

from typing import Any

COLUMNS = ("NAME", "TYPE", "SOCKET", "STATE", "PID", "RESTARTS", "RECONNECTS", "CRASHES", "LAST EXIT", "UPTIME", "RSS", "CPU",
           "FRONT-END", "HEARTBEAT")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"


def human_duration(sec: float | None) -> str:
    if sec is None:
        return "-"
    if sec < 60:
        return f"{sec:.1f}s"
    m, s = divmod(int(sec), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def device_row(d: dict[str, Any]) -> list[str]:
    last = d.get("last_exit")
    state = d.get("state", "?")
    if state in ("backoff", "crash-looping") and d.get("backoff_remaining") is not None:
        state = f"backoff ({d['backoff_remaining']:.1f}s)"
    cpu = d.get("cpu_seconds")
    return [
        d.get("name", "?"), d.get("type", "?"), d.get("socket", "?"), state,
        str(d["pid"]) if d.get("pid") else "-", str(d.get("restarts", 0)), str(d.get("reconnects", 0)),
        str(d.get("crashes_total", 0)),
        last["text"] if last else "-", human_duration(d.get("uptime")), human_bytes(d.get("rss")),
        f"{cpu:.2f}s" if cpu is not None else "-", d.get("frontend", "-"),
        human_duration(d.get("heartbeat_age")) + " ago" if d.get("heartbeat_age") is not None else "-",
    ]


def format_table(reply: dict[str, Any]) -> str:
    """Fixed-width columns, one device per line, a summary line on top."""
    rows = [list(COLUMNS)] + [device_row(d) for d in reply.get("devices", [])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    sup = reply.get("supervisor") or {}
    if sup:
        lines.append(f"supervisor pid {sup.get('pid')}, up {human_duration(sup.get('uptime'))}, "
                     f"sandbox {'on' if sup.get('sandbox') else 'OFF'}: {sup.get('summary', '')}")
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)
