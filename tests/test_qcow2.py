"""qcow2 driver against the real qemu-img / qemu-io: images qemu makes read byte-identically
to a reference, images vdisk writes pass ``qemu-img check`` and ``qemu-img compare``,
hostile images give clear vdisk errors. Ranges cross cluster and L2-table boundaries."""

from __future__ import annotations

import json
import os
import random
import struct
from contextlib import closing
from functools import partial
from pathlib import Path

import pytest

import vdisk
from tests.conftest import need, pattern, run
from tests.formats_helpers import open_driver
from vdisk.errors import CorruptImage, ReadOnlyImage, UnsupportedFeature, VdiskError
from vdisk.formats.base import BackingRef, Kind
from vdisk.formats.qcow2 import Qcow2Driver
from vdisk.storage import FileStorage, MemoryStorage

pytestmark = pytest.mark.timeout(120)

KiB, MiB = 1024, 1 << 20


@pytest.fixture(autouse=True)
def _tools():
    need("qemu-img")
    need("qemu-io")


def qimg(*args: str, check: bool = True):
    return run(["qemu-img", *args], check=check)


def qio(path: str, *cmds: str, fmt: str = "qcow2", check: bool = True):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    return run([*args, path], check=check)


#: the driver itself on a file, without the generic layer
opened = partial(open_driver, Qcow2Driver)


class Model:
    """The expected guest content: a list of writes applied over zeros."""

    def __init__(self) -> None:
        self.ops: list[tuple[int, int, int | None]] = []  # (offset, length, byte or None=zero)

    def write(self, off: int, n: int, byte: int | None) -> None:
        self.ops.append((off, n, byte))

    def read(self, off: int, n: int) -> bytes:
        buf = bytearray(n)
        for o, m, b in self.ops:
            lo, hi = max(o, off), min(o + m, off + n)
            if lo < hi:
                buf[lo - off : hi - off] = bytes([b or 0]) * (hi - lo)
        return bytes(buf)


def l2_span(cs: int, extl2: bool = False) -> int:
    return cs * (cs // (16 if extl2 else 8))


# -- reading images qemu made ---------------------------------------------------------

VARIANTS = [
    ("v2-4k", 4096, ["compat=0.10"]),
    ("v3-4k", 4096, []),
    ("v3-64k", 65536, []),
    ("v3-2M", 2 * MiB, []),
    ("extl2-16k", 16384, ["extended_l2=on"]),
    ("extl2-64k", 65536, ["extended_l2=on"]),
    ("refbits1", 4096, ["refcount_bits=1"]),
    ("refbits64", 4096, ["refcount_bits=64"]),
    ("lazy", 65536, ["lazy_refcounts=on"]),
]


@pytest.mark.parametrize(("cs", "opts"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_read_qemu_images(tmp_path, cs, opts):
    extl2 = "extended_l2=on" in opts
    span = l2_span(cs, extl2)
    size = min(max(2 * span, 8 * cs), 1 << 30)
    if span >= size:
        span = size // 2  # one L2 table covers the disk: a mid-disk cluster boundary instead
    path = str(tmp_path / "a.qcow2")
    qimg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        ",".join([f"cluster_size={cs}", *opts]),
        path,
        str(size),
    )
    m = Model()
    writes = [
        (0x11, 0, 100),
        (0x22, cs - 700, 1500),  # crosses a cluster boundary
        (0x33, 3 * cs - 512, 2 * cs + 1024),  # spans three clusters
        (0x44, span - cs - 4096, cs + 8192),  # crosses the L2 table boundary
        (0x55, size - 5000, 5000),  # the end of the disk
    ]
    if extl2:
        sub = cs // 32
        writes += [(0x66, 6 * cs + sub, sub), (0x67, 6 * cs + 5 * sub + 100, 3 * sub)]
    cmds = []
    for byte, off, n in writes:
        cmds.append(f"write -P {byte:#x} {off} {n}")
        m.write(off, n, byte)
    zero_at = 4 * cs if size > 8 * cs else 2 * cs
    if cs >= 4096:
        cmds.append(f"write -z {span - 2 * cs} {2 * cs}")  # whole clusters: zero flags in v3
        m.write(span - 2 * cs, 2 * cs, None)
    cmds.append(f"write -z {zero_at + 512} 1024")
    m.write(zero_at + 512, 1024, None)
    qio(path, *cmds)
    raw = str(tmp_path / "a.raw")
    qimg("convert", "-O", "raw", path, raw)  # qemu's own reading, as the reference
    d = opened(path)
    try:
        with open(raw, "rb") as ref:
            for _b, off, n in writes:
                lo, hi = max(0, off - cs - 123), min(size, off + n + cs + 77)
                got = d.read(lo, hi - lo)
                assert got == m.read(lo, hi - lo), (off, n)
                ref.seek(lo)
                assert got == ref.read(hi - lo), (off, n)
        # a whole window across the L2 boundary in one read
        lo = max(0, span - 3 * cs)
        hi = min(size, span + 3 * cs)
        assert d.read(lo, hi - lo) == m.read(lo, hi - lo)
        ext = d.block_status(0, size)
        assert sum(e.length for e in ext) == size
        assert ext[0].kind == Kind.DATA
        if cs >= 4096 and "compat=0.10" not in opts:
            z = d.block_status(span - 2 * cs, 2 * cs)
            assert [e.kind for e in z] == [Kind.ZERO]
        info = d.info()
        assert info["cluster_size"] == cs
        assert info["compat"] == ("0.10" if "compat=0.10" in opts else "1.1")
        assert info["extended_l2"] == extl2
    finally:
        d.close()


def test_read_matches_qemu_convert(tmp_path):
    """The whole disk, compared with qemu-img's own raw conversion."""
    path, raw = str(tmp_path / "a.qcow2"), str(tmp_path / "a.raw")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "5M")
    qio(path, "write -P 0xa1 4000 300000", "write -z 1M 64k", "write -P 0xa2 2093000 10000")
    qimg("convert", "-O", "raw", path, raw)
    with closing(opened(path)) as d:
        assert d.read(0, 5 * MiB) == Path(raw).read_bytes()


def test_mapping_of_mixed_clusters_across_l2_tables(tmp_path):
    """The run iterator over data, compressed, zero and unallocated clusters, with L2
    tables of 64 entries (512-byte clusters): a range read or mapped whole gives what
    the clusters give one by one, and what qemu-img reads."""
    path, raw = str(tmp_path / "m.qcow2"), str(tmp_path / "m.raw")
    span = l2_span(512)
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, str(4 * span))
    rnd = random.Random(3)
    clusters = 4 * span // 512
    # compressed clusters first (qemu compresses only into unallocated ones), then data
    # and zeros over and around them
    cmds = [f"write -c -P 0x33 {c * 512} 512" for c in rnd.sample(range(clusters), 40)]
    for _ in range(40):
        c = rnd.randrange(clusters)
        n = min(rnd.randrange(1, 40), clusters - c) * 512
        op = rnd.choice([f"write -P {rnd.randrange(1, 255)}", "write -z"])
        cmds.append(f"{op} {c * 512} {n}")
    qio(path, *cmds)
    qimg("convert", "-O", "raw", path, raw)
    want = Path(raw).read_bytes()
    with closing(opened(path)) as d:
        whole = d.block_status(0, d.size)
        one_by_one = [e for c in range(0, d.size, 512) for e in d.block_status(c, 512)]
        kinds = bytearray(d.size // 512)
        for e in one_by_one:
            kinds[e.offset // 512] = e.kind
        for e in whole:
            assert set(kinds[e.offset // 512 : e.end // 512]) == {e.kind}
            if e.host is not None:  # contiguous on the host as it says
                for c in range(e.offset, e.end, 512):
                    assert d.block_status(c, 512)[0].host == e.host + c - e.offset
        assert d.read(0, d.size) == want
        for _ in range(50):
            off = rnd.randrange(d.size)
            n = rnd.randrange(1, min(3 * span, d.size - off) + 1)
            assert d.read(off, n) == want[off : off + n]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [4096, 65536])
def test_compressed_read_and_overwrite(tmp_path, ctype, cs):
    if ctype == "zstd":
        pytest.importorskip("zstandard")
    raw, path = tmp_path / "a.raw", str(tmp_path / "c.qcow2")
    size = 3 * MiB + 12345
    content = bytearray(pattern(0, size))
    content[MiB : MiB + 200000] = bytes(200000)  # a zero stretch
    raw.write_bytes(content)
    qimg(
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        f"cluster_size={cs},compression_type={ctype}",
        str(raw),
        path,
    )
    with closing(opened(path)) as d:
        assert d.info()["compression_type"] == ctype
        assert d.read(0, size) == bytes(content)
        assert d.read(cs - 10, 3 * cs) == bytes(content[cs - 10 : 4 * cs - 10])
    # overwrite parts of compressed clusters: copy-on-write out of the compressed data
    with closing(opened(path, readonly=False)) as d:
        d.write(cs // 2, b"\x5a" * cs)
        d.write_zeroes(4 * cs, 2 * cs)
        d.write(10 * cs + 7, b"\x6b" * 100)
    content[cs // 2 : cs // 2 + cs] = b"\x5a" * cs
    content[4 * cs : 6 * cs] = bytes(2 * cs)
    content[10 * cs + 7 : 10 * cs + 107] = b"\x6b" * 100
    raw.write_bytes(content)
    qimg("check", path)
    qimg("compare", "-f", "qcow2", "-F", "raw", path, str(raw))


def test_zstd_without_module_is_unsupported(tmp_path, monkeypatch):
    pytest.importorskip("zstandard")
    raw, path = tmp_path / "a.raw", str(tmp_path / "c.qcow2")
    raw.write_bytes(pattern(0, 256 * KiB))
    qimg("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw), path)
    import vdisk.formats.qcow2 as q

    monkeypatch.setattr(q, "zstandard", None)  # as on a machine without the module
    with closing(opened(path)) as d, pytest.raises(UnsupportedFeature, match="zstd"):
        d.read(0, 4096)


def test_backing_chain(tmp_path):
    base, top, raw = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2"), str(tmp_path / "r")
    qimg("create", "-q", "-f", "qcow2", base, "4M")
    qio(base, "write -P 0x10 0 4M")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 0x20 60k 70k", "write -z 1M 128k")
    with closing(opened(top)) as d:
        assert d.backing == BackingRef("base.qcow2", "qcow2")
        kinds = {e.kind for e in d.block_status(0, 4 * MiB)}
        assert kinds == {Kind.DATA, Kind.HOLE, Kind.ZERO}
    qimg("convert", "-O", "raw", top, raw)
    with vdisk.open(top, readonly=True) as d:
        assert d.read(0, 4 * MiB) == Path(raw).read_bytes()
    # writes through the generic layer (copy-up of partial clusters) stay qemu-consistent
    with vdisk.open(top) as d:
        d.write(3 * MiB - 100, b"\x30" * 70000)
        d.write_zeroes(2 * MiB, 65536)
    qimg("check", top)
    qio(
        top,
        "read -P 0x10 0 60k",
        "read -P 0x20 60k 70k",
        "read -P 0 1M 128k",
        "read -P 0x10 3000k 71k",
        "read -P 0x30 3145628 70000",
        "read -P 0 2M 64k",
    )


def test_internal_snapshots_from_qemu(tmp_path):
    path = str(tmp_path / "s.qcow2")
    qimg("create", "-q", "-f", "qcow2", path, "2M")
    qio(path, "write -P 0x01 0 1M")
    qimg("snapshot", "-c", "first", path)
    qio(path, "write -P 0x02 512k 1M")
    with closing(opened(path)) as d:
        snaps = d.list_snapshots()
        assert [s.name for s in snaps] == ["first"]
        assert snaps[0].size == 2 * MiB
        view = d.open_snapshot("first")
        assert view.read(0, 2 * MiB) == b"\x01" * MiB + bytes(MiB)
        with pytest.raises(ReadOnlyImage):
            view.write(0, b"x")
        view.close()
        assert d.read(0, 2 * MiB) == b"\x01" * (512 * KiB) + b"\x02" * MiB + bytes(512 * KiB)
    # writing over clusters shared with the snapshot copies them (L2 and data)
    with closing(opened(path, readonly=False)) as d:
        d.write(100 * KiB, b"\x03" * 300 * KiB)
        assert d.open_snapshot("first").read(0, MiB) == b"\x01" * MiB
    qimg("check", path)
    qio(path, "read -P 0x01 0 100k", "read -P 0x03 100k 300k", "read -P 0x02 512k 1M")
    raw = str(tmp_path / "first.raw")
    qimg("convert", "-O", "raw", "-l", "snapshot.name=first", path, raw)
    assert Path(raw).read_bytes() == b"\x01" * MiB + bytes(MiB)


def test_snapshot_create_revert_delete(tmp_path):
    path = str(tmp_path / "s.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "3M")
    qio(path, "write -P 0x01 0 2M", "write -c -P 0x07 2M 64k", "write -P 0x01 2112k 960k")
    with closing(opened(path, readonly=False)) as d:
        d.create_snapshot("mine")
        d.write(4000, b"\x02" * 10000)
        d.write(2 * MiB + 100, b"\x08" * 100)
    qimg("check", path)
    out = qimg("snapshot", "-l", path).stdout
    assert "mine" in out
    raw = str(tmp_path / "mine.raw")
    qimg("convert", "-O", "raw", "-l", "snapshot.name=mine", path, raw)
    data = Path(raw).read_bytes()
    assert data[:MiB] == b"\x01" * MiB and data[2 * MiB : 2 * MiB + 65536] == b"\x07" * 65536
    with closing(opened(path, readonly=False)) as d:
        d.revert_snapshot("mine")
        assert d.read(0, 3 * MiB) == data
    qimg("check", path)
    with closing(opened(path, readonly=False)) as d:
        d.write(0, b"\x09" * 8192)
        d.delete_snapshot("mine")
        assert d.list_snapshots() == []
    qimg("check", path)
    qio(path, "read -P 0x09 0 8192", "read -P 0x01 8192 1M", "read -P 0x07 2M 64k")


# -- images vdisk writes ---------------------------------------------------------------

WRITE_VARIANTS = [
    ("512-ref64-growth", {"cluster_size": 512, "refcount_bits": 64}),
    ("4k-v2", {"cluster_size": 4096, "compat": "0.10"}),
    ("4k-ref2", {"cluster_size": 4096, "refcount_bits": 2}),
    ("64k", {}),
    ("16k-extl2", {"cluster_size": 16384, "extended_l2": True}),
]


@pytest.mark.parametrize("opts", [v[1] for v in WRITE_VARIANTS], ids=[v[0] for v in WRITE_VARIANTS])
def test_random_writes_pass_qemu_check(tmp_path, opts):
    path, raw = str(tmp_path / "w.qcow2"), tmp_path / "w.raw"
    cs = opts.get("cluster_size", 65536)
    size = 6 * MiB + 1536  # the last cluster is partial (qemu sizes are whole sectors)
    Qcow2Driver.create(FileStorage(path, readonly=False, create=True), size, dict(opts))
    ref = bytearray(size)
    rnd = random.Random(7)
    # tiny caches: L2 tables and refcount blocks are evicted and written back all the time
    d = opened(path, readonly=False, l2_cache_size=2 * cs, refcount_cache_size=2 * cs)
    for i in range(150):
        off = rnd.randrange(size)
        n = min(rnd.randrange(1, 3 * cs), size - off)
        r = rnd.random()
        if r < 0.7:
            data = rnd.randbytes(n)
            d.write(off, data)
            ref[off : off + n] = data
        elif r < 0.85:
            d.write_zeroes(off, n)
            ref[off : off + n] = bytes(n)
        else:
            a = off - off % cs
            n = min(max(cs, n - n % cs), size - a)
            d.discard(a, n)
            ref[a : a + n] = bytes(n)
        if i % 40 == 0:
            d.flush()
    d.write(size - 1500, b"\xee" * 1500)  # up to the very end
    ref[size - 1500 :] = b"\xee" * 1500
    assert d.read(0, size) == ref
    d.close()
    raw.write_bytes(ref)
    qimg("check", path)
    qimg("compare", "-f", "qcow2", "-F", "raw", path, str(raw))
    qio(path, f"read -P 0xee {size - 1500} 1500")
    with closing(opened(path)) as d:
        assert d.check().exit_code == 0


@pytest.mark.parametrize("opts", [v[1] for v in WRITE_VARIANTS], ids=[v[0] for v in WRITE_VARIANTS])
def test_long_writes_pass_qemu_check(tmp_path, opts):
    """Writes of many clusters (what convert does): fresh clusters at the end of the file
    are allocated as one run and written with one pwrite; runs cross L2 tables and
    refcount blocks, meet allocated clusters, freed ones and the partial last cluster."""
    path, raw = str(tmp_path / "w.qcow2"), tmp_path / "w.raw"
    cs = opts.get("cluster_size", 65536)
    size = 2 * l2_span(cs, bool(opts.get("extended_l2"))) + 3 * cs + 1536
    size = min(size, 24 * MiB + 1536)
    Qcow2Driver.create(FileStorage(path, readonly=False, create=True), size, dict(opts))
    ref = bytearray(size)
    rnd = random.Random(11)
    d = opened(path, readonly=False, l2_cache_size=2 * cs, refcount_cache_size=2 * cs)

    def write(off: int, n: int) -> None:
        n = min(n, size - off)
        data = rnd.randbytes(n)
        d.write(off, memoryview(data))
        ref[off : off + n] = data

    write(3 * cs, 5 * cs)  # allocated clusters in the middle of later runs
    pos = 0
    while pos < size:  # sequential, cluster-aligned and not, with gaps
        n = rnd.randrange(2 * cs, 40 * cs) + rnd.choice([0, 0, 700])
        write(pos, n)
        pos += n + rnd.choice([0, 0, cs, 3 * cs + 512])
    d.flush()
    for _ in range(3):  # overwrites in place, then discards: freed clusters get reused
        a = rnd.randrange(size // cs) * cs
        write(a, rnd.randrange(2, 20) * cs)
    a = (size // cs // 3) * cs
    d.discard(a, 8 * cs)
    ref[a : a + 8 * cs] = bytes(8 * cs)
    d.flush()
    write(a - cs, 12 * cs)
    write(0, size)  # everything at once: overwrite in place
    assert d.read(0, size) == ref
    d.close()
    raw.write_bytes(ref)
    qimg("check", path)
    qimg("compare", "-f", "qcow2", "-F", "raw", path, str(raw))
    with closing(opened(path)) as d:
        assert d.check().exit_code == 0


def _compressible(rnd: random.Random, n: int) -> bytes:
    words = [rnd.randbytes(3).hex().encode() for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


@pytest.mark.parametrize(
    ("cs", "ctype", "rbits"),
    [
        (512, "zlib", 16),
        (4096, "zlib", 16),
        (65536, "zlib", 16),
        (512, "zstd", 16),
        (65536, "zstd", 16),
        (4096, "zlib", 1),
        (4096, "zstd", 2),
    ],
)
def test_compressed_writes_pass_qemu_check(tmp_path, cs, ctype, rbits):
    """compress=on (convert -c): whole clusters stored compressed and packed across host
    clusters (their sectors may share one, and the refcount counts each, up to what
    narrow refcounts hold), incompressible ones plainly; later overwrites and discards
    release the shared host clusters."""
    if ctype == "zstd":
        pytest.importorskip("zstandard")
    path, raw = str(tmp_path / "c.qcow2"), tmp_path / "c.raw"
    size = min(3 * l2_span(cs) + 5 * cs + 512, 8 * MiB + 512)
    opts = {"cluster_size": cs, "compression_type": ctype, "refcount_bits": rbits}
    Qcow2Driver.create(FileStorage(path, readonly=False, create=True), size, opts)
    ref = bytearray(size)
    rnd = random.Random(5)
    d = opened(path, readonly=False, compress="on", l2_cache_size=2 * cs)
    pos = 0
    while pos < size:
        n = min(rnd.randrange(1, 30) * cs + rnd.choice([0, 0, 100]), size - pos)
        data = bytearray(_compressible(rnd, n))
        for c in range(0, n - cs, 7 * cs):  # some clusters do not compress
            data[c : c + cs] = rnd.randbytes(cs)
        d.write(pos, bytes(data))
        ref[pos : pos + n] = data
        pos += n + rnd.choice([0, cs, 4 * cs])
        if rnd.random() < 0.2:
            d.flush()  # the next batch starts in a new host cluster
    assert d.read(0, size) == ref
    d.close()
    raw.write_bytes(ref)
    qimg("check", path)
    qimg("compare", "-f", "qcow2", "-F", "raw", path, str(raw))
    info = json.loads(qimg("check", "--output=json", path).stdout)
    assert info.get("compressed-clusters", 0) > info["allocated-clusters"] // 2
    with closing(opened(path, readonly=False)) as d:
        for _ in range(20):
            off = rnd.randrange(size)
            n = min(rnd.randrange(1, 3 * cs), size - off)
            if rnd.random() < 0.7:
                data = rnd.randbytes(n)
                d.write(off, data)
                ref[off : off + n] = data
            else:
                a = off - off % cs
                n = min(max(cs, n - n % cs), size - a)
                d.discard(a, n)
                ref[a : a + n] = bytes(n)
        assert d.read(0, size) == ref
    raw.write_bytes(ref)
    qimg("check", path)
    qimg("compare", "-f", "qcow2", "-F", "raw", path, str(raw))
    with closing(opened(path)) as d:
        assert d.check().exit_code == 0


def test_create_options_and_qemu_info(tmp_path):
    import json

    base = str(tmp_path / "b.raw")
    Path(base).write_bytes(b"\x42" * MiB)
    path = str(tmp_path / "o.qcow2")
    Qcow2Driver.create(
        FileStorage(path, readonly=False, create=True),
        MiB,
        {"cluster_size": 4096, "compat": "0.10", "backing": BackingRef("b.raw", "raw")},
    )
    info = json.loads(qimg("info", "--output", "json", path).stdout)
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["compat"] == "0.10"
    assert info["backing-filename"] == "b.raw" and info["backing-filename-format"] == "raw"
    qio(path, "read -P 0x42 0 1M")
    with closing(opened(path)) as d:
        assert d.backing == BackingRef("b.raw", "raw")
    with pytest.raises(VdiskError):
        Qcow2Driver.create(
            FileStorage(str(tmp_path / "x"), readonly=False, create=True),
            MiB,
            {"cluster_size": 3000},
        )


def test_api_roundtrip_and_growth(tmp_path):
    path, raw = str(tmp_path / "g.qcow2"), tmp_path / "g.raw"
    vdisk.create(path, "1M", format="qcow2", cluster_size=4096)
    with vdisk.open(path) as d:
        d.write(MiB - 3000, pattern(MiB - 3000, 3000))
        d.resize(40 * MiB)  # the L1 table must grow (one L2 table covers 2 MiB)
        d.write(39 * MiB + 5, pattern(39 * MiB + 5, 100000))
    ref = bytearray(40 * MiB)
    ref[MiB - 3000 : MiB] = pattern(MiB - 3000, 3000)
    ref[39 * MiB + 5 : 39 * MiB + 100005] = pattern(39 * MiB + 5, 100000)
    raw.write_bytes(ref)
    qimg("check", path)
    qimg("compare", "-f", "qcow2", "-F", "raw", path, str(raw))
    with closing(opened(path, readonly=False)) as d:
        assert d.size == 40 * MiB
        d.truncate(MiB - 1100)  # rounded up to 512 bytes, as qemu counts sectors
        assert d.size == MiB - 1024
        d.truncate(MiB - 1024)  # frees what lies past the end, zeroes the tail cluster
        d.truncate(40 * MiB)
        assert d.read(MiB - 4000, 4000) == bytes(1000) + pattern(MiB - 3000, 1976) + bytes(1024)
    ref[MiB - 1024 :] = bytes(len(ref) - MiB + 1024)
    raw.write_bytes(ref)
    assert qimg("check", path).stdout.count("leaked") == 0
    qimg("compare", "-f", "qcow2", "-F", "raw", path, str(raw))


def test_write_to_qemu_zero_and_extl2_images(tmp_path):
    path, raw = str(tmp_path / "z.qcow2"), str(tmp_path / "z.raw")
    qimg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", path, "2M")
    qio(path, "write -P 0x01 2k 2k", "write -z 64k 64k", "write -P 0x02 130k 6k")
    with closing(opened(path, readonly=False)) as d:
        d.write(3000, b"\x03" * 200)  # into a partly allocated cluster (subclusters)
        d.write(70 * KiB, b"\x04" * 1000)  # into a zero cluster
        d.write_zeroes(128 * KiB, 64 * KiB)
    qimg("check", path)
    qio(
        path,
        "read -P 0 0 2k",
        "read -P 0x01 2k 952",
        "read -P 0x03 3000 200",
        "read -P 0x01 3200 896",
        "read -P 0 4k 60k",
        "read -P 0 64k 6k",
        "read -P 0x04 70k 1000",
        "read -P 0 128k 64k",
    )
    qimg("convert", "-O", "raw", path, raw)
    with closing(opened(path)) as d:
        assert d.read(0, 2 * MiB) == Path(raw).read_bytes()


# -- flags, check, repair --------------------------------------------------------------


def test_dirty_lazy_refcounts_image_is_rebuilt(tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "4M")
    # qemu dies with the image dirty: refcounts of the new clusters were never written
    p = qio(path, "write -P 0x77 0 300k", "abort", check=False)
    assert p.returncode != 0
    with closing(opened(path)) as d:
        assert d.info()["dirty"] is True
        assert d.read(0, 300 * KiB) == b"\x77" * 300 * KiB
    assert qimg("check", path, check=False).returncode != 0
    with closing(opened(path, readonly=False)) as d:  # rebuilds, then clears the bit
        assert d.info()["dirty"] is False
        d.write(MiB, b"\x78" * 5000)
    qimg("check", path)
    qio(path, "read -P 0x77 0 300k", "read -P 0x78 1M 5000")


def test_check_finds_and_repairs_leaks(tmp_path):
    path = str(tmp_path / "leak.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    qio(path, "write -P 1 0 100k")
    with closing(opened(path, readonly=False)) as d:
        for _ in range(3):
            off = d.refs.alloc()  # allocated and written, never mapped: a leak
            d.io.write(off, b"\x99" * 4096)
    assert qimg("check", path, check=False).returncode == 3
    with closing(opened(path)) as d:
        rep = d.check()
        assert rep.exit_code == 3 and len(rep.leaks) == 3
    with closing(opened(path, readonly=False)) as d:
        rep = d.check(repair=True)
        assert len(rep.repaired) == 3 and rep.exit_code == 0
    qimg("check", path)
    qio(path, "read -P 1 0 100k")


def test_check_repairs_corruption_by_rebuild(tmp_path):
    path = str(tmp_path / "bad.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    qio(path, "write -P 1 0 100k")
    with closing(opened(path, readonly=False)) as d:
        d.refs.set_count(20, 0)  # a cluster in use now looks free
    assert qimg("check", path, check=False).returncode == 2
    with closing(opened(path)) as d:
        assert d.check().exit_code == 2
    with closing(opened(path, readonly=False)) as d:
        assert d.check(repair=True).exit_code == 0
    qimg("check", path)
    qio(path, "read -P 1 0 100k")


def test_corrupt_bit_refuses_writable_open(tmp_path):
    path = str(tmp_path / "c.qcow2")
    qimg("create", "-q", "-f", "qcow2", path, "1M")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    with closing(opened(path)) as d:
        assert d.info()["corrupt"] is True
    with pytest.raises(CorruptImage, match="marked corrupt"):
        opened(path, readonly=False)


def test_probe_and_registry():
    assert Qcow2Driver.probe(b"QFI\xfb\x00\x00\x00\x03" + bytes(100), 4096) == 100
    assert Qcow2Driver.probe(b"QFI\xfa\x00\x00\x00\x03", 4096) == 0
    from vdisk import formats

    assert formats.get("qcow2") is Qcow2Driver


# -- hostile images ----------------------------------------------------------------------


def _patched(tmp_path, edits: dict[int, bytes], *, size: str = "1M", opts: str = "", truncate=None):
    path = str(tmp_path / "h.qcow2")
    if os.path.exists(path):
        os.unlink(path)
    args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [path, size]
    qimg(*args)
    qio(path, "write -P 3 0 128k")
    with open(path, "r+b") as f:
        for off, data in edits.items():
            f.seek(off)
            f.write(data)
        if truncate is not None:
            f.truncate(truncate)
    return path


def _l1_offset(path) -> int:
    return struct.unpack(">Q", Path(path).read_bytes()[40:48])[0]


@pytest.mark.parametrize(
    ("edits", "err", "match"),
    [
        ({0: b"QFI\xfa"}, CorruptImage, "bad magic"),
        ({4: struct.pack(">I", 4)}, UnsupportedFeature, "version 4"),
        ({20: struct.pack(">I", 30)}, CorruptImage, "cluster_bits"),
        ({20: struct.pack(">I", 8)}, CorruptImage, "cluster_bits"),
        ({32: struct.pack(">I", 1)}, UnsupportedFeature, "encrypted"),
        ({32: struct.pack(">I", 2)}, UnsupportedFeature, "LUKS"),
        ({36: struct.pack(">I", 0x7FFFFFFF)}, CorruptImage, "l1_size"),
        ({36: struct.pack(">I", 0)}, CorruptImage, "too small"),
        ({40: struct.pack(">Q", 1 << 40)}, CorruptImage, "L1 table"),
        ({40: struct.pack(">Q", 65536 + 8)}, CorruptImage, "L1 table"),
        ({48: struct.pack(">Q", 1 << 40)}, CorruptImage, "refcount table"),
        ({56: struct.pack(">I", 100000)}, CorruptImage, "refcount_table_clusters"),
        ({56: struct.pack(">I", 0)}, CorruptImage, "refcount_table_clusters"),
        ({60: struct.pack(">I", 10**6)}, CorruptImage, "nb_snapshots"),
        ({60: struct.pack(">I", 3), 64: struct.pack(">Q", 1 << 30)}, CorruptImage, "snapshot"),
        ({72: struct.pack(">Q", 1 << 40)}, UnsupportedFeature, "bit 40"),
        ({72: struct.pack(">Q", 4)}, UnsupportedFeature, "external data file"),
        ({96: struct.pack(">I", 7)}, CorruptImage, "refcount_order"),
        ({100: struct.pack(">I", 1 << 20)}, CorruptImage, "header_length"),
        ({8: struct.pack(">QI", 4000, 5000)}, CorruptImage, "backing file name"),
        ({112: struct.pack(">II", 0xE2792ACA, 1 << 20)}, CorruptImage, "header extension"),
    ],
)
def test_hostile_headers(tmp_path, edits, err, match):
    path = _patched(tmp_path, edits)
    with pytest.raises(err, match=match):
        opened(path)


def test_hostile_tables(tmp_path):
    # truncated file
    path = _patched(tmp_path, {}, truncate=50)
    with pytest.raises(CorruptImage, match="too small"):
        opened(path)
    # L2 table pointing past the end of the file
    path = _patched(tmp_path, {})
    with open(path, "r+b") as f:
        f.seek(_l1_offset(path))
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    with closing(opened(path)) as d:
        with pytest.raises(CorruptImage, match="past the end"):
            d.read(0, 4096)
        rep = d.check()
        assert rep.exit_code == 2
    # an L1 entry that points at the L1 table itself, a refcount table entry pointing at
    # the refcount table: garbage, but no hang and no crash
    path = _patched(tmp_path, {})
    l1 = _l1_offset(path)
    rt = struct.unpack(">Q", Path(path).read_bytes()[48:56])[0]
    with open(path, "r+b") as f:
        f.seek(l1)
        f.write(struct.pack(">Q", l1 | (1 << 63)))
        f.seek(rt)
        f.write(struct.pack(">Q", rt))
    with closing(opened(path)) as d:
        try:
            d.read(0, 256 * KiB)
        except CorruptImage:
            pass
        assert d.check().exit_code == 2
    # a compressed cluster that does not decompress
    raw, path = tmp_path / "p.raw", str(tmp_path / "p.qcow2")
    raw.write_bytes(pattern(0, 256 * KiB))
    qimg("convert", "-c", "-O", "qcow2", str(raw), path)
    data = bytearray(Path(path).read_bytes())
    l2 = struct.unpack(">Q", data[_l1_offset(path) : _l1_offset(path) + 8])[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack(">Q", data[l2 : l2 + 8])[0]
    host = entry & ((1 << 54) - 1)
    data[host : host + 64] = b"\xff" * 64
    Path(path).write_bytes(data)
    with closing(opened(path)) as d, pytest.raises(CorruptImage, match="decompress"):
        d.read(0, 4096)


def test_hostile_through_api_is_one_clear_error(tmp_path):
    path = _patched(tmp_path, {36: struct.pack(">I", 0x7FFFFFFF)})
    with pytest.raises(CorruptImage) as ei:
        vdisk.open(path, readonly=True)
    assert "h.qcow2" in str(ei.value) and "l1_size" in str(ei.value)


# -- crash consistency -----------------------------------------------------------------


class CrashStorage(MemoryStorage):
    """A store that knows what is durable: a sync makes earlier writes durable; a crash
    keeps the durable bytes plus any subset of the writes since (the disk may reorder
    them). At each sync, before it takes effect, one possible crash image is recorded."""

    def __init__(self, data: bytes, rng: random.Random, limit: int) -> None:
        super().__init__("crash.qcow2", data)
        self.durable = bytearray(data)
        self.pending: list[tuple[int, bytes]] = []
        self.rng, self.limit = rng, limit
        self.crashes: list[bytes] = []

    def pwrite(self, offset, data) -> None:
        super().pwrite(offset, data)
        self.pending.append((offset, bytes(data)))
        if self.rng.random() < 0.05:
            self._crash()  # a crash may come at any moment, not only at a sync

    def punch_hole(self, offset: int, length: int) -> None:
        self.pwrite(offset, bytes(length))

    def truncate(self, size: int) -> None:
        super().truncate(size)
        self.sync()

    def _crash(self) -> None:
        if self.pending and len(self.crashes) < self.limit:
            img = bytearray(self.durable)
            for off, data in self.pending:
                if self.rng.random() < 0.5:
                    if off + len(data) > len(img):
                        img.extend(bytes(off + len(data) - len(img)))
                    img[off : off + len(data)] = data
            self.crashes.append(bytes(img))

    def sync(self) -> None:
        self._crash()
        self.durable = bytearray(self.buf)
        self.pending = []


@pytest.mark.parametrize("cs", [512, 4096])
def test_crash_at_every_sync_leaves_a_consistent_image(tmp_path, cs):
    path = str(tmp_path / "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},refcount_bits=64", path, "4M")
    # with 512-byte clusters the first refcount table covers 2 MiB of file: start near
    # that, so the table has to grow while we write
    base = 1960 * KiB if cs == 512 else 64 * cs
    qio(path, f"write -P 0x01 0 {base}")
    qimg("snapshot", "-c", "s", path)
    rng = random.Random(cs)
    st = CrashStorage(Path(path).read_bytes(), rng, limit=50 if cs == 512 else 100)
    d = Qcow2Driver.open(
        st, readonly=False, options={"l2_cache_size": cs, "refcount_cache_size": cs}
    )
    written = {c: {0, 1} if c < base // cs else {0} for c in range(8 * MiB // cs)}
    table_at = d.refs.table_offset
    for step in range(40):
        c = rng.randrange(4 * MiB // cs - 4)
        n = rng.randrange(1, 4)
        byte = 2 + step
        if rng.random() < 0.8:
            d.write(c * cs, bytes([byte]) * (n * cs))
            for k in range(c, c + n):
                written[k].add(byte)
        else:
            d.discard(c * cs, n * cs)
        if step == 10:
            d.create_snapshot("mine")
        if step == 20:
            d.truncate(8 * MiB)  # L1 growth in the middle
        if step == 30:
            d.delete_snapshot("s")
        if step % 5 == 4:
            d.flush()
    assert cs != 512 or d.refs.table_offset != table_at  # the refcount table did move
    d.close()
    assert len(st.crashes) >= 10
    img = tmp_path / "crash.qcow2"
    dirty_seen = 0
    for i, crash in enumerate(st.crashes):
        img.write_bytes(crash)
        if struct.unpack(">Q", crash[72:80])[0] & 1:
            dirty_seen += 1
            # dirty (a snapshot operation was under way): a read-write open repairs
            opened(img, readonly=False).close()
            p = qimg("check", str(img), check=False)
            assert p.returncode == 0, f"dirty crash image {i}: {p.stdout}"
        p = qimg("check", str(img), check=False)
        assert p.returncode in (0, 3), f"crash image {i}: {p.stdout}"
        with closing(opened(img)) as r:
            size = r.size
            data = r.read(0, size)
        for k in range(size // cs):
            chunk = data[k * cs : (k + 1) * cs]
            assert chunk == bytes([chunk[0]]) * cs and chunk[0] in written[k], (i, k)
    assert dirty_seen > 0  # crashes inside the snapshot operations were tried


def test_set_backing_rewrites_header(tmp_path):
    a, b, top = (str(tmp_path / n) for n in ("a.raw", "b.qcow2", "top.qcow2"))
    Path(a).write_bytes(b"\x0a" * MiB)
    qimg("create", "-q", "-f", "qcow2", b, "1M")
    qio(b, "write -P 0x0b 0 1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "a.raw", "-F", "raw", top)
    qio(top, "write -P 0x0c 64k 64k")
    with closing(opened(top, readonly=False)) as d:
        d.set_backing(BackingRef("b.qcow2", "qcow2"))
    out = qimg("info", top).stdout
    assert "backing file: b.qcow2" in out and "backing file format: qcow2" in out
    qimg("check", top)
    qio(top, "read -P 0x0b 0 64k", "read -P 0x0c 64k 64k", "read -P 0x0b 128k 896k")
    with closing(opened(top, readonly=False)) as d:
        d.set_backing(None)
        assert d.backing is None
    assert "backing file" not in qimg("info", top).stdout
    qio(top, "read -P 0 0 64k", "read -P 0x0c 64k 64k")


def test_allocation_never_overwrites_metadata_of_a_corrupt_image(tmp_path):
    path = str(tmp_path / "m.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    qio(path, "write -P 1 0 8k")
    with closing(opened(path, readonly=False)) as d:
        d.refs.set_count(d.l1_offset // 4096, 0)  # the L1 table's cluster now looks free
    before = Path(path).read_bytes()
    d = opened(path, readonly=False)
    with pytest.raises(CorruptImage, match="holds the L1 table"):
        d.write(512 * KiB, b"\x02" * 4096)
    d.storage.close()
    assert Path(path).read_bytes()[: len(before)] == before


def test_check_reports_and_repairs_a_lost_refcount_block(tmp_path):
    path = str(tmp_path / "rb.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "2M")
    qio(path, "write -P 4 0 200k")
    rt = struct.unpack(">Q", Path(path).read_bytes()[48:56])[0]
    with open(path, "r+b") as f:
        f.seek(rt)
        f.write(struct.pack(">Q", 1 << 40))  # the first refcount block is now past EOF
    with closing(opened(path)) as d:
        rep = d.check()
        assert rep.exit_code == 2 and "refcount block 0" in rep.corruptions[0]
    d = opened(path, readonly=False)
    with pytest.raises(CorruptImage, match="past the end"):
        d.write(MiB, b"x" * 4096)
    d.storage.close()
    with closing(opened(path, readonly=False)) as d:
        rep = d.check(repair=True)
        assert rep.exit_code == 0 and rep.repaired[0] == "rebuilt the refcount structures"
    qimg("check", path)
    qio(path, "read -P 4 0 200k")


def test_compact_releases_free_space(tmp_path):
    path = str(tmp_path / "k.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "8M")
    qio(path, "write -P 1 0 2M", "write -P 2 6M 2M")
    qio(path, "discard 0 1M", "discard 6M 2M")
    # space the host still holds but qcow2 does not use: junk in free clusters inside the
    # file (as an older writer may leave) and a free tail
    with closing(opened(path)) as d:
        free = [c for c in range(os.path.getsize(path) // 65536) if d.refs.get(c) == 0]
    assert len(free) >= 8
    with open(path, "r+b") as f:
        for c in free[:8]:
            f.seek(c * 65536)
            f.write(b"\xff" * 65536)
        f.seek(0, 2)
        f.write(b"\xee" * 2 * MiB)
    size_before = os.path.getsize(path)
    with closing(opened(path, readonly=False)) as d:
        released = d.compact()
    assert released >= 2 * MiB + 8 * 65536
    assert os.path.getsize(path) <= size_before - 2 * MiB
    qimg("check", path)
    qio(path, "read -P 0 0 1M", "read -P 1 1M 1M", "read -P 0 6M 2M")


def test_fuzzed_metadata_gives_only_vdisk_errors(tmp_path):
    """Random damage to the header, L1, L2, refcount and snapshot tables: every outcome is
    data or a VdiskError (never another exception), and the work stays bounded."""
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", a, "3M")
    qio(a, "write -P 1 0 300k", "write -z 1M 64k", "write -c -P 3 2M 4k")
    qimg("snapshot", "-c", "s", a)
    qio(a, "write -P 2 100k 10k")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", b, "2M")
    qio(b, "write -P 1 0 3k", "write -P 1 40k 100k")
    bases = [Path(a).read_bytes(), Path(b).read_bytes()]

    def regions(img: bytes) -> list[tuple[int, int]]:
        l1, rt, snap = (struct.unpack_from(">Q", img, o)[0] for o in (40, 48, 64))
        l2 = struct.unpack_from(">Q", img, l1)[0] & 0x00FFFFFFFFFFFE00
        rb = struct.unpack_from(">Q", img, rt)[0]
        out = [(0, 200), (l1, 64), (rt, 64), (l2, 512), (rb, 512)]
        return [*out, (snap, 120)] if snap else out

    rng = random.Random(2024)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        base = rng.choice(bases)
        data = bytearray(base)
        regs = regions(base)
        for _ in range(rng.randint(1, 4)):
            start, n = rng.choice(regs)
            i = start + rng.randrange(n)
            data[i] = (
                rng.randrange(256) if rng.random() < 0.5 else data[i] ^ (1 << rng.randrange(8))
            )
        try:
            d = Qcow2Driver.open(MemoryStorage("fuzz", bytes(data)), readonly=False, options={})
            size = min(d.size, 4 * MiB)
            d.read(0, size)
            d.block_status(0, d.size)
            for s in d.list_snapshots():
                d.open_snapshot(s.name).read(0, min(size, MiB))
            d.check()
            d.write(rng.randrange(max(1, size - 70000)), b"z" * 70000)
            d.write_zeroes(0, min(size, 65536))
            d.check(repair=True)
            d.close()
            outcomes["ok"] += 1
        except VdiskError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 10


def test_mapping_caches_stay_bounded(tmp_path):
    path = str(tmp_path / "many.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "128M")
    # one write at every L2 boundary (an L2 table of 4 KiB clusters maps 2 MiB)
    qio(path, *(f"write -P {i + 1} {i * 2 * MiB - 100} 200" for i in range(1, 64)))
    with closing(opened(path, l2_cache_size=16384, refcount_cache_size=8192)) as d:
        for i in range(1, 64):
            assert d.read(i * 2 * MiB - 100, 200) == bytes([i + 1]) * 200
        st = d.stats()
        assert st["l2_cache"]["bytes"] <= 16384 and st["l2_cache"]["evictions"] > 50
        assert d.check().exit_code == 0
        assert d.refs.cache.used <= 8192


def test_huge_sparse_disk(tmp_path):
    path = str(tmp_path / "huge.qcow2")
    size = 4 << 40
    qimg("create", "-q", "-f", "qcow2", path, str(size))
    qio(path, f"write -P 7 {3 << 40} 1M")
    with closing(opened(path, readonly=False)) as d:
        ext = d.block_status(0, size)  # one piece per unmapped L2 range, not per cluster
        assert [e.kind for e in ext] == [Kind.HOLE, Kind.DATA, Kind.HOLE]
        assert ext[1].offset == 3 << 40 and ext[1].length == MiB
        d.write(size - 100000, b"\x08" * 100000)
        d.discard(0, 1 << 40)
        assert d.check().exit_code == 0
    qimg("check", path)
    qio(path, f"read -P 7 {3 << 40} 1M", f"read -P 8 {size - 100000} 100000")
