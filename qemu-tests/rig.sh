#!/usr/bin/env bash
# Builds the QEMU test rig under target/qemu-rig/ (cached: a second run only
# rebuilds what changed):
#   vmlinuz         Debian bookworm's 6.1 kernel, from the package archive
#   initramfs.gz    busybox, the kernel modules the tests need, static ciod
#                   and cio, ciod-rdma and cio-rdma (built with the rdma
#                   feature, dynamic: libibverbs is loaded at run time) with
#                   libibverbs, librdmacm and the soft-RoCE provider,
#                   Debian's usbip/usbipd, lspci/setpci, the rdma tool and
#                   the verbs baselines (ibv_rc_pingpong, rping) with
#                   their libraries, and
#                   the init scripts (qemu-tests/guest-init.sh, guest-usb.sh,
#                   guest-nvme-remote.sh)
#   cio, ciod       the static binaries, for the host side of the tests
#   qemu11          a link to QEMU 11 (qemu-tests/qemu11.sh, cached outside
#                   the checkout), for the guests that need vfio-user
# Installs qemu-system-x86, busybox-static, cpio, usbip, usb.ids,
# pciutils, the RDMA user space (ibverbs-providers, ibverbs-utils,
# rdmacm-utils) and what building sideway needs (cmake, libclang-dev) with
# apt if missing.
# Prints the rig directory on its last line. Fails loudly on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rig="$root/target/qemu-rig"
mkdir -p "$rig"

log() { printf 'rig: %s\n' "$*" >&2; }

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
# (grep without -q: an early exit would SIGPIPE busybox and fail under pipefail)
{ [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x insmod >/dev/null; } || need_pkgs+=(busybox-static)
command -v cpio >/dev/null || need_pkgs+=(cpio)
[ -x /usr/sbin/usbipd ] || need_pkgs+=(usbip)
[ -e /usr/share/misc/usb.ids ] || need_pkgs+=(usb.ids)
[ -x /usr/bin/setpci ] && [ -x /usr/bin/lspci ] || need_pkgs+=(pciutils)
[ -e /etc/libibverbs.d/rxe.driver ] || need_pkgs+=(ibverbs-providers)
command -v ibv_rc_pingpong >/dev/null || need_pkgs+=(ibverbs-utils)
command -v rping >/dev/null || need_pkgs+=(rdmacm-utils)
command -v rdma >/dev/null || need_pkgs+=(iproute2)
command -v cmake >/dev/null || need_pkgs+=(cmake)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_pkgs+=(libclang-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    }
fi
# busybox-static replaces /bin/busybox with a static build.
file -L /bin/busybox 2>/dev/null | grep -q "statically linked" || ldd /bin/busybox 2>&1 | grep -q "not a dynamic" || {
    log "/bin/busybox is not static: install busybox-static"
    exit 1
}

# Kernel: the newest 6.1 image package the archive has.
if [ ! -f "$rig/vmlinuz" ]; then
    pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
    if [ -z "$pkg" ]; then
        apt-get update -qq >/dev/null
        pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
    fi
    [ -n "$pkg" ] || { log "no linux-image-6.1.0-*-amd64 package in the archive"; exit 1; }
    log "kernel package $pkg"
    rm -rf "$rig/kernel" "$rig"/*.deb
    # Stale package lists may name a version the archive no longer has.
    (cd "$rig" && apt-get download "$pkg" >/dev/null 2>&1) || {
        apt-get update -qq >/dev/null
        (cd "$rig" && apt-get download "$pkg" >/dev/null)
    }
    dpkg-deb -x "$rig"/"$pkg"_*.deb "$rig/kernel"
    rm -f "$rig"/*.deb
    cp "$rig"/kernel/boot/vmlinuz-* "$rig/vmlinuz.tmp"
    mv "$rig/vmlinuz.tmp" "$rig/vmlinuz"
fi
kver=$(ls "$rig/kernel/lib/modules" | head -n 1)
moddir="$rig/kernel/lib/modules/$kver/kernel"

# Static ciod and cio.
log "building static ciod and cio"
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$root/target/static" \
    cargo build --quiet --release --locked --target x86_64-unknown-linux-gnu \
    -p cio-backend --bin ciod -p cio-cli --bin cio
ciod="$root/target/static/x86_64-unknown-linux-gnu/release/ciod"
cio="$root/target/static/x86_64-unknown-linux-gnu/release/cio"
for b in "$cio" "$ciod"; do
    cp "$b" "$rig/$(basename "$b").tmp" && mv "$rig/$(basename "$b").tmp" "$rig/$(basename "$b")"
done

# ciod and cio with RDMA (dynamic: sideway loads libibverbs at run time,
# which a static binary cannot), as ciod-rdma and cio-rdma.
log "building ciod-rdma and cio-rdma"
# (The default target directory: only the crates the feature changes are
# built again.)
# rdma-overrun (qemu-tests/src/bin) is the broken peer the RDMA test uses.
cargo build --quiet --release --locked -p cio-backend --bin ciod -p cio-cli --bin cio \
    -p cio-qemu-tests --bin rdma-overrun \
    --features cio-backend/rdma,cio-cli/rdma,cio-qemu-tests/rdma
for b in ciod cio; do
    cp "$root/target/release/$b" "$rig/$b-rdma.tmp" && mv "$rig/$b-rdma.tmp" "$rig/$b-rdma"
done
cp "$root/target/release/rdma-overrun" "$rig/rdma-overrun.tmp" && mv "$rig/rdma-overrun.tmp" "$rig/rdma-overrun"

qemu11=$(bash qemu-tests/qemu11.sh)
ln -sfn "$qemu11" "$rig/qemu11"

# Modules in load order (dependencies first).
modules=(
    virt/lib/irqbypass.ko
    drivers/vfio/vfio.ko
    drivers/vfio/vfio_iommu_type1.ko
    drivers/vfio/vfio_virqfd.ko
    drivers/vfio/pci/vfio-pci-core.ko
    drivers/vfio/pci/vfio-pci.ko
    drivers/virtio/virtio_ring.ko
    drivers/virtio/virtio.ko
    drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci_modern_dev.ko
    drivers/virtio/virtio_pci.ko
    net/core/failover.ko
    drivers/net/net_failover.ko
    drivers/net/virtio_net.ko
    drivers/usb/common/usb-common.ko
    drivers/usb/core/usbcore.ko
    drivers/usb/host/xhci-hcd.ko
    drivers/usb/host/xhci-pci.ko
    drivers/scsi/scsi_common.ko
    drivers/scsi/scsi_mod.ko
    crypto/crct10dif_common.ko
    lib/crc-t10dif.ko
    lib/crc64.ko
    lib/crc64-rocksoft.ko
    block/t10-pi.ko
    drivers/scsi/sd_mod.ko
    drivers/usb/storage/usb-storage.ko
    drivers/usb/class/cdc-acm.ko
    drivers/usb/usbip/usbip-core.ko
    drivers/usb/usbip/usbip-host.ko
    drivers/usb/usbip/vhci-hcd.ko
)
# Copied to /modules/extra but not loaded at boot: the guest that needs them
# loads them (nvme's driver would otherwise claim the nvme that guest A
# serves through VFIO).
extra_modules=(
    drivers/nvme/host/nvme-core.ko
    drivers/nvme/host/nvme.ko
)
# Soft-RoCE, in load order, in /modules/rdma: loaded by guests booted with
# cio.rdma=IFACE:IP (rxe checksums its packets with the crc32 shash).
rdma_modules=(
    fs/configfs/configfs.ko
    drivers/infiniband/core/ib_core.ko
    drivers/infiniband/core/ib_uverbs.ko
    drivers/infiniband/core/iw_cm.ko
    drivers/infiniband/core/ib_cm.ko
    drivers/infiniband/core/rdma_cm.ko
    drivers/infiniband/core/rdma_ucm.ko
    net/ipv4/udp_tunnel.ko
    net/ipv6/ip6_udp_tunnel.ko
    crypto/crc32_generic.ko
    drivers/infiniband/sw/rxe/rdma_rxe.ko
)
# What the RDMA binaries load at run time (ldd does not see it) and the
# tools that run beside them.
libdir=/usr/lib/x86_64-linux-gnu
rdma_libs=(
    "$libdir/libibverbs.so.1" "$libdir/librdmacm.so.1"
    "$libdir/libibverbs/librxe-rdmav34.so"
)
rdma_tools=(/usr/bin/rdma /usr/bin/ibv_rc_pingpong /usr/bin/rping)

initrd="$rig/initramfs.gz"
stamp="$rig/initramfs.inputs"
inputs=$(sha256sum "$ciod" "$cio" "$rig/ciod-rdma" "$rig/cio-rdma" "$rig/rdma-overrun" qemu-tests/guest-init.sh \
    qemu-tests/guest-usb.sh qemu-tests/guest-nvme-remote.sh qemu-tests/rig.sh \
    /usr/sbin/usbip /usr/sbin/usbipd /usr/bin/lspci /usr/bin/setpci \
    "${rdma_libs[@]}" "${rdma_tools[@]}" | sha256sum | cut -d' ' -f1)
if [ -f "$initrd" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
    log "initramfs up to date"
else
    log "building initramfs"
    tree="$rig/initramfs"
    rm -rf "$tree"
    mkdir -p "$tree"/{bin,dev,proc,sys,tmp,modules}
    cp /bin/busybox "$tree/bin/busybox"
    cp "$ciod" "$tree/bin/ciod"
    cp "$cio" "$tree/bin/cio"
    cp "$rig/ciod-rdma" "$tree/bin/ciod-rdma"
    cp "$rig/cio-rdma" "$tree/bin/cio-rdma"
    cp "$rig/rdma-overrun" "$tree/bin/rdma-overrun"
    # Without debug info (symbols stay): the guest unpacks all of this into
    # its 512 MiB.
    strip --strip-debug "$tree"/bin/ciod* "$tree"/bin/cio* "$tree/bin/rdma-overrun"
    cp qemu-tests/guest-init.sh "$tree/init"
    cp qemu-tests/guest-usb.sh "$tree/usb-test.sh"
    cp qemu-tests/guest-nvme-remote.sh "$tree/nvme-remote-test.sh"
    chmod +x "$tree/init" "$tree/usb-test.sh" "$tree/nvme-remote-test.sh"
    # Debian's usbip tools (the stock client and server) and pciutils
    # (what the tests compare cio's register tools with) with their
    # libraries at the same paths, and what they read at run time.
    mkdir -p "$tree/usr/sbin" "$tree/usr/bin" "$tree/usr/share/misc" "$tree/var/run/vhci_hcd"
    for b in /usr/sbin/usbip /usr/sbin/usbipd /usr/bin/lspci /usr/bin/setpci \
        "${rdma_tools[@]}" "$tree/bin/ciod-rdma" "$tree/bin/cio-rdma" "$tree/bin/rdma-overrun" \
        "${rdma_libs[@]}"; do
        case "$b" in "$tree"/*) ;; *) mkdir -p "$tree$(dirname "$b")" && cp -L "$b" "$tree$b" ;; esac
        for lib in $(ldd "$b" | grep -o '/[^ ]*\.so[^ ]*'); do
            mkdir -p "$tree$(dirname "$lib")"
            cp -L "$lib" "$tree$lib"
        done
    done
    mkdir -p "$tree/etc/libibverbs.d"
    cp /etc/libibverbs.d/rxe.driver "$tree/etc/libibverbs.d/"
    cp -L /usr/share/misc/usb.ids "$tree/usr/share/misc/usb.ids"
    : > "$tree/modules/order"
    loaded=" "
    for m in "${modules[@]}"; do
        [ -f "$moddir/$m" ] || { log "module $m missing from kernel $kver"; exit 1; }
        # Every dependency must be loaded before it.
        deps=$(strings "$moddir/$m" | sed -n 's/^depends=//p' | tr ',-' ' _')
        for d in $deps; do
            case "$loaded" in *" $d "*) ;; *) log "module $m needs $d loaded first"; exit 1 ;; esac
        done
        name=$(basename "$m" .ko)
        loaded="$loaded${name//-/_} "
        cp "$moddir/$m" "$tree/modules/"
        basename "$m" >> "$tree/modules/order"
    done
    mkdir -p "$tree/modules/extra"
    for m in "${extra_modules[@]}"; do
        [ -f "$moddir/$m" ] || { log "module $m missing from kernel $kver"; exit 1; }
        cp "$moddir/$m" "$tree/modules/extra/"
    done
    mkdir -p "$tree/modules/rdma"
    : > "$tree/modules/rdma/order"
    for m in "${rdma_modules[@]}"; do
        [ -f "$moddir/$m" ] || { log "module $m missing from kernel $kver"; exit 1; }
        cp "$moddir/$m" "$tree/modules/rdma/"
        basename "$m" >> "$tree/modules/rdma/order"
    done
    (cd "$tree" && find . | cpio -o -H newc --quiet | gzip -1 > "$initrd.tmp")
    mv "$initrd.tmp" "$initrd"
    echo "$inputs" > "$stamp"
fi
echo "$rig"
