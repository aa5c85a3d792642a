# Sourced by the guest init with cio.test=nvme-remote: guest B of the
# vfio-user test. Its QEMU (11) shows it an nvme through vfio-user-pci whose
# server, cio on the host, forwards everything to the nvme of another guest;
# this guest's own kernel driver (nvme) binds it and the block layer does the
# IO. Prints CIO- lines for the harness; the data checks are the host's
# (against the image file behind the other guest's nvme).

insmod /modules/extra/nvme-core.ko || echo "CIO-FAIL insmod nvme-core"
# In the background: its probe blocks until the controller answers.
insmod /modules/extra/nvme.ko &

i=0
while [ ! -b /dev/nvme0n1 ]; do
    i=$((i + 1))
    if [ $i -gt 900 ]; then
        echo "CIO-FAIL no /dev/nvme0n1 after 90 s"
        dmesg | tail -n 40
        return
    fi
    sleep 0.1
done
c=/sys/class/nvme/nvme0
echo "CIO-NVME serial=$(cat $c/serial) model=$(cat $c/model | tr ' ' _) driver=$(basename "$(readlink $c/device/driver)") sectors=$(cat /sys/block/nvme0n1/size)"

# An IO that never completes leaves dd in uninterruptible sleep: a watchdog
# prints what the kernel said meanwhile (the harness fails on CIO-STUCK).
watch() { ( sleep 120; echo "CIO-STUCK $1 after 120 s"; dmesg | tail -n 30 | sed 's/^/CIO-STUCK /' ) & }
unwatch() { kill $! 2>/dev/null; }

# A rate in KiB/s of N MiB since T0 (now: guest-init.sh).
speed() { echo "$(($1 * 1024 * 100 / ($(now) - $2 + 1)))KiB/s"; }

# The host wrote the image: read its first 4 MiB (O_DIRECT: from the device,
# not the page cache).
t0=$(now)
watch read
if dd if=/dev/nvme0n1 of=/tmp/head bs=1M count=4 iflag=direct 2>/tmp/dd-read; then
    unwatch
    s=$(speed 4 "$t0")
    echo "CIO-READ sha256=$(sha256sum /tmp/head | cut -d' ' -f1) speed=$s"
else
    unwatch
    echo "CIO-FAIL read: $(cat /tmp/dd-read)"
fi

# 8 MiB of fresh data at 8 MiB, written and read back with O_DIRECT.
dd if=/dev/urandom of=/tmp/new bs=1M count=8 2>/dev/null
t0=$(now)
watch write
if dd if=/tmp/new of=/dev/nvme0n1 bs=1M seek=8 oflag=direct conv=fsync 2>/tmp/dd-write; then
    unwatch
    s=$(speed 8 "$t0")
    echo "CIO-WRITE sha256=$(sha256sum /tmp/new | cut -d' ' -f1) speed=$s"
else
    unwatch
    echo "CIO-FAIL write: $(cat /tmp/dd-write)"
fi
t0=$(now)
watch back
if dd if=/dev/nvme0n1 of=/tmp/back bs=1M skip=8 count=8 iflag=direct 2>/tmp/dd-back; then
    unwatch
    s=$(speed 8 "$t0")
    echo "CIO-BACK sha256=$(sha256sum /tmp/back | cut -d' ' -f1) speed=$s"
else
    unwatch
    echo "CIO-FAIL read back: $(cat /tmp/dd-back)"
fi
rm -f /tmp/head /tmp/new /tmp/back
# The 4 KiB reads of guest A's local baseline (guest-init.sh; the read
# back above is its sequential read).
watch speeds
nvme_speeds CIO-SPEEDS /dev/nvme0n1 0
unwatch
# Errors the driver logged (timeouts, resets, IOMMU faults).
dmesg | grep -v "command line" -i | grep -i -e "nvme.*\(timeout\|reset\|error\|fail\)" -e "DMAR.*fault" |
    head -n 5 | sed 's/^/CIO-DMESG /'
