#!/usr/bin/env bash
# Installs everything vdisk needs on a fresh Debian 12 machine: system packages, then the
# package and its test extras. Idempotent; run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
PKGS="fuse3 libfuse3-dev pkg-config qemu-utils libnbd-bin nbdkit e2fsprogs fdisk util-linux kmod fio openssl"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check -e ".[test,s3]"
