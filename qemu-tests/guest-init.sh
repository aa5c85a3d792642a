#!/bin/busybox sh
# Init of the QEMU test guest. Loads the modules, binds the test devices
# (edu, nvme, e1000e, ivshmem) to vfio-pci, brings up the user-net NIC, starts ciod and runs
# the commands the harness sends on the console; or,
# with cio.test=usb (or nvme-remote) on the kernel command line, runs that
# scenario instead. With cio.rdma=IFACE:IP it also brings up soft-RoCE
# (rdma_rxe) on IFACE with address IP/24 and serves over RDMA instead of
# TCP: ciod-rdma (ciod built with the rdma feature) on rdma:IP:7451.
# Lines starting with CIO- are read by the harness.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

for m in $(cat /modules/order); do
    insmod "/modules/$m" || echo "CIO-FAIL insmod $m"
done

ip link set lo up
# Centiseconds since boot (busybox dd prints no rate).
now() { read -r up _ < /proc/uptime; echo "${up%.*}${up#*.}"; }
# One nvme's speeds through this kernel's own driver, O_DIRECT: MARKER DEV
# MIB: MIB MiB from 8 MiB on in 1 MiB blocks (none if 0), then 64 reads
# of 4 KiB one at a time.
nvme_speeds() {
    seq=""
    if [ "$3" -gt 0 ]; then
        t0=$(now)
        dd if="$2" of=/dev/null bs=1M skip=8 count="$3" iflag=direct 2>/dev/null || echo "CIO-FAIL $1 read"
        seq=" seq_read=$(($3 * 1024 * 100 / ($(now) - t0 + 1)))KiB/s"
    fi
    t0=$(now)
    dd if="$2" of=/dev/null bs=4k count=64 iflag=direct 2>/dev/null || echo "CIO-FAIL $1 4k"
    echo "$1$seq qd1_4k_read=$((64 * 100 / ($(now) - t0 + 1)))IOPS"
}

# The USB guest runs its whole scenario inside (qemu-tests/guest-usb.sh).
case " $(cat /proc/cmdline) " in
    *" cio.test=usb "*)
        . /usb-test.sh
        echo "CIO-EXIT"
        poweroff -f
        ;;
    *" cio.test=nvme-remote "*)
        . /nvme-remote-test.sh
        echo "CIO-EXIT"
        poweroff -f
        ;;
esac
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || echo "CIO-FAIL network"
rdma_if=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in cio.rdma=*) rdma_if=${arg#cio.rdma=} ;; esac
done
if [ -n "$rdma_if" ]; then
    rdma_ip=${rdma_if#*:}
    rdma_if=${rdma_if%%:*}
    for m in $(cat /modules/rdma/order); do
        insmod "/modules/rdma/$m" || echo "CIO-FAIL insmod $m"
    done
    if [ "$rdma_if" != eth0 ]; then
        ip addr add "$rdma_ip/24" dev "$rdma_if" && ip link set "$rdma_if" up || echo "CIO-FAIL network $rdma_if"
    fi
    rdma link add rxe0 type rxe netdev "$rdma_if" || echo "CIO-FAIL rdma link add rxe0 on $rdma_if"
    echo "CIO-RDMA $(rdma link show 2>&1 | head -n 1)"
fi
# User-net learns the guest's MAC address from its first packet; until
# then host port forwards cannot reach it.
ping -c 1 -W 2 10.0.2.2 >/dev/null 2>&1 || arping -c 1 -I eth0 10.0.2.2 >/dev/null 2>&1

# cio.nvme-local: the nvme's own speed through this guest's nvme driver
# first (the baseline of the vfio-user test), before it goes to vfio-pci.
case " $(cat /proc/cmdline) " in
    *" cio.nvme-local "*)
        insmod /modules/extra/nvme-core.ko && insmod /modules/extra/nvme.ko || echo "CIO-FAIL insmod nvme"
        i=0
        while [ ! -b /dev/nvme0n1 ] && [ $i -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
        nvme_speeds CIO-LOCAL /dev/nvme0n1 8
        ;;
esac

# Bind the test devices to vfio-pci; each is served as NAME<index>.
# For each: its config header as the kernel reads it (sysfs), and a local
# read of one BAR0 register through VFIO (ciod probe).
vfio_args=""
for d in /sys/bus/pci/devices/*; do
    case "$(cat "$d/vendor"):$(cat "$d/device")" in
        0x1234:0x11e8) name=vedu; off=0; reads=2000 ;;   # QEMU edu: identification
        0x1b36:0x0010) name=vnvme; off=8; reads=1 ;;     # QEMU nvme: VS
        0x8086:0x10d3) name=ve1000e; off=8; reads=1 ;;   # e1000e: STATUS
        0x1af4:0x1110) name=vivshmem; off=0; reads=1 ;;  # ivshmem-plain: IntrMask
        *) continue ;;
    esac
    eval "i=\${count_$name:-0}"
    eval "count_$name=$((i + 1))"
    name="$name$i"
    bdf=${d##*/}
    [ -e "$d/driver" ] && echo "$bdf" > "$d/driver/unbind"
    echo vfio-pci > "$d/driver_override"
    echo "$bdf" > /sys/bus/pci/drivers_probe
    group=$(basename "$(readlink "$d/iommu_group")")
    if [ ! -e "/dev/vfio/$group" ]; then
        echo "CIO-FAIL vfio bind $bdf"
        continue
    fi
    echo "CIO-VFIO $name $bdf group $group driver $(basename "$(readlink "$d/driver")")"
    echo "CIO-CONFIG $name $(od -An -tx1 -v -N 64 "$d/config" | tr -d ' \n')"
    echo "CIO-RESET $name $(cat "$d/reset_method" 2>/dev/null || echo none)"
    echo "CIO-PROBE $name $(/bin/ciod probe "$bdf" --offset $off --reads $reads 2>&1 | tail -n 1)"
    # e1000e by vendor:device id, the others by PCI address: both forms.
    case "$name" in
        ve1000e*) vfio_args="$vfio_args --vfio 8086:10d3=$name" ;;
        *) vfio_args="$vfio_args --vfio $bdf=$name" ;;
    esac
done

# The test key comes on the kernel command line (cio.psk=...).
for arg in $(cat /proc/cmdline); do
    case "$arg" in cio.psk=*) echo "${arg#cio.psk=}" > /tmp/psk ;; esac
done
chmod 600 /tmp/psk
# Serves the emulated edu as edu0 and each real one (through VFIO) as veduN.
# Plaintext beyond loopback: the guest's only network is QEMU user-net, which
# the host reaches through a port forward on its own loopback. The mapped-DMA
# limits default to a quarter and half of this guest's 512 MiB; a vfio-user
# guest B maps all of its RAM while it boots (mapped, hardly touched), so
# they are raised.
# With RDMA: ciod-rdma on the RDMA address, and an emulated memory device
# too (for the posted-write checks); ready once its log says it listens.
if [ -n "$rdma_if" ]; then
    ciod=/bin/ciod-rdma listen="rdma:$rdma_ip:7451" extra="--emulate memory:mem0:16M"
else
    ciod=/bin/ciod listen=0.0.0.0:7451 extra=""
fi
# shellcheck disable=SC2086
RUST_LOG=info $ciod --listen "$listen" --no-announce --insecure-plaintext --psk-file /tmp/psk \
    --max-mapped-per-session 4G --max-mapped-total 8G --emulate edu $extra $vfio_args 2>&1 | tee /tmp/ciod.log &

# Ready once port 7451 (0x1D1B) is listening, or the RDMA listener is.
i=0
while ! grep -q ':1D1B 00000000:0000 0A' /proc/net/tcp && ! grep -q "listening" /tmp/ciod.log 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt 200 ] && { echo "CIO-FAIL ciod did not listen"; break; }
    sleep 0.1
done
echo "CIO-READY"
# Commands from the harness (Guest::run) arrive on the console, one a line:
# "ID COMMAND". Each answers with its output as "CIO-OUT ID LINE" and
# "CIO-END ID STATUS". Without input (the harness's stdin closed) this waits
# forever, as ciod does.
while read -r id cmd; do
    case "$id" in ''|*[!0-9]*) continue ;; esac
    eval "$cmd" > /tmp/cmd.out 2>&1
    rc=$?
    sed "s/^/CIO-OUT $id /" /tmp/cmd.out
    echo "CIO-END $id $rc"
done
wait
echo "CIO-EXIT"
poweroff -f
