"""VHDX against qemu-img 7.2: its images read byte-identically, ours pass its check and
compare, differencing disks resolve through their parent, a dirty log is replayed (or
applied in memory when read-only), hostile images give clear errors."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
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
from vdisk.errors import BackingMismatch, CorruptImage, UnsupportedFeature, VdiskError
from vdisk.formats import vhdx
from vdisk.formats.base import Kind

MiB = 1 << 20
DRIVER_CLASS = vhdx.VhdxDriver
HOT_OFFSETS = [0, 64 * 1024, 128 * 1024, 192 * 1024, 2 * MiB, 3 * MiB, 3 * MiB + 65536]


# writes that cross 1 MiB block boundaries, a sub-block write, a zeroed range
QEMU_WRITES = [
    "write -P 0x11 0 4k",
    "write -P 0x22 1020k 8k",
    "write -P 0x33 2560k 2m",
    "write -P 0x44 5m 512",
    "write -P 0x55 9m 512",
    "write -z 3m 64k",
]


@pytest.mark.parametrize(
    "opts",
    [
        "subformat=dynamic,block_size=1M",
        "subformat=fixed,block_size=1M",
        "subformat=dynamic,block_size=8M",
        "subformat=fixed,block_size=8M,block_state_zero=off",  # a short last block
    ],
)
def test_reads_qemu_images(tmp_path, qemu_img, qemu_io, opts):
    path = str(tmp_path / "q.vhdx")
    qemu_img("create", "-q", "-f", "vhdx", "-o", opts, path, str(9 * MiB + 512))
    qemu_io(*[a for w in QEMU_WRITES for a in ("-c", w)], path)
    want = qemu_raw(qemu_img, "vhdx", path, tmp_path)
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert d.size == 9 * MiB + 512
        assert d.read(0, d.size) == want
        # unaligned reads across block boundaries
        for off, n in [(MiB - 100, 300), (2560 * 1024 - 1, 2 * MiB + 2), (5 * MiB + 511, 2)]:
            assert d.read(off, n) == want[off : off + n]
        for e in d.block_status(0, d.size):
            if e.kind != Kind.DATA:
                assert want[e.offset : e.end] == bytes(e.length)
        assert d.check().exit_code == 0
    finally:
        d.close()
    with vdisk.open(path, readonly=True) as disk:
        assert disk.read(0, disk.size) == want


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_vdisk_writes_pass_qemu_check(tmp_path, qemu_img, subformat):
    path = str(tmp_path / "v.vhdx")
    size = 6 * MiB + 4096
    vdisk.create(path, size, format="vhdx", cluster_size=MiB, options={"subformat": subformat})
    model = bytearray(size)
    rng = random.Random(subformat)
    with vdisk.open(path, cache_mb=1) as d:
        for step in range(40):
            off = rng.randrange(0, size - 1)
            n = min(rng.choice([1, 700, 4096, 70000, MiB + 3]), size - off)
            if step % 7 == 6:
                d.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                data = pattern(off, n, seed=step)
                d.write(off, data)
                model[off : off + n] = data
        d.discard(2 * MiB, MiB)
        model[2 * MiB : 3 * MiB] = bytes(MiB)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    qemu_img("check", path)
    qemu_img("compare", "-f", "vhdx", "-F", "raw", path, str(ref))
    assert qemu_raw(qemu_img, "vhdx", path, tmp_path) == bytes(model)
    with vdisk.open(path, readonly=True) as d:
        assert d.read(0, size) == bytes(model)
        assert d.info()["format-specific"]["subformat"] == subformat


def test_differencing(tmp_path):
    base = str(tmp_path / "base.vhdx")
    top = str(tmp_path / "top.vhdx")
    size = 5 * MiB
    vdisk.create(base, size, format="vhdx", cluster_size=MiB)
    model = bytearray(size)
    with vdisk.open(base) as d:
        d.write(0, pattern(0, size, seed=1))
        model[:] = pattern(0, size, seed=1)
    before = Path(base).read_bytes()
    vdisk.create(top, None, format="vhdx", backing="base.vhdx", cluster_size=MiB)
    with vdisk.open(top, cache_mb=0) as d:
        assert d.read(0, size) == bytes(model)
        # sub-block writes (sector bitmap), a write across a block boundary, zeroes
        for off, n, seed in [(4096, 8192, 2), (MiB - 512, 1024, 3), (3 * MiB, MiB, 4)]:
            d.write(off, pattern(off, n, seed=seed))
            model[off : off + n] = pattern(off, n, seed=seed)
        d.write_zeroes(2 * MiB + 512, 1024)
        model[2 * MiB + 512 : 2 * MiB + 1536] = bytes(1024)
        d.write_zeroes(4 * MiB, MiB)
        model[4 * MiB : 5 * MiB] = bytes(MiB)
        assert d.read(0, size) == bytes(model)
    drv = open_driver(DRIVER_CLASS, top)
    try:
        assert drv.backing is not None and drv.backing.path == "base.vhdx"
        kinds = {e.kind for e in drv.block_status(0, size)}
        assert kinds == {Kind.DATA, Kind.HOLE, Kind.ZERO}
        assert drv.check().exit_code == 0
    finally:
        drv.close()
    with vdisk.open(top, readonly=True) as d:
        assert d.read(0, size) == bytes(model)
        assert d.info()["backing-chain"][0]["format"] == "vhdx"
    assert Path(base).read_bytes() == before
    # the parent changes: its DataWriteGuid changes, the child refuses it
    with vdisk.open(base) as d:
        d.write(0, b"x" * 512)
    with pytest.raises(BackingMismatch, match="DataWriteGuid"):
        vdisk.open(top, readonly=True)


def test_parent_loop_is_an_error(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.vhdx", "b.vhdx", "c.vhdx"))
    vdisk.create(a, 2 * MiB, format="vhdx", cluster_size=MiB)
    vdisk.create(b, None, format="vhdx", backing="a.vhdx")
    vdisk.create(c, None, format="vhdx", backing="b.vhdx")
    os.replace(c, a)  # a is now a child of b, and b a child of a
    with pytest.raises(BackingMismatch):
        vdisk.open(b, readonly=True)


# -- the log -----------------------------------------------------------------------------------


def _make_dirty(path: str) -> tuple[bytes, int]:
    """Put a log entry that rewrites one 4 KiB page and zeroes another into the log of
    ``path`` and point the header at it. Returns the page written and its guest offset."""
    d = open_driver(DRIVER_CLASS, path)
    host = d.block_status(0, d.size)[0].host
    h, slot = d.header, d.header_slot
    d.close()
    assert host is not None
    page = bytes(range(256)) * 16
    guid = uuid.uuid4().bytes_le
    fsize = os.path.getsize(path)
    entry = vhdx.build_log_entry(
        7, guid, [(host + 8192, page), (host + 4096 * 5, None)], fsize, fsize
    )
    with open(path, "r+b") as f:
        f.seek(h.log_offset)
        f.write(entry)
        h.log_guid = guid
        h.seq += 1
        f.seek(vhdx.HEADER_OFFSETS[1 - slot])
        f.write(h.pack())
    return page, 8192


def test_dirty_log_applied_in_memory_and_replayed(tmp_path, qemu_img, qemu_io):
    path = str(tmp_path / "log.vhdx")
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "3M")
    qemu_io("-c", "write -P 0x5a 0 3M", path)
    page, at = _make_dirty(path)
    want = bytearray(b"\x5a" * 3 * MiB)
    want[at : at + 4096] = page
    want[5 * 4096 : 6 * 4096] = bytes(4096)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()

    # qemu agrees on what the log says: let it replay a copy (a read-write open does)
    copy = str(tmp_path / "copy.vhdx")
    shutil.copy(path, copy)
    qemu_io("-c", "read 0 512", copy)
    assert qemu_raw(qemu_img, "vhdx", copy, tmp_path) == bytes(want)

    d = open_driver(DRIVER_CLASS, path)  # read-only: applied in memory, the file is untouched
    try:
        assert d.info()["log-applied-in-memory"]
        assert d.read(0, d.size) == bytes(want)
    finally:
        d.close()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest

    with vdisk.open(path) as disk:  # writable: replayed, LogGuid cleared
        assert disk.read(0, disk.size) == bytes(want)
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert not any(d.header.log_guid)
        assert d.read(0, d.size) == bytes(want)
    finally:
        d.close()
    qemu_img("check", path)
    assert qemu_raw(qemu_img, "vhdx", path, tmp_path) == bytes(want)


def test_torn_log_entry_is_ignored(tmp_path, qemu_img, qemu_io):
    path = str(tmp_path / "torn.vhdx")
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "2M")
    qemu_io("-c", "write -P 0x5a 0 2M", path)
    _make_dirty(path)
    d = open_driver(DRIVER_CLASS, path)
    log_off = d.header.log_offset
    d.close()
    with open(path, "r+b") as f:  # corrupt the data sector: the entry's CRC no longer matches
        f.seek(log_off + 4096 + 100)
        f.write(b"\xff\xfe")
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert d.read(0, d.size) == b"\x5a" * 2 * MiB
    finally:
        d.close()


# -- hostile images ----------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path, qemu_img, qemu_io) -> str:
    path = str(tmp_path / "h.vhdx")
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "4M")
    qemu_io("-c", "write -P 0x33 0 2M", path)
    return path


def _reregion(path: str, fix) -> None:
    """Change the region tables with ``fix(bytearray)`` and restore their CRC."""
    with open(path, "r+b") as f:
        for off in vhdx.REGION_OFFSETS:
            f.seek(off)
            buf = bytearray(f.read(vhdx.REGION_SIZE))
            fix(buf)
            f.seek(off)
            f.write(vhdx._with_checksum(buf))


def test_truncated(small):
    os.truncate(small, 100_000)
    driver_read_fails(DRIVER_CLASS, small, CorruptImage)


def test_wrong_magic(small):
    patch(small, 0, b"vhdxfilX")
    assert vhdx.VhdxDriver.probe(Path(small).read_bytes()[:65536], 0) == 0
    driver_read_fails(DRIVER_CLASS, small, CorruptImage, match="file identifier")


def test_bad_header_crc(small):
    for off in vhdx.HEADER_OFFSETS:
        patch(small, off + 40, b"\x01\x02")
    driver_read_fails(DRIVER_CLASS, small, CorruptImage, match="CRC")


def test_region_past_end(small):
    def fix(buf):
        for i in range(2):
            at = 16 + 32 * i
            guid, _off, length, fl = vhdx.REGION_ENTRY.unpack_from(buf, at)
            if guid == vhdx.BAT_GUID:
                vhdx.REGION_ENTRY.pack_into(buf, at, guid, 1 << 40, length, fl)

    _reregion(small, fix)
    driver_read_fails(DRIVER_CLASS, small, CorruptImage, match="past the end")


def test_bat_entry_past_end(small):
    d = open_driver(DRIVER_CLASS, small)
    bat = d.bat_offset
    d.close()
    patch(small, bat, struct.pack("<Q", (1 << 30) << 20 | vhdx.FULLY_PRESENT))
    driver_read_fails(DRIVER_CLASS, small, CorruptImage, match="BAT entry of block 0")


def test_huge_size_and_log(small):
    d = open_driver(DRIVER_CLASS, small)
    meta = d._meta_item_offset(vhdx.DISK_SIZE_GUID)
    h, slot = d.header, d.header_slot
    d.close()
    patch(small, meta, struct.pack("<Q", 1 << 62))
    driver_read_fails(DRIVER_CLASS, small, CorruptImage, match="virtual disk size")
    patch(small, meta, struct.pack("<Q", 4 * MiB))
    h.log_guid = uuid.uuid4().bytes_le
    h.log_length = 1 << 31
    h.seq += 5
    patch(small, vhdx.HEADER_OFFSETS[slot], h.pack())
    driver_read_fails(DRIVER_CLASS, small, UnsupportedFeature, match="log")


def test_big_disk_bounded_memory(tmp_path):
    path = str(tmp_path / "big.vhdx")
    size = 16 << 40
    vdisk.create(path, size, format="vhdx", cluster_size=256 * MiB)
    with vdisk.open(path, cache_mb=1) as d:
        d.write(size - 4096, b"z" * 4096)
        d.write(0, b"a" * 4096)
        assert d.read(size - 4096, 4096) == b"z" * 4096
        assert d.read(size // 2, 4096) == bytes(4096)
        assert d.driver.stats()["bat"]["bytes"] <= 4 << 20
    assert os.stat(path).st_blocks * 512 < 64 * MiB


def test_errors_are_vdisk_errors(tmp_path):
    p = tmp_path / "junk.vhdx"
    p.write_bytes(b"vhdxfile" + os.urandom(2 * MiB))
    with pytest.raises(VdiskError):
        vdisk.open(str(p), readonly=True)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_resize_grows(tmp_path, qemu_img, subformat):
    """Inside the last 8 MiB block: its tail must read as zeros."""
    p = str(tmp_path / "r.vhdx")
    opts = {"subformat": subformat}
    grow_and_compare(qemu_img, tmp_path, p, "vhdx", 3 * MiB, 7 * MiB, opts)


def test_commit_flatten_rebase(tmp_path, qemu_img):
    from vdisk import ops

    base, top = str(tmp_path / "base.vhdx"), str(tmp_path / "top.vhdx")
    size = 3 * MiB
    vdisk.create(base, size, format="vhdx", cluster_size=MiB)
    model = bytearray(pattern(0, size, seed=1))
    with vdisk.open(base) as d:
        d.write(0, bytes(model))
    vdisk.create(top, None, format="vhdx", backing="base.vhdx")
    with vdisk.open(top) as d:
        d.write(MiB - 4096, b"t" * 8192)  # partially present blocks on both sides
    model[MiB - 4096 : MiB + 4096] = b"t" * 8192
    ops.commit(top)  # the base changes; the top is re-pinned to its new DataWriteGuid
    with vdisk.open(base, readonly=True) as d:
        assert d.read(0, size) == bytes(model)
    with vdisk.open(top) as d:
        assert d.read(0, size) == bytes(model)
        d.write(2 * MiB + 512, b"u" * 512)
    model[2 * MiB + 512 : 2 * MiB + 1024] = b"u" * 512
    ops.rebase(top, None)  # flatten: the top stands alone, qemu can read it now
    drv = open_driver(DRIVER_CLASS, top)
    try:
        assert drv.backing is None and drv.info()["subformat"] == "dynamic"
    finally:
        drv.close()
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    qemu_img("check", top)
    qemu_img("compare", "-f", "vhdx", "-F", "raw", top, str(ref))
    ops.rebase(top, base)  # and back onto the base: a differencing disk again
    with vdisk.open(top, readonly=True) as d:
        assert d.info()["backing-chain"][0]["filename"] == base
        assert d.read(0, size) == bytes(model)


@pytest.mark.parametrize("target", [1 << 50, 64 * 1024])
def test_hostile_log_entry(small, target):
    d = open_driver(DRIVER_CLASS, small)
    h, slot = d.header, d.header_slot
    d.close()
    guid = uuid.uuid4().bytes_le
    fsize = os.path.getsize(small)
    entry = vhdx.build_log_entry(3, guid, [(target, None)], fsize, fsize)
    patch(small, h.log_offset, entry)
    h.log_guid = guid
    h.seq += 1
    patch(small, vhdx.HEADER_OFFSETS[1 - slot], h.pack())
    driver_read_fails(DRIVER_CLASS, small, CorruptImage, match="log entry 3 writes")
    with pytest.raises(CorruptImage):
        open_driver(DRIVER_CLASS, small, readonly=False)
    assert os.path.getsize(small) == fsize


def test_mutated_headers_give_clear_errors(small):
    """Seeded random damage to the header and tables: only vdisk errors, bounded time."""
    mutated_headers_give_clear_errors(DRIVER_CLASS, small, HOT_OFFSETS)


def test_qemu_killed_mid_write_leaves_a_log_we_replay(tmp_path, qemu_img, qemu_io):
    """kill -9 qemu-io while it allocates blocks (qemu updates the BAT through the log):
    vdisk's view of the dirty image, read-only and after its own replay, equals qemu's."""
    import signal
    import subprocess
    import time

    path = str(tmp_path / "k.vhdx")
    rng = random.Random(9)
    for _attempt in range(15):
        if os.path.exists(path):
            os.unlink(path)
        qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "64M")
        cmds = [a for j in range(64) for a in ("-c", f"write -P {j + 1} {j}M 4k")]
        p = subprocess.Popen(["qemu-io", *cmds, path], stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.01, 0.09))
        p.send_signal(signal.SIGKILL)
        p.wait()
        d = open_driver(DRIVER_CLASS, path)
        dirty = any(d.header.log_guid)
        d.close()
        if dirty:
            break
    else:
        pytest.skip("qemu-io never left a dirty log in 15 attempts")
    copy = str(tmp_path / "copy.vhdx")
    shutil.copy(path, copy)
    qemu_io("-c", "read 0 512", copy)  # a read-write open: qemu replays its log
    want = qemu_raw(qemu_img, "vhdx", copy, tmp_path)
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert d.read(0, d.size) == want
    finally:
        d.close()
    with vdisk.open(path) as disk:
        assert disk.read(0, disk.size) == want
    qemu_img("check", path)
    assert qemu_raw(qemu_img, "vhdx", path, tmp_path) == want


def test_chunk_boundary(tmp_path, qemu_io):
    """Past 4 GiB (one chunk of 512-byte sectors) every BAT index is shifted by the sector
    bitmap entry between chunks: qemu and vdisk must agree on both sides of it."""
    base, top = str(tmp_path / "base.vhdx"), str(tmp_path / "top.vhdx")
    size, edge = 5 << 30, 4 << 30
    vdisk.create(base, size, format="vhdx", cluster_size=MiB)
    with vdisk.open(base) as d:
        d.write(edge - 4096, b"a" * 8192)
        d.write(size - 512, b"e" * 512)
    qemu_io("-c", f"read -P 0x61 {edge - 4096} 8192", "-c", f"read -P 0x65 {size - 512} 512", base)
    qemu_io("-c", f"write -P 0x71 {edge + MiB} 4096", base)
    vdisk.create(top, None, format="vhdx", backing="base.vhdx", cluster_size=MiB)
    with vdisk.open(top) as d:
        d.write(edge - 65536, b"t" * 131072)  # partially present blocks in two chunks
        assert d.read(edge - 65536 - 4096, 4096) == bytes(4096)
        assert d.read(edge - 65536, 131072) == b"t" * 131072
        assert d.read(edge + 65536, 4096) == bytes(4096)
        assert d.read(edge + MiB, 4096) == b"q" * 4096
        assert d.read(size - 512, 512) == b"e" * 512
    drv = open_driver(DRIVER_CLASS, top)
    try:
        assert drv.check().exit_code == 0
        assert drv.bat.count == 2 * (drv.chunk_ratio + 1)
    finally:
        drv.close()


# -- power loss at every operation ----------------------------------------------------------------


@pytest.mark.parametrize("differencing", [False, True])
def test_power_loss(tmp_path, differencing):
    from vdisk.storage import MemoryStorage

    size = 3 * MiB
    parent = None
    if differencing:
        ps = MemoryStorage(str(tmp_path / "parent"))
        vhdx.VhdxDriver.create(ps, size, {"cluster_size": MiB})
        pd = vhdx.VhdxDriver.open(ps, readonly=False, options={})
        pdata = pattern(0, size, seed=3)
        pd.write(0, pdata)
        parent = (pd, pdata)
    assert crash_walk(vhdx.VhdxDriver, size, {"cluster_size": MiB}, 7, parent=parent) > 50


def test_unpinned_parent_loop(tmp_path):
    """Two disks naming each other with null linkage GUIDs (nothing to verify): the chain
    walk itself must stop with a clear error."""
    from vdisk.formats.base import BackingRef

    a, b = str(tmp_path / "a.vhdx"), str(tmp_path / "b.vhdx")
    vdisk.create(a, 2 * MiB, format="vhdx", cluster_size=MiB)
    vdisk.create(b, None, format="vhdx", backing="a.vhdx")
    for path, other in ((a, "b.vhdx"), (b, "a.vhdx")):
        d = open_driver(DRIVER_CLASS, path, readonly=False)
        try:
            d.set_backing(BackingRef(other, "vhdx"), None)
        finally:
            d.close()
    with pytest.raises(BackingMismatch, match="loop"):
        vdisk.open(a, readonly=True)


def test_log_sequence_wraps_around(tmp_path, qemu_img, qemu_io):
    """Two entries: the older at the end of the log, the newer wrapped to its start; both
    are replayed, in order (the newer page wins), as qemu replays them."""
    path = str(tmp_path / "wrap.vhdx")
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "2M")
    qemu_io("-c", "write -P 0x5a 0 2M", path)
    d = open_driver(DRIVER_CLASS, path)
    host = d.block_status(0, d.size)[0].host
    h, slot = d.header, d.header_slot
    d.close()
    assert host is not None
    guid = uuid.uuid4().bytes_le
    fsize = os.path.getsize(path)
    old_at = h.log_length - 8192
    older = vhdx.build_log_entry(5, guid, [(host, b"\x01" * 4096)], fsize, fsize, old_at)
    newer = vhdx.build_log_entry(
        6, guid, [(host, b"\x03" * 4096), (host + 8192, None)], fsize, fsize, old_at
    )
    assert len(older) == 8192
    patch(path, h.log_offset + old_at, older)
    patch(path, h.log_offset, newer)
    h.log_guid, h.seq = guid, h.seq + 1
    patch(path, vhdx.HEADER_OFFSETS[1 - slot], h.pack())
    want = bytearray(b"\x5a" * 2 * MiB)
    want[0:4096] = b"\x03" * 4096
    want[8192:12288] = bytes(4096)
    copy = str(tmp_path / "copy.vhdx")
    shutil.copy(path, copy)
    qemu_io("-c", "read 0 512", copy)
    assert qemu_raw(qemu_img, "vhdx", copy, tmp_path) == bytes(want)
    d = open_driver(DRIVER_CLASS, path)
    try:
        assert d.read(0, d.size) == bytes(want)
    finally:
        d.close()
    with vdisk.open(path) as disk:
        assert disk.read(0, disk.size) == bytes(want)
    qemu_img("check", path)


def test_resize_qemu_fixed_short_last_block(tmp_path, qemu_img, qemu_io):
    p = str(tmp_path / "g.vhdx")
    old = 9 * MiB + 512
    opts = "subformat=fixed,block_size=8M,block_state_zero=off"
    qemu_img("create", "-q", "-f", "vhdx", "-o", opts, p, str(old))
    qemu_io("-c", f"write -P 0x61 0 {old}", p)
    with vdisk.open(p) as d:
        d.resize(12 * MiB)  # still two blocks: the last one's file space grows
        d.write(12 * MiB - 512, b"z" * 512)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(b"a" * old + bytes(12 * MiB - 512 - old) + b"z" * 512)
    qemu_img("check", p)
    qemu_img("compare", "-f", "vhdx", "-F", "raw", p, str(ref))


def test_one_bad_copy_is_survived(small):
    """A torn header or region table is covered by the other copy."""
    want = b"\x33" * 2 * MiB + bytes(2 * MiB)
    d = open_driver(DRIVER_CLASS, small)
    slot = d.header_slot
    d.close()
    patch(small, vhdx.HEADER_OFFSETS[slot] + 100, b"torn")
    patch(small, vhdx.REGION_OFFSETS[0] + 40, b"torn")
    d = open_driver(DRIVER_CLASS, small)
    try:
        assert d.header_slot == 1 - slot
        assert d.read(0, d.size) == want
    finally:
        d.close()
    with vdisk.open(small) as disk:  # writing rewrites both headers
        disk.write(0, b"w" * 512)
    d = open_driver(DRIVER_CLASS, small)
    try:
        assert d.read(0, 512) == b"w" * 512
    finally:
        d.close()
