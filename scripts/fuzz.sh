#!/usr/bin/env bash
# Runs every cargo-fuzz target of vfu-proto (the decoders, proto/fuzz) and of vfu-relay
# (what the device VM writes into the rings, and the tunnel's control messages,
# relay/fuzz) for a bounded time and prints, per target, the executions, coverage and
# whether it found a crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
#
# Needs cargo-fuzz (installed on first use). The toolchain here is stable, so targets
# are built without a sanitizer (-s none): libFuzzer's coverage guidance still works,
# and Rust's own bounds checks and the targets' assertions catch the bugs that matter
# for safe code. Each crate's corpus lives in CRATE/corpus/TARGET and is kept in git
# (minimised with `cargo fuzz cmin` before committing; relay/fuzz's seeds come from
# `cargo run --example seeds` there). A run reads that corpus and writes what it finds
# new to CRATE/target/new-corpus/TARGET (outside git), so the suite leaves the tree
# clean; FUZZ_GROW=1 writes into the kept corpus instead. Crashes, and inputs that run
# for more than 10 s (hangs), land in CRATE/artifacts/TARGET. A relay target replays one step by step
# with VFU_FUZZ_TRACE=1.
set -euo pipefail
seconds=${1:-60}
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
status=0
for crate in proto/fuzz relay/fuzz; do
    cd "$root/$crate"
    for target in $(cargo fuzz list); do
        mkdir -p "corpus/$target"
        if [ "${FUZZ_GROW:-0}" = 1 ]; then
            dirs=("corpus/$target")
        else
            new="target/new-corpus/$target"
            mkdir -p "$new"
            dirs=("$new" "corpus/$target")
        fi
        log=$(mktemp)
        echo "fuzz: $crate $target for ${seconds}s" >&2
        if cargo fuzz run -s none "$target" "${dirs[@]}" -- \
            -max_total_time="$seconds" -max_len=4096 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
            result="no crash"
        else
            result="CRASH (see $crate/artifacts/$target)"
            status=1
            grep -E "panicked|ERROR|SUMMARY" "$log" | head -5 >&2 || true
        fi
        runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo "?")
        cov=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | grep -Eo 'cov: [0-9]+' | tail -1 || true)
        printf '%-20s %12s executions  %-10s %s\n' "$target" "$runs" "${cov:-cov: ?}" "$result"
        rm -f "$log"
    done
done
exit $status
