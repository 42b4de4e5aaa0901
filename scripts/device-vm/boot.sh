#!/usr/bin/env bash
# Boots the device VM built by build-image.sh under QEMU (TCG), with the tunnel device
# connected to a relay's frontend socket, and exits with the status of the command the
# VM ran (vfu-guest by default). The console goes to stdout and to a log file.
#
#   scripts/device-vm/boot.sh [options]
#
#   --socket PATH       the relay's frontend socket (vhost-user); without it the VM
#                       boots with no tunnel device
#   --serve LIST        devices to serve, NAME=MODEL[,NAME=MODEL...] (vfu.serve=)
#   --queue-pairs P     tunnel queue pairs (default 1): the device gets 2P queues
#                       (vhost-user-fs-pci num-request-queues=2P-1) and vfu-guest
#                       --queue-pairs P
#   --queue-size N      entries per queue (default 256, at most 1024)
#   --device KIND       fs: vhost-user-fs-pci, the compatibility mode (default);
#                       generic: vhost-user-test-device-pci (QEMU 10.2 and later),
#                       virtio id 56 (PCI id 1af4:1078)
#   --memory MIB        guest memory (default 512)
#   --accel NAME        QEMU accelerator (default tcg; kvm where /dev/kvm is fast)
#   --hugepages N       2 MiB hugepages /init reserves (default: /init's, 64)
#   --args LIST         more vfu-guest arguments, comma-separated (vfu.args=)
#   --cmd LIST          run this instead of vfu-guest, comma-separated; @BDF@ is the
#                       tunnel's PCI address (vfu.cmd=)
#   --driver NAME       vfio-pci (/init's default: no-IOMMU mode, MSI-X),
#                       uio_pci_generic (INTx) or none (vfu.driver=)
#   --viommu            add a virtual IOMMU (intel-iommu, intel_iommu=on), put the
#                       tunnel device behind it (iommu_platform=on) and bind it to
#                       vfio-pci (unless --driver says otherwise); the relay must then
#                       handle vhost-user IOTLB messages
#   --rust-log FILTER   RUST_LOG for vfu-guest (vfu.log=, default info)
#   --append TEXT       more kernel command-line parameters
#   --timeout SECONDS   stop the VM after this long (default 300; 0 = never)
#   --log FILE          console log (default: target/device-vm/console.log)
#   --quiet             console to the log file only, not to stdout
#   --image DIR         image folder (default: target/device-vm/current)
#   --qemu PATH         QEMU binary (default qemu-system-x86_64)
#   --qemu-arg ARG      one more QEMU argument (repeatable)
#   --kernel-messages   do not pass "quiet" to the kernel
#   --dry-run           print the QEMU command line and exit
#   -h, --help          this text
#
# Exit status: the VM command's own status (from the console line
# "VFU-GUEST EXIT status=N"); 124 when the timeout stopped the VM; 125 when /init
# gave up before starting the command ("VFU-INIT FAILED reason=..."); 126 when QEMU
# failed or the VM stopped without saying why (see the log).
set -euo pipefail

usage() { sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//'; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${VFU_DEVICE_VM_DIR:-$repo/target/device-vm}

socket=
serve=
pairs=1
qsize=256
kind=fs
memory=512
hugepages=
vargs=
vcmd=
driver=
rust_log=
append=
timeout=300
log=
quiet=false
image=$cache/current
qemu="qemu-system-x86_64"
accel=tcg
qemu_extra=()
kernel_quiet=quiet
dry_run=false
viommu=false
need() { [ $# -ge 2 ] || { echo "boot: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
    --socket) need "$@"; socket=$2; shift ;;
    --serve) need "$@"; serve=$2; shift ;;
    --queue-pairs) need "$@"; pairs=$2; shift ;;
    --queue-size) need "$@"; qsize=$2; shift ;;
    --device) need "$@"; kind=$2; shift ;;
    --memory) need "$@"; memory=$2; shift ;;
    --accel) need "$@"; accel=$2; shift ;;
    --hugepages) need "$@"; hugepages=$2; shift ;;
    --args) need "$@"; vargs=$2; shift ;;
    --cmd) need "$@"; vcmd=$2; shift ;;
    --driver) need "$@"; driver=$2; shift ;;
    --rust-log) need "$@"; rust_log=$2; shift ;;
    --append) need "$@"; append=$2; shift ;;
    --timeout) need "$@"; timeout=$2; shift ;;
    --log) need "$@"; log=$2; shift ;;
    --quiet) quiet=true ;;
    --image) need "$@"; image=$2; shift ;;
    --qemu) need "$@"; qemu=$2; shift ;;
    --qemu-arg) need "$@"; qemu_extra+=("$2"); shift ;;
    --kernel-messages) kernel_quiet= ;;
    --viommu) viommu=true ;;
    --dry-run) dry_run=true ;;
    -h | --help) usage; exit 0 ;;
    *) echo "boot: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'boot: %s\n' "$*" >&2; }
die() { printf 'boot: ERROR: %s\n' "$*" >&2; exit 126; }
number() { case "$2" in '' | *[!0-9]*) echo "boot: $1 must be a number, not '$2'" >&2; exit 2 ;; esac; }
number --queue-pairs "$pairs"
number --queue-size "$qsize"
number --memory "$memory"
number --timeout "$timeout"
[ -z "$hugepages" ] || number --hugepages "$hugepages"
[ "$pairs" -ge 1 ] || { echo "boot: --queue-pairs must be at least 1" >&2; exit 2; }
if [ "$qsize" -lt 1 ] || [ "$qsize" -gt 1024 ]; then echo "boot: --queue-size must be 1..1024" >&2; exit 2; fi
for v in "$serve" "$vargs" "$vcmd" "$driver" "$rust_log"; do
    case "$v" in *[[:space:]\"]*) echo "boot: '$v': no spaces or quotes in --serve/--args/--cmd/--driver/--rust-log (use commas)" >&2; exit 2 ;; esac
done

kernel=$image/vmlinuz
initrd=$image/initrd.cpio.gz
if ! $dry_run; then
    if [ ! -r "$kernel" ] || [ ! -r "$initrd" ]; then
        die "no image in $image: run scripts/device-vm/build-image.sh first"
    fi
fi
log=${log:-$cache/console.log}

cmdline="console=ttyS0 panic=-1 ${kernel_quiet:+$kernel_quiet }initcall_blacklist=virtio_fs_init"
iommu_opt=
if $viommu; then
    cmdline+=" intel_iommu=on"
    iommu_opt=",iommu_platform=on"
    driver=${driver:-vfio-pci}
fi
[ -z "$serve" ] || cmdline+=" vfu.serve=$serve"
if [ "$pairs" -gt 1 ]; then vargs="--queue-pairs,$pairs${vargs:+,$vargs}"; fi
[ -z "$vargs" ] || cmdline+=" vfu.args=$vargs"
[ -z "$vcmd" ] || cmdline+=" vfu.cmd=$vcmd"
[ -z "$driver" ] || cmdline+=" vfu.driver=$driver"
[ -z "$hugepages" ] || cmdline+=" vfu.hugepages=$hugepages"
[ -z "$rust_log" ] || cmdline+=" vfu.log=$rust_log"
[ -z "$append" ] || cmdline+=" $append"

qemu_cmd=(
    "$qemu" -accel "$accel" -smp 1
    -object "memory-backend-memfd,id=mem,size=${memory}M,share=on,seal=on"
    -machine "q35,memory-backend=mem" -m "${memory}M"
    -nodefaults -no-user-config -display none -no-reboot
    -chardev "stdio,id=console,logfile=$log,logappend=off"
    -serial chardev:console
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline"
)
# The vIOMMU comes before the devices behind it.
if $viommu; then qemu_cmd+=(-device "intel-iommu,caching-mode=on"); fi
if [ -n "$socket" ]; then
    qemu_cmd+=(-chardev "socket,id=vu,path=$socket")
    case "$kind" in
    fs)
        qemu_cmd+=(-device "vhost-user-fs-pci,chardev=vu,tag=vfu,num-request-queues=$((2 * pairs - 1)),queue-size=$qsize$iommu_opt") ;;
    generic)
        qemu_cmd+=(-device "vhost-user-test-device-pci,chardev=vu,virtio-id=56,num_vqs=$((2 * pairs)),vq_size=$qsize$iommu_opt") ;;
    *) echo "boot: --device must be fs or generic, not '$kind'" >&2; exit 2 ;;
    esac
fi
qemu_cmd+=("${qemu_extra[@]}")

# The command line, quoted for a shell only where needed.
shell_words() {
    local a out=
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+=" $a"
        else
            out+=" '${a//\'/\'\\\'\'}'"
        fi
    done
    echo "${out# }"
}
if $dry_run; then
    shell_words "${qemu_cmd[@]}"
    exit 0
fi

command -v "$qemu" >/dev/null || die "$qemu not found: run scripts/device-vm/install-deps.sh"
if [ "$kind" = generic ] && [ -n "$socket" ] &&
    ! "$qemu" -device help 2>/dev/null | grep -q '"vhost-user-test-device-pci"'; then
    die "$qemu has no user-creatable vhost-user-test-device-pci (QEMU 10.2 and later); use --device fs"
fi
if [ -n "$socket" ]; then
    # The relay may still be starting: wait for its socket for up to 30 s.
    wait_max=30
    if [ "$timeout" -gt 0 ] && [ "$timeout" -lt 30 ]; then wait_max=$timeout; fi
    waited=0
    while [ ! -S "$socket" ]; do
        [ "$waited" -lt "$wait_max" ] || die "no socket at $socket after $wait_max s: is the relay running (vfu-relay --frontend-socket $socket ...)?"
        [ "$waited" -gt 0 ] || say "waiting for $socket"
        sleep 1
        waited=$((waited + 1))
    done
fi
mkdir -p "$(dirname "$log")"
: >"$log"

say "image $image ($(sed -n 's/^kernel-release //p' "$image/manifest.txt" 2>/dev/null || echo '?'))"
say "console log: $log"
say "$(shell_words "${qemu_cmd[@]}")"
start=$(date +%s.%N)
runner=()
[ "$timeout" -eq 0 ] || runner=(timeout --foreground -k 5 "$timeout")
qemu_status=0
if $quiet; then
    "${runner[@]}" "${qemu_cmd[@]}" >/dev/null </dev/null || qemu_status=$?
else
    "${runner[@]}" "${qemu_cmd[@]}" || qemu_status=$?
fi
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

# The console marks lines with \r\n.
marker() { tr -d '\r' <"$log" | grep -a -E "$1" | tail -1 || true; }
exit_line=$(marker '^VFU-GUEST EXIT status=[0-9]+')
failed_line=$(marker '^VFU-INIT FAILED')
if [ "$timeout" -ne 0 ] && [ "$qemu_status" -eq 124 ]; then
    say "TIMEOUT: stopped the VM after ${timeout} s (log: $log)"
    exit 124
fi
if [ -n "$exit_line" ]; then
    status=${exit_line##*status=}
    say "the VM ran its command and powered off after ${elapsed} s: exit status $status"
    exit "$status"
fi
if [ -n "$failed_line" ]; then
    say "/init gave up after ${elapsed} s: ${failed_line#VFU-INIT FAILED reason=}"
    exit 125
fi
say "the VM stopped after ${elapsed} s without a VFU-GUEST EXIT line (QEMU exit status $qemu_status); see $log"
exit 126
