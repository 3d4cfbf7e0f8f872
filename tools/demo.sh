#!/usr/bin/env bash
# The end-to-end demo of `make demo`: a real ext4 disk goes through every way in.
#   1. a raw disk with an ext4 file system, converted to a compressed .vdisk (verified)
#   2. a snapshot and a linked clone
#   3. the clone mounted with FUSE, its file system loop-mounted, a file written
#   4. the image served over NBD and read by qemu-img and nbdinfo
#   5. converted to qcow2 and checked by qemu-img itself; check and scrub by vdisk
# Everything it makes lives in a temporary directory removed at the end, mounts included.
set -euo pipefail
W=$(mktemp -d /tmp/vdisk-demo.XXXXXX)
MNT="$W/mnt"
SERVER=""
cleanup() {
    set +e
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    if mountpoint -q "$MNT" 2>/dev/null; then vdisk umount "$MNT" || fusermount3 -u -z "$MNT"; fi
    rm -rf "$W"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "1. a 256 MiB ext4 disk with real files, converted to .vdisk"
mkdir -p "$W/files"
cp -r /usr/share/doc/. "$W/files/" 2>/dev/null || true
echo "hello from vdisk" > "$W/files/hello.txt"
truncate -s 256M "$W/disk.raw"
run mkfs.ext4 -q -F -d "$W/files" "$W/disk.raw"
run vdisk convert -O vdisk --verify "$W/disk.raw" "$W/disk.vdisk"
run vdisk info "$W/disk.vdisk"
du -h --apparent-size "$W/disk.raw" | sed 's/^/raw apparent size: /'
du -h "$W/disk.vdisk" | sed 's/^/vdisk on disk:     /'

step "2. a snapshot, and a linked clone"
run vdisk snapshot create "$W/disk.vdisk" pristine
run vdisk snapshot list "$W/disk.vdisk"
run vdisk clone "$W/disk.vdisk" "$W/vm1.vdisk"
run vdisk info "$W/vm1.vdisk"

step "3. the clone mounted with FUSE; its ext4 mounted too; a file written"
mkdir -p "$MNT"
if [ "$(id -u)" = 0 ]; then
    run vdisk mount --background --fs "" "$W/vm1.vdisk" "$MNT"
    run ls "$MNT"
    run cat "$MNT/fs/hello.txt"
    echo "written through FUSE" > "$MNT/fs/new.txt"
    run cat "$MNT/stats"
    run vdisk umount "$MNT"
else
    run vdisk mount --background "$W/vm1.vdisk" "$MNT"
    run ls -l "$MNT"
    run vdisk umount "$MNT"
fi
run vdisk check "$W/vm1.vdisk"

step "4. the base served over NBD, read by qemu-img and nbdinfo"
PORT=$((20000 + RANDOM % 20000))
vdisk serve --read-only --port "$PORT" "$W/disk.vdisk" &
SERVER=$!
for _ in $(seq 50); do nbdinfo "nbd://127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.1; done
run qemu-img compare -f raw -F raw "$W/disk.raw" "nbd://127.0.0.1:$PORT"
run nbdinfo --map "nbd://127.0.0.1:$PORT" | head -5
kill "$SERVER"; wait "$SERVER" || true; SERVER=""

step "5. to qcow2, checked by qemu-img; vdisk check and scrub"
run vdisk convert -O qcow2 "$W/disk.vdisk" "$W/disk.qcow2"
run qemu-img check "$W/disk.qcow2"
run qemu-img compare "$W/disk.raw" "$W/disk.qcow2"
run vdisk check "$W/disk.vdisk"
run vdisk scrub "$W/disk.vdisk"

step "demo finished: every step passed"
