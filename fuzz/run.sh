#!/usr/bin/env bash
# Runs the fuzz targets (all, or the ones named) for SECS seconds each on
# the corpus kept in fuzz/corpus/, with libFuzzer through cargo-fuzz and no
# sanitizer (the stable toolchain; Rust's own checks, debug assertions
# included, catch what a sanitizer would in safe code). Prints the
# executions of each target; exits non-zero on the first crash, whose
# input is left in fuzz/artifacts/TARGET/.
#
#   fuzz/run.sh 60                 # every target, a minute each
#   fuzz/run.sh 600 session        # one target, ten minutes
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames usbip vfio_user config session)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
cargo fuzz build -s none >/dev/null
total=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    if ! cargo fuzz run -s none "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=4096 \
        -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz: $t crashed; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rm -f "$log"
    echo "fuzz: $t: ${runs:-?} executions in ${secs}s, corpus $(ls "corpus/$t" | wc -l) inputs"
    total=$((total + ${runs:-0}))
done
echo "fuzz: $total executions in all, no crash"
