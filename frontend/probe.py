"""``vhost-supervisor probe SOCKET [--json] [--type T]``: what does this back-end offer?

Why: an operator wiring a VMM to a socket wants to see, without starting a VM,
which features, protocol features, queue count and config space the back-end
behind it announces (ours or anyone's).  The probe connects as a front-end,
negotiates protocol features only (MQ, CONFIG, REPLY_ACK), never sets virtio
features or memory, and disconnects, so the back-end goes back to waiting.

Also runnable as ``python -m frontend.probe``.  Exit status: 0 on success,
1 when the socket cannot be reached or the back-end breaks the protocol,
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from typing import Any

from connection.errors import ConnectionClosed, ProtocolError
from connection.protocol import ProtocolFeature, VirtioFeature

from .vhost_user import VhostUserFrontend, feature_names
from .virtio_blk import decode_blk_config

#: Device-specific feature bit names, per device type.
DEVICE_FEATURE_NAMES: dict[str, dict[int, str]] = {
    "block": {0: "BLK_F_BARRIER", 1: "BLK_F_SIZE_MAX", 2: "BLK_F_SEG_MAX", 4: "BLK_F_GEOMETRY", 5: "BLK_F_RO",
              6: "BLK_F_BLK_SIZE", 7: "BLK_F_SCSI", 9: "BLK_F_FLUSH", 10: "BLK_F_TOPOLOGY",
              11: "BLK_F_CONFIG_WCE", 12: "BLK_F_MQ", 13: "BLK_F_DISCARD", 14: "BLK_F_WRITE_ZEROES",
              15: "BLK_F_LIFETIME", 16: "BLK_F_SECURE_ERASE", 17: "BLK_F_ZONED"},
    "console": {0: "CONSOLE_F_SIZE", 1: "CONSOLE_F_MULTIPORT", 2: "CONSOLE_F_EMERG_WRITE"},
    "rng": {},
}
#: Config sizes tried per type, first accepted wins.  The type's full size
#: comes first because some back-ends (ours) zero-pad any request up to 256
#: bytes, so "the largest size accepted" is no measure of the config size.
CONFIG_SIZES: dict[str, tuple[int, ...]] = {
    "block": (60, 56, 40, 36, 32, 24, 20, 16, 8),   # 60: what QEMU's vhost-user-blk reads
    "console": (12, 8, 4),
    "rng": (),
    "unknown": (256, 128, 96, 72, 64, 60, 56, 40, 36, 32, 24, 16, 12, 8, 4),
}
#: Device-specific bits only virtio-blk has among the types we know (console uses 0..2).
_BLK_ONLY_BITS = sum(1 << b for b in (4, 5, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17))
_CONSOLE_BITS = 0b111


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vhost-supervisor probe",
                                     description="Connect to a vhost-user back-end and show what it offers.")
    parser.add_argument("socket", help="path of the back-end's listening Unix socket")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--type", choices=("auto", "block", "console", "rng", "unknown"), default="auto",
                        help="device type for naming feature bits and decoding the config "
                             "(default: guessed from the feature bits)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the socket")
    return parser.parse_args(argv)


def _read_config(fe: VhostUserFrontend, sizes: tuple[int, ...]) -> bytes | None:
    for size in sizes:
        try:
            return fe.get_config(0, size)
        except ProtocolError:
            continue
    return None


def guess_type(features: int, has_config: bool) -> str:
    """A device type from the offered feature bits: virtio-blk has bits no other
    known type uses; a device with only bits 0..2 and a config space looks like
    a console.  Anything else is "unknown" (use ``--type``)."""
    device_bits = features & ((1 << 24) - 1)
    if device_bits & _BLK_ONLY_BITS:
        return "block"
    if has_config and device_bits & ~_CONSOLE_BITS == 0 and device_bits:
        return "console"
    return "unknown"


def probe(path: str, device_type: str = "auto", timeout: float = 5.0) -> dict[str, Any]:
    """Connect to ``path`` and return what the back-end offers (a JSON-able dict)."""
    fe = VhostUserFrontend.connect(path, timeout)
    try:
        fe.negotiate(protocol_features=ProtocolFeature.MQ | ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK,
                     set_features=False)
        has_config = bool(fe.acked_protocol_features & ProtocolFeature.CONFIG)
        guessed = device_type == "auto"
        if guessed:
            device_type = guess_type(fe.features, has_config)
        config = _read_config(fe, CONFIG_SIZES[device_type]) if has_config else None
    finally:
        fe.disconnect()
        fe.close()
    names = feature_names(fe.features & ~((1 << 24) - 1), VirtioFeature)
    device_names = DEVICE_FEATURE_NAMES.get(device_type, {})
    dev_bits = [device_names.get(bit, f"bit{bit}") for bit in range(24) if fe.features & (1 << bit)]
    result: dict[str, Any] = {
        "socket": path,
        "device_type": device_type,
        "device_type_guessed": guessed,
        "features": fe.features,
        "feature_names": dev_bits + names,
        "protocol_features": fe.protocol_features,
        "protocol_feature_names": feature_names(fe.protocol_features, ProtocolFeature),
        "queue_num": fe.queue_num,
        "config_size": len(config) if config is not None else None,
        "config": config.hex() if config is not None else None,
    }
    if device_type == "block" and config:
        result["block"] = decode_blk_config(config)
    if device_type == "console" and config and len(config) >= 4:
        cols, rows = struct.unpack_from("<HH", config, 0)
        result["console"] = {"cols": cols, "rows": rows}
        if len(config) >= 8:
            result["console"]["max_nr_ports"] = struct.unpack_from("<I", config, 4)[0]
    return result


def _hexdump(data: bytes) -> list[str]:
    return [f"  {off:04x}: " + " ".join(f"{b:02x}" for b in data[off:off + 16]) for off in range(0, len(data), 16)]


def format_text(info: dict[str, Any]) -> str:
    lines = [
        f"socket: {info['socket']}",
        f"device type: {info['device_type']}{' (guessed from features)' if info['device_type_guessed'] else ''}",
        f"features: {info['features']:#018x} {' '.join(info['feature_names'])}",
        f"protocol features: {info['protocol_features']:#x} {' '.join(info['protocol_feature_names'])}",
        f"queues: {info['queue_num'] if info['queue_num'] is not None else 'unknown (no MQ)'}",
    ]
    if info["config"] is None:
        lines.append("config: none (no CONFIG protocol feature, or every size refused)")
    else:
        lines.append(f"config ({info['config_size']} bytes):")
        lines.extend(_hexdump(bytes.fromhex(info["config"])))
    blk = info.get("block")
    if blk:
        cap = blk.get("capacity", 0)
        lines.append(f"block: capacity {cap} sectors ({cap * 512} bytes, {cap * 512 / (1 << 20):.1f} MiB)")
        rest = " ".join(f"{k}={v}" for k, v in blk.items() if k != "capacity")
        if rest:
            lines.append(f"block: {rest}")
    con = info.get("console")
    if con:
        lines.append("console: " + " ".join(f"{k}={v}" for k, v in con.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vhost-supervisor probe``; returns the exit status."""
    try:
        args = _parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        info = probe(args.socket, args.type, args.timeout)
    except (OSError, ConnectionClosed, ProtocolError) as exc:
        print(f"probe: {args.socket}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
