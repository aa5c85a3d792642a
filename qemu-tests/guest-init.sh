#!/bin/busybox sh
# Init of the QEMU test guest. Loads the modules, binds every edu
# (1234:11e8) to vfio-pci, brings up the user-net NIC and starts ciod.
# Lines starting with CIO- are read by the harness.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

for m in $(cat /modules/order); do
    insmod "/modules/$m" || echo "CIO-FAIL insmod $m"
done

ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || echo "CIO-FAIL network"
# User-net learns the guest's MAC address from its first packet; until
# then host port forwards cannot reach it.
ping -c 1 -W 2 10.0.2.2 >/dev/null 2>&1 || arping -c 1 -I eth0 10.0.2.2 >/dev/null 2>&1

vfio_args=""
n=0
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then
        bdf=${d##*/}
        echo vfio-pci > "$d/driver_override"
        echo "$bdf" > /sys/bus/pci/drivers_probe
        group=$(basename "$(readlink "$d/iommu_group")")
        if [ -e "/dev/vfio/$group" ]; then
            echo "CIO-VFIO $bdf group $group driver $(basename "$(readlink "$d/driver")")"
            vfio_args="$vfio_args --vfio $bdf=vedu$n"
            n=$((n + 1))
        else
            echo "CIO-FAIL vfio bind $bdf"
        fi
    fi
done

# The test key comes on the kernel command line (cio.psk=...).
for arg in $(cat /proc/cmdline); do
    case "$arg" in cio.psk=*) echo "${arg#cio.psk=}" > /tmp/psk ;; esac
done
chmod 600 /tmp/psk
# Serves the emulated edu as edu0 and each real one (through VFIO) as veduN.
# shellcheck disable=SC2086
RUST_LOG=info /bin/ciod --listen 0.0.0.0:7451 --psk-file /tmp/psk --emulate edu $vfio_args &

# Ready once port 7451 (0x1D1B) is listening.
i=0
while ! grep -q ':1D1B 00000000:0000 0A' /proc/net/tcp; do
    i=$((i + 1))
    [ $i -gt 200 ] && { echo "CIO-FAIL ciod did not listen"; break; }
    sleep 0.1
done
echo "CIO-READY"
wait
echo "CIO-EXIT"
poweroff -f
