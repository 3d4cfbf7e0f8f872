"""`vdisk serve --export-snapshots`: each internal snapshot is a read-only export named
IMAGE@SNAPSHOT beside the writable image, for native and qcow2 images (a backup reads a
consistent state while the disk stays in use)."""

from __future__ import annotations

from pathlib import Path

import vdisk
from tests.conftest import need, pattern, run
from tests.test_nbd import patterned, serve  # noqa: F401 (the fixture)

MiB = 1 << 20
SIZE = 8 * MiB


def test_snapshots_are_read_only_exports(serve, tmp_path: Path) -> None:  # noqa: F811
    need("qemu-io")
    need("nbdinfo")
    images = []
    for fmt in ("vdisk", "qcow2"):
        img = patterned(tmp_path / f"d.{fmt}", SIZE, fmt)
        if fmt == "vdisk":
            with vdisk.open(str(img)) as d:
                d.snapshots.create("before")
        else:
            run(["qemu-img", "snapshot", "-c", "before", str(img)])
        with vdisk.open(str(img)) as d:
            d.write(2 * MiB, b"\x5a" * MiB)
        images.append(img)
    ref = tmp_path / "before.raw"
    ref.write_bytes(pattern(0, SIZE))
    s = serve(*images, args=("--export-snapshots",))
    names = run(["nbdinfo", "--list", "--json", s.url()]).stdout
    for img in images:
        snap = f"{img.name}@before"
        assert f'"{snap}"' in names, names
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), s.url(snap)])
        p = run(["qemu-io", "-f", "raw", "-c", "write 0 4096", s.url(snap)], check=False)
        assert p.returncode != 0 and "Permission denied" in p.stderr, p  # a read-only export
        run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 2M 1M", s.url(img.name)])
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 5M 64k", "-c", "flush", s.url(img.name)])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), s.url(snap)])
    assert s.stop() == 0
    for img in images:
        with vdisk.open(str(img), readonly=True) as d:
            assert d.read(5 * MiB, 65536) == b"\x77" * 65536
            with d.snapshots.open("before") as view:
                assert view.read(0, SIZE) == pattern(0, SIZE)
