"""Guest-side shell (busybox ash) for the cases, and the host-side checks that mirror them.

Why the pattern ships in the initramfs: the host generates it from a seed, so the host can
check the very same bytes in the image file without trusting anything the guest says.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

BS = 65536  # dd block size: every dd request is one 64 KiB O_DIRECT I/O


def pattern(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes; different seeds give different data."""
    return random.Random(seed).randbytes(size)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def image_bytes(image: Path, offset: int, size: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(size)


def make_image(path: Path, size: int) -> Path:
    """A sparse raw image of `size` bytes (zeroes)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


WRITE_VERIFY = r"""
set -u
DEV=/dev/{dev}
OFF={offset_blocks}
CNT={count_blocks}
[ -b $DEV ] || {{ echo "E2E-RESULT error=no_$DEV"; exit 2; }}
echo "E2E-RESULT size_bytes=$(blockdev --getsize64 $DEV)"
echo "E2E-RESULT ro=$(blockdev --getro $DEV)"
dd if=/e2e/pattern of=$DEV bs={bs} seek=$OFF count=$CNT oflag=direct conv=fsync,notrunc 2>/tmp/dd.err
echo "E2E-RESULT write_rc=$?"
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=$DEV of=/tmp/readback bs={bs} skip=$OFF count=$CNT iflag=direct 2>>/tmp/dd.err
echo "E2E-RESULT read_rc=$?"
echo "E2E-RESULT expected_md5=$(md5sum < /e2e/pattern | cut -d' ' -f1)"
echo "E2E-RESULT readback_md5=$(md5sum < /tmp/readback | cut -d' ' -f1)"
tail -n 3 /tmp/dd.err
"""


def write_verify_script(offset: int, size: int, dev: str = "vda", pattern_file: str = "pattern") -> str:
    """O_DIRECT write of /e2e/<pattern_file> at `offset`, fsync, drop caches, O_DIRECT read back."""
    assert offset % BS == 0 and size % BS == 0
    text = WRITE_VERIFY.format(offset_blocks=offset // BS, count_blocks=size // BS, bs=BS, dev=dev)
    return text.replace("/e2e/pattern", f"/e2e/{pattern_file}")


READ_ONLY = r"""
set -u
DEV=/dev/{dev}
echo "E2E-RESULT ro=$(blockdev --getro $DEV)"
dd if=/e2e/pattern of=$DEV bs={bs} count=1 oflag=direct conv=notrunc 2>/tmp/dd.err
echo "E2E-RESULT write_rc=$?"
echo "E2E-RESULT write_err=$(tr '\n' ' ' < /tmp/dd.err)"
echo "E2E-RESULT read_md5=$(dd if=$DEV bs={bs} count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
"""


def read_only_script(dev: str = "vda") -> str:
    """Try an O_DIRECT write on a read-only disk; report rc and error text; read must work."""
    return READ_ONLY.format(bs=BS, dev=dev)


DISCARD = r"""
set -u
DEV=/dev/{dev}
echo "E2E-RESULT discard_max=$(cat /sys/block/{dev}/queue/discard_max_bytes)"
dd if=/e2e/pattern of=$DEV bs={bs} seek=0 oflag=direct conv=fsync,notrunc 2>/dev/null
echo "E2E-RESULT write_rc=$?"
blkdiscard -o {offset} -l {length} $DEV 2>/tmp/discard.err
echo "E2E-RESULT discard_rc=$?"
echo "E2E-RESULT discard_err=$(tr '\n' ' ' < /tmp/discard.err)"
sync
"""


def discard_script(offset: int, length: int) -> str:
    """Fill the start of the disk, then blkdiscard a range inside it."""
    return DISCARD.format(bs=BS, offset=offset, length=length, dev="vda")


RNG = r"""
set -u
echo "E2E-RESULT rng_available=$(tr ' ' ',' < /sys/class/misc/hw_random/rng_available)"
echo "E2E-RESULT rng_current=$(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng of=/tmp/rnd bs=1024 count=16 iflag=fullblock 2>/dev/null
echo "E2E-RESULT read_rc=$?"
echo "E2E-RESULT bytes=$(wc -c < /tmp/rnd)"
echo "E2E-RESULT distinct=$(od -An -v -tu1 -w1 /tmp/rnd | sort -u | wc -l)"
echo "E2E-RESULT zero_run=$(od -An -v -tx1 /tmp/rnd | grep -c '00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00')"
"""


def rng_script() -> str:
    """Read 16 KiB from /dev/hwrng and report which source the kernel picked."""
    return RNG


LOOP = r"""
set -u
DEV=/dev/{dev}
MIN_ROUNDS={min_rounds}
MAX_ROUNDS={max_rounds}
LAP={lap}
STREAMS={streams}
CNT={count_blocks}
WANT0=$(md5sum < /e2e/pattern | cut -d' ' -f1)
WANT1=$(md5sum < /e2e/pattern2 | cut -d' ' -f1)
t_end=$(( $(cut -d. -f1 /proc/uptime) + {min_seconds} ))
echo "E2E-PHASE loop-start"
r=0
while [ $r -lt $MIN_ROUNDS ] || [ $(cut -d. -f1 /proc/uptime) -lt $t_end ]; do
    [ $r -ge $MAX_ROUNDS ] && break
    slot=$((r % LAP))
    if [ $(( (r / LAP) % 2 )) -eq 0 ]; then P=/e2e/pattern; WANT=$WANT0; else P=/e2e/pattern2; WANT=$WANT1; fi
    s=0
    while [ $s -lt $STREAMS ]; do
        ( off=$(( (slot * STREAMS + s) * CNT ))
          dd if=$P of=$DEV bs={bs} seek=$off count=$CNT oflag=direct conv=notrunc 2>/dev/null || echo "E2E-RESULT write_fail_r${{r}}_s${{s}}=1"
          got=$(dd if=$DEV bs={bs} skip=$off count=$CNT iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
          [ "$got" = "$WANT" ] || echo "E2E-RESULT mismatch_r${{r}}_s${{s}}=$got"
        ) &
        s=$((s + 1))
    done
    wait
    echo "E2E-PHASE round=$r"
    r=$((r + 1))
done
echo "E2E-RESULT rounds_done=$r"
"""


def loop_script(
    min_rounds: int, streams: int, chunk: int, disk_size: int, min_seconds: int = 8, max_rounds: int = 2000
) -> str:
    """Rounds of `streams` parallel write-then-verify jobs, each on its own range.

    Needs /e2e/pattern and /e2e/pattern2 (each `chunk` bytes). Why parallel: several
    requests are in flight at once (on more than one queue when the guest has several
    CPUs), so a crash catches some mid-flight. Why a time floor: on a fast (KVM) guest the
    rounds alone would be over before the host's kills land. Once the rounds fill the disk
    they start over on the same ranges with the other pattern, so a lost write can never
    hide behind an identical earlier one.
    """
    assert chunk % BS == 0
    lap = disk_size // (streams * chunk)
    assert lap >= 1, "disk too small for one round"
    return LOOP.format(
        min_rounds=min_rounds, max_rounds=max_rounds, lap=lap, streams=streams,
        count_blocks=chunk // BS, bs=BS, dev="vda", min_seconds=min_seconds,
    )


def loop_expected_image(rounds_done: int, streams: int, chunk: int, disk_size: int,
                        patterns: tuple[bytes, bytes]) -> dict[int, bytes]:
    """Offset -> the bytes `loop_script` left there after `rounds_done` rounds."""
    lap = disk_size // (streams * chunk)
    expected: dict[int, bytes] = {}
    for r in range(max(0, rounds_done - lap), rounds_done):  # the last write of each slot wins
        data = patterns[(r // lap) % 2]
        for s in range(streams):
            expected[((r % lap) * streams + s) * chunk] = data
    return expected


def combine(parts: dict[str, str]) -> str:
    """Run several case scripts in turn, prefixing each one's result keys (`vda_size_bytes`).

    Why: one guest exercises several devices, and the results must not collide.
    """
    out = ["rc=0"]
    for prefix, script in parts.items():
        out.append(f"cat > /tmp/{prefix}.sh <<'E2E_EOF'\n{script}\nE2E_EOF")
        out.append(f"sh /tmp/{prefix}.sh 2>&1 | sed 's/E2E-RESULT /E2E-RESULT {prefix}_/' || rc=1")
    out.append("exit $rc")
    return "\n".join(out) + "\n"


# --- host-side checks shared by the cases against qemu-storage-daemon and ours ------------

WRITE_REFUSED = ("Operation not permitted", "Read-only file system", "I/O error")


def check_write_verify(res, image: Path, offset: int, data: bytes, disk_size: int) -> None:
    """The guest read back what it wrote, and the image holds exactly those bytes there."""
    assert res.int("size_bytes") == disk_size, res.results
    assert res.int("write_rc") == 0 and res.int("read_rc") == 0, res.console[-2000:]
    assert res.results["expected_md5"] == md5(data)
    assert res.results["readback_md5"] == md5(data), "guest read back other bytes than it wrote"
    assert md5(image_bytes(image, offset, len(data))) == md5(data), "image file does not hold the pattern"
    assert image_bytes(image, 0, offset) == bytes(offset), "bytes before the range changed"
    assert res.int("io_errors") == 0, res.console[-2000:]


def check_read_only(res, image: Path, before: bytes) -> None:
    """Writes fail (EPERM from the guest's block layer, which honours VIRTIO_BLK_F_RO;
    `blockdev --setrw` cannot lift a disk-level ro flag in Linux 6.1, so a guest cannot
    force a write through to the device) and the image stays byte-identical."""
    assert res.int("ro") == 1, "the device did not advertise VIRTIO_BLK_F_RO"
    assert res.int("write_rc") != 0, res.results
    assert any(e in res.results["write_err"] for e in WRITE_REFUSED), res.results
    assert image.read_bytes() == before, "the read-only image changed"
    assert res.results["read_md5"] == md5(before[:BS]), "reads from the read-only disk are wrong"


OUT_OF_ORDER = r"""
set -u
DEV=/dev/vda
W={writes}
( i=0
  while [ $i -lt $W ]; do
      dd if=/e2e/pattern of=$DEV bs={bs} seek=$i count=1 oflag=direct conv=notrunc 2>/dev/null \
          || echo "E2E-RESULT write_fail_$i=1"
      echo "E2E-PHASE write=$i"
      i=$((i + 1))
  done
  echo "E2E-RESULT writes_done=$i"
  touch /tmp/writer.done ) &
( n=0
  while [ ! -e /tmp/writer.done ]; do
      dd if=$DEV of=/dev/null bs=4096 count=1 skip={read_block} iflag=direct 2>/dev/null || echo "E2E-RESULT read_fail=$n"
      n=$((n + 1))
  done
  echo "E2E-RESULT reads=$n" ) &
wait
"""


def out_of_order_script(writes: int, read_block: int = 1000) -> str:
    """One writer and one reader on the same queue, so that when writes are slow the
    reads submitted after a write complete before it: completions out of order."""
    return OUT_OF_ORDER.format(writes=writes, bs=BS, read_block=read_block)
