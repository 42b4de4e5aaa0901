#!/usr/bin/env bash
# Installs what building and booting the device VM needs, from Debian's packages:
# QEMU 10.0 (qemu-system-x86, from bookworm-backports on Debian 12), busybox-static,
# cpio, kmod (depmod, modinfo), xz-utils, gzip, file, and make, gcc-12 and binutils
# (build-image.sh builds vfio.ko with no-IOMMU mode for Debian's kernel). Idempotent: when everything
# is there already it changes nothing and needs no network.
#
#   scripts/device-vm/install-deps.sh [--check] [--with-shellcheck]
#
#   --check            only report what is missing; exit 1 if anything is
#   --with-shellcheck  also install shellcheck (for linting these scripts)
#
# Runs as root (or through passwordless sudo). Non-interactive: apt runs with
# DEBIAN_FRONTEND=noninteractive, so it also works in CI (CI=true, no stdin).
# On Debian 12 it adds /etc/apt/sources.list.d/backports.sources (bookworm-backports,
# with the URIs and Signed-By of the bookworm entry in debian.sources) if no
# bookworm-backports source is configured yet. Exits non-zero, saying why, when the
# package registry cannot be reached or the packages are not found there.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

check_only=false
with_shellcheck=false
while [ $# -gt 0 ]; do
    case "$1" in
    --check) check_only=true ;;
    --with-shellcheck) with_shellcheck=true ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install-deps: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'install-deps: %s\n' "$*" >&2; }
die() { printf 'install-deps: ERROR: %s\n' "$*" >&2; exit 1; }

# The QEMU we need: 10.0 or later (vhost-user-fs-pci with many queues, memfd backends).
QEMU_MIN=10.0
# Plain packages from the release itself.
BASE_PKGS=(busybox-static cpio kmod xz-utils gzip file make gcc-12 binutils)
$with_shellcheck && BASE_PKGS+=(shellcheck)

# Prints the installed version of package $1, or nothing.
installed_version() {
    dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "installed" { print $2 }'
}

# True when the installed qemu-system-x86 is at least $QEMU_MIN.
qemu_ok() {
    local v
    v=$(installed_version qemu-system-x86)
    [ -n "$v" ] || return 1
    command -v qemu-system-x86_64 >/dev/null || return 1
    dpkg --compare-versions "$v" ge "1:$QEMU_MIN"
}

missing=()
for p in "${BASE_PKGS[@]}"; do
    [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
qemu_missing=true
if qemu_ok; then qemu_missing=false; fi

if [ ${#missing[@]} -eq 0 ] && ! $qemu_missing; then
    say "nothing to do: qemu-system-x86 $(installed_version qemu-system-x86), ${BASE_PKGS[*]} installed"
    exit 0
fi
if $check_only; then
    $qemu_missing && say "missing: qemu-system-x86 >= $QEMU_MIN (installed: $(installed_version qemu-system-x86 | grep . || echo none))"
    [ ${#missing[@]} -eq 0 ] || say "missing: ${missing[*]}"
    exit 1
fi

# Root, or passwordless sudo.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        die "must run as root (or with passwordless sudo) to install: ${missing[*]} $($qemu_missing && echo qemu-system-x86)"
    fi
fi
run() { say "+ $*"; "${SUDO[@]}" "$@"; }

export DEBIAN_FRONTEND=noninteractive
[ -r /etc/os-release ] || die "/etc/os-release not found: this script supports Debian only"
# shellcheck disable=SC1091
. /etc/os-release
[ "${ID:-}" = debian ] || die "this script supports Debian only (found ID=${ID:-?}); install QEMU >= $QEMU_MIN, ${BASE_PKGS[*]} by hand"
codename=${VERSION_CODENAME:-}
qemu_target=()
if [ "$codename" = bookworm ]; then
    # QEMU 10.0 is in bookworm-backports only.
    qemu_target=(-t bookworm-backports)
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        src=/etc/apt/sources.list.d/debian.sources
        [ -r "$src" ] || die "no bookworm-backports source and no $src to copy URIs and Signed-By from; add bookworm-backports to APT's sources by hand"
        # The stanza whose Suites list bookworm itself (not -security).
        read -r uris signed_by < <(awk '
            BEGIN { RS = ""; FS = "\n" }
            {
                u = ""; s = ""; b = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { u = $i; sub(/^URIs:[ \t]*/, "", u) }
                    if ($i ~ /^Signed-By:/) { s = $i; sub(/^Signed-By:[ \t]*/, "", s) }
                    if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) b = 1
                }
                if (b && u != "") { print u, (s == "" ? "-" : s); exit }
            }' "$src")
        [ -n "${uris:-}" ] || die "found no bookworm stanza in $src; add bookworm-backports to APT's sources by hand"
        say "adding /etc/apt/sources.list.d/backports.sources (URIs: $uris, Signed-By: $signed_by)"
        {
            echo "Types: deb"
            echo "URIs: $uris"
            echo "Suites: bookworm-backports"
            echo "Components: main"
            [ "$signed_by" = - ] || echo "Signed-By: $signed_by"
        } | "${SUDO[@]}" tee /etc/apt/sources.list.d/backports.sources >/dev/null
    else
        say "a bookworm-backports source is configured already"
    fi
fi

# apt-get update; treat any source that cannot be fetched as an error (apt itself only
# warns and goes on with old lists).
say "+ apt-get update"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "${SUDO[@]}" apt-get update -o APT::Update::Error-Mode=any >"$log" 2>&1 ||
    grep -Eq '^(Err:|E:|W: (Failed to fetch|Some index files failed))' "$log"; then
    grep -E '^(Err:|E:|W:)' "$log" >&2 || cat "$log" >&2
    die "cannot reach Debian's package registry (apt-get update failed, see above); check the network or APT's proxy settings and run again"
fi

if $qemu_missing; then
    if [ "$codename" = bookworm ]; then
        cand=$(apt-cache madison qemu-system-x86 | awk -F'|' '$3 ~ /bookworm-backports/ { gsub(/ /, "", $2); print $2; exit }')
    else
        cand=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
    fi
    if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
        die "qemu-system-x86 is not available from the configured sources${qemu_target[*]:+ (${qemu_target[*]})}"
    fi
    dpkg --compare-versions "$cand" ge "1:$QEMU_MIN" ||
        die "the newest qemu-system-x86 available is $cand, older than $QEMU_MIN"
    run apt-get install -y --no-install-recommends "${qemu_target[@]}" qemu-system-x86
fi
if [ ${#missing[@]} -gt 0 ]; then
    run apt-get install -y --no-install-recommends "${missing[@]}"
fi

qemu_ok || die "qemu-system-x86 >= $QEMU_MIN still not installed"
say "done: $(qemu-system-x86_64 --version | head -1)"
