#!/usr/bin/env bash
# The end-to-end demo on the embedded default (the loopback VMM, no VM needed): builds
# everything, starts vfu-relay and a loopback device VM serving the gpio model, talks
# to the device through the relay as a vfio-user client, and compares with the same
# model served directly. Ctrl-C stops it and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building (release)..." >&2
cargo build --release --workspace --locked --quiet
exec target/release/vfu-demo "$@"
