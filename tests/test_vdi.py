"""VDI against qemu-img 7.2: its images read byte-identically, ours pass its check and
compare, differencing images find their parent by UUID, hostile headers give clear errors."""

from __future__ import annotations

import os
import random
import struct
import uuid
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
from vdisk.errors import BackingMismatch, CorruptImage
from vdisk.formats import vdi
from vdisk.formats.base import Kind

MiB = 1 << 20
DRIVER_CLASS = vdi.VdiDriver
HOT_OFFSETS = [0x40, 0x150, 0x170, 0x180, 0x200]


@pytest.mark.parametrize("static", ["off", "on"])
def test_reads_qemu_images(tmp_path, qemu_img, qemu_io, static):
    path = str(tmp_path / "q.vdi")
    qemu_img("create", "-q", "-f", "vdi", "-o", f"static={static}", path, "7M")
    writes = [
        "write -P 0x11 0 4k",
        "write -P 0x22 1020k 8k",
        "write -P 0x33 2560k 2m",
        "write -z 3m 64k",
    ]
    qemu_io(*[a for w in writes for a in ("-c", w)], path)
    want = qemu_raw(qemu_img, "vdi", path, tmp_path)
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert d.size == 7 * MiB
        assert d.read(0, d.size) == want
        for off, n in [(MiB - 100, 300), (2560 * 1024 - 1, 2 * MiB + 2)]:
            assert d.read(off, n) == want[off : off + n]
        for e in d.block_status(0, d.size):
            if e.kind != Kind.DATA:
                assert want[e.offset : e.end] == bytes(e.length)
        assert d.check().exit_code == 0
        assert d.info()["subformat"] == ("static" if static == "on" else "dynamic")
    finally:
        d.close()
    with vdisk.open(path, readonly=True) as disk:
        assert disk.read(0, disk.size) == want


@pytest.mark.parametrize("static", [False, True])
def test_vdisk_writes_pass_qemu_check(tmp_path, qemu_img, qemu_io, static):
    path = str(tmp_path / "v.vdi")
    size = 6 * MiB + 4096
    vdisk.create(path, size, format="vdi", options={"static": static})
    model = bytearray(size)
    rng = random.Random(str(static))
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
        d.discard(2 * MiB, MiB)
        model[2 * MiB : 3 * MiB] = bytes(MiB)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    qemu_img("check", path)
    qemu_img("compare", "-f", "vdi", "-F", "raw", path, str(ref))
    # and qemu can keep writing to it; vdisk reads what qemu wrote
    qemu_io("-c", "write -P 0x77 5m 1m", path)
    model[5 * MiB : 6 * MiB] = b"\x77" * MiB
    with vdisk.open(path, readonly=True) as d:
        assert d.read(0, size) == bytes(model)
    qemu_img("check", path)


def test_differencing(tmp_path):
    base = str(tmp_path / "base.vdi")
    top = str(tmp_path / "top.vdi")
    size = 4 * MiB
    vdisk.create(base, size, format="vdi")
    model = bytearray(pattern(0, size, seed=1))
    with vdisk.open(base) as d:
        d.write(0, bytes(model))
    before = Path(base).read_bytes()
    vdisk.create(top, None, format="vdi", backing="base.vdi")
    with vdisk.open(top, cache_mb=0) as d:  # the parent is found by UUID in the directory
        assert d.read(0, size) == bytes(model)
        for off, n, seed in [(4096, 8192, 2), (MiB - 512, 1024, 3)]:
            d.write(off, pattern(off, n, seed=seed))
            model[off : off + n] = pattern(off, n, seed=seed)
        d.write_zeroes(3 * MiB, MiB)
        model[3 * MiB :] = bytes(MiB)
        assert d.read(0, size) == bytes(model)
        assert d.info()["backing-chain"][0]["filename"].endswith("base.vdi")
    drv = open_driver(DRIVER_CLASS, top)
    try:
        kinds = [e.kind for e in drv.block_status(0, size)]
        assert kinds == [Kind.DATA, Kind.HOLE, Kind.ZERO]
        assert drv.check().exit_code == 0
    finally:
        drv.close()
    assert Path(base).read_bytes() == before
    # an explicit hint works too, from another directory
    os.mkdir(tmp_path / "sub")
    moved = str(tmp_path / "sub" / "top.vdi")
    os.replace(top, moved)
    with pytest.raises(BackingMismatch, match="does not exist"):
        vdisk.open(moved, readonly=True)
    with vdisk.open(moved, readonly=True, options={"backing": "../base.vdi"}) as d:
        assert d.read(0, size) == bytes(model)
    # a different image under the parent's name is refused
    os.replace(base, tmp_path / "old.vdi")
    vdisk.create(base, size, format="vdi")
    with pytest.raises(BackingMismatch, match="UUID"):
        vdisk.open(moved, readonly=True, options={"backing": "../base.vdi"})


def test_parent_loop(tmp_path):
    a, b = str(tmp_path / "a.vdi"), str(tmp_path / "b.vdi")
    for p in (a, b):
        vdisk.create(p, MiB, format="vdi")
    ua = open_driver(DRIVER_CLASS, a).h
    ub = open_driver(DRIVER_CLASS, b).h
    for path, other in ((a, ub), (b, ua)):  # each links to the other
        with open(path, "r+b") as f:
            f.seek(vdi.OFF_TYPE)
            f.write(struct.pack("<I", vdi.TYPE_DIFF))
            f.seek(vdi.OFF_UUIDS + 32)
            f.write(other.uuid_image + other.uuid_last_snap)
    with pytest.raises(BackingMismatch, match="loop"):
        vdisk.open(a, readonly=True)


# -- hostile images ------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path, qemu_img, qemu_io) -> str:
    path = str(tmp_path / "h.vdi")
    qemu_img("create", "-q", "-f", "vdi", path, "4M")
    qemu_io("-c", "write -P 0x33 0 2M", path)
    return path


def test_truncated(small):
    os.truncate(small, 300)
    driver_read_fails(DRIVER_CLASS, small, match="too short")


def test_wrong_signature(small):
    patch(small, 64, b"\0\0\0\0")
    assert vdi.VdiDriver.probe(Path(small).read_bytes()[:512], 0) == 0
    driver_read_fails(DRIVER_CLASS, small, match="signature")


def test_block_map_past_end(small):
    patch(small, 0x180, struct.pack("<I", 1 << 30))  # blocks_in_image
    patch(small, 0x170, struct.pack("<Q", 1 << 50))  # disk_size
    driver_read_fails(DRIVER_CLASS, small, match="past the end")


def test_huge_size(small):
    patch(small, 0x170, struct.pack("<Q", 1 << 62))
    driver_read_fails(DRIVER_CLASS, small, match="disk_size")


def test_entry_out_of_range(small):
    patch(small, 0x200, struct.pack("<I", 12345))
    driver_read_fails(DRIVER_CLASS, small, match="block map entry 0")


def test_data_inside_map(small):
    patch(small, 0x158, struct.pack("<I", 0x200))  # offset_data
    driver_read_fails(DRIVER_CLASS, small, match="overlaps the block map")


def test_check_finds_shared_block(small):
    patch(small, 0x204, struct.pack("<I", 0))  # block 1 -> data block 0 as well
    d = open_driver(DRIVER_CLASS, small)
    try:
        rep = d.check()
        assert rep.exit_code == 2 and any("twice" in c for c in rep.corruptions)
    finally:
        d.close()


def test_unknown_uuid_parent_is_clear(tmp_path):
    p = str(tmp_path / "orphan.vdi")
    vdisk.create(p, MiB, format="vdi")
    patch(p, vdi.OFF_TYPE, struct.pack("<I", vdi.TYPE_DIFF))
    patch(p, vdi.OFF_UUIDS + 32, uuid.uuid4().bytes)
    with pytest.raises(BackingMismatch, match="does not exist"):
        vdisk.open(p, readonly=True)
    with pytest.raises(CorruptImage):
        patch(p, vdi.OFF_BLOCKS_ALLOCATED, struct.pack("<I", 99))
        open_driver(DRIVER_CLASS, p)


@pytest.mark.parametrize("static", [False, True])
def test_resize_grows(tmp_path, qemu_img, static):
    p = str(tmp_path / "r.vdi")
    grow_and_compare(qemu_img, tmp_path, p, "vdi", 3 * MiB, 7 * MiB, {"static": static})


def test_commit_flatten_rebase(tmp_path, qemu_img):
    from vdisk import ops

    base, top = str(tmp_path / "base.vdi"), str(tmp_path / "top.vdi")
    size = 3 * MiB
    vdisk.create(base, size, format="vdi")
    model = bytearray(pattern(0, size, seed=1))
    with vdisk.open(base) as d:
        d.write(0, bytes(model))
    vdisk.create(top, None, format="vdi", backing="base.vdi")
    with vdisk.open(top) as d:
        d.write(MiB - 4096, b"t" * 8192)
    model[MiB - 4096 : MiB + 4096] = b"t" * 8192
    ops.commit(top)
    with vdisk.open(base, readonly=True) as d:
        assert d.read(0, size) == bytes(model)
    with vdisk.open(top) as d:  # re-pinned to the base's new modification UUID
        assert d.read(0, size) == bytes(model)
    ops.rebase(top, None)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    qemu_img("check", top)
    qemu_img("compare", "-f", "vdi", "-F", "raw", top, str(ref))
    ops.rebase(top, base)
    with vdisk.open(top, readonly=True) as d:
        assert d.info()["backing-chain"][0]["filename"] == base
        assert d.read(0, size) == bytes(model)


def test_mutated_headers_give_clear_errors(small):
    """Seeded random damage to the header and tables: only vdisk errors, bounded time."""
    mutated_headers_give_clear_errors(DRIVER_CLASS, small, HOT_OFFSETS)


@pytest.mark.parametrize("differencing", [False, True])
def test_power_loss(tmp_path, differencing):
    """Power loss after every operation (see tests.test_vhdx.crash_walk)."""
    size = 3 * MiB
    parent = None
    if differencing:
        pd = vdi.VdiDriver.open(_memory_vdi(size), readonly=False, options={})
        pdata = pattern(0, size, seed=3)
        pd.write(0, pdata)
        parent = (pd, pdata)
    opts = {"backing": "parent"} if differencing else {}
    assert crash_walk(vdi.VdiDriver, size, {}, 7, parent=parent, open_opts=opts) > 50


def _memory_vdi(size: int):
    from vdisk.storage import MemoryStorage

    st = MemoryStorage("parent")
    vdi.VdiDriver.create(st, size, {})
    return st


def test_resize_qemu_image_short_last_block(tmp_path, qemu_img, qemu_io):
    p = str(tmp_path / "g.vdi")
    old = 1537 * 1024
    qemu_img("create", "-q", "-f", "vdi", p, str(old))
    qemu_io("-c", f"write -P 0x61 0 {old}", p)
    with vdisk.open(p) as d:
        d.resize(12 * MiB)
        d.write(12 * MiB - 512, b"z" * 512)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(b"a" * old + bytes(12 * MiB - 512 - old) + b"z" * 512)
    qemu_img("check", p)
    qemu_img("compare", "-f", "vdi", "-F", "raw", p, str(ref))
