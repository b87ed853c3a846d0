#!/bin/sh
# Fetch libblkio 1.5 (Debian 13's libblkio1 + libblkio-dev, unpacked with
# dpkg -x, not installed) and build blkio_bench against it.  Cached outside
# the source tree (BLKIO_CACHE, default ~/.cache/vhost-supervisor/blkio);
# prints the path of the built client.  The mirror is the one apt uses here
# (/etc/apt/sources.list*), the path is Debian's pool path, and each .deb is
# checked against the SHA256 of trixie's Packages index.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${BLKIO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-supervisor/blkio}
VERSION=1.5.0-2
ROOT=$CACHE/root-$VERSION
BIN=$CACHE/blkio_bench
mkdir -p "$CACHE"

mirror() {
    # First Debian main archive URI in the apt sources (deb822 or one-line format).
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do
        [ -f "$f" ] || continue
        sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]*\)\{0,1\}\([^[:space:]]*\).*/\2/p' "$f"
    done | grep -v -e security -e '^$' | head -n 1
}

fetch() {  # name sha256
    deb=$CACHE/$1
    if [ -f "$deb" ] && echo "$2  $deb" | sha256sum -c --status; then return 0; fi
    base=$(mirror)
    [ -n "$base" ] || { echo "no Debian mirror in /etc/apt/sources.list*" >&2; exit 1; }
    curl -fsS -m 120 -o "$deb.part" "${base%/}/pool/main/libb/libblkio/$1"
    echo "$2  $deb.part" | sha256sum -c --status || { echo "$1: SHA256 mismatch" >&2; exit 1; }
    mv "$deb.part" "$deb"
}

if [ ! -f "$ROOT/.done" ]; then
    fetch libblkio1_${VERSION}_amd64.deb b9f848d8707d35b8c0f89c5766db45907d57069ed0e8394f41c51b34df6a28e3
    fetch libblkio-dev_${VERSION}_amd64.deb 0b254075bc65dc0c4dfefefe8c175a3c068115dada89d7b2a4d8c9fc9b27f3d6
    rm -rf "$ROOT"
    dpkg -x "$CACHE/libblkio1_${VERSION}_amd64.deb" "$ROOT"
    dpkg -x "$CACHE/libblkio-dev_${VERSION}_amd64.deb" "$ROOT"
    touch "$ROOT/.done"
fi
LIB=$ROOT/usr/lib/x86_64-linux-gnu
if [ ! -x "$BIN" ] || [ "$HERE/blkio_bench.c" -nt "$BIN" ] || [ "$ROOT/.done" -nt "$BIN" ]; then
    ${CC:-gcc} -O2 -Wall -Wextra -o "$BIN.tmp" "$HERE/blkio_bench.c" -I"$ROOT/usr/include" \
        "$LIB/libblkio.so.1" -Wl,-rpath,"$LIB" -lpthread -lm
    mv "$BIN.tmp" "$BIN"
fi
echo "$BIN"
