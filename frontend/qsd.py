"""The command line of qemu-storage-daemon's vhost-user-blk export, the reference
peer that the driver tests, the e2e harness and the benchmarks all start."""

from __future__ import annotations

import os


def qsd_command(binary: str, image: str | os.PathLike[str], sock: str | os.PathLike[str], *,
                iothread: bool = True, writable: bool = True,
                num_queues: int | None = None) -> list[str]:
    """argv for one export of ``image`` on ``sock``; with ``iothread`` the export runs
    in its own iothread, qemu-storage-daemon's fast configuration."""
    export = (f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
              f"writable={'on' if writable else 'off'}")
    if num_queues is not None:
        export += f",num-queues={num_queues}"
    cmd = [binary]
    if iothread:
        cmd += ["--object", "iothread,id=io0"]
        export += ",iothread=io0"
    return cmd + ["--blockdev", f"driver=file,node-name=f,filename={image}", "--export", export]
