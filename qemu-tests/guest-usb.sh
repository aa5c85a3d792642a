# USB scenario of the QEMU test guest, sourced by /init (busybox sh).
# The guest has one QEMU usb-storage disk on qemu-xhci. ciod exports it
# through usbip-host; cio attaches it back through vhci-hcd over loopback,
# and so do Debian's stock usbip/usbipd. Every result is a CIO-USB line
# the harness (qemu-tests/tests/usb.rs) checks; CIO-FAIL stops the test.
KNOWN=4194304          # the known file: the image's first 4 MiB
READ_MB=16             # bulk read measured on each path

say() { echo "CIO-USB $*"; }
fail() { echo "CIO-FAIL usb: $*"; }
# waitfor TENTHS CMD...: polls CMD every 0.1 s.
waitfor() {
    n=$1; shift
    while ! "$@"; do
        n=$((n - 1)); [ $n -le 0 ] && return 1
        sleep 0.1
    done
}
cs() { read -r up _ < /proc/uptime; echo "${up%.*}${up#*.}"; }
# The disk that came through vhci-hcd (vhci) or the local xhci (local).
disk() {
    for b in /sys/block/sd*; do
        [ -e "$b" ] || continue
        case "$(readlink -f "$b")" in
            *vhci_hcd*) [ "$1" = vhci ] && { DISK=${b##*/}; return 0; } ;;
            *) [ "$1" = local ] && { DISK=${b##*/}; return 0; } ;;
        esac
    done
    return 1
}
sum_known() { head -c $KNOWN "/dev/$DISK" | sha256sum | cut -d' ' -f1; }
driver_is() { [ "$(basename "$(readlink "$SRC/driver")")" = "$1" ]; }
restored() { driver_is usb && disk local; }
no_vhci_port() { ! cio usb port | grep -q '^Port'; }
vhci_port() { PORT=$(cio usb port | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1); [ -n "$PORT" ]; }
# bench PHASE: timed O_DIRECT read of READ_MB MiB from the vhci disk.
bench() {
    t0=$(cs)
    dd if="/dev/$DISK" of=/dev/null bs=1M count=$READ_MB iflag=direct 2>/dev/null || fail "$1: bulk read"
    t1=$(cs)
    say "READ $1 $READ_MB $((t1 - t0))"
}

# The source device: QEMU's usb-storage (46f4:0001).
BUSID=""
waitfor 100 disk local || fail "no local usb-storage disk"
for d in /sys/bus/usb/devices/*; do
    [ "$(cat "$d/idVendor" 2>/dev/null)" = 46f4 ] && BUSID=${d##*/}
done
[ -n "$BUSID" ] || fail "no 46f4 device"
SRC=/sys/bus/usb/devices/$BUSID
say "SRC $BUSID $(cat "$SRC/speed") $DISK"
say "SUM local $(sum_known)"

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /tmp/psk
chmod 600 /tmp/psk
RUST_LOG=info ciod --listen 127.0.0.1:7451 --no-announce --psk-file /tmp/psk --usb "$BUSID" \
    --emulate-usb cdc-acm --usbip-listen 127.0.0.1:3240 2>/tmp/ciod.log &
CIOD=$!
waitfor 100 grep -q ':1D1B 00000000:0000 0A' /proc/net/tcp || fail "ciod did not listen"
CIO="cio --psk-file /tmp/psk"

# 1. cio <-> ciod: list, attach, checksum, 8 MiB write/read-back, bench.
$CIO usb list 127.0.0.1 | grep -q " $BUSID: " && say "LIST cio ok" || fail "cio usb list"
cio usb list 127.0.0.1 >/dev/null 2>&1 && fail "usb list without the key succeeded"
$CIO usb attach 127.0.0.1 "$BUSID" > /tmp/attach.out 2>&1 &
ATT=$!
waitfor 300 disk vhci || fail "no disk through cio"
driver_is usbip-host || fail "source not bound to usbip-host"
say "SUM cio $(sum_known)"
head -c 8388608 /dev/urandom > /tmp/w8
W=$(sha256sum < /tmp/w8 | cut -d' ' -f1)
dd if=/tmp/w8 of="/dev/$DISK" bs=1M seek=8 conv=fsync 2>/dev/null || fail "write through cio"
R=$(dd if="/dev/$DISK" bs=1M skip=8 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
say "WRITE cio $W $R"
bench cio
vhci_port || fail "cio usb port shows nothing"
say "PORT $(cio usb port | grep -A2 '^Port' | tr -s ' \n' ' ')"
say "PORTJSON $PORT $(cio usb port --json)"
cio usb detach "$PORT" >/dev/null || fail "cio usb detach"
waitfor 100 sh -c "! kill -0 $ATT 2>/dev/null" || fail "cio attach did not exit after detach"
wait $ATT; say "DETACH cio exit $? $(tail -n 1 /tmp/attach.out)"
waitfor 100 restored || fail "device not restored after detach"
say "RESTORED detach"

# 1b. The same, direct: after the handshake both kernels speak USB/IP on
# the session's connection.
$CIO usb attach --direct 127.0.0.1 "$BUSID" >/dev/null || fail "cio usb attach --direct"
waitfor 300 disk vhci || fail "no disk through cio --direct"
say "SUM direct $(sum_known)"
bench direct
vhci_port && cio usb detach "$PORT" >/dev/null || fail "cio usb detach (direct)"
waitfor 100 restored || fail "device not restored after a direct import"
say "RESTORED direct"

# 2. Stock usbip client -> ciod's plain USB/IP.
usbip list -r 127.0.0.1 2>&1 | grep -q "$BUSID" && say "LIST stock-client ok" || fail "usbip list -r"
usbip attach -r 127.0.0.1 -b "$BUSID" 2>&1 || fail "usbip attach"
waitfor 300 disk vhci || fail "no disk through stock usbip"
say "SUM stock-client $(sum_known)"
bench stock-client
vhci_port && usbip detach -p "$PORT" >/dev/null 2>&1 || fail "usbip detach"
waitfor 100 restored || fail "device not restored after usbip detach"
say "RESTORED stock-client"

# 3. cio -> stock usbipd: the kernel at both ends (the baseline).
usbipd -D -t 3241 || fail "usbipd"
usbip bind -b "$BUSID" >/dev/null 2>&1 || fail "usbip bind"
waitfor 50 driver_is usbip-host || fail "usbip bind did not bind"
cio usb list usbip://127.0.0.1:3241 | grep -q " $BUSID: " && say "LIST stock-server ok" || fail "cio usb list usbip://"
cio usb attach usbip://127.0.0.1:3241 "$BUSID" >/dev/null || fail "cio usb attach usbip://"
waitfor 300 disk vhci || fail "no disk from usbipd"
say "SUM stock-server $(sum_known)"
bench stock-server
vhci_port && cio usb detach "$PORT" >/dev/null || fail "cio usb detach (usbipd)"
waitfor 100 no_vhci_port || fail "port not freed after detach (usbipd)"
usbip unbind -b "$BUSID" >/dev/null 2>&1 || fail "usbip unbind"
killall usbipd 2>/dev/null
waitfor 100 restored || fail "device not restored after usbip unbind"

# 4. The cio paths once more, for the same-run ratio against 3; the
# relayed one from a background relay this time.
$CIO usb attach --background 127.0.0.1 "$BUSID" > /tmp/bg.out || fail "cio usb attach --background"
ATT=$(sed -n 's/.*relay pid \([0-9]*\).*/\1/p' /tmp/bg.out)
say "BACKGROUND $(cat /tmp/bg.out)"
waitfor 300 disk vhci || fail "no disk through cio (2)"
bench cio
vhci_port && cio usb detach "$PORT" >/dev/null
waitfor 100 sh -c "! kill -0 $ATT 2>/dev/null" || fail "background relay did not exit after detach"
waitfor 100 restored || fail "device not restored (2)"
$CIO usb attach --direct 127.0.0.1 "$BUSID" >/dev/null || fail "cio usb attach --direct (2)"
waitfor 300 disk vhci || fail "no disk through cio --direct (2)"
bench direct
vhci_port && cio usb detach "$PORT" >/dev/null
waitfor 100 restored || fail "device not restored (direct 2)"

# 5. The link dies mid-transfer: the relay on the target is killed.
$CIO usb attach 127.0.0.1 "$BUSID" >/dev/null 2>&1 &
ATT=$!
waitfor 300 disk vhci || fail "no disk through cio (3)"
dd if="/dev/$DISK" of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null &
DD=$!
sleep 1
kill -9 $ATT
waitfor 300 sh -c "! kill -0 $DD 2>/dev/null" || fail "reader hung after the link died"
waitfor 100 no_vhci_port && say "KILL relay port-freed" || fail "vhci port still in use after the link died"
waitfor 100 restored && say "KILL relay source-restored" || fail "source device not restored after the link died"
$CIO usb attach 127.0.0.1 "$BUSID" >/dev/null 2>&1 &
ATT=$!
waitfor 300 disk vhci || fail "not re-exportable after the link died"
say "SUM reexport $(sum_known)"

# 5b. The emulated CDC-ACM device through the same path: the kernel's
# cdc_acm driver binds it and bytes written to the tty come back.
$CIO usb attach 127.0.0.1 emu-1 >/dev/null 2>&1 &
EMU=$!
waitfor 300 test -c /dev/ttyACM0 || fail "no /dev/ttyACM0 from the emulated device"
stty -F /dev/ttyACM0 raw -echo || fail "stty"
(sleep 0.5; printf 'hello through cio\n' > /dev/ttyACM0) &
say "ACM $(timeout 10 head -n 1 /dev/ttyACM0)"
kill $EMU
waitfor 100 sh -c "! kill -0 $EMU 2>/dev/null" || fail "emulated attach did not stop"

# 6. The backend goes away mid-transfer (ciod stopped).
dd if="/dev/$DISK" of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null &
DD=$!
sleep 1
kill $CIOD
waitfor 300 sh -c "! kill -0 $ATT 2>/dev/null" || fail "cio attach kept running without its backend"
wait $ATT; say "KILL ciod attach-exit $?"
waitfor 300 sh -c "! kill -0 $DD 2>/dev/null" || fail "reader hung after ciod stopped"
waitfor 100 no_vhci_port && say "KILL ciod port-freed" || fail "vhci port still in use after ciod stopped"
waitfor 100 restored && say "KILL ciod source-restored" || fail "source not restored after ciod stopped"
grep -c "device restored" /tmp/ciod.log | sed 's/^/CIO-USB RESTORES /'

# 7. ciod killed outright (no chance to clean up): the device stays on
# usbip-host until the next ciod starts and gives it back.
start_ciod() {
    RUST_LOG=info ciod --listen 127.0.0.1:7451 --no-announce --psk-file /tmp/psk --usb "$BUSID" "$@" 2>>/tmp/ciod.log &
    CIOD=$!
    waitfor 100 grep -q ':1D1B 00000000:0000 0A' /proc/net/tcp || fail "ciod did not listen again"
}
start_ciod
$CIO usb attach 127.0.0.1 "$BUSID" >/dev/null 2>&1 &
ATT=$!
waitfor 300 disk vhci || fail "no disk through cio (4)"
kill -9 $CIOD
waitfor 300 sh -c "! kill -0 $ATT 2>/dev/null" || fail "cio attach kept running after ciod was killed"
waitfor 100 no_vhci_port || fail "vhci port still in use after ciod was killed"
sleep 1
driver_is usbip-host && say "KILL9 left-on-usbip-host"
start_ciod --usb-idle-timeout 3
waitfor 100 restored && say "KILL9 recovered-at-start" || fail "a new ciod did not give the device back"

# 8. Silent link loss (no FIN, no RST): one side stops answering.
# The backend freezes: the relay's pings go unanswered (1 s keepalive, so
# 4 s), it gives up and frees the port; once ciod runs again it sees the
# closed connection and gives the device back.
$CIO usb attach --keepalive 1 127.0.0.1 "$BUSID" >/dev/null 2>&1 &
ATT=$!
waitfor 300 disk vhci || fail "no disk through cio (5)"
T0=$(cs)
kill -STOP $CIOD
waitfor 200 sh -c "! kill -0 $ATT 2>/dev/null" || fail "relay hung on a silent backend"
wait $ATT; say "SILENT backend attach-exit $? after $(( $(cs) - T0 ))cs"
waitfor 100 no_vhci_port && say "SILENT backend port-freed" || fail "port kept after a silent backend"
kill -CONT $CIOD
waitfor 100 restored && say "SILENT backend restored" || fail "device not restored after a silent backend"
# The frontend freezes: ciod hears nothing for its 3 s idle limit, ends the
# import and gives the device back; the frozen relay, once gone, frees the port.
$CIO usb attach --keepalive 1 127.0.0.1 "$BUSID" >/dev/null 2>&1 &
ATT=$!
waitfor 300 disk vhci || fail "no disk through cio (6)"
kill -STOP $ATT
waitfor 150 restored && say "SILENT frontend restored" || fail "device not restored after a silent frontend"
kill -KILL $ATT
waitfor 100 no_vhci_port && say "SILENT frontend port-freed" || fail "port kept after a silent frontend"
kill $CIOD
say "DONE"
