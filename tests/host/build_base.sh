#!/bin/sh
# Debian 12 base root for the host test: debootstrap once, keyed on this script.
# Usage: build_base.sh OUTDIR   (OUTDIR/root is the tree, OUTDIR/.done marks success)
# The mirror is the one this machine's apt already uses (bookworm suite).
set -eu
out=$1
[ -f "$out/.done" ] && exit 0
command -v debootstrap >/dev/null || {
    apt-get install -y -qq debootstrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
}
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2=="bookworm"{print $1; exit}')
[ -n "$mirror" ] || { echo "build_base: no bookworm source in this machine's apt configuration" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,udev,dbus,python3,python3-venv,libcap2,libseccomp2,iproute2,procps,linux-image-cloud-amd64 \
    bookworm "$out/root" "$mirror" > "$out/debootstrap.log" 2>&1 || {
    tail -30 "$out/debootstrap.log" >&2; exit 1; }
ln -sf /dev/null "$out/root/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$out/root/etc/systemd/system/getty@tty1.service"
echo vhost-host-test > "$out/root/etc/hostname"
touch "$out/.done"
