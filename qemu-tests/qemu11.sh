#!/usr/bin/env bash
# Provides QEMU 11 (the first QEMU with a vfio-user client, -device
# vfio-user-pci) next to the machine's own bookworm QEMU 7.2, which has none.
#
# Debian's unstable suite has it: this script debootstraps a minimal sid tree
# and installs qemu-system-x86 into it. The tree is cached outside the
# checkout (CI clones are fresh) in
#   ${CIO_CACHE_DIR:-/var/cache/cio}/qemu11-<key>
# where <key> is a hash of this script, so editing the recipe rebuilds it and
# a finished tree is reused. It prints the path of a wrapper that runs the
# tree's qemu-system-x86_64 with the tree's own loader and libraries (no
# chroot, so host paths for kernels, images and sockets work unchanged).
# About 90 s and 230 MB the first time; fails loudly on any error.
set -euo pipefail
cd "$(dirname "$0")"

log() { printf 'qemu11: %s\n' "$*" >&2; }

cache=${CIO_CACHE_DIR:-/var/cache/cio}
key=$(sha256sum qemu11.sh | cut -c1-16)
dir="$cache/qemu11-$key"
wrapper="$dir/qemu-system-x86_64"
# (Not `-device help`: listing every device loads every module, and the
# modules of a --no-install-recommends tree lack their libraries.)
has_vfio_user() { "$wrapper" -device vfio-user-pci,help 2>/dev/null | grep -q 'socket='; }

if [ -x "$wrapper" ] && has_vfio_user; then
    echo "$wrapper"
    exit 0
fi

log "building a Debian sid tree with QEMU 11 in $dir"
mkdir -p "$cache"
rm -rf "$dir" "$dir.tmp"
command -v debootstrap >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    }
}
# The mirror the machine's own apt sources name (the only one reachable).
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v '^ *#' |
    grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n 1 || true)
[ -n "$mirror" ] || { log "no Debian mirror in /etc/apt/sources*"; exit 1; }
debootstrap --variant=minbase sid "$dir.tmp" "$mirror" >"$cache/qemu11-debootstrap.log" 2>&1 || {
    log "debootstrap failed; last lines of $cache/qemu11-debootstrap.log:"
    tail -n 20 "$cache/qemu11-debootstrap.log" >&2
    exit 1
}
# The archive's Release file may look expired to this machine's clock.
inlog="$cache/qemu11-install.log"
{
    chroot "$dir.tmp" apt-get -qq -o Acquire::Check-Valid-Until=false update &&
        DEBIAN_FRONTEND=noninteractive chroot "$dir.tmp" apt-get install -y -qq \
            --no-install-recommends qemu-system-x86 &&
        chroot "$dir.tmp" apt-get clean
} >"$inlog" 2>&1 || {
    log "installing qemu-system-x86 in the sid tree failed; last lines of $inlog:"
    tail -n 20 "$inlog" >&2
    exit 1
}

root="$dir"
ld=$(cd "$dir.tmp" && ls lib64/ld-linux-x86-64.so.2)
cat >"$dir.tmp/qemu-system-x86_64" <<EOF
#!/bin/sh
# QEMU 11 from the Debian sid tree around this file (made by qemu-tests/qemu11.sh).
export QEMU_MODULE_DIR=$root/usr/lib/x86_64-linux-gnu/qemu
exec $root/$ld --library-path $root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu \\
    $root/usr/bin/qemu-system-x86_64 -L $root/usr/share/qemu -L $root/usr/share/seabios "\$@"
EOF
chmod +x "$dir.tmp/qemu-system-x86_64"
mv "$dir.tmp" "$dir"
# Trees of earlier versions of this recipe.
for old in "$cache"/qemu11-*/; do
    [ "${old%/}" = "$dir" ] || rm -rf "${old%/}"
done
"$wrapper" --version | head -n 1 >&2
has_vfio_user || {
    log "$wrapper has no vfio-user-pci device"
    exit 1
}
echo "$wrapper"
