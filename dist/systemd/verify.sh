#!/usr/bin/env bash
# Checks the units with `systemd-analyze verify`, pointing them at the
# binaries given (systemd checks that ExecStart= is executable).
#   dist/systemd/verify.sh target/release/ciod target/release/cio
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ciod=$(realpath "$1")
cio=$(realpath "$2")
command -v systemd-analyze >/dev/null || { echo "verify.sh: systemd-analyze is missing (apt-get install systemd)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/bin/ciod#$ciod#" "$here/ciod.service" > "$tmp/ciod.service"
sed "s#/usr/bin/cio #$cio #" "$here/cio-usb-attach@.service" > "$tmp/cio-usb-attach@.service"
cp "$tmp/cio-usb-attach@.service" "$tmp/cio-usb-attach@1-1.service"
# Warnings about the environment (no /etc/cio here) are not the units' fault;
# anything systemd-analyze calls an error fails the check.
out=$(cd "$tmp" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no \
    ./ciod.service ./cio-usb-attach@1-1.service 2>&1) || { echo "$out"; exit 1; }
if echo "$out" | grep -iE "unknown|invalid|failed|error|ignoring" ; then
    echo "verify.sh: systemd-analyze complained about the units" >&2
    exit 1
fi
echo "systemd units verified: ciod.service, cio-usb-attach@.service"
