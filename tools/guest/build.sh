#!/usr/bin/env bash
# Builds the tiny guest the VM boot test (tests/test_vm_boot.py) runs: a Debian kernel,
# uncompressed (QEMU boots an ELF vmlinux through its PVH entry in ~3 s instead of ~6.5 s
# for the bzImage under TCG), and a busybox initramfs holding only the modules a virtio
# disk with ext4 needs, resolved with modprobe --show-depends.
#
# Usage: tools/guest/build.sh [OUTDIR]   (default: $VDISK_GUEST_DIR or /var/cache/vdisk-guest)
# Prints OUTDIR on success; OUTDIR then holds vmlinux, initramfs.cpio.gz and KVER.
# Idempotent: a complete OUTDIR is reused as it is. Needs root (or sudo) for apt-get.
set -euo pipefail
export LC_ALL=C
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-${VDISK_GUEST_DIR:-/var/cache/vdisk-guest}}"
if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/initramfs.cpio.gz" ] && [ -s "$OUT/KVER" ]; then
    echo "$OUT"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
PKGS="qemu-system-x86 busybox-static kmod cpio xz-utils"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 || {
        $SUDO apt-get update -qq >/dev/null
        $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
    }
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# The newest plain amd64 kernel image package of the distribution (not installed: extracted).
pkg="$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n1)"
if [ -z "$pkg" ]; then
    $SUDO apt-get update -qq >/dev/null
    pkg="$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n1)"
fi
[ -n "$pkg" ] || { echo "build.sh: no linux-image-*-amd64 package found" >&2; exit 1; }
apt-get download -q "$pkg" >/dev/null 2>&1 || apt-get download "$pkg"
dpkg-deb -x ./*.deb root
KVER="$(ls root/lib/modules | head -n1)"

# vmlinuz is a bzImage whose payload is xz: find the xz stream and unpack it.
vmlinuz="root/boot/vmlinuz-$KVER"
off="$(grep -abo -m1 -P '\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1)"
[ -n "$off" ] || { echo "build.sh: no xz payload in $vmlinuz" >&2; exit 1; }
tail -c +"$((off + 1))" "$vmlinuz" | xz -dcq --single-stream >vmlinux || true
head -c 4 vmlinux | grep -q 'ELF' || { echo "build.sh: payload of $vmlinuz is not an ELF" >&2; exit 1; }

# The initramfs: busybox, the modules (decompressed: busybox insmod takes plain .ko), /init.
depmod -b root "$KVER"
mkdir -p initrd/bin initrd/dev initrd/proc initrd/sys initrd/mnt initrd/lib/modules
cp /bin/busybox initrd/bin/busybox
: >initrd/modules.order
for m in virtio_pci virtio_blk ext4; do
    modprobe -d root -S "$KVER" --show-depends "$m" | while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        name="$(basename "$path")"
        name="${name%.xz}"
        name="${name%.zst}"
        name="${name%.gz}"
        [ -e "initrd/lib/modules/$name" ] && continue
        case "$path" in
            *.xz) xz -dc "$path" >"initrd/lib/modules/$name" ;;
            *.zst) zstd -dcq "$path" >"initrd/lib/modules/$name" ;;
            *.gz) gzip -dc "$path" >"initrd/lib/modules/$name" ;;
            *) cp "$path" "initrd/lib/modules/$name" ;;
        esac
        echo "$name" >>initrd/modules.order
    done
done
install -m 0755 "$HERE/init" initrd/init
(cd initrd && find . | cpio -o -H newc --quiet | gzip -9) >initramfs.cpio.gz

mkdir -p "$OUT"
cp vmlinux "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
cp initramfs.cpio.gz "$OUT/initramfs.tmp" && mv "$OUT/initramfs.tmp" "$OUT/initramfs.cpio.gz"
echo "$KVER" >"$OUT/KVER"
echo "$OUT"
