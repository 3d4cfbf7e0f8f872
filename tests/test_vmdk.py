"""VMDK against the real qemu-img 7.2: every subformat qemu writes is read byte for byte,
images vdisk writes pass ``qemu-img check`` and ``compare``, parent chains resolve and
check their CID, and hostile images fail with a clear vdisk error.

Sizes are 2 GiB + 1 MiB so that writes cross grain (64 KiB), grain-table (32 MiB) and
2 GiB extent boundaries; every image is sparse on the host, so this stays small and fast.
"""

from __future__ import annotations

import os
import re
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
from vdisk.errors import (
    BackingMismatch,
    CorruptImage,
    UnsupportedFeature,
    UsageError,
    VdiskError,
)
from vdisk.formats.base import Kind
from vdisk.formats.vmdk import VmdkDriver
from vdisk.storage import FileStorage

SIZE = (2 << 30) + (1 << 20)
M, K, G = 1 << 20, 1 << 10, 1 << 30
#: (offset, length): across a grain, a grain table (32 MiB), the 2 GiB extent split, the end
WRITES = [
    (60 * K, 8 * K),
    (200 * K + 17, 70 * K + 3),
    (32 * M - 4 * K, 12 * K),
    (2 * G - 6 * K, 12 * K),
    (SIZE - 64 * K - 512, 64 * K + 512),
]
SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]


def _expected(writes: list[tuple[int, bytes]], off: int, n: int) -> bytes:
    out = bytearray(n)
    for woff, data in writes:
        s, e = max(off, woff), min(off + n, woff + len(data))
        if s < e:
            out[s - off : e - off] = data[s - woff : e - woff]
    return bytes(out)


def _windows() -> list[tuple[int, int]]:
    """Ranges to compare: each write with 64 KiB of margin either side."""
    out = []
    for off, n in WRITES:
        s = max(0, off - 64 * K)
        out.append((s, min(SIZE, off + n + 64 * K) - s))
    return out


def _pattern_writes(seed: int = 1) -> list[tuple[int, bytes]]:
    return [(off, pattern(off, n, seed=seed + i)) for i, (off, n) in enumerate(WRITES)]


def _raw_reference(tmp_path, writes: list[tuple[int, bytes]]) -> str:
    ref = str(tmp_path / "ref.raw")
    with open(ref, "wb") as f:
        f.truncate(SIZE)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return ref


def _check_reads(path: str, writes: list[tuple[int, bytes]]) -> None:
    with vdisk.open(path, readonly=True) as d:
        assert d.size == SIZE
        for off, n in _windows():
            assert d.read(off, n) == _expected(writes, off, n), f"{path}: {off}+{n}"
        # one read of 2 MiB across the 2 GiB extent split, up to the end of the disk
        off = 2 * G - 1 * M
        assert d.read(off, 2 * M) == _expected(writes, off, 2 * M)


# -- qemu writes, vdisk reads ------------------------------------------------------------


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_reads_qemu_images(tmp_path, qemu_img, sub):
    writes = _pattern_writes()
    ref = _raw_reference(tmp_path, writes)
    img = str(tmp_path / f"{sub}.vmdk")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", ref, img)
    _check_reads(img, writes)
    d = VmdkDriver.open(FileStorage(img, readonly=True), readonly=True, options={})
    try:
        st = d.block_status(0, d.size)
        assert sum(e.length for e in st) == SIZE
        data = [e for e in st if e.kind == Kind.DATA]
        for off, n in WRITES:  # every written byte is DATA in this layer
            pos = off
            for e in data:
                if e.offset <= pos < e.end:
                    pos = e.end
            assert pos >= off + n, f"{off}+{n} not all DATA"
        if sub != "monolithicFlat" and sub != "twoGbMaxExtentFlat":
            assert any(e.kind == Kind.HOLE for e in st)
    finally:
        d.close()


def test_reads_qemu_io_writes_in_place(tmp_path, qemu_img, qemu_io):
    """qemu-io writing into a qemu-created twoGbMaxExtentSparse (GTs allocated by qemu,
    grains appended in write order, not guest order)."""
    img = str(tmp_path / "t.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img, str(SIZE))
    cmds = []
    writes = []
    for i, (off, n) in enumerate(reversed(WRITES)):
        cmds += ["-c", f"write -P {0x30 + i} {off} {n}"]
        writes.append((off, bytes([0x30 + i]) * n))
    qemu_io("-f", "vmdk", *cmds, img)
    _check_reads(img, writes)


# -- vdisk writes, qemu checks ------------------------------------------------------------


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_vdisk_writes_pass_qemu_check(tmp_path, qemu_img, qemu_io, sub):
    img = str(tmp_path / f"w-{sub}.vmdk")
    vdisk.create(img, SIZE, format="vmdk", options={"subformat": sub})
    writes = _pattern_writes(seed=7)
    with vdisk.open(img) as d:
        for off, data in writes:
            d.write(off, data)
    # reopen and overwrite across a grain boundary (for streamOptimized: a rewrite of
    # grains already written, which appends new compressed copies)
    with vdisk.open(img) as d:
        extra = (60 * K + 100, pattern(60 * K + 100, 10 * K, seed=99))
        d.write(*extra)
    writes.append(extra)
    _check_reads(img, writes)
    assert qemu_img("check", img, check=False).returncode == 0
    ref = _raw_reference(tmp_path, writes)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref)
    # qemu-io exits 1 on a -P mismatch: a constant pattern across grain and extent seams
    with vdisk.open(img) as d:
        d.write(2 * G - 100, b"\x5a" * 70000)
    qemu_io("-f", "vmdk", "-c", f"read -P 0x5a {2 * G - 100} 70000", img)
    qemu_io("-f", "vmdk", "-c", f"read -P 0 {2 * G + 70000} 4096", img)


def test_stream_optimized_layout(tmp_path, qemu_img):
    """vdisk's streamOptimized: compressed grains with markers, GD at end behind a footer;
    an empty image is already valid, and qemu reads every state."""
    img = str(tmp_path / "s.vmdk")
    vdisk.create(img, 4 * M, format="vmdk", options={"subformat": "streamOptimized"})
    assert qemu_img("check", img, check=False).returncode == 0
    with open(img, "rb") as f:
        raw = f.read()
    assert raw[:4] == b"KDMV"
    version, flags = struct.unpack_from("<II", raw, 4)
    assert version == 3 and flags & (1 << 16) and flags & (1 << 17)
    assert struct.unpack_from("<Q", raw, 56)[0] == 0xFFFFFFFFFFFFFFFF  # gdOffset: at end
    assert raw[-1024:-1020] == b"KDMV" and raw[-512:] == bytes(512)
    data = b"".join(pattern(i * 64 * K, 64 * K, seed=3) for i in range(10))
    with vdisk.open(img) as d:
        d.write(64 * K, data)  # sequential whole grains
        d.flush()
        d.write(5 * 64 * K + 5, b"\xaa" * 200)  # a partial rewrite after a flush
    model = bytearray(4 * M)
    model[64 * K : 64 * K + len(data)] = data
    model[5 * 64 * K + 5 : 5 * 64 * K + 205] = b"\xaa" * 200
    ref = str(tmp_path / "ref.raw")
    with open(ref, "wb") as f:
        f.write(model)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref)
    assert qemu_img("check", img, check=False).returncode == 0
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, 4 * M) == model
    # small: the compressible pattern took far less than 10 grains of raw space
    assert os.path.getsize(img) < 10 * 64 * K
    # a session that only unmaps grains (no grain appended) still rewrites GTs and GD
    d = VmdkDriver.open(FileStorage(img, readonly=False), readonly=False, options={})
    d.write_zeroes(64 * K, 2 * 64 * K, unmap=True)
    d.close()
    model[64 * K : 3 * 64 * K] = bytes(2 * 64 * K)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, 4 * M) == model
    assert qemu_img("check", img, check=False).returncode == 0


def test_write_zeroes_and_discard(tmp_path, qemu_img):
    img = str(tmp_path / "z.vmdk")
    vdisk.create(img, 8 * M, format="vmdk")
    data = pattern(0, 8 * M)
    with vdisk.open(img) as d:
        d.write(0, data)
    with vdisk.open(img) as d:
        d.write_zeroes(100 * K, 300 * K)  # whole and partial grains
        d.discard(1 * M, 2 * M)
    model = bytearray(data)
    model[100 * K : 400 * K] = bytes(300 * K)
    model[1 * M : 3 * M] = bytes(2 * M)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, 8 * M) == model
        st = d.block_status(1 * M, 2 * M)
        assert all(e.kind != Kind.DATA for e in st)
    ref = str(tmp_path / "ref.raw")
    with open(ref, "wb") as f:
        f.write(model)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref)
    assert qemu_img("check", img, check=False).returncode == 0


# -- parents ---------------------------------------------------------------------------------


def test_parent_chain_both_ways(tmp_path, qemu_img, qemu_io):
    base = str(tmp_path / "base.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", base, "8M")
    qemu_io("-f", "vmdk", "-c", "write -P 0x11 0 8M", base)
    # a child made by vdisk, written by vdisk
    child = str(tmp_path / "child.vmdk")
    vdisk.create(child, None, format="vmdk", backing="base.vmdk")
    with vdisk.open(child) as d:
        assert d.driver.backing is not None and d.driver.backing.path == "base.vmdk"
        d.write(64 * K - 4 * K, b"\x22" * 8 * K)
    model = bytearray(b"\x11" * 8 * M)
    model[60 * K : 68 * K] = b"\x22" * 8 * K
    with vdisk.open(child, readonly=True) as d:
        assert d.read(0, 8 * M) == model
        kinds = {e.kind for e in d.driver.block_status(0, 8 * M)}
        assert kinds == {Kind.DATA, Kind.HOLE}
    assert qemu_img("check", child, check=False).returncode == 0
    ref = str(tmp_path / "ref.raw")
    with open(ref, "wb") as f:
        f.write(model)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", child, ref)
    # a child made by qemu, read by vdisk
    qchild = str(tmp_path / "qchild.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", qchild)
    qemu_io("-f", "vmdk", "-c", "write -P 0x33 1M 4k", qchild)
    with vdisk.open(qchild, readonly=True) as d:
        got = d.read(1 * M - 4 * K, 12 * K)
        assert got == b"\x11" * 4 * K + b"\x33" * 4 * K + b"\x11" * 4 * K
    # writing the base gives it a new CID: both children now refuse it
    with vdisk.open(base) as d:
        d.write(0, b"\x44" * 512)
    for c in (child, qchild):
        with pytest.raises(BackingMismatch, match="parentCID"):
            vdisk.open(c, readonly=True)


def test_parent_loop(tmp_path):
    img = str(tmp_path / "loop.vmdk")
    vdisk.create(img, 1 * M, format="vmdk", options={"subformat": "monolithicFlat"})
    text = read_file(img).decode()
    cid = next(ln.split("=")[1] for ln in text.splitlines() if ln.startswith("CID="))
    text = text.replace("parentCID=ffffffff", f'parentCID={cid}\nparentFileNameHint="loop.vmdk"')
    with open(img, "w") as f:
        f.write(text)
    with pytest.raises(BackingMismatch, match="loop"):
        vdisk.open(img, readonly=True)


def test_non_vmdk_parent_refused(tmp_path):
    raw = str(tmp_path / "base.raw")
    vdisk.create(raw, 1 * M, format="raw")
    with pytest.raises((UnsupportedFeature, UsageError)):
        vdisk.create(str(tmp_path / "c.vmdk"), None, format="vmdk", backing="base.raw")


# -- hostile images ------------------------------------------------------------------------------


def _sparse(tmp_path, size: int = 4 * M) -> str:
    img = str(tmp_path / "h.vmdk")
    vdisk.create(img, size, format="vmdk")
    with vdisk.open(img) as d:
        d.write(0, pattern(0, size))
    return img


def test_hostile_header_fields(tmp_path):
    img = _sparse(tmp_path)
    good = read_file(img)

    def case(off: int, fmt: str, value: int, match: str, exc=CorruptImage) -> None:
        write_file(img, good)
        patch(img, off, struct.pack(fmt, value))
        api_read_fails(img, "vmdk", exc, match)

    case(0, "<I", 0x12345678, "magic")
    case(4, "<I", 9, "version", UnsupportedFeature)
    case(8, "<I", 3 | (1 << 20), "unknown flags", UnsupportedFeature)
    case(12, "<Q", 1 << 62, "capacity")  # huge size
    case(20, "<Q", 100, "grainSize")  # not a power of two
    case(44, "<I", 1 << 30, "numGTEsPerGT")
    case(56, "<Q", 1 << 40, "gdOffset")  # GD past the end
    case(73, "<B", ord("x"), "newline")  # text-mode transfer damage
    # a GD entry pointing past the end of the file: refused when the table is used
    write_file(img, good)
    gd = struct.unpack_from("<Q", good, 56)[0] * 512
    patch(img, gd, struct.pack("<I", 0x7FFFFFF0))
    api_read_fails(img, "vmdk", CorruptImage, "past the end")
    # a grain entry pointing past the end
    write_file(img, good)
    gt = struct.unpack_from("<I", good, gd)[0] * 512
    patch(img, gt + 4, struct.pack("<I", 0x7FFFFFF0))
    api_read_fails(img, "vmdk", CorruptImage, "outside the file")
    write_file(img, good)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, 4 * M) == pattern(0, 4 * M)


def test_truncated_and_wrong_magic(tmp_path):
    img = _sparse(tmp_path)
    good = read_file(img)
    for cut in (0, 100, 600, 64 * K, len(good) - 4096):
        with open(img, "wb") as f:
            f.write(good[:cut])
        with pytest.raises(VdiskError), vdisk.open(img, readonly=True, format="vmdk") as d:
            d.read(0, d.size)
    with open(img, "wb") as f:
        f.write(b"hello world, not an image" * 100)
    api_read_fails(img, "vmdk", CorruptImage, "descriptor")


def test_stream_hostile(tmp_path, qemu_img):
    img = str(tmp_path / "s.vmdk")
    vdisk.create(img, 1 * M, format="vmdk", options={"subformat": "streamOptimized"})
    with vdisk.open(img) as d:
        d.write(0, pattern(0, 1 * M))
    good = read_file(img)
    # damaged deflate data in the first grain
    patch(img, 128 * 512 + 12 + 20, b"\xff" * 16)
    api_read_fails(img, "vmdk", CorruptImage, "grain 0")
    # a grain marker naming another LBA
    write_file(img, good)
    patch(img, 128 * 512, struct.pack("<Q", 12345))
    api_read_fails(img, "vmdk", CorruptImage, "grain marker")
    # a compressed size far beyond a grain (decompression bombs are bounded too)
    write_file(img, good)
    patch(img, 128 * 512 + 8, struct.pack("<I", 1 << 30))
    api_read_fails(img, "vmdk", CorruptImage, "claims")
    # the footer cut off
    with open(img, "wb") as f:
        f.write(good[:-1024])
    api_read_fails(img, "vmdk", CorruptImage, "footer")


DESC = """# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
{extents}

ddb.adapterType = "ide"
"""


@pytest.mark.parametrize(
    ("extents", "extra", "match"),
    [
        ('RW 2048 FLAT "/etc/passwd" 0', "", "absolute"),
        ('RW 2048 FLAT "../escape-flat.vmdk" 0', "", "leaves"),
        ('RW 2048 FLAT "sub/../../x.vmdk" 0', "", "leaves"),
        ('RW 2048 FLAT "d-flat.vmdk" 0', "CID=87654321\n", "twice"),
        ('RW 2048 FLAT "d-fl\x01at.vmdk" 0', "", "control character"),
        ('RW 2048 FLAT "d-flat.vmdk\nRW 2048 FLAT "/etc/passwd" 0', "", "malformed|absolute"),
        ('RW 2048 FLAT "d-flat.vmdk', "", "malformed"),
        ('RW 4096 FLAT "d-flat.vmdk" 0', "", "needs"),  # extent larger than its file
        ('RW 2048 FLAT "d-flat.vmdk" 0', 'createType="x"\n', "twice"),
        ("", "", "no extents"),
        ('RW 2048 VMFSSPARSE "d-flat.vmdk"', "", "unsupported type"),
        ('RW 2048 FLAT "d-flat.vmdk" 0', "garbage line here\n", "neither"),
        ('RW \u00b2\u00b3 FLAT "d-flat.vmdk" 0', "", "malformed"),  # non-ASCII digits
        # a line built to make a backtracking parser hang: refused at once
        (
            'RW 2048 FLAT "d-flat.vmdk" 0',
            "a" + " " * 300000 + "= x" + " " * 300000 + "y\n",
            "limit",
        ),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_descriptor_injection(tmp_path, extents, extra, match):
    with open(tmp_path / "d-flat.vmdk", "wb") as f:
        f.truncate(2048 * 512)
    img = str(tmp_path / "d.vmdk")
    text = DESC.format(extents=extents) + extra
    with open(img, "w") as f:
        f.write(text)
    with pytest.raises((CorruptImage, UnsupportedFeature), match=match):
        vdisk.open(img, readonly=True, format="vmdk")


def test_descriptor_ok_and_limits(tmp_path):
    with open(tmp_path / "d-flat.vmdk", "wb") as f:
        f.truncate(2048 * 512)
    img = str(tmp_path / "d.vmdk")
    with open(img, "w") as f:
        f.write(DESC.format(extents='RW 2048 FLAT "d-flat.vmdk" 0\nRW 100 ZERO'))
    with vdisk.open(img, readonly=True) as d:
        assert d.size == 2148 * 512
        assert d.block_status(2048 * 512, 100 * 512)[0].kind == Kind.ZERO
    with open(img, "w") as f:
        f.write("# Disk DescriptorFile\n" + "#" * (2 << 20))
    with pytest.raises(CorruptImage, match="limit"):
        vdisk.open(img, readonly=True, format="vmdk")


def test_descriptor_text_ends_at_first_nul(tmp_path, qemu_img, qemu_io):
    """qemu rewrites a shorter descriptor in place (its new CID may have fewer hex digits)
    and leaves the old tail after the NUL: that tail is stale, ignored and never parsed."""
    with open(tmp_path / "d-flat.vmdk", "wb") as f:
        f.truncate(2048 * 512)
    img = str(tmp_path / "d.vmdk")
    with open(img, "w") as f:
        f.write(DESC.format(extents='RW 2048 FLAT "d-flat.vmdk" 0') + "\0RW 100 ZERO\nCID=1\n")
    with vdisk.open(img, readonly=True) as d:
        assert d.size == 2048 * 512
    # the same in an embedded descriptor, as qemu leaves it: a shorter text, then a NUL,
    # then the old text's tail
    img = _sparse(tmp_path)
    raw = bytearray(read_file(img))
    start = raw.index(b"# Disk DescriptorFile")
    old = bytes(raw[start : raw.index(b"\0", start)])
    new = re.sub(rb"(?m)^CID=[0-9a-fA-F]+", b"CID=1", old)
    assert len(new) < len(old)
    raw[start : start + len(new) + 1] = new + b"\0"
    assert raw[start + len(new) + 1 : start + len(old)].strip(b"\0")  # a stale tail is there
    write_file(img, raw)
    with vdisk.open(img, readonly=True, format="vmdk") as d:
        d.read(0, d.size)
    qemu_img("info", img)


def test_embedded_descriptor_must_match_capacity(tmp_path):
    img = _sparse(tmp_path)
    raw = bytearray(read_file(img))
    i = raw.index(b"RW 8192 SPARSE")
    raw[i : i + 14] = b"RW 8190 SPARSE"
    write_file(img, raw)
    api_read_fails(img, "vmdk", CorruptImage, "capacity")


def test_probe_and_options(tmp_path):
    assert VmdkDriver.probe(b"KDMV" + bytes(100), 512) == 100
    assert VmdkDriver.probe(b"# Disk DescriptorFile\nversion=1\n", 40) == 100
    assert VmdkDriver.probe(b"conectix", 512) == 0
    with pytest.raises(UsageError):
        vdisk.create(str(tmp_path / "x.vmdk"), M, format="vmdk", options={"subformat": "nope"})
    with pytest.raises(UsageError):
        vdisk.create(str(tmp_path / "y.vmdk"), M, format="vmdk", options={"bogus": 1})


def test_grain_table_cache_is_bounded(tmp_path):
    """Reading every grain table of a large sparse image keeps the LRU at its capacity."""
    img = str(tmp_path / "big.vmdk")
    vdisk.create(img, 64 * G, format="vmdk")  # 2048 grain tables of 2 KiB
    d = VmdkDriver.open(FileStorage(img, readonly=True), readonly=True, options={})
    try:
        d.gt_cache.capacity = 64 * 2048  # 64 tables
        for gi in range(0, 2048, 3):
            d.block_status(gi * 32 * M, 64 * K)
        st = d.stats()["grain-tables"]
        assert st["bytes"] <= 64 * 2048 and st["evictions"] > 0
    finally:
        d.close()


def test_commit_rebase_flatten(tmp_path, qemu_img):
    """The generic chain operations over VMDK's set_backing (parentCID and
    parentFileNameHint rewritten in the embedded descriptor)."""
    from vdisk import ops

    base = str(tmp_path / "base.vmdk")
    vdisk.create(base, 8 * M, format="vmdk")
    model = bytearray(pattern(0, 8 * M, seed=1))
    with vdisk.open(base) as d:
        d.write(0, bytes(model))
    child = str(tmp_path / "child.vmdk")
    vdisk.create(child, None, format="vmdk", backing="base.vmdk")
    with vdisk.open(child) as d:
        d.write(64 * K - 512, b"\x22" * 1024)
    model[64 * K - 512 : 64 * K + 512] = b"\x22" * 1024
    assert ops.commit(child) > 0
    for p in (base, child):  # the child is pinned to the base's new CID
        with vdisk.open(p, readonly=True) as d:
            assert d.read(0, 8 * M) == model
    other = str(tmp_path / "other.vmdk")
    vdisk.create(other, 8 * M, format="vmdk")
    ops.rebase(child, other)
    with vdisk.open(child, readonly=True) as d:
        assert d.driver.backing is not None and d.driver.backing.path == "other.vmdk"
        assert d.read(0, 8 * M) == model
    ops.flatten(child)
    os.unlink(other)
    with vdisk.open(child, readonly=True) as d:
        assert d.driver.backing is None
        assert d.read(0, 8 * M) == model
    assert "parentFileNameHint" not in read_file(child)[512 : 21 * 512].decode("latin-1")
    assert qemu_img("check", child, check=False).returncode == 0
    ref = str(tmp_path / "ref.raw")
    write_file(ref, model)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", child, ref)


@pytest.mark.parametrize("sub", ["streamOptimized", "twoGbMaxExtentFlat"])
def test_random_io_other_subformats(tmp_path, qemu_img, sub):
    """The conformance suite covers monolithicSparse; the same model test for the others
    (stream-optimized: partial rewrites of compressed grains, zeroes, reopen)."""
    size = (8 << 20) + 3 * 512
    img = str(tmp_path / "m.vmdk")
    vdisk.create(img, size, format="vmdk", options={"subformat": sub})
    model = random_model_io(img, size, sub, fmt=None, discard=False)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, size) == model
    assert qemu_img("check", img, check=False).returncode == 0
    ref = str(tmp_path / "ref.raw")
    write_file(ref, model)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref)


def test_crash_order_of_new_grains():
    """A power loss anywhere in a batch of new grains (unsynced writes dropped, kept, or
    thinned and reordered): the image opens and every written range reads as all old
    (zeros) or all new, never as garbage, since GT entries follow a barrier."""
    import random

    from vdisk.storage.faulty import FaultyStorage

    fs = FaultyStorage(path="crash.vmdk")
    VmdkDriver.create(fs, 4 * M, {"cluster_size": 4096})  # 2 MiB per grain table
    fs.sync()  # as vdisk.create does
    start = len(fs.log)
    d = VmdkDriver.open(fs, readonly=False, options={})
    rng = random.Random(5)
    grains = sorted(rng.sample(range(1024), 40))
    writes = [(g * 4096, pattern(g * 4096, 4096, seed=g + 1)) for g in grains]
    d.write_many(writes[:20])
    d.write_many(writes[20:])
    d.flush()
    crash_images_hold_old_or_new(VmdkDriver, fs, start, writes)


def test_grain_tables_allocated_on_demand(tmp_path, qemu_img):
    """A sparse extent whose GD entries are 0 (no GT yet, which VMware allows): the first
    write into that range appends a GT and its redundant copy, and qemu reads the result."""
    img = str(tmp_path / "g.vmdk")
    vdisk.create(img, 96 * M, format="vmdk")  # 3 grain tables of 32 MiB
    raw = bytearray(read_file(img))
    rgd = struct.unpack_from("<Q", raw, 48)[0] * 512
    gd = struct.unpack_from("<Q", raw, 56)[0] * 512
    for base in (gd, rgd):
        raw[base + 4 : base + 12] = bytes(8)  # GTs 1 and 2 not allocated
    write_file(img, bytes(raw))
    with vdisk.open(img, readonly=True) as d:
        assert d.read(32 * M - 4096, 8192) == bytes(8192)
        assert d.block_status(32 * M, 64 * M)[0].kind == Kind.HOLE
    model = bytearray(96 * M)
    with vdisk.open(img) as d:
        for off in (32 * M - 4096, 64 * M - 4096):  # crosses GT 0 -> 1, then 1 -> 2
            data = pattern(off, M, seed=4)
            d.write(off, data)
            model[off : off + M] = data
    with vdisk.open(img, readonly=True) as d:
        for off in (0, 32 * M - 64 * K, 64 * M - 64 * K, 95 * M):
            assert d.read(off, M) == model[off : off + M]
        assert d.check().exit_code == 0
    assert qemu_img("check", img, check=False).returncode == 0
    ref = str(tmp_path / "ref.raw")
    write_file(ref, model)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref)


def test_write_into_qemu_stream_optimized(tmp_path, qemu_img):
    """qemu's streamOptimized keeps its GD and GTs near the start (not at the end): vdisk
    appends compressed grains and updates those GTs in place; qemu reads the result."""
    writes = _pattern_writes(seed=11)
    ref = _raw_reference(tmp_path, writes)
    img = str(tmp_path / "qs.vmdk")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", ref, img)
    more = [(60 * K + 1000, b"\x5b" * 5000), (40 * M + 7, pattern(40 * M + 7, 70000, seed=12))]
    with vdisk.open(img) as d:
        for off, data in more:
            d.write(off, data)
    writes += more
    _check_reads(img, writes)
    assert qemu_img("check", img, check=False).returncode == 0
    ref = _raw_reference(tmp_path, writes)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, ref)


def test_read_coalesces_only_true_runs(tmp_path):
    """Grains 0 and 2 lie back to back in the file with grain 1 unallocated between them
    in guest space: one read across all three must not join them into one host run."""
    img = str(tmp_path / "gap.vmdk")
    vdisk.create(img, M, format="vmdk")
    d = VmdkDriver.open(FileStorage(img, readonly=False), readonly=False, options={})
    try:
        d.write(0, b"A" * 64 * K)
        d.write(128 * K, b"C" * 64 * K)
        assert d.read(0, 192 * K) == b"A" * 64 * K + bytes(64 * K) + b"C" * 64 * K
        assert d.read(60 * K, 72 * K) == b"A" * 4 * K + bytes(64 * K) + b"C" * 4 * K
    finally:
        d.close()


def test_zeroed_grains(tmp_path, qemu_img, qemu_io):
    """GT entry 1 (zeroed grain, version 2 with the zeroed-grain flag): qemu writes it for
    write -z; vdisk reads ZERO there, and writes it itself where a parent must be hidden."""
    img = str(tmp_path / "z.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", img, "4M")
    qemu_io("-f", "vmdk", "-c", "write -P 0x11 0 1M", "-c", "write -z 128k 256k", img)
    with vdisk.open(img, readonly=True) as d:
        assert d.read(0, M) == b"\x11" * 128 * K + bytes(256 * K) + b"\x11" * 640 * K
        kinds = [(e.kind, e.offset, e.length) for e in d.driver.block_status(0, M)]
        assert (Kind.ZERO, 128 * K, 256 * K) in kinds
    child = str(tmp_path / "c.vmdk")
    vdisk.create(child, None, format="vmdk", backing="z.vmdk", options={"zeroed_grain": "on"})
    with vdisk.open(child) as d:
        d.write_zeroes(512 * K, 128 * K)  # must hide the parent's 0x11 there
    with vdisk.open(child, readonly=True) as d:
        assert d.read(448 * K, 256 * K) == b"\x11" * 64 * K + bytes(128 * K) + b"\x11" * 64 * K
        kinds = {e.kind for e in d.driver.block_status(512 * K, 128 * K)}
        assert kinds == {Kind.ZERO}
    assert qemu_img("check", child, check=False).returncode == 0
    qemu_io("-f", "vmdk", "-c", f"read -P 0 {512 * K} {128 * K}", child)
