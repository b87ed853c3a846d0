#!/bin/sh
# Instructions per request of the block device's drain (benchmarks/device_micro.py)
# under valgrind's callgrind: the totals at two request counts, differenced, so
# interpreter start-up and imports cancel out.  Deterministic to about +-1 %,
# where CPU time on a shared machine is not.
#   sh benchmarks/device_ir.sh [device_micro flags, e.g. --batch 16 --op write]
set -eu
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for n in 2000 6000; do
    PYTHONPATH=$PWD valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$n" "$PY" -m benchmarks.device_micro \
        --requests $n --repeat 1 --image-mib 4 "$@" >/dev/null 2>"$tmp/err.$n"
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$tmp/err.$n" > "$tmp/ir.$n"
done
echo "$(( ($(cat "$tmp/ir.6000") - $(cat "$tmp/ir.2000")) / 4000 )) instructions/request ($*)"
