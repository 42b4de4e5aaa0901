#!/usr/bin/env bash
# Boots the device VM under TCG against a real vfu-relay and checks that /init gets
# the tunnel device (vhost-user-fs-pci, PCI id 1af4:105a) bound to vfio-pci in no-IOMMU
# mode (/init's default), runs the image's static vfu-guest and powers off with its
# status.
# It does not serve devices (no client traffic): that is the end-to-end test's job.
#
#   scripts/device-vm/smoke-test.sh [--relay PATH] [--image DIR] [--timeout SECONDS]
#
#   --relay PATH       vfu-relay binary (default: target/debug/vfu-relay, or
#                      $CARGO_TARGET_DIR/debug/vfu-relay)
#   --image DIR        image folder (default: target/device-vm/current)
#   --timeout SECONDS  boot timeout (default 120)
#
# Prints "device-vm smoke test: passed" and exits 0, or says what went wrong.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
relay=${CARGO_TARGET_DIR:-$repo/target}/debug/vfu-relay
image=
timeout=120
while [ $# -gt 0 ]; do
    case "$1" in
    --relay) relay=${2:?--relay needs a path}; shift ;;
    --image) image=${2:?--image needs a folder}; shift ;;
    --timeout) timeout=${2:?--timeout needs seconds}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "smoke-test: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
say() { printf 'smoke-test: %s\n' "$*" >&2; }
die() { printf 'smoke-test: FAILED: %s\n' "$*" >&2; exit 1; }

[ -x "$relay" ] || die "no vfu-relay at $relay (cargo build first, or --relay PATH)"
dir=$(mktemp -d /tmp/vfu-smoke.XXXXXX)
relay_pid=
cleanup() {
    if [ -n "$relay_pid" ]; then kill "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT

say "starting $relay"
"$relay" --frontend-socket "$dir/frontend.sock" --device "gpio0=$dir/gpio0.sock" >"$dir/relay.log" 2>&1 &
relay_pid=$!

boot_args=(--socket "$dir/frontend.sock" --cmd "/bin/vfu-guest,--list-models"
    --timeout "$timeout" --log "$dir/console.log" --quiet)
[ -z "$image" ] || boot_args+=(--image "$image")
status=0
"$here/boot.sh" "${boot_args[@]}" </dev/null || status=$?
show_logs() {
    echo "--- console ---" >&2
    tr -d '\r' <"$dir/console.log" >&2 || true
    echo "--- relay ---" >&2
    cat "$dir/relay.log" >&2 || true
}
if [ "$status" -ne 0 ]; then
    show_logs
    die "boot.sh exited with $status"
fi
console=$(tr -d '\r' <"$dir/console.log")
for want in 'VFU-INIT READY bdf=[0-9a-f:.]+ driver=vfio-pci' \
    'is /dev/vfio/noiommu-[0-9]+ \(no-IOMMU\)' \
    'hugetlbfs mounted on /dev/hugepages' \
    '^gpio$' \
    'VFU-GUEST EXIT status=0' 'VFU-INIT POWEROFF'; do
    if ! grep -Eq "$want" <<<"$console"; then
        show_logs
        die "no line matching '$want' on the console"
    fi
done
kill -0 "$relay_pid" 2>/dev/null || { show_logs; die "the relay died"; }
grep -q 'device VM disconnected' "$dir/relay.log" ||
    { show_logs; die "the relay never saw the device VM's VMM (no 'device VM disconnected' in its log)"; }
echo "device-vm smoke test: passed"
