"""Parallels against qemu-img 7.2: its images (and hand-made old-magic ones) read
byte-identically, ours pass its check and compare, DiskDescriptor.xml bundles resolve their
snapshot chain, hostile headers and descriptors give clear errors."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

import vdisk
from tests.conftest import pattern
from tests.formats_helpers import (
    crash_walk,
    driver_read_fails,
    grow_and_compare,
    mutated_headers_give_clear_errors,
    open_driver,
    patch,
    qemu_raw,
)
from vdisk.errors import CorruptImage, UnsupportedFeature
from vdisk.formats import parallels as prl
from vdisk.formats.base import Kind

MiB = 1 << 20
DRIVER_CLASS = prl.ParallelsDriver
HOT_OFFSETS = [0, 16, 28, 32, 36, 48, 64]


@pytest.mark.parametrize("cluster", ["64k", "1M"])
def test_reads_qemu_images(tmp_path, qemu_img, qemu_io, cluster):
    path = str(tmp_path / "q.hdd")
    qemu_img("create", "-q", "-f", "parallels", "-o", f"cluster_size={cluster}", path, "5M")
    writes = ["write -P 0x11 0 4k", "write -P 0x22 1020k 8k", "write -P 0x33 2500k 2m"]
    qemu_io(*[a for w in writes for a in ("-c", w)], path)
    want = qemu_raw(qemu_img, "parallels", path, tmp_path)
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert d.read(0, d.size) == want
        for off, n in [(65536 - 100, 300), (2500 * 1024 - 1, 2 * MiB + 2)]:
            assert d.read(off, n) == want[off : off + n]
        for e in d.block_status(0, d.size):
            if e.kind != Kind.DATA:
                assert want[e.offset : e.end] == bytes(e.length)
        assert d.check().exit_code == 0
    finally:
        d.close()
    with vdisk.open(path, readonly=True) as disk:
        assert disk.read(0, disk.size) == want


def _old_magic_image(path: str, clusters: dict[int, bytes], cs: int = 63 * 512) -> int:
    """A "WithoutFreeSpace" image: BAT in sectors, data_off 0 (computed), odd cluster size."""
    nbat = 8
    size = nbat * cs
    data = -(-(64 + 4 * nbat) // 512) * 512
    bat = [0] * nbat
    body = b""
    for i, (idx, payload) in enumerate(sorted(clusters.items())):
        bat[idx] = (data + i * cs) // 512
        body += payload.ljust(cs, b"\0")
    hdr = prl.HEADER.pack(prl.MAGIC_OLD, 2, 16, 1, cs // 512, nbat, size // 512, 0, 0, 0, 0)
    raw = (hdr + struct.pack(f"<{nbat}I", *bat)).ljust(data, b"\0") + body
    Path(path).write_bytes(raw)
    return size


def test_old_magic(tmp_path, qemu_img):
    path = str(tmp_path / "old.hdd")
    cs = 63 * 512
    size = _old_magic_image(path, {1: pattern(cs, cs, 1), 4: pattern(0, 100, 2)}, cs)
    want = qemu_raw(qemu_img, "parallels", path, tmp_path)
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert d.size == size and d.cluster_size == cs
        assert d.read(0, size) == want
        assert d.read(cs - 10, cs + 20) == want[cs - 10 : 2 * cs + 10]
    finally:
        d.close()
    with vdisk.open(path) as disk:  # write across clusters of the old format
        disk.write(3 * cs - 7, b"q" * (cs + 14))
    want = bytearray(want)
    want[3 * cs - 7 : 4 * cs + 7] = b"q" * (cs + 14)
    assert qemu_raw(qemu_img, "parallels", path, tmp_path) == bytes(want)


def test_vdisk_writes_pass_qemu_check(tmp_path, qemu_img, qemu_io):
    path = str(tmp_path / "v.hdd")
    size = 6 * MiB + 4096
    vdisk.create(path, size, format="parallels", cluster_size=256 * 1024)
    model = bytearray(size)
    rng = random.Random(5)
    with vdisk.open(path, cache_mb=1) as d:
        for step in range(40):
            off = rng.randrange(0, size - 1)
            n = min(rng.choice([1, 700, 4096, 70000, MiB + 3]), size - off)
            if step % 7 == 6:
                d.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                d.write(off, pattern(off, n, seed=step))
                model[off : off + n] = pattern(off, n, seed=step)
        # open for writing: marked in use
        assert open_driver(DRIVER_CLASS, path).in_use == prl.IN_USE
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    qemu_img("check", path)
    qemu_img("compare", "-f", "parallels", "-F", "raw", path, str(ref))
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert d.in_use == prl.CLOSED
    finally:
        d.close()
    qemu_io("-c", "write -P 0x77 5m 1m", path)
    model[5 * MiB : 6 * MiB] = b"\x77" * MiB
    with vdisk.open(path, readonly=True) as d:
        assert d.read(0, size) == bytes(model)


# -- DiskDescriptor.xml bundles --------------------------------------------------------------------

ROOT = "{11111111-2222-3333-4444-555555555555}"


def _descriptor(
    images: list[tuple[str, str]], shots: list[tuple[str, str]], extra: str = ""
) -> str:
    imgs = "".join(
        f"<Image><GUID>{g}</GUID><Type>Compressed</Type><File>{f}</File></Image>" for g, f in images
    )
    sh = "".join(f"<Shot><GUID>{g}</GUID><ParentGUID>{p}</ParentGUID></Shot>" for g, p in shots)
    return (
        f"<?xml version='1.0' encoding='UTF-8'?>{extra}\n<Parallels_disk_image Version=\"1.0\">"
        "<Disk_Parameters><Disk_size>8192</Disk_size><Cylinders>16</Cylinders><Heads>16</Heads>"
        "<Sectors>32</Sectors><Padding>0</Padding></Disk_Parameters>"
        f"<StorageData><Storage><Start>0</Start><End>8192</End><Blocksize>2048</Blocksize>{imgs}"
        f"</Storage></StorageData><Snapshots>{sh}</Snapshots></Parallels_disk_image>"
    )


@pytest.fixture
def bundle(tmp_path, qemu_img, qemu_io) -> tuple[Path, bytes]:
    b = tmp_path / "disk.hdd"
    b.mkdir()
    root, top = str(b / "disk.hdd.0.hds"), str(b / "disk.hdd.1.hds")
    for p in (root, top):
        qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=1M", p, "4M")
    qemu_io("-c", "write -P 0x11 0 4M", root)
    qemu_io("-c", "write -P 0x22 1M 1M", top)  # whole clusters: the rest falls through
    (b / prl.DESCRIPTOR).write_text(
        _descriptor(
            [(ROOT, "disk.hdd.0.hds"), (prl.TOP_GUID, "disk.hdd.1.hds")],
            [(ROOT, prl.NULL_GUID), (prl.TOP_GUID, ROOT)],
        )
    )
    want = b"\x11" * MiB + b"\x22" * MiB + b"\x11" * 2 * MiB
    return b, want


def test_bundle_chain(bundle):
    b, want = bundle
    root_before = (b / "disk.hdd.0.hds").read_bytes()
    with vdisk.open(str(b / prl.DESCRIPTOR), readonly=True) as d:
        assert d.format == "parallels"
        assert d.read(0, d.size) == want
        assert d.info()["backing-chain"][0]["filename"].endswith("disk.hdd.0.hds")
    with vdisk.open(str(b / "disk.hdd.1.hds"), readonly=True) as d:  # the image, not the XML
        assert d.read(0, d.size) == want
    with vdisk.open(str(b / prl.DESCRIPTOR)) as d:  # writes go to the top image
        d.write(3 * MiB - 100, b"w" * 200)
    model = bytearray(want)
    model[3 * MiB - 100 : 3 * MiB + 100] = b"w" * 200
    with vdisk.open(str(b / prl.DESCRIPTOR), readonly=True) as d:
        assert d.read(0, d.size) == bytes(model)
    assert (b / "disk.hdd.0.hds").read_bytes() == root_before


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("doctype", UnsupportedFeature, "DOCTYPE"),
        ("loop", CorruptImage, "loops"),
        ("escape", UnsupportedFeature, "outside the bundle"),
        ("garbage", CorruptImage, "well-formed"),
        ("huge", CorruptImage, "exceeds"),
        ("utf16", CorruptImage, "magic"),  # not taken for a descriptor at all
    ],
)
def test_hostile_descriptors(bundle, case, exc, match):
    b, _want = bundle
    desc = b / prl.DESCRIPTOR
    other = "{99999999-2222-3333-4444-555555555555}"
    if case == "doctype":
        bomb = '<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
        desc.write_text(_descriptor([(ROOT, "disk.hdd.0.hds")], [(ROOT, prl.NULL_GUID)], bomb))
    elif case == "loop":
        desc.write_text(
            _descriptor(
                [(ROOT, "disk.hdd.0.hds"), (other, "x.hds"), (prl.TOP_GUID, "disk.hdd.1.hds")],
                [(ROOT, other), (other, ROOT), (prl.TOP_GUID, ROOT)],
            )
        )
    elif case == "escape":
        desc.write_text(
            _descriptor([(prl.TOP_GUID, "../../etc/passwd")], [(prl.TOP_GUID, prl.NULL_GUID)])
        )
    elif case == "garbage":
        desc.write_text("<Parallels_disk_image><oops></Parallels_disk_image>")
    elif case == "utf16":
        bomb = '<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">]>'
        text = _descriptor([(ROOT, "disk.hdd.0.hds")], [(ROOT, prl.NULL_GUID)], bomb)
        desc.write_bytes(text.replace("UTF-8", "UTF-16").encode("utf-16"))
        with pytest.raises(UnsupportedFeature, match="not UTF-8"):  # nor parsed if asked to
            prl.parse_descriptor(desc.read_bytes(), str(desc))
    else:
        desc.write_text(_descriptor([], []) + "<!--" + "x" * (2 * MiB) + "-->")
    with pytest.raises(exc, match=match):
        vdisk.open(str(desc), readonly=True, format="parallels")


# -- hostile images --------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path, qemu_img, qemu_io) -> str:
    path = str(tmp_path / "h.hdd")
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", path, "4M")
    qemu_io("-c", "write -P 0x33 0 1M", path)
    return path


def test_truncated(small):
    os.truncate(small, 40)
    driver_read_fails(DRIVER_CLASS, small, match="too short")


def test_wrong_magic(small):
    patch(small, 0, b"WithoutFreeSpacX")
    assert prl.ParallelsDriver.probe(Path(small).read_bytes()[:4096], 0) == 0
    driver_read_fails(DRIVER_CLASS, small, match="magic")


def test_bat_past_end(small):
    patch(small, prl.OFF_BAT_ENTRIES, struct.pack("<IQ", 1 << 30, 1 << 37))
    driver_read_fails(DRIVER_CLASS, small, match="past the end")


def test_entry_past_end(small):
    patch(small, 64, struct.pack("<I", 1 << 20))
    driver_read_fails(DRIVER_CLASS, small, match="BAT entry 0")


def test_huge_size_and_cluster(small):
    patch(small, 36, struct.pack("<Q", 1 << 60))
    driver_read_fails(DRIVER_CLASS, small, match="disk size")
    patch(small, 36, struct.pack("<Q", 8192))
    patch(small, 28, struct.pack("<I", 0))
    driver_read_fails(DRIVER_CLASS, small, match="cluster")


def test_check_finds_shared_cluster(small):
    first = struct.unpack("<I", Path(small).read_bytes()[64:68])[0]
    patch(small, 68, struct.pack("<I", first))
    d = open_driver(DRIVER_CLASS, small)
    try:
        assert any("twice" in c for c in d.check().corruptions)
    finally:
        d.close()


def test_resize_grows(tmp_path, qemu_img):
    """The old last cluster was short: its tail must read as zeros."""
    p = str(tmp_path / "r.hdd")
    grow_and_compare(qemu_img, tmp_path, p, "parallels", 3 * MiB - 512, 7 * MiB)


def test_mutated_headers_give_clear_errors(small):
    """Seeded random damage to the header and tables: only vdisk errors, bounded time."""
    mutated_headers_give_clear_errors(DRIVER_CLASS, small, HOT_OFFSETS)


def test_unclean_close_is_reported_and_repaired(small, qemu_img):
    patch(small, prl.OFF_IN_USE, struct.pack("<I", prl.IN_USE))
    assert qemu_img("check", small, check=False).returncode == 2  # qemu: not closed correctly
    d = open_driver(DRIVER_CLASS, small)
    try:
        rep = d.check()
        assert rep.exit_code == 0 and rep.info["closed-cleanly"] is False
    finally:
        d.close()
    d = open_driver(DRIVER_CLASS, small, readonly=False)
    try:
        assert d.check(repair=True).repaired
    finally:
        d.close()
    qemu_img("check", small)


def test_power_loss():
    """Power loss after every operation (see tests.test_vhdx.crash_walk)."""
    assert crash_walk(prl.ParallelsDriver, 3 * MiB, {"cluster_size": 256 * 1024}, 7) > 50


@pytest.mark.parametrize("feature,flags", [(prl.EXT_DIRTY_BITMAP, 0), (0x1234, prl.EXT_NECESSARY)])
def test_format_extension(small, qemu_img, feature, flags):
    """A dirty bitmap extension is dropped on the first write (it would go stale); an
    unknown NECESSARY feature forbids writing."""
    import hashlib

    cs = 64 * 1024
    end = os.path.getsize(small)
    ext = -(-end // cs) * cs
    body = prl.EXT_FEATURE.pack(feature, flags, 32, 0) + bytes(32)
    cluster = bytearray(cs)
    cluster[24 : 24 + len(body)] = body
    struct.pack_into("<Q", cluster, 0, prl.EXT_MAGIC)
    cluster[8:24] = hashlib.md5(bytes(cluster[24:])).digest()
    patch(small, ext, bytes(cluster))
    patch(small, prl.OFF_EXT, struct.pack("<Q", ext // 512))
    want = b"\x33" * MiB + bytes(3 * MiB)
    with vdisk.open(small, readonly=True) as d:
        assert d.read(0, d.size) == want
    if flags & prl.EXT_NECESSARY:
        d = vdisk.open(small)
        with pytest.raises(UnsupportedFeature, match="NECESSARY"):
            d.write(0, b"n" * 4096)
            d.flush()
        with pytest.raises(UnsupportedFeature):  # the refused write is still pending
            d.close()
        return
    with vdisk.open(small) as d:
        d.write(2 * MiB, b"n" * 4096)
    d = open_driver(DRIVER_CLASS, small)
    try:
        assert d.ext_off == 0
        assert d.read(2 * MiB, 4096) == b"n" * 4096
    finally:
        d.close()
    qemu_img("check", small)


def test_overlays_make_a_bundle(tmp_path, qemu_img):
    """vdisk.create with a backing image writes DiskDescriptor.xml (a new one, then adds to
    it); commit, flatten and rebase rewrite the ParentGUID; the .hdd files stay qemu-clean."""
    from vdisk import ops

    base, mid, top = (str(tmp_path / n) for n in ("base.hdd", "mid.hdd", "top.hdd"))
    size = 3 * MiB
    vdisk.create(base, size, format="parallels")
    model = bytearray(pattern(0, size, seed=1))
    with vdisk.open(base) as d:
        d.write(0, bytes(model))
    vdisk.create(mid, None, format="parallels", backing="base.hdd")
    vdisk.create(top, None, format="parallels", backing="mid.hdd")
    desc = str(tmp_path / prl.DESCRIPTOR)
    with vdisk.open(mid) as d:
        d.write(MiB - 100, b"m" * 200)
    model[MiB - 100 : MiB + 100] = b"m" * 200
    with vdisk.open(desc) as d:  # the bundle's top is the newest overlay
        assert [c["filename"] for c in d.info()["backing-chain"]] == [mid, base]
        d.write(2 * MiB, b"t" * 4096)
    model[2 * MiB : 2 * MiB + 4096] = b"t" * 4096
    with vdisk.open(top, readonly=True) as d:
        assert d.read(0, size) == bytes(model)
    ops.commit(top)  # top's data into mid
    with vdisk.open(mid, readonly=True) as d:
        assert d.read(0, size) == bytes(model)
    ops.rebase(top, None)  # flatten: top stands alone
    with vdisk.open(top, readonly=True) as d:
        assert d.backing is None and d.read(0, size) == bytes(model)
    ops.rebase(top, base)
    with vdisk.open(desc, readonly=True) as d:
        assert [c["filename"] for c in d.info()["backing-chain"]] == [base]
        assert d.read(0, size) == bytes(model)
    for p in (base, mid, top):
        qemu_img("check", p)
    with pytest.raises(UnsupportedFeature, match="one directory"):
        os.mkdir(tmp_path / "elsewhere")
        vdisk.create(str(tmp_path / "elsewhere" / "x.hdd"), None, format="parallels", backing=base)
