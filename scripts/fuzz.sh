#!/usr/bin/env bash
# Runs every cargo-fuzz target of vfu-proto for a bounded time and prints, per target,
# the executions, coverage and whether it found a crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
#
# Needs cargo-fuzz (installed on first use). The toolchain here is stable, so targets
# are built without a sanitizer (-s none): libFuzzer's coverage guidance still works,
# and Rust's own bounds checks and the targets' assertions catch the bugs that matter
# for safe code. The corpus lives in proto/fuzz/corpus/TARGET and is kept in git
# (minimised with `cargo fuzz cmin` before committing); crashes land in
# proto/fuzz/artifacts/TARGET.
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/../proto/fuzz"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
status=0
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    log=$(mktemp)
    echo "fuzz: $target for ${seconds}s" >&2
    if cargo fuzz run -s none "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
        result="no crash"
    else
        result="CRASH (see proto/fuzz/artifacts/$target)"
        status=1
        grep -E "panicked|ERROR|SUMMARY" "$log" | head -5 >&2 || true
    fi
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo "?")
    cov=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | grep -Eo 'cov: [0-9]+' | tail -1 || true)
    printf '%-20s %12s executions  %-10s %s\n' "$target" "$runs" "${cov:-cov: ?}" "$result"
    rm -f "$log"
done
exit $status
