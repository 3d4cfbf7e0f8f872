"""VHD against the real qemu-img 7.2: fixed and dynamic images (with and without
force_size) are read byte for byte, images vdisk writes compare equal in qemu, differencing
chains resolve to the content written (qemu 7.2 reads those wrongly, so the reference is
the raw content), and hostile images fail with a clear vdisk error.

The disk is 6 MiB + 1 KiB with 2 MiB blocks, so writes cross block boundaries and the
last block is partial.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest

import vdisk
from tests.conftest import pattern
from tests.formats_helpers import (
    api_read_fails,
    crash_images_hold_old_or_new,
    patch,
    random_model_io,
    read_file,
    write_file,
)
from vdisk.errors import BackingMismatch, CorruptImage, UnsupportedFeature, UsageError
from vdisk.formats.base import Kind
from vdisk.formats.vhd import VhdDriver, checksum, geometry
from vdisk.storage import FileStorage

K, M = 1 << 10, 1 << 20
SIZE = 6 * M + 1024
#: across the first and second block boundaries, unaligned, and up to the end
WRITES = [
    (2 * M - 4 * K, 8 * K),
    (4 * M - 700, 1500),
    (100, 10),
    (SIZE - 3 * K, 3 * K),
]


def _expected(writes: list[tuple[int, bytes]], size: int) -> bytearray:
    out = bytearray(size)
    for off, data in writes:
        out[off : off + len(data)] = data
    return out


def _driver(path: str, **options) -> VhdDriver:
    return VhdDriver.open(FileStorage(path, readonly=True), readonly=True, options=options)


# -- qemu writes, vdisk reads ---------------------------------------------------------------


@pytest.mark.parametrize("sub", ["fixed", "dynamic"])
@pytest.mark.parametrize("force", ["off", "on"])
def test_reads_qemu_images(tmp_path, qemu_img, qemu_io, sub, force):
    img = str(tmp_path / "q.vhd")
    qemu_img(
        "create", "-q", "-f", "vpc", "-o", f"subformat={sub},force_size={force}", img, str(SIZE)
    )
    size = int(
        qemu_img("info", "-f", "vpc", "--output", "json", img)
        .stdout.split('"virtual-size": ')[1]
        .split(",")[0]
    )
    if force == "on":
        assert size == SIZE
    else:  # qemu rounds up to a CHS geometry
        assert size >= SIZE
    cmds, writes = [], []
    for i, (off, n) in enumerate(WRITES):
        cmds += ["-c", f"write -P {0x41 + i} {off} {n}"]
        writes.append((off, bytes([0x41 + i]) * n))
    qemu_io("-f", "vpc", *cmds, img)
    model = _expected(writes, size)
    with vdisk.open(img, readonly=True, format="vpc") as d:
        assert d.size == size
        assert d.read(0, size) == model
        assert d.read(2 * M - 5000, 10000) == model[2 * M - 5000 : 2 * M + 5000]
    d = _driver(img)
    try:
        assert d.info()["size-from"] == ("current_size" if force == "on" else "chs")
        st = d.block_status(0, size)
        assert sum(e.length for e in st) == size
        for e in st:
            if e.kind != Kind.DATA:
                assert model[e.offset : e.end] == bytes(e.length)
    finally:
        d.close()


def test_reads_converted_random_content(tmp_path, qemu_img):
    ref = str(tmp_path / "r.raw")
    data = bytearray(os.urandom(SIZE))
    data[3 * M : 5 * M] = bytes(2 * M)  # one whole block of zeros
    write_file(ref, data)
    img = str(tmp_path / "c.vhd")
    qemu_img("convert", "-O", "vpc", "-o", "force_size=on", ref, img)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, SIZE) == data


def test_size_rules_match_qemu(tmp_path, qemu_img):
    """The CHS rounding of create and the size a reader picks are qemu's, for sizes on
    both sides of the largest CHS geometry (127 GiB)."""
    for size in (10 * M, (1 << 30) + 1, 127 << 30, 200 << 30):
        a, b = str(tmp_path / f"a{size}.vhd"), str(tmp_path / f"b{size}.vhd")
        qemu_img("create", "-q", "-f", "vpc", a, str(size))
        vdisk.create(b, size, format="vhd", options={"force_size": False})
        qa = qemu_img("info", "--output", "json", a).stdout
        qb = qemu_img("info", "--output", "json", b).stdout
        va = qa.split('"virtual-size": ')[1].split(",")[0]
        assert va == qb.split('"virtual-size": ')[1].split(",")[0]
        assert read_file(a)[56:60] == read_file(b)[56:60]  # same geometry
        with vdisk.open(b, readonly=True) as d:
            assert d.size == int(va)
        os.unlink(a)
        os.unlink(b)
    assert geometry(20480) == (301, 4, 17)
    # a footer whose current size differs from its CHS size: the creator decides, and
    # the size_calc option overrides the creator table as qemu's force_size_calc does
    p = str(tmp_path / "o.vhd")
    vdisk.create(p, 10 * M, format="vhd", options={"force_size": False})
    chs = _driver(p).size
    assert chs == 10514432
    raw = bytearray(read_file(p))
    raw[-512 + 48 : -512 + 56] = struct.pack(">Q", 10 * M)
    raw[:512] = raw[-512:]
    _fix_footer_checksums(p, raw)
    assert _driver(p).size == chs
    assert _driver(p, size_calc="current_size").size == 10 * M
    raw[-512 + 28 : -512 + 32] = b"win "
    raw[:512] = raw[-512:]
    _fix_footer_checksums(p, raw)
    assert _driver(p).size == 10 * M
    assert _driver(p, size_calc="chs").size == chs


# -- vdisk writes, qemu reads ------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["fixed", "dynamic"])
@pytest.mark.parametrize("force", [True, False])
def test_vdisk_writes_qemu_reads(tmp_path, qemu_img, qemu_io, sub, force):
    img = str(tmp_path / "w.vhd")
    vdisk.create(img, SIZE, format="vhd", options={"subformat": sub, "force_size": force})
    # a fixed VHD has no header to probe (its footer is at the end): name the format
    with vdisk.open(img, format="vhd") as d:
        size = d.size
        writes = [(off, pattern(off, n, seed=5)) for off, n in WRITES]
        for off, data in writes:
            d.write(off, data)
    with vdisk.open(img, format="vhd") as d:  # reopen: partial sectors into allocated blocks
        extra = (2 * M + 3, pattern(2 * M + 3, 517, seed=9))
        d.write(*extra)
        d.write(5 * M - 100, b"\x5a" * 300)
    writes += [extra, (5 * M - 100, b"\x5a" * 300)]
    model = _expected(writes, size)
    with vdisk.open(img, readonly=True, format="vhd") as d:
        assert d.read(0, size) == model
    ref = str(tmp_path / "ref.raw")
    write_file(ref, model)
    qemu_img("compare", "-f", "vpc", "-F", "raw", img, ref)
    qemu_io("-f", "vpc", "-c", f"read -P 0x5a {5 * M - 100} 300", img)
    assert qemu_img("check", img, check=False).returncode == 63  # vpc has no check
    with vdisk.open(img, readonly=True, format="vhd") as d:
        assert d.check().exit_code == 0


def test_write_zeroes_and_discard_dynamic(tmp_path, qemu_img):
    img = str(tmp_path / "z.vhd")
    vdisk.create(img, SIZE, format="vhd")
    data = pattern(0, SIZE)
    with vdisk.open(img) as d:
        d.write(0, data)
    with vdisk.open(img) as d:
        d.write_zeroes(100, 5000)  # partial sectors on both sides
        d.write_zeroes(4 * M + 100, 5000, unmap=False)  # qemu, ignoring bitmaps, sees zeros
        d.discard(2 * M, 2 * M)  # a whole block
    model = bytearray(data)
    model[100:5100] = bytes(5000)
    model[4 * M + 100 : 4 * M + 5100] = bytes(5000)
    model[2 * M : 4 * M] = bytes(2 * M)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, SIZE) == model
    ref = str(tmp_path / "ref.raw")
    write_file(ref, model)
    qemu_img("compare", "-f", "vpc", "-F", "raw", img, ref)


# -- differencing ------------------------------------------------------------------------------


def _chain(tmp_path) -> tuple[str, str, bytearray]:
    parent = str(tmp_path / "parent.vhd")
    vdisk.create(parent, SIZE, format="vhd")
    base = pattern(0, SIZE, seed=1)
    with vdisk.open(parent) as d:
        d.write(0, base)
    child = str(tmp_path / "child.vhd")
    vdisk.create(child, None, format="vhd", backing="parent.vhd")
    model = bytearray(base)
    with vdisk.open(child) as d:
        for i, (off, n) in enumerate(WRITES):
            data = pattern(off, n, seed=20 + i)
            d.write(off, data)
            model[off : off + n] = data
    return parent, child, model


def test_differencing_chain_reads_through(tmp_path):
    parent, child, model = _chain(tmp_path)
    with vdisk.open(child, readonly=True) as d:
        assert d.driver.backing is not None
        assert d.driver.backing.path == "parent.vhd" and d.driver.backing.format == "vhd"
        assert d.read(0, SIZE) == model
        # this layer only: clear bitmap bits are HOLE (the parent's), written sectors DATA
        st = d.driver.block_status(0, SIZE)
        assert {e.kind for e in st} == {Kind.DATA, Kind.HOLE}
        data = [e for e in st if e.kind == Kind.DATA]
        assert sum(e.length for e in data) < SIZE // 4
    # the parent is untouched
    with vdisk.open(parent, readonly=True) as d:
        assert d.read(0, SIZE) == pattern(0, SIZE, seed=1)
    # zeroes in a differencing disk hide the parent instead of falling through
    with vdisk.open(child) as d:
        d.write_zeroes(1 * M, 8 * K)
        d.discard(3 * M, 64 * K)
    model[1 * M : 1 * M + 8 * K] = bytes(8 * K)
    model[3 * M : 3 * M + 64 * K] = bytes(64 * K)
    with vdisk.open(child, readonly=True) as d:
        assert d.read(0, SIZE) == model
    # a grandchild
    gchild = str(tmp_path / "gchild.vhd")
    vdisk.create(gchild, None, format="vhd", backing="child.vhd")
    with vdisk.open(gchild) as d:
        d.write(2 * M - 64 * K, b"\x77" * 128 * K)
    model[2 * M - 64 * K : 2 * M + 64 * K] = b"\x77" * 128 * K
    with vdisk.open(gchild, readonly=True) as d:
        assert d.read(0, SIZE) == model
        assert len(d.info()["backing-chain"]) == 2


def test_differencing_locators(tmp_path):
    """The relative and absolute locators (UTF-16LE) and the UTF-16BE name are written;
    a moved chain still opens through the relative locator."""
    _parent, child, model = _chain(tmp_path)
    raw = read_file(child)
    assert "parent.vhd".encode("utf-16-le") in raw
    assert str(tmp_path / "parent.vhd").encode("utf-16-le") in raw
    assert "parent.vhd".encode("utf-16-be") in raw[512 + 64 : 512 + 64 + 512]
    moved = tmp_path / "moved"
    moved.mkdir()
    for n in ("parent.vhd", "child.vhd"):
        shutil.move(str(tmp_path / n), str(moved / n))
    with vdisk.open(str(moved / "child.vhd"), readonly=True) as d:
        assert d.read(0, SIZE) == model


def test_differencing_wrong_parent(tmp_path):
    parent, child, _ = _chain(tmp_path)
    os.unlink(parent)
    vdisk.create(parent, SIZE, format="vhd")  # same name, another disk
    with pytest.raises(BackingMismatch, match="unique id"):
        vdisk.open(child, readonly=True)
    os.unlink(parent)
    with pytest.raises(BackingMismatch, match="does not exist"):
        vdisk.open(child, readonly=True)


def test_differencing_parent_loop(tmp_path):
    parent, child, _ = _chain(tmp_path)
    shutil.copy(child, parent)  # parent.vhd now names parent.vhd as its parent
    with pytest.raises(BackingMismatch, match="loop"):
        vdisk.open(parent, readonly=True)


def test_differencing_needs_vhd_parent_and_its_size(tmp_path):
    raw = str(tmp_path / "b.raw")
    vdisk.create(raw, SIZE, format="raw")
    with pytest.raises((UnsupportedFeature, UsageError)):
        vdisk.create(str(tmp_path / "c.vhd"), None, format="vhd", backing="b.raw")
    p = str(tmp_path / "p.vhd")
    vdisk.create(p, SIZE, format="vhd")
    with pytest.raises(UsageError, match="size"):
        vdisk.create(str(tmp_path / "c2.vhd"), 2 * SIZE, format="vhd", backing="p.vhd")


# -- crash order and hostile images -----------------------------------------------------------


def test_torn_footer_recovered_from_copy(tmp_path):
    """An allocation cut before its new footer landed: the copy at offset 0 is used, and a
    writable open puts the footer back at the end."""
    img = str(tmp_path / "t.vhd")
    vdisk.create(img, SIZE, format="vhd")
    with vdisk.open(img) as d:
        d.write(0, b"\x11" * 4096)
    raw = read_file(img)
    write_file(img, raw[:-512] + b"\x00" * 100)  # footer gone, a torn tail instead
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, 4096) == b"\x11" * 4096
        assert "copy" in d.driver.info()["footer"]
    with vdisk.open(img) as d:
        d.write(4 * M, b"\x22" * 4096)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, 4096) == b"\x11" * 4096
        assert d.read(4 * M, 4096) == b"\x22" * 4096
        assert "footer" not in d.driver.info()


def _dynamic(tmp_path) -> tuple[str, bytes]:
    img = str(tmp_path / "h.vhd")
    vdisk.create(img, SIZE, format="vhd")
    with vdisk.open(img) as d:
        d.write(0, pattern(0, SIZE))
    return img, read_file(img)


def _fix_header_checksum(path: str) -> None:
    raw = bytearray(read_file(path)[512:1536])
    raw[36:40] = struct.pack(">I", checksum(raw, 36))
    patch(path, 512, bytes(raw))


def _fix_footer_checksums(path: str, raw: bytearray) -> None:
    for at in (0, len(raw) - 512):
        f = raw[at : at + 512]
        f[64:68] = struct.pack(">I", checksum(f, 64))
        raw[at : at + 512] = f
    write_file(path, bytes(raw))


def test_hostile_footers(tmp_path):
    img, good = _dynamic(tmp_path)
    for cut in (0, 100):
        write_file(img, good[:cut])
        api_read_fails(img, "vhd", CorruptImage, "too short")
    write_file(img, b"x" * 4096)
    api_read_fails(img, "vhd", CorruptImage, "no VHD footer")
    bad = bytearray(good)
    bad[-512 + 70] ^= 0xFF  # one bit of the unique id: checksum fails, copy at 0 still good
    write_file(img, bytes(bad))
    with vdisk.open(img, readonly=True) as d:  # falls back to the copy
        assert d.read(0, 4096) == pattern(0, 4096)
    bad[70] ^= 0xFF  # now both footers are bad
    write_file(img, bytes(bad))
    api_read_fails(img, "vhd", CorruptImage, "checksum")
    # huge size (with valid checksums): refused before anything is allocated
    bad = bytearray(good)
    for at in (0, len(bad) - 512):
        bad[at + 48 : at + 56] = struct.pack(">Q", 1 << 60)
        bad[at + 28 : at + 32] = b"qem2"
    _fix_footer_checksums(img, bad)
    api_read_fails(img, "vhd", CorruptImage, "disk size")
    # an unknown disk type
    bad = bytearray(good)
    for at in (0, len(bad) - 512):
        bad[at + 60 : at + 64] = struct.pack(">I", 6)
    _fix_footer_checksums(img, bad)
    api_read_fails(img, "vhd", UnsupportedFeature, "disk type")


def test_hostile_dynamic_header(tmp_path):
    img, good = _dynamic(tmp_path)

    def case(off: int, fmt: str, value: int, match: str, fix: bool = True) -> None:
        write_file(img, good)
        patch(img, 512 + off, struct.pack(fmt, value))
        if fix:
            _fix_header_checksum(img)
        api_read_fails(img, "vhd", CorruptImage, match)

    case(16, ">Q", 1 << 40, "BAT")  # BAT offset past the end
    case(28, ">I", 0x7FFFFFFF, "BAT")  # max table entries: huge
    case(28, ">I", 1, "BAT has 1 entries")  # too few for the size
    case(32, ">I", 3 * M, "block size")  # not a power of two
    case(0, ">Q", 0x1234, "cookie")
    case(40, ">I", 0x1234, "checksum", fix=False)
    # a BAT entry pointing past the end of the file
    write_file(img, good)
    patch(img, 1536, struct.pack(">I", 0x7FFFFF00))
    api_read_fails(img, "vhd", CorruptImage, "BAT entry 0")
    # a BAT entry pointing into the metadata
    write_file(img, good)
    patch(img, 1536, struct.pack(">I", 1))
    api_read_fails(img, "vhd", CorruptImage, "BAT entry 0")
    write_file(img, good)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, SIZE) == pattern(0, SIZE)


def test_hostile_locator(tmp_path):
    _parent, child, _ = _chain(tmp_path)
    good = read_file(child)
    # locator 0 data offset (header + 576 + 16) far past the end
    patch(child, 512 + 576 + 16, struct.pack(">Q", 1 << 40))
    _fix_header_checksum(child)
    with pytest.raises(CorruptImage, match="parent locator 0"):
        vdisk.open(child, readonly=True)
    # a control character inside the relative path
    write_file(child, good)
    off = struct.unpack(">Q", good[512 + 576 + 16 : 512 + 576 + 24])[0]
    patch(child, off + 4, "\n".encode("utf-16-le"))
    with pytest.raises(CorruptImage, match="control character"):
        vdisk.open(child, readonly=True)


def test_probe_and_options(tmp_path):
    assert VhdDriver.probe(b"conectix" + bytes(504), 512) == 100
    assert VhdDriver.probe(b"KDMV", 512) == 0
    from vdisk import formats

    assert formats.get("vpc") is VhdDriver
    with pytest.raises(UsageError):
        vdisk.create(str(tmp_path / "a.vhd"), M, format="vhd", options={"subformat": "nope"})
    with pytest.raises(UsageError):
        vdisk.create(str(tmp_path / "b.vhd"), M, format="vhd", options={"force_size": "maybe"})
    p = str(tmp_path / "c.vhd")
    vdisk.create(p, M, format="vhd", options={"force_size": "off"})
    with pytest.raises(UsageError):
        _driver(p, size_calc="nope")
    with pytest.raises(UsageError):
        _driver(p, bogus=1)


def test_commit_rebase_flatten(tmp_path, qemu_img):
    """The generic chain operations over VHD's set_backing: commit into the parent, rebase
    onto a copy, flatten to a plain dynamic disk that qemu reads equal."""
    from vdisk import ops

    parent, child, model = _chain(tmp_path)
    assert ops.commit(child) > 0
    with vdisk.open(parent, readonly=True) as d:
        assert d.read(0, SIZE) == model
    with vdisk.open(child, readonly=True) as d:
        assert d.read(0, SIZE) == model
    other = str(tmp_path / "other.vhd")
    vdisk.create(other, SIZE, format="vhd")
    ops.rebase(child, other)  # safe mode: the child keeps its content
    with vdisk.open(child, readonly=True) as d:
        assert d.driver.backing is not None and d.driver.backing.path == "other.vhd"
        assert d.read(0, SIZE) == model
    ops.flatten(child)
    os.unlink(other)
    with vdisk.open(child, readonly=True) as d:
        assert d.driver.backing is None and d.driver.info()["subformat"] == "dynamic"
        assert d.read(0, SIZE) == model
    ref = str(tmp_path / "ref.raw")
    write_file(ref, model)
    qemu_img("compare", "-f", "vpc", "-F", "raw", child, ref)


@pytest.mark.parametrize("opts", [{"subformat": "fixed"}, {"cluster_size": 64 * K}])
def test_random_io_other_layouts(tmp_path, qemu_img, opts):
    """The conformance suite covers 2 MiB dynamic disks; the same model test for fixed
    disks and 64 KiB blocks (many block boundaries)."""
    img = str(tmp_path / "m.vhd")
    vdisk.create(img, SIZE, format="vhd", options=opts)
    model = random_model_io(img, SIZE, str(opts), fmt="vhd", discard=True)
    with vdisk.open(img, readonly=True, format="vhd") as d:
        assert d.read(0, SIZE) == model
        assert d.check().exit_code == 0
    ref = str(tmp_path / "ref.raw")
    write_file(ref, model)
    qemu_img("compare", "-f", "vpc", "-F", "raw", img, ref)


def test_differencing_over_qemu_parent(tmp_path, qemu_img, qemu_io):
    """qemu 7.2 cannot create a differencing VHD (no backing support in vpc): vdisk makes
    the child over a qemu-made parent; qemu still reads the child's own sectors right."""
    parent = str(tmp_path / "qp.vhd")
    qemu_img("create", "-q", "-f", "vpc", parent, str(SIZE))
    qemu_io("-f", "vpc", "-c", f"write -P 0x61 0 {4 * M}", parent)
    child = str(tmp_path / "qc.vhd")
    vdisk.create(child, None, format="vhd", backing="qp.vhd")
    with vdisk.open(child) as d:
        size = d.size
        d.write(2 * M - 512, b"\x62" * 1024)
    model = bytearray(size)
    model[: 4 * M] = b"\x61" * (4 * M)
    model[2 * M - 512 : 2 * M + 512] = b"\x62" * 1024
    with vdisk.open(child, readonly=True) as d:
        assert d.read(0, size) == model
    assert qemu_img("info", child).returncode == 0
    qemu_io("-f", "vpc", "-c", f"read -P 0x62 {2 * M - 512} 1024", child)


def test_crash_order_of_block_allocation():
    """A power loss anywhere while blocks are allocated and written: the image opens
    (from the footer copy at 0 when the last footer was lost) and every written range
    reads as all old (zeros) or all new."""
    import random

    from vdisk.storage.faulty import FaultyStorage

    fs = FaultyStorage(path="crash.vhd")
    VhdDriver.create(fs, 2 * M, {"cluster_size": 64 * K})
    fs.sync()  # as vdisk.create does
    start = len(fs.log)
    d = VhdDriver.open(fs, readonly=False, options={})
    rng = random.Random(3)
    writes = []
    for i in range(30):  # new blocks, and new sectors of blocks already allocated
        off = rng.randrange(0, 2 * M // 4096) * 4096
        if any(o == off for o, _ in writes):
            continue
        writes.append((off, pattern(off, 4096, seed=i + 1)))
        d.write(off, writes[-1][1])
        if i % 7 == 6:
            d.flush()
    d.flush()
    crash_images_hold_old_or_new(VhdDriver, fs, start, writes)


def test_check_footer_copy(tmp_path):
    img, good = _dynamic(tmp_path)
    bad = bytearray(good)
    bad[70] ^= 0xFF  # the copy at 0 damaged; the footer at the end is fine
    write_file(img, bytes(bad))
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, 4096) == pattern(0, 4096)
        assert d.check().exit_code == 2
    d = VhdDriver.open(FileStorage(img, readonly=False), readonly=False, options={})
    try:
        assert d.check(repair=True).repaired
    finally:
        d.close()
    assert read_file(img) == good
    with vdisk.open(img, readonly=True) as d:
        assert d.check().exit_code == 0


@pytest.mark.parametrize("sub", ["fixed", "dynamic"])
@pytest.mark.parametrize("force", [True, False])
def test_resize(tmp_path, qemu_img, sub, force):
    """Grow (past the room of the BAT's own sectors, so the BAT moves) and shrink, and
    qemu agrees on size and content after each step."""
    img = str(tmp_path / "r.vhd")
    opts = {"subformat": sub, "force_size": force, "cluster_size": 64 * K}
    vdisk.create(img, SIZE, format="vhd", options=opts)  # the BAT's sector: 128 blocks
    with vdisk.open(img, format="vhd") as d:
        size0 = d.size
        d.write(0, pattern(0, size0))
    model = bytearray(pattern(0, size0))
    for new in (20 * M + 512 * 7, 5 * M - 512, 7 * M):
        with vdisk.open(img, format="vhd") as d:
            d.resize(new)
            assert d.size == new
            model = model[:new] + bytes(max(0, new - len(model)))
            d.write(new - 3000, b"\x7e" * 3000)  # the very end of the disk
            model[new - 3000 : new] = b"\x7e" * 3000
        with vdisk.open(img, format="vhd", readonly=True) as d:
            assert d.size == new
            for off in (0, 2 * M - 4096, new - 3 * M):
                assert d.read(off, 3 * M) == model[off : off + 3 * M]
            assert d.check().exit_code == 0
        info = qemu_img("info", "-f", "vpc", "--output", "json", img).stdout
        assert f'"virtual-size": {new},' in info
        ref = str(tmp_path / "ref.raw")
        write_file(ref, model)
        qemu_img("compare", "-f", "vpc", "-F", "raw", img, ref)


def test_fixed_vhd_is_probed_by_its_footer(tmp_path):
    """A fixed VHD has its only footer at the end; vdisk probes the tail too."""
    import subprocess

    import vdisk

    p = str(tmp_path / "f.vhd")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", p, "8M"], check=True
    )
    with vdisk.open(p, readonly=True) as d:
        assert d.format == "vhd"
    # a raw disk with the cookie but no valid checksum in its last sector stays raw
    r = tmp_path / "r.img"
    r.write_bytes(bytes(4096 - 512) + b"conectix" + bytes(504))
    with vdisk.open(str(r), readonly=True) as d:
        assert d.format == "raw"
