#!/bin/sh
# Build QEMU's qtest binaries (qemu-system-x86_64 + tests/qtest/qos-test) for
# the installed Debian QEMU version, cached outside the project tree.
#
# Why: Debian's qemu-system-x86_64 lacks the qtest accelerator and Debian does
# not ship qos-test, so running QEMU's own vhost-user-blk suite needs a small
# build of the matching source.  The build is keyed by the Debian source
# version and reused by later runs (first run ~6 min on 2 cores, cached: ~0 s).
#
# Output: prints the build directory on stdout (last line).
# Env: QEMU_QTEST_CACHE (default /var/cache/vhost-supervisor, or
#      $XDG_CACHE_HOME/vhost-supervisor when /var/cache is not writable).
set -eu
# Debian's python3 and meson, whatever else is first on PATH (pyenv, venvs).
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

log() { echo "build_qemu: $*" >&2; }

src_pkg=$(dpkg-query -W -f='${source:Package}' qemu-system-x86)
src_ver=$(dpkg-query -W -f='${source:Version}' qemu-system-x86)
upstream=$(echo "$src_ver" | sed -e 's/^[0-9]*://' -e 's/[+-].*//')
if [ -z "$src_ver" ]; then
    echo "build_qemu: qemu-system-x86 is not installed" >&2; exit 2
fi

base=${QEMU_QTEST_CACHE:-}
if [ -z "$base" ]; then
    if mkdir -p /var/cache/vhost-supervisor 2>/dev/null && [ -w /var/cache/vhost-supervisor ]; then
        base=/var/cache/vhost-supervisor
    else
        base=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-supervisor
    fi
fi
cache="$base/qemu-$upstream-qtest"
build="$cache/build"
stamp="$cache/.built-$(echo "$src_ver" | tr ':' '_')"

# A binary run from its build tree looks for firmware only under
# qemu-bundle/<configured path> (util/cutils.c get_relocated_path); the dfsg
# source has no pc-bios blobs, so those paths lead to Debian's packages.
link_firmware() {
    for dir in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
        mkdir -p "$build/qemu-bundle$(dirname "$dir")"
        ln -sfn "$dir" "$build/qemu-bundle$dir"
    done
}

# QEMU's own example back-end (contrib/vhost-user-blk, on libvhost-user): the
# third peer of benchmarks/block_matrix.py.  Seconds to build from this tree.
PEER=contrib/vhost-user-blk/vhost-user-blk

if [ -f "$stamp" ] && [ -x "$build/qemu-system-x86_64" ] && [ -x "$build/tests/qtest/qos-test" ]; then
    if [ ! -x "$build/$PEER" ]; then
        log "ninja $PEER"
        (cd "$build" && ninja "$PEER" >ninja-peer.log 2>&1) || { tail -n 20 "$build/ninja-peer.log" >&2; exit 1; }
    fi
    link_firmware
    log "cached build for $src_pkg $src_ver in $build"
    echo "$build"; exit 0
fi
mkdir -p "$cache"

# Build dependencies (only what this reduced configuration needs).
deps="build-essential ninja-build meson pkg-config libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev \
      python3 python3-venv dpkg-dev seabios ipxe-qemu qemu-system-data qemu-system-common"
missing=""
for p in $deps; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing build dependencies:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

# Source: Debian's source package for exactly the installed version.  The
# deb-src entry lives in a file of its own and is removed afterwards.
srcroot="$cache/source"
srcdir=$(find "$srcroot" -mindepth 1 -maxdepth 1 -type d -name "$src_pkg-$upstream*" 2>/dev/null | head -n 1)
if [ -z "$srcdir" ] || [ ! -f "$srcdir/tests/qtest/vhost-user-blk-test.c" ]; then
    list=/etc/apt/sources.list.d/vhost-supervisor-qemu-src.sources
    cleanup() { rm -f "$list"; apt-get update -qq >/dev/null 2>&1 || true; }
    trap cleanup EXIT INT TERM
    cat >"$list" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    log "fetching source $src_pkg=$src_ver"
    apt-get update -qq
    rm -rf "$srcroot"; mkdir -p "$srcroot"
    # _apt must be able to write there, or apt warns and downloads unsandboxed
    chown _apt "$srcroot" 2>/dev/null || true
    (cd "$srcroot" && apt-get source -qq "$src_pkg=$src_ver" >/dev/null)
    cleanup
    trap - EXIT INT TERM
    srcdir=$(find "$srcroot" -mindepth 1 -maxdepth 1 -type d -name "$src_pkg-$upstream*" | head -n 1)
fi
log "source in $srcdir"

# Reduced configuration; firmware comes from Debian's packages (see link_firmware).
rm -rf "$build"; mkdir -p "$build"
cd "$build"
"$srcdir/configure" --target-list=x86_64-softmmu --without-default-features \
    --enable-tools --enable-vhost-user --enable-vhost-user-blk-server --enable-tcg --enable-fdt=system \
    --meson=/usr/bin/meson \
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu >configure.log 2>&1 \
    || { tail -n 40 configure.log >&2; exit 1; }
jobs=$(nproc)
log "ninja -j$jobs qemu-system-x86_64 tests/qtest/qos-test $PEER"
ninja -j"$jobs" qemu-system-x86_64 tests/qtest/qos-test "$PEER" >ninja.log 2>&1 \
    || { tail -n 40 ninja.log >&2; exit 1; }
link_firmware
touch "$stamp"
echo "$build"
