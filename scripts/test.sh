#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and cross-process tests, and a bounded
# run of every fuzz target. This is what CI runs (.ci/run), on a clean clone.
#
#   scripts/test.sh                 (FUZZ_SECONDS=15 per fuzz target by default)
#   FUZZ_SECONDS=0 scripts/test.sh  (skip fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the cross-process tests run the built binaries)"
cargo build --workspace --locked

step "device VM: build the image, boot it under TCG against the relay (scripts/device-vm)"
if scripts/device-vm/install-deps.sh --check; then
    scripts/device-vm/build-image.sh >/dev/null
    scripts/device-vm/smoke-test.sh
    # For the tests that boot the device VM.
    VFU_DEVICE_VM_IMAGE=$(pwd)/target/device-vm/current
    export VFU_DEVICE_VM_IMAGE
else
    echo "!!! SKIPPED: the device-VM image and boot test (QEMU >= 10.0 or the image tools" >&2
    echo "!!! are not installed; scripts/device-vm/install-deps.sh installs them)" >&2
fi

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s += $1} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s += $1} END {print s + 0}')

fuzz_seconds=${FUZZ_SECONDS:-15}
if [ "$fuzz_seconds" -gt 0 ]; then
    step "fuzz targets, ${fuzz_seconds}s each"
    scripts/fuzz.sh "$fuzz_seconds"
fi

# One closing line for the whole suite (cargo prints one per test binary).
echo "tests: ${passed} passed, ${failed} failed"
