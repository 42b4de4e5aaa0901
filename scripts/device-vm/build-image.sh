#!/usr/bin/env bash
# Builds the device VM: a Debian kernel and a busybox initramfs holding a static
# vfu-guest, the uio/vfio modules and /init (scripts/device-vm/init), reproducibly
# from Debian packages. The result is cached under target/device-vm/ keyed by the
# package versions, the vfu-guest binary and these scripts: a second run with the
# same inputs does nothing.
#
#   scripts/device-vm/build-image.sh [options]
#
#   --kernel SPEC     6.12 (default: the newest linux-image-6.12.*+deb12-amd64),
#                     6.1 (the newest linux-image-6.1.0-*-amd64), or a package name,
#                     optionally with =VERSION
#   --vfu-guest PATH  put this vfu-guest into the image (must be statically linked)
#                     instead of building it with cargo
#   --out DIR         cache and output folder (default: target/device-vm in the repo,
#                     or $VFU_DEVICE_VM_DIR)
#   --force           build the image again even when it is cached
#   -h, --help        this text
#
# Needs the packages scripts/device-vm/install-deps.sh installs, and Debian's package
# registry only for a kernel package not downloaded yet. Prints the image folder on
# its last line; target/device-vm/current points to the newest image (boot.sh's
# default).
#
# vfio-pci without an IOMMU needs vfio's no-IOMMU mode, which Debian's kernels are
# built without (CONFIG_VFIO_NOIOMMU is not set): then vfio.ko alone is built again
# with it, from the kernel's own source and header packages (linux-source-X.Y,
# linux-headers-*, linux-kbuild-*: same version) with the compiler the kernel was
# built with (gcc-12), reproducibly, and replaces the stock vfio.ko in the image.
#
# Layout of the cache:
#   debs/                       downloaded kernel packages (apt-get download)
#   kernel/PKG_VERSION/         the kernel package, unpacked (dpkg-deb -x)
#   vfio-noiommu/PKG_VERSION/   vfio.ko built with CONFIG_VFIO_NOIOMMU (and the
#                               source, headers and build tree it came from)
#   images/KEY/                 vmlinuz, initrd.cpio.gz, manifest.txt (the inputs),
#                               sha256sums; the three newest are kept
#   current -> images/KEY       the image built or found last
set -euo pipefail

usage() { sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
kernel_spec=6.12
vfu_guest=
out=${VFU_DEVICE_VM_DIR:-$repo/target/device-vm}
force=false
while [ $# -gt 0 ]; do
    case "$1" in
    --kernel) kernel_spec=${2:?--kernel needs a value}; shift ;;
    --vfu-guest) vfu_guest=${2:?--vfu-guest needs a path}; shift ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    --force) force=true ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build-image: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: ERROR: %s\n' "$*" >&2; exit 1; }

umask 022
export LC_ALL=C
# Every file in the initramfs gets this time stamp.
epoch=${SOURCE_DATE_EPOCH:-0}

# Tools.
for t in apt-get apt-cache dpkg-deb dpkg-query cpio depmod modinfo xz gzip file sha256sum; do
    command -v "$t" >/dev/null || die "'$t' not found: run scripts/device-vm/install-deps.sh"
done
busybox=/bin/busybox
if [ ! -x "$busybox" ] || ! file -L "$busybox" | grep -q 'statically linked'; then
    die "$busybox is missing or not static: run scripts/device-vm/install-deps.sh (package busybox-static)"
fi
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
busybox_version=$(pkg_version busybox-static)
[ -n "$busybox_version" ] || die "package busybox-static is not installed: run scripts/device-vm/install-deps.sh"

# The kernel package: name and version, from the local package lists.
has_candidate() {
    local v
    v=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }')
    [ -n "$v" ] && [ "$v" != "(none)" ] && echo "$v"
}
newest_of() { # $1: extended regex of package names
    local p
    for p in $(apt-cache pkgnames linux-image- | grep -E "$1" | sort -rV); do
        if has_candidate "$p" >/dev/null; then echo "$p"; return 0; fi
    done
    return 1
}
case "$kernel_spec" in
6.12) kpkg=$(newest_of '^linux-image-6\.12\.[0-9]+\+deb12-amd64$') ||
    die "no linux-image-6.12.*+deb12-amd64 in the package lists: run scripts/device-vm/install-deps.sh (it adds bookworm-backports), or try --kernel 6.1" ;;
6.1) kpkg=$(newest_of '^linux-image-6\.1\.0-[0-9]+-amd64$') ||
    die "no linux-image-6.1.0-*-amd64 in the package lists (apt-get update?)" ;;
*) kpkg=${kernel_spec%%=*} ;;
esac
if [ "$kernel_spec" != "${kernel_spec#*=}" ]; then
    kver_pkg=${kernel_spec#*=}
else
    kver_pkg=$(has_candidate "$kpkg") || die "package $kpkg is not in the package lists (apt-get update?)"
fi
say "kernel package: $kpkg $kver_pkg"

# vfu-guest, static.
if [ -z "$vfu_guest" ]; then
    command -v cargo >/dev/null || die "cargo not found (or pass --vfu-guest PATH)"
    say "building a static vfu-guest: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked -p vfu-guest --target x86_64-unknown-linux-gnu"
    (cd "$repo" && RUSTFLAGS='-C target-feature=+crt-static' \
        cargo build --release --locked -p vfu-guest --target x86_64-unknown-linux-gnu)
    vfu_guest=${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/vfu-guest
    case "$vfu_guest" in /*) ;; *) vfu_guest=$repo/$vfu_guest ;; esac
fi
[ -x "$vfu_guest" ] || die "vfu-guest binary $vfu_guest not found"
if ! file -L "$vfu_guest" | grep -Eq 'static(-pie)? linked|statically linked'; then
    die "$vfu_guest is not statically linked ($(file -L "$vfu_guest" | cut -d: -f2-)); build it with RUSTFLAGS='-C target-feature=+crt-static' ... --target x86_64-unknown-linux-gnu"
fi
vfu_guest_sha=$(sha256sum "$vfu_guest" | cut -d' ' -f1)
say "vfu-guest: $vfu_guest (sha256 $vfu_guest_sha, static)"

# The modules each driver needs (their dependencies are added from modinfo).
MODULES_UIO="uio_pci_generic"
MODULES_VFIO="vfio_pci vfio_iommu_type1"

# The key: everything the image is made from.
manifest=$(
    echo "kernel $kpkg $kver_pkg"
    echo "busybox-static $busybox_version"
    echo "kmod $(pkg_version kmod)"
    echo "cpio $(pkg_version cpio)"
    echo "gzip $(pkg_version gzip)"
    echo "vfu-guest $vfu_guest_sha"
    echo "init $(sha256sum "$here/init" | cut -d' ' -f1)"
    echo "build-image.sh $(sha256sum "$0" | cut -d' ' -f1)"
    echo "modules uio_pci_generic: $MODULES_UIO; vfio-pci: $MODULES_VFIO"
    echo "vfio-noiommu tools: gcc-12 $(pkg_version gcc-12), make $(pkg_version make), binutils $(pkg_version binutils)"
    echo "epoch $epoch"
)
key=$(printf '%s\n' "$manifest" | sha256sum | cut -c1-16)
img=$out/images/$key
mkdir -p "$out/images"
if [ -e "$img/done" ] && ! $force; then
    ln -sfn "images/$key" "$out/current"
    say "cached: $img (same inputs; --force builds it again)"
    echo "$img"
    exit 0
fi

# Download a package into the cache: fetch_deb NAME VERSION prints the .deb's path.
deb_dir=$out/debs
mkdir -p "$deb_dir"
cached_deb() {
    find "$deb_dir" -maxdepth 1 -name "${1}_*.deb" | while read -r f; do
        [ "$(dpkg-deb -f "$f" Version)" = "$2" ] && echo "$f"; done | head -1
}
fetch_deb() {
    local f
    f=$(cached_deb "$1" "$2")
    if [ -z "$f" ]; then
        say "downloading $1=$2"
        local apt_opts=()
        [ "$(id -u)" -ne 0 ] || apt_opts=(-o APT::Sandbox::User=root)
        (cd "$deb_dir" && apt-get download "${apt_opts[@]}" "$1=$2" >&2) ||
            die "cannot download $1=$2 from Debian's package registry (network? run scripts/device-vm/install-deps.sh, which runs apt-get update)"
        f=$(cached_deb "$1" "$2")
        [ -n "$f" ] || die "apt-get download left no ${1}_*.deb in $deb_dir"
    else
        say "package cached: $f"
    fi
    echo "$f"
}

# Download and unpack the kernel package.
deb=$(fetch_deb "$kpkg" "$kver_pkg")
ktree=$out/kernel/${kpkg}_$kver_pkg
if [ ! -e "$ktree/.done" ]; then
    say "unpacking $(basename "$deb") into $ktree"
    rm -rf "$ktree"
    mkdir -p "$ktree"
    dpkg-deb -x "$deb" "$ktree"
    touch "$ktree/.done"
fi
vmlinuz=$(find "$ktree/boot" -maxdepth 1 -name 'vmlinuz-*' | head -1)
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"
kver=${vmlinuz##*/vmlinuz-}
moddir=
for d in "$ktree/lib/modules/$kver" "$ktree/usr/lib/modules/$kver"; do
    [ -d "$d" ] && moddir=$d && break
done
[ -n "$moddir" ] || die "no lib/modules/$kver in $deb"
say "kernel $kver"

# vfio with no-IOMMU mode. noiommu_ko: the vfio.ko to put into the image instead of
# the stock one (empty: the stock one has it, or it cannot be had).
kconfig=$ktree/boot/config-$kver
[ -r "$kconfig" ] || die "no boot/config-$kver in $deb"
noiommu_ko=
noiommu_param=enable_unsafe_noiommu_mode=1
if grep -q '^CONFIG_VFIO_NOIOMMU=y' "$kconfig"; then
    say "vfio: the kernel has CONFIG_VFIO_NOIOMMU=y"
elif ! grep -q '^CONFIG_VFIO=m' "$kconfig"; then
    say "WARNING: vfio is not a module of this kernel and has no no-IOMMU mode: vfio-pci will not bind without a vIOMMU"
    noiommu_param=
else
    nbuild=$out/vfio-noiommu/${kpkg}_$kver_pkg
    if [ ! -e "$nbuild/.done" ]; then
        for t in make strip x86_64-linux-gnu-gcc-12 tar; do
            command -v "$t" >/dev/null || die "'$t' not found (building vfio.ko with no-IOMMU mode): run scripts/device-vm/install-deps.sh"
        done
        say "vfio: the kernel is built without CONFIG_VFIO_NOIOMMU: building vfio.ko with it"
        series=$(echo "$kver" | cut -d. -f1-2)
        hdeb=$(fetch_deb "linux-headers-$kver" "$kver_pkg")
        debs=("$hdeb" "$(fetch_deb "linux-source-$series" "$kver_pkg")")
        for dep in $(dpkg-deb -f "$hdeb" Depends | tr ',' '\n' | awk '{ print $1 }' | grep -E '^linux-(headers|kbuild)-'); do
            debs+=("$(fetch_deb "$dep" "$kver_pkg")")
        done
        rm -rf "$nbuild"
        mkdir -p "$nbuild/root" "$nbuild/src"
        for d in "${debs[@]}"; do dpkg-deb -x "$d" "$nbuild/root"; done
        hdr=$nbuild/root/usr/src/linux-headers-$kver
        common=$(find "$nbuild/root/usr/src" -maxdepth 1 -name 'linux-headers-*-common*' | head -1)
        tarball=$(find "$nbuild/root/usr/src" -maxdepth 1 -name "linux-source-$series.tar.*" | head -1)
        [ -d "$hdr" ] && [ -n "$common" ] && [ -n "$tarball" ] ||
            die "the headers or source of $kver are not where expected under $nbuild/root/usr/src"
        grep -q 'gcc-12$' "$hdr/.kernelvariables" ||
            die "$kver was not built with gcc-12 ($(grep '^CC' "$hdr/.kernelvariables")): build-image.sh knows only gcc-12"
        tar -xf "$tarball" -C "$nbuild/src" --wildcards '*/drivers/vfio/*.[ch]' '*/drivers/vfio/Makefile' \
            --exclude '*/drivers/vfio/*/*'
        vsrc=$(find "$nbuild/src" -type d -path '*/drivers/vfio' | head -1)
        [ -n "$vsrc" ] || die "no drivers/vfio in $tarball"
        # vfio.ko's objects for this configuration, from its Makefile (vfio-y and
        # vfio-$(CONFIG_X) lines with X=y).
        objs=$(awk -v cfg="$kconfig" '
            BEGIN { while ((getline l < cfg) > 0) if (l ~ /^CONFIG_[A-Z0-9_]+=y$/) { sub(/=y$/, "", l); on[l] = 1 } }
            /^vfio-y[ \t]*\+?=/ { for (i = 3; i <= NF; i++) print $i }
            /^vfio-\$\(CONFIG_[A-Z0-9_]+\)/ { c = $1; sub(/^vfio-\$\(/, "", c); sub(/\).*/, "", c); if (c in on) for (i = 3; i <= NF; i++) print $i }
        ' "$vsrc/Makefile" | tr '\n' ' ')
        build=$nbuild/build
        mkdir -p "$build"
        cp "$vsrc"/*.c "$vsrc"/*.h "$build/"
        printf 'obj-m := vfio.o\nvfio-y := %s\nccflags-y := -DCONFIG_VFIO_NOIOMMU=1\n' "$objs" >"$build/Kbuild"
        say "make -C $common O=$hdr M=$build modules (vfio-y: $objs)"
        # No BTF (needs pahole); paths mapped so that the module does not depend on
        # where the cache is.
        make -s -C "$common" O="$hdr" M="$build" ARCH=x86 KERNELRELEASE="$kver" \
            CC=x86_64-linux-gnu-gcc-12 CONFIG_DEBUG_INFO_BTF_MODULES= \
            KCFLAGS="-ffile-prefix-map=$build/=drivers/vfio/ -ffile-prefix-map=$nbuild/root/=/" \
            -j2 modules >&2 || die "building vfio.ko with CONFIG_VFIO_NOIOMMU failed"
        strip --strip-debug -o "$nbuild/vfio.ko" "$build/vfio.ko"
        stock=$(find "$moddir/kernel/drivers/vfio" -maxdepth 1 -name 'vfio.ko*' | head -1)
        [ "$(modinfo -F vermagic "$nbuild/vfio.ko")" = "$(modinfo -F vermagic "$stock")" ] ||
            die "the vfio.ko built does not match the kernel (vermagic $(modinfo -F vermagic "$nbuild/vfio.ko"))"
        modinfo -F parm "$nbuild/vfio.ko" | grep -q '^enable_unsafe_noiommu_mode:' ||
            die "the vfio.ko built has no enable_unsafe_noiommu_mode parameter"
        # Only the module is kept; the packages stay in debs/.
        rm -rf "$nbuild/root" "$nbuild/src" "$build"
        touch "$nbuild/.done"
    fi
    noiommu_ko=$nbuild/vfio.ko
    say "vfio: no-IOMMU vfio.ko $noiommu_ko (sha256 $(sha256sum "$noiommu_ko" | cut -d' ' -f1))"
fi

# Staging tree.
tmp=$out/images/$key.tmp
rm -rf "$tmp"
root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,etc,root,usr,lib/modules/vfu}
ln -s bin "$root/sbin"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$here/init" "$root/init"
if command -v strip >/dev/null; then
    strip -o "$root/bin/vfu-guest" "$vfu_guest"
    chmod 0755 "$root/bin/vfu-guest"
else
    install -m 0755 "$vfu_guest" "$root/bin/vfu-guest"
fi
if [ "$(id -u)" -eq 0 ]; then
    mknod -m 0600 "$root/dev/console" c 5 1
    mknod -m 0666 "$root/dev/null" c 1 3
fi

# Modules: the closure of each list under modinfo's "depends", dependencies first,
# decompressed (busybox insmod takes plain .ko files).
declare -A modfile=()
while IFS= read -r f; do
    n=${f##*/}
    n=${n%%.ko*}
    modfile[${n//-/_}]=${f#"$moddir"/}
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
declare -A seen=()
order=()
visit() {
    local m=${1//-/_} dep
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    [ -n "${modfile[$m]:-}" ] || die "module $m not found in $kpkg (built in? then leave it out of the list)"
    for dep in $(modinfo -F depends "$moddir/${modfile[$m]}" | tr ',' ' '); do
        visit "$dep"
    done
    order+=("$m")
}
unpack_module() { # $1: file under $moddir, $2: decompressed file under the image's
    case "$1" in
    *.xz) xz -dc "$moddir/$1" >"$root/lib/modules/$kver/$2" ;;
    *.zst) zstd -qdc "$moddir/$1" >"$root/lib/modules/$kver/$2" ;;
    *.gz) gzip -dc "$moddir/$1" >"$root/lib/modules/$kver/$2" ;;
    *) cp "$moddir/$1" "$root/lib/modules/$kver/$2" ;;
    esac
}
write_list() { # $1: list name, rest: root modules
    local name=$1 m rel
    shift
    seen=()
    order=()
    for m in "$@"; do visit "$m"; done
    : >"$root/lib/modules/vfu/$name.list"
    for m in "${order[@]}"; do
        rel=${modfile[$m]}
        rel=${rel%.xz}
        rel=${rel%.zst}
        rel=${rel%.gz}
        if [ ! -e "$root/lib/modules/$kver/$rel" ]; then
            mkdir -p "$(dirname "$root/lib/modules/$kver/$rel")"
            case "${modfile[$m]}" in
            */vfio.ko*) if [ -n "$noiommu_ko" ]; then cp "$noiommu_ko" "$root/lib/modules/$kver/$rel"; else unpack_module "${modfile[$m]}" "$rel"; fi ;;
            *) unpack_module "${modfile[$m]}" "$rel" ;;
            esac
            chmod 0644 "$root/lib/modules/$kver/$rel"
        fi
        # Module parameters follow the file: vfio's no-IOMMU mode.
        if [ "$m" = vfio ] && [ -n "$noiommu_param" ]; then
            echo "$m $rel $noiommu_param" >>"$root/lib/modules/vfu/$name.list"
        else
            echo "$m $rel" >>"$root/lib/modules/vfu/$name.list"
        fi
    done
    say "modules for $name: ${order[*]}"
}
# shellcheck disable=SC2086 # the lists are words
write_list uio_pci_generic $MODULES_UIO
# shellcheck disable=SC2086
write_list vfio-pci $MODULES_VFIO
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [ -e "$moddir/$f" ] && install -m 0644 "$moddir/$f" "$root/lib/modules/$kver/$f"
done
depmod -b "$root" "$kver" || die "depmod -b $root $kver failed"

noiommu_line="vfio.ko stock"
[ -z "$noiommu_ko" ] || noiommu_line="vfio.ko built with CONFIG_VFIO_NOIOMMU, sha256 $(sha256sum "$noiommu_ko" | cut -d' ' -f1)"
manifest=$(printf '%s\nkernel-release %s\n%s' "$manifest" "$kver" "$noiommu_line")
printf '%s\n' "$manifest" >"$root/etc/vfu-image"
chmod 0644 "$root/etc/vfu-image"

# The archive: sorted, one time stamp, owned by root, gzip without name or time.
find "$root" -exec touch -h -d "@$epoch" {} +
(cd "$root" && find . -mindepth 1 -print0 | sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$tmp/initrd.cpio.gz"
install -m 0644 "$vmlinuz" "$tmp/vmlinuz"
printf '%s\n' "$manifest" >"$tmp/manifest.txt"
(cd "$tmp" && sha256sum vmlinuz initrd.cpio.gz >sha256sums)
rm -rf "$root"
touch "$tmp/done"
rm -rf "$img"
mv "$tmp" "$img"
ln -sfn "images/$key" "$out/current"
# Keep the three newest images.
find "$out/images" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | tail -n +4 |
    while read -r _ old; do say "removing old image $old"; rm -rf "$old"; done
say "built $img: vmlinuz $(du -h "$img/vmlinuz" | cut -f1), initrd.cpio.gz $(du -h "$img/initrd.cpio.gz" | cut -f1)"
sed 's/^/build-image:   /' "$img/sha256sums" >&2
echo "$img"
