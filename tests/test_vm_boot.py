"""A real VM boots with its disk served by `vdisk serve` and writes a file to it.

The guest (tools/guest/build.sh: a Debian kernel booted through PVH, a busybox initramfs
with virtio_blk and ext4) mounts /dev/vda, writes a marker, syncs and powers off; then the
marker is in the image's file system, e2fsck finds it clean and `vdisk check` too.
QEMU runs with TCG (KVM is not usable on the CI machines); a boot takes a few seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import need, run
from tests.test_nbd import Served, _env

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = os.environ.get("VDISK_GUEST_DIR") or (
    "/var/cache/vdisk-guest" if os.geteuid() == 0 else os.path.expanduser("~/.cache/vdisk-guest")
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def guest() -> Path:
    """The built guest (cached across runs); skip only if it cannot be built here."""
    out = Path(GUEST_DIR)
    if not ((out / "vmlinux").exists() and (out / "initramfs.cpio.gz").exists()):
        try:
            p = subprocess.run(
                ["bash", str(ROOT / "tools" / "guest" / "build.sh"), str(out)],
                capture_output=True,
                text=True,
                timeout=900,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("building the guest (tools/guest/build.sh) took over 15 minutes")
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            pytest.skip(
                "cannot build the guest kernel/initramfs (packages qemu-system-x86, "
                f"busybox-static, kmod, cpio, linux-image-*-amd64 not installable?): {tail}"
            )
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (tools/guest/build.sh installs it)")
    return out


def _make_image(tmp: Path, fmt: str) -> Path:
    """A 64 MiB disk holding an empty ext4 file system, in format ``fmt``."""
    raw = tmp / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
    run(["mkfs.ext4", "-q", "-F", "-L", "vdisktest", str(raw)])
    if fmt == "raw":
        return raw
    img = tmp / f"disk.{fmt}"
    if fmt == "qcow2":
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)])
        return img
    try:  # the native format, once it exists: copy the file system in through the API
        from vdisk import api

        api.create(str(img), 64 << 20, format="vdisk")
        with api.open(str(img), format="vdisk") as d, open(raw, "rb") as src:
            off = 0
            while chunk := src.read(1 << 20):
                if chunk.count(0) != len(chunk):
                    d.write(off, chunk)
                off += len(chunk)
    except Exception as e:
        pytest.skip(f"native .vdisk images are not usable yet: {type(e).__name__}: {e}")
    return img


# raw is the baseline; the native format is the one that matters. (qcow2 works as well,
# but each boot costs seconds of TCG: test_nbd covers qcow2 through real clients.)
@pytest.mark.parametrize("fmt", ["raw", "vdisk"])
def test_guest_writes_marker(guest: Path, tmp_path: Path, fmt: str) -> None:
    need("mkfs.ext4")
    need("debugfs")
    need("qemu-img")
    img = _make_image(tmp_path, fmt)
    marker = f"vdisk-{uuid.uuid4().hex[:12]}"
    server = Served(tmp_path, [img], "-f", fmt)
    try:
        vm = subprocess.run(
            [
                "qemu-system-x86_64",
                "-accel", "tcg",
                "-m", "256",
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial", "stdio",
                "-kernel", str(guest / "vmlinux"),
                "-initrd", str(guest / "initramfs.cpio.gz"),
                "-append", f"console=ttyS0 quiet panic=-1 vdisk.marker={marker}",
                "-drive", f"file={server.url()},format=raw,if=virtio,cache=none",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )  # fmt: skip
        assert f"MARKER-WRITTEN {marker}" in vm.stdout, vm.stdout[-3000:] + vm.stderr[-2000:]
    finally:
        rc = server.stop()
        log = server.log()
    assert rc == 0, log
    assert "dropped" not in log, log

    # what the guest wrote is in the image: read it back through vdisk as a plain raw file
    check = Served(tmp_path, [img], "-f", fmt, "--read-only")
    try:
        out = tmp_path / "back.raw"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", check.url(), str(out)])
    finally:
        check.stop()
    got = run(["debugfs", "-R", "cat /marker", str(out)]).stdout.strip()
    assert got == marker
    run(["e2fsck", "-f", "-n", str(out)])
    p = run([sys.executable, "-m", "vdisk", "check", "-f", fmt, str(img)], check=False, env=_env())
    assert p.returncode == (63 if fmt == "raw" else 0), p.stdout + p.stderr
