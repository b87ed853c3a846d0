"""Guest network benchmark: our jailed net device vs QEMU's own userspace tap back-end.

Both runs use the same guest, the same `virtio-net-pci,vectors=0` (see docs/operations.md,
the TCG MSI-X trap) and a tap in a private network namespace; only the netdev differs:

* ours: `vhost-supervisor run --net vhost=SOCK,tap-name=...` + `-netdev vhost-user`
* qemu: `-netdev tap,ifname=...,script=no,downscript=no,vhost=off`

Rows (host-side timing, the guest uses busybox only):

* tcp_tx_MBps: guest -> host, `dd if=/dev/zero | nc`, 64 MiB
* tcp_rx_MBps: host -> guest, `nc > /dev/null`, 64 MiB
* rr_per_s / rr_avg_ms: `ping -A` (next request as soon as the reply is in) for 5 s
* rx_pps: 64-byte frames the host blasts at the tap for 5 s (AF_PACKET), counted by the
  guest's eth0 rx_packets

and, through our device only, DPDK testpmd (`net_virtio_user`) txonly packets/s to the tap.

Under TCG the guest's emulated CPU dominates; read the ratios.

    python -m benchmarks.net [--runs 2] [--mib 64] [--no-testpmd] [--poll-us N]
    python -m benchmarks.net --host-rr      # the device's own round trip, no guest
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from frontend.guest import procs
from frontend.guest.backends import Supervisor
from frontend.guest.initramfs import DEFAULT_MODULES, base_initramfs
from frontend.guest.kernel import ensure_kernel
from frontend.guest.qemu import Qemu, _Dev, choose_accel
from frontend.netns import NetNs, packet_socket

log = logging.getLogger("bench.net")
MiB = 1 << 20
TAP = "vhbench0"
HOST_IP, GUEST_IP = "10.81.0.1", "10.81.0.2"
GUEST_MAC = "52:54:00:12:34:56"
BLAST_SECONDS = 5.0

GUEST = r"""
ip link set eth0 up
ip addr add {guest}/24 dev eth0
i=0
until ping -c 1 -W 1 {host} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 60 ] && break; done
echo "E2E-RESULT ping_wait=$i"
echo "E2E-PHASE tx"
dd if=/dev/zero bs=64k count={blocks} 2>/dev/null | nc {host} 5001
echo "E2E-RESULT tx_rc=$?"
echo "E2E-PHASE rx"
nc {host} 5002 < /dev/null > /dev/null
echo "E2E-RESULT rx_rc=$?"
ping -A -q -w 5 {host} > /tmp/rr.txt 2>&1
echo "E2E-RESULT rr_sent=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' /tmp/rr.txt)"
echo "E2E-RESULT rr_avg=$(sed -n 's/.*= [0-9.]*\/\([0-9.]*\)\/.*/\1/p' /tmp/rr.txt)"
a=$(cat /sys/class/net/eth0/statistics/rx_packets)
echo "E2E-PHASE pps"
sleep {pps_wait}
b=$(cat /sys/class/net/eth0/statistics/rx_packets)
echo "E2E-RESULT pps_frames=$((b-a))"
"""


class _Timed(threading.Thread):
    """One TCP connection on the host side, timed from accept to EOF."""

    def __init__(self, port: int, send: int = 0) -> None:
        super().__init__(daemon=True)
        # IP_FREEBIND: listening before the tap (and its address) exists
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, 15, 1)
        self.sock.bind((HOST_IP, port))
        self.sock.listen(1)
        self.sock.settimeout(900)
        self.send = send
        self.bytes = 0
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                t0 = time.perf_counter()
                if self.send:
                    block = bytes(1 << 16)
                    while self.bytes < self.send:
                        self.bytes += conn.send(block[:self.send - self.bytes])
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)            # the guest closes once it has read everything
                else:
                    while chunk := conn.recv(1 << 16):
                        self.bytes += len(chunk)
                self.seconds = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - reported as a failed row
            self.error = exc
        finally:
            self.sock.close()


def _blast(seconds: float) -> int:
    """64-byte frames (local experimental ethertype) to the guest's MAC for ``seconds``."""
    frame = bytes.fromhex(GUEST_MAC.replace(":", "")) + bytes.fromhex("020000000001") + b"\x88\xb5" + bytes(50)
    s = packet_socket(TAP)
    sent = 0
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(64):
                try:
                    s.send(frame)
                    sent += 1
                except (BlockingIOError, socket.timeout):
                    break
    finally:
        s.close()
    return sent


def run_once(backend: str, kernel, initrd: Path, accel: str, mib: int, poll_us: int = 0) -> dict[str, float]:
    ns = NetNs("vhbench")
    workdir = Path(tempfile.mkdtemp(prefix="bnet-", dir="/tmp"))
    sup = q = None
    try:
        with ns.entered():
            q = Qemu(kernel, workdir, accel=accel, base_initrd=initrd, mem_mb=512, name=backend)
            if backend == "ours":
                sock = workdir / "net.sock"
                sup = Supervisor(workdir, ["--net", f"vhost={sock},tap-name={TAP},name=net0,poll-us={poll_us}"],
                                 workdir / "supervisor.log")
                sup.start([sock])
                q.attach(sup)
                q.add_vhost_user_net(sock, GUEST_MAC)
            else:
                q._devs.append(_Dev(["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                                     "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},vectors=0"]))
            tx, rx = _Timed(5001), _Timed(5002, send=mib * MiB)
            tx.start()
            rx.start()
            q.start(GUEST.format(guest=GUEST_IP, host=HOST_IP, blocks=mib * 16, pps_wait=BLAST_SECONDS + 2))
            deadline = time.monotonic() + 60
            while ns.ip("link", "show", TAP, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise q.failure(f"{TAP} did not appear")
                time.sleep(0.05)
            ns.ip("link", "set", TAP, "up")
            ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
            q.wait_for_line("E2E-PHASE pps", timeout=900)
            time.sleep(0.5)
            blasted = _blast(BLAST_SECONDS)
            res = q.wait(timeout=900)
            tx.join(10)
            rx.join(10)
        if res.rc != 0 or tx.error or rx.error:
            raise RuntimeError(f"{backend}: guest rc={res.rc} {res.results} tx={tx.error} rx={rx.error}")
        out = {
            "tcp_tx_MBps": tx.bytes / tx.seconds / 1e6,
            "tcp_rx_MBps": rx.bytes / rx.seconds / 1e6,
            "rr_per_s": int(res.results["rr_sent"]) / 5.0,
            "rr_avg_ms": float(res.results["rr_avg"]),
            "rx_pps": int(res.results["pps_frames"]) / BLAST_SECONDS,
            "rx_blasted_pps": blasted / BLAST_SECONDS,
        }
        log.warning("%s: %s", backend, json.dumps({k: round(v, 2) for k, v in out.items()}))
        return out
    finally:
        if q is not None:
            q.stop()
        if sup is not None:
            sup.stop()
        procs.reap_all()
        ns.close()


def testpmd_txonly(seconds: float = 3.0) -> float:
    """Packets/s testpmd's txonly pushes through our jailed device to the tap."""
    from frontend.testpmd import PmdSession
    ns = NetNs("vhbench")
    workdir = Path(tempfile.mkdtemp(prefix="bnet-", dir="/tmp"))
    sup = pmd = None
    try:
        with ns.entered():
            sock = workdir / "net.sock"
            sup = Supervisor(workdir, ["--net", f"vhost={sock},tap-name={TAP},name=net0"], workdir / "sup.log")
            sup.start([sock])
            pmd = PmdSession(sock, workdir)
            pmd.cmd("set fwd txonly", "testpmd> ")
            before = ns.link_stats(TAP)["rx_packets"]
            pmd.cmd("start", "testpmd> ")
            time.sleep(seconds)
            pmd.cmd("stop", "Done.")
            time.sleep(0.5)
            return (ns.link_stats(TAP)["rx_packets"] - before) / seconds
    finally:
        if pmd is not None:
            pmd.quit()
        if sup is not None:
            sup.stop()
        procs.reap_all()
        ns.close()


def host_rr(count: int = 3000) -> tuple[float, float]:
    """ICMP echo round trips through the device alone (no QEMU, no guest): the
    front-end driver sends an echo request on transmitq0 and waits for the
    reply on receiveq0; the device runs unjailed in a forked child.  Returns
    (median, mean) in microseconds, the first 200 round trips left out."""
    import os

    from connection.connection import VhostUserListener
    from connection.executor import Executor
    from frontend.vhost_user import DRIVER_PROTOCOL_FEATURES, VhostUserFrontend
    from connection.protocol import VirtioFeature as VF
    from devices import net as netdev
    from frontend.netns import NetDriver, icmp_echo_frame

    ns = NetNs("vhbench")
    try:
        with ns.entered():
            builder = netdev.NetBuilder.from_options("rr", {"tap-name": TAP})
            ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
            ns.ip("neigh", "add", GUEST_IP, "lladdr", GUEST_MAC, "dev", TAP)
            sock = tempfile.mktemp(prefix="bnet-rr-", dir="/tmp")
            listener = VhostUserListener(sock)
            pid = os.fork()
            if pid == 0:
                try:
                    listener.run_device(Executor(), builder)
                finally:
                    os._exit(0)
            fe = VhostUserFrontend.connect(sock)
            feats = (int(VF.VERSION_1 | VF.RING_EVENT_IDX | VF.PROTOCOL_FEATURES) | netdev.F_MRG_RXBUF
                     | netdev.F_CSUM | netdev.F_GUEST_CSUM)
            fe.negotiate(feats, int(DRIVER_PROTOCOL_FEATURES))
            fe.setup_memory(16 * MiB)
            drv = NetDriver(fe, 256)
            drv.post(128)
            mac = json.loads(ns.ip("-j", "link", "show", TAP).stdout)[0]["address"]
            times = []
            for i in range(count):
                frame = icmp_echo_frame(GUEST_MAC, mac, GUEST_IP, HOST_IP, 7, i & 0xFFFF)
                t0 = time.perf_counter()
                drv.send(frame)
                drv.frames(1, match=lambda f: f[12:14] == b"\x08\x00" and f[23] == 1)
                times.append(time.perf_counter() - t0)
            fe.close()
            os.waitpid(pid, 0)
            listener.close()
            builder.close()
    finally:
        ns.close()
    times = times[200:]
    return statistics.median(times) * 1e6, statistics.mean(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--no-testpmd", action="store_true")
    ap.add_argument("--host-rr", action="store_true", help="only the device's own round-trip time")
    ap.add_argument("--poll-us", type=int, default=0, help="our device's poll-us= (tx ring polling bound)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.host_rr:
        med, mean = host_rr()
        print(f"ICMP echo through the device alone (driver -> tx -> tap -> rx -> driver): "
              f"median {med:.1f} us, mean {mean:.1f} us")
        return 0
    kernel = ensure_kernel()
    initrd = base_initramfs(kernel, DEFAULT_MODULES + ["virtio_net"])
    accel = choose_accel(kernel)
    results: dict[str, list[dict[str, float]]] = {"ours": [], "qemu": []}
    for _ in range(args.runs):
        for backend in ("ours", "qemu"):   # alternating, so host drift hits both
            results[backend].append(run_once(backend, kernel, initrd, accel, args.mib, args.poll_us))
    keys = list(results["ours"][0])
    print(f"\nguest network, {accel}, {args.runs} runs each, medians (ours = jailed net child; "
          f"qemu = -netdev tap,vhost=off)")
    print(f"{'row':<16}{'ours':>12}{'qemu':>12}{'ours/qemu':>12}")
    for k in keys:
        a = statistics.median(r[k] for r in results["ours"])
        b = statistics.median(r[k] for r in results["qemu"])
        ratio = a / b if b else float("nan")
        if k == "rr_avg_ms":
            ratio = b / a if a else float("nan")   # lower is better: report qemu/ours
        print(f"{k:<16}{a:>12.2f}{b:>12.2f}{ratio:>12.2f}")
    if not args.no_testpmd:
        pps = testpmd_txonly()
        print(f"testpmd txonly through our device to the tap: {pps:,.0f} packets/s (64-byte)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
