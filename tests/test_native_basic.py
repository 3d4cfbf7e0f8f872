"""The native driver through the public API and directly: geometry, big images, backing
identity, periodic commit, space reclaim, hostile headers."""

from __future__ import annotations

import dataclasses
import os
import random
import time
import tracemalloc

import pytest

import vdisk
from vdisk.errors import BackingMismatch, CorruptImage, UnsupportedFeature, UsageError
from vdisk.formats import native_layout as L
from vdisk.formats.base import BackingRef, Kind
from vdisk.formats.native import NativeDriver
from vdisk.storage import FileStorage, MemoryStorage


def _pattern(off: int, n: int) -> bytes:
    words = b"".join((i).to_bytes(8, "little") for i in range(off // 8, (off + n) // 8 + 2))
    s = off % 8
    return words[s : s + n]


def test_probe() -> None:
    st = MemoryStorage()
    NativeDriver.create(st, 1 << 20, {})
    assert NativeDriver.probe(st.pread(0, 65536), st.size()) == 100
    assert NativeDriver.probe(b"QFI\xfb" + bytes(100), 104) == 0


@pytest.mark.parametrize("cs", [4096, 65536, 2 << 20])
def test_api_roundtrip_across_boundaries(tmp_path, cs: int) -> None:
    p = str(tmp_path / "a.vdisk")
    size = 7 * cs + 1000
    vdisk.create(p, size, cluster_size=cs)
    model = bytearray(size)
    with vdisk.open(p, cache_mb=0) as d:
        for off, n in [
            (cs - 100, 300),
            (0, cs),
            (2 * cs - 1, cs + 2),
            (size - 1500, 1500),
            (10, 5),
        ]:
            data = _pattern(off, n)
            d.write(off, data)
            model[off : off + n] = data
        d.write_zeroes(3 * cs + 7, cs)
        model[3 * cs + 7 : 4 * cs + 7] = bytes(cs)
        assert d.read(0, size) == model
    with vdisk.open(p, readonly=True) as d:
        assert d.read(0, size) == model
        assert d.read(cs - 50, 100) == model[cs - 50 : cs + 50]
        info = d.info()["format-specific"]
        assert info["cluster_size"] == cs and info["allocated_clusters"] >= 3
        assert d.check().exit_code == 0
        assert "metadata_cache" in d.stats()["format"]


def test_one_tib_image_is_instant_and_tiny(tmp_path) -> None:
    p = str(tmp_path / "big.vdisk")
    t = time.perf_counter()
    vdisk.create(p, "1T")
    with vdisk.open(p) as d:
        assert d.size == 1 << 40
        assert d.read((1 << 40) - 4096, 4096) == bytes(4096)
        d.write(1 << 39, b"x" * 5000)
        d.write((1 << 40) - 10, b"y" * 10)
    with vdisk.open(p, readonly=True) as d:
        assert d.read(1 << 39, 5000) == b"x" * 5000
        assert d.read((1 << 40) - 10, 10) == b"y" * 10
        ext = d.block_status(0, 1 << 40)
        assert len(ext) <= 5 and ext[0].kind == Kind.HOLE
    elapsed = time.perf_counter() - t
    assert elapsed < 1.0, elapsed
    assert os.stat(p).st_blocks * 512 <= 64 * 1024


def test_empty_one_tib_open_is_fast(tmp_path) -> None:
    p = str(tmp_path / "big.vdisk")
    vdisk.create(p, "1T", cluster_size=4096)
    t = time.perf_counter()
    d = NativeDriver.open(FileStorage(p, readonly=True), readonly=True, options={})
    assert d.read(123 << 30, 1 << 20) == bytes(1 << 20)
    d.close()
    assert time.perf_counter() - t < 0.5
    assert os.stat(p).st_blocks * 512 <= 16 * 1024


def test_discard_truncate_and_compact_free_space(tmp_path) -> None:
    p = str(tmp_path / "c.vdisk")
    vdisk.create(p, "8M", cluster_size=65536)
    with vdisk.open(p) as d:
        d.write(0, os.urandom(8 << 20))
        d.flush()
        full = os.path.getsize(p)
        d.discard(0, 4 << 20)
        d.resize(6 << 20)
        d.flush()
        drv = d.driver
        assert drv.info()["allocated_clusters"] == 32
        released = drv.compact()
        assert released > 0
        assert os.stat(p).st_blocks * 512 < full * 0.7
        assert d.check().exit_code == 0
        d.resize(8 << 20)
        assert d.read(4 << 20, 4 << 20) == os.urandom(0) + d.read(4 << 20, 2 << 20) + bytes(2 << 20)
    with vdisk.open(p) as d:
        assert d.read(6 << 20, 2 << 20) == bytes(2 << 20)
        assert d.check().exit_code == 0


def test_rewrites_reuse_space(tmp_path) -> None:
    p = str(tmp_path / "r.vdisk")
    vdisk.create(p, "1M", cluster_size=4096)
    with vdisk.open(p, commit_interval=None) as d:
        for _i in range(30):
            d.write(0, os.urandom(1 << 20))
            d.flush()
        slots = d.driver.host_slots
    # old versions are freed and reused, not appended forever: live data, the version the
    # other header copy still references, and the one being written (DESIGN: freed space
    # is reused only after the next commit is durable)
    assert slots < 3 * 256 + 40, slots


def test_periodic_commit_without_threads() -> None:
    st = MemoryStorage()
    NativeDriver.create(st, 1 << 20, {"cluster_size": 4096})
    d = NativeDriver.open(st, readonly=False, options={"commit_interval": 0.05})
    g = d.generation
    d.write(0, b"a" * 4096)
    assert d.generation == g
    time.sleep(0.06)
    d.write(4096, b"b" * 4096)
    assert d.generation == g + 1
    d.close()


def test_write_many_parallel_matches_serial() -> None:
    blobs = [(i * 65536, os.urandom(30000) + bytes(35536)) for i in range(16)]
    images = []
    for workers in (1, 2):
        st = MemoryStorage()
        NativeDriver.create(st, 1 << 20, {})
        d = NativeDriver.open(st, readonly=False, options={"workers": workers})
        d.write_many(blobs)
        assert d.read(0, 1 << 20) == b"".join(b for _o, b in blobs)
        d.close()
        images.append(st)
    d = NativeDriver.open(images[1], readonly=True, options={})
    assert d.check().exit_code == 0


def test_unknown_options_and_bad_cluster_size() -> None:
    st = MemoryStorage()
    with pytest.raises(UsageError, match="cluster size"):
        NativeDriver.create(st, 1 << 20, {"cluster_size": 3000})
    with pytest.raises(UsageError, match="cluster size"):
        NativeDriver.create(st, 1 << 20, {"cluster_size": 4 << 20})
    with pytest.raises(UsageError, match="unknown option"):
        NativeDriver.create(st, 1 << 20, {"colour": 1})
    NativeDriver.create(st, 1 << 20, {})
    with pytest.raises(UsageError, match="unknown option"):
        NativeDriver.open(st, readonly=True, options={"colour": 1})


# -- backing ------------------------------------------------------------------------------


def test_native_backing_identity(tmp_path) -> None:
    base, top = str(tmp_path / "base.vdisk"), str(tmp_path / "top.vdisk")
    vdisk.create(base, "2M", cluster_size=4096)
    with vdisk.open(base) as d:
        d.write(0, b"B" * 8192)
    vdisk.create(top, None, backing=base)
    with vdisk.open(top) as d:
        assert d.read(0, 8192) == b"B" * 8192
        d.write(4096, b"T" * 4096)
        assert d.read(0, 8192) == b"B" * 4096 + b"T" * 4096
        info = d.driver.info()
        assert info["backing"]["path"] == "base.vdisk"
        assert info["backing"]["identity"].startswith("vdisk uuid")
    with vdisk.open(base) as d:
        d.write(0, b"C" * 10)
    with pytest.raises(BackingMismatch, match="changed since"):
        vdisk.open(top)


def test_foreign_backing_identity_and_set_backing(tmp_path) -> None:
    base, other, top = (str(tmp_path / n) for n in ("b.raw", "o.raw", "t.vdisk"))
    with open(base, "wb") as f:
        f.write(b"R" * (1 << 20))
    with open(other, "wb") as f:
        f.write(b"S" * (1 << 20))
    vdisk.create(top, None, backing=base, backing_format="raw")
    with vdisk.open(top, readonly=True) as d:
        assert d.read(100, 10) == b"R" * 10
    with open(base, "r+b") as f:
        f.write(b"X")
    with pytest.raises(BackingMismatch, match="head/tail xxh3"):
        vdisk.open(top)
    st = FileStorage(top, readonly=False)
    drv = NativeDriver.open(st, readonly=False, options={})
    ob = vdisk.formats.get("raw").open(FileStorage(other, readonly=True), readonly=True, options={})
    drv.set_backing(BackingRef("o.raw", "raw"), ob)
    ob.close()
    drv.close()
    with vdisk.open(top, readonly=True) as d:
        assert d.read(100, 10) == b"S" * 10


# -- hostile and damaged headers ---------------------------------------------------------------


def _image(cs: int = 4096) -> bytearray:
    st = MemoryStorage()
    NativeDriver.create(st, 1 << 20, {"cluster_size": cs})
    d = NativeDriver.open(st, readonly=False, options={})
    d.write(0, _pattern(0, 300000))
    d.close()
    return st.buf


def _with_header(buf: bytearray, **changes: object) -> MemoryStorage:
    """Both header copies replaced by the newest one with ``changes`` (valid checksum)."""
    fsize = len(buf)
    hdrs = []
    for off in L.HEADER_OFFSETS:
        try:
            hdrs.append(L.parse_header(bytes(buf[off : off + 4096]), "x", off, fsize))
        except Exception:
            pass
    h = dataclasses.replace(max(hdrs, key=lambda h: h.generation), **changes)
    raw = h.pack()
    out = bytearray(buf)
    for off in L.HEADER_OFFSETS:
        out[off : off + 4096] = raw + bytes(4096 - len(raw))
    return MemoryStorage("hostile.vdisk", bytes(out))


def _open(st: MemoryStorage) -> NativeDriver:
    return NativeDriver.open(st, readonly=True, options={})


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"cluster_bits": 30}, "cluster bits 30"),
        ({"cluster_bits": 9}, "cluster bits 9"),
        ({"size": 1 << 63}, "guest size"),
        ({"depth": 0}, "mapping depth 0"),
        ({"depth": 99}, "mapping depth 99"),
        ({"host_slots": 1 << 40}, "host slot count"),
        ({"host_slots": 0}, "host slot count"),
        ({"rdepth": 50}, "refcount depth"),
        ({"snap_count": 1 << 20}, "snapshot count"),
        ({"backing_kind": 7, "backing_path": "x"}, "backing kind"),
        ({"root": L.Entry(1 << 50, 100, 1, 0, 0, 0)}, "outside the allocated area"),
        ({"root": L.Entry(4097, 100, 1, 0, 0, 0)}, "not aligned"),
        ({"root": L.Entry(8192 * 4, 1 << 30, 1, 0, 0, 0)}, "stored length"),
        ({"root": L.Entry(8192 * 4, 100, 9, 0, 0, 0)}, "codec"),
        ({"root": L.Entry(8192 * 4, 100, 1, 0x80, 0, 0)}, "flags"),
        ({"root": L.Entry(8192 * 4, 100, 1, 0, 0, 0)}, "checksum"),
        ({"deferred": L.Entry(8192, 1 << 30, 0, 0, 0, 0), "deferred_runs": 5}, "deferred"),
        ({"snap_table": L.Entry(1 << 40, 100, 0, 0, 0, 0), "snap_count": 1}, "snapshot table"),
    ],
)
def test_hostile_header_fields(changes: dict, match: str) -> None:
    st = _with_header(_image(), **changes)
    tracemalloc.start()
    try:
        with pytest.raises((CorruptImage, UnsupportedFeature), match=match):
            d = _open(st)
            d.read(0, 1 << 20)
            d.check()
            raise CorruptImage(f"not detected; wanted {match}")
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


def test_unknown_incompatible_bit_names_the_bit() -> None:
    with pytest.raises(UnsupportedFeature, match="incompatible feature bit 5"):
        _open(_with_header(_image(), incompat=1 << 5))
    d = _open(_with_header(_image(), compat=1 << 7, autoclear=1 << 3))  # ignored
    assert d.read(0, 8) == _pattern(0, 8)


def test_truncated_files() -> None:
    buf = _image()
    with pytest.raises(CorruptImage, match="too short"):
        _open(MemoryStorage("t", bytes(buf[:100])))
    # an intact newest header that names slots past the end is an error, not a reason to
    # fall back silently to the older copy
    with pytest.raises(CorruptImage, match="host slot count"):
        _open(MemoryStorage("t", bytes(buf[:9000])))
    d = _open(MemoryStorage("t", bytes(4096) + bytes(buf[4096:])))  # the other copy serves
    assert d.check().exit_code == 0
    st = MemoryStorage("t", bytes(buf[: len(buf) // 2]))
    with pytest.raises(CorruptImage):
        d = _open(st)
        d.read(0, 1 << 20)


def test_garbage_file_is_not_an_image() -> None:
    with pytest.raises(CorruptImage):
        _open(MemoryStorage("g", os.urandom(100000)))
    with pytest.raises(CorruptImage, match="bad magic"):
        _open(MemoryStorage("g", bytes(100000)))


def test_version_is_checked() -> None:
    buf = _image()
    out = bytearray(buf)
    for off in L.HEADER_OFFSETS:
        n = L.HEADER.size
        length = int.from_bytes(out[off + 12 : off + 16], "little")
        out[off + 8 : off + 12] = (7).to_bytes(4, "little")
        body = bytes(out[off : off + length - 8])
        out[off + length - 8 : off + length] = L.codec.checksum(body).to_bytes(8, "little")
        assert n
    with pytest.raises(UnsupportedFeature, match="version 7"):
        _open(MemoryStorage("v", bytes(out)))


def test_commit_into_native_base_repins_identity(tmp_path) -> None:
    from vdisk import ops

    base, top = str(tmp_path / "base.vdisk"), str(tmp_path / "top.vdisk")
    vdisk.create(base, "1M", cluster_size=4096)
    with vdisk.open(base) as d:
        d.write(0, b"b" * 20000)
    vdisk.create(top, None, backing=base)
    with vdisk.open(top) as d:
        d.write(8192, b"t" * 4096)
    ops.commit(top)
    with vdisk.open(base, readonly=True) as d:
        assert d.read(0, 20000) == b"b" * 8192 + b"t" * 4096 + b"b" * 7712
    with vdisk.open(top, readonly=True) as d:  # pinned to the base's new generation
        assert d.read(0, 20000) == b"b" * 8192 + b"t" * 4096 + b"b" * 7712
        assert d.driver.info()["backing"]["identity"].startswith("vdisk uuid")


def _rewrite_root(buf: bytearray, new_node: bytes) -> MemoryStorage:
    """Append ``new_node`` as the mapping root (valid checksums everywhere) of image ``buf``."""
    d = _open(MemoryStorage("x", bytes(buf)))
    cs = d.cluster_size
    cdc, stored, cks = L.codec.encode(new_node)
    host = d.host_slots * cs
    out = bytearray(buf) + bytes(max(0, host - len(buf))) + stored + bytes(cs - len(stored))
    root = L.Entry(host, len(stored), cdc, 0, cks, 0)
    return _with_header(out, root=root, host_slots=d.host_slots + 1)


def test_aliased_tables_are_found_by_check() -> None:
    """A hostile image whose root points twice at the same table (checksums recomputed:
    xxh3 is not a MAC) reads without hanging, and check() reports the double reference."""
    st = MemoryStorage()
    NativeDriver.create(st, 4 << 20, {"cluster_size": 4096})
    d = NativeDriver.open(st, readonly=False, options={})
    d.write(0, b"a" * 4096)
    d.write(200 * 4096, b"b" * 4096)
    d.close()
    d = _open(MemoryStorage("x", bytes(st.buf)))
    assert d.map.depth == 2
    node = bytearray(d.map.load(d.map.root, 1))
    node[32:64] = node[0:32]
    hostile = _rewrite_root(st.buf, bytes(node))
    h = _open(hostile)
    assert h.read(128 * 4096, 4096) == b"a" * 4096  # consistent, if forged
    rep = h.check()
    assert rep.exit_code == 2
    assert any("references" in c for c in rep.corruptions), rep.corruptions
    w = NativeDriver.open(hostile, readonly=False, options={"commit_interval": 0})
    with pytest.raises(CorruptImage, match="referenced more often"):
        w.discard(0, 4 << 20)  # freeing the aliased table twice is refused, not done


def test_root_pointing_at_a_data_cluster_is_an_error() -> None:
    st = MemoryStorage()
    NativeDriver.create(st, 4 << 20, {"cluster_size": 4096})
    d = NativeDriver.open(st, readonly=False, options={})
    d.write(0, os.urandom(4096))
    d.close()
    d = _open(MemoryStorage("x", bytes(st.buf)))
    data_entry = d._entry(0)
    assert data_entry is not None
    hostile = _with_header(st.buf, root=data_entry)
    with pytest.raises(CorruptImage):
        h = _open(hostile)
        h.read(0, 4 << 20)
        if h.check().exit_code == 2:
            raise CorruptImage("found by check")


def test_metadata_cache_is_bounded_and_counted() -> None:
    st = MemoryStorage()
    NativeDriver.create(st, 64 << 20, {"cluster_size": 4096})
    d = NativeDriver.open(st, readonly=False, options={"metadata_cache_mb": 0.05})
    for i in range(0, 64 << 20, 1 << 20):
        d.write(i, b"x" * 4096)
    d.flush()
    for i in range(0, 64 << 20, 1 << 20):
        assert d.read(i, 4) == b"xxxx"
    s = d.stats()["metadata_cache"]
    assert s["capacity"] == int(0.05 * (1 << 20)) and s["bytes"] <= s["capacity"] + 4096
    assert s["misses"] > 0 and s["hits"] > 0 and s["evictions"] > 0


def test_open_and_close_without_writes_does_not_commit(tmp_path) -> None:
    """Opening a base for writing and closing it unchanged must not change its identity
    (overlays pin the generation)."""
    p = str(tmp_path / "n.vdisk")
    vdisk.create(p, "1M")
    for _ in range(2):
        with vdisk.open(p) as d:
            gen = d.driver.generation
            d.read(0, 4096)
        with vdisk.open(p, readonly=True) as d:
            assert d.driver.generation == gen
        with vdisk.open(p) as d:
            d.write(0, b"x")


def test_check_finds_and_repairs_leaks() -> None:
    st = MemoryStorage("leak.vdisk")
    NativeDriver.create(st, 1 << 20, {"cluster_size": 4096})
    d = NativeDriver.open(st, readonly=False, options={})
    d.write(0, os.urandom(50000))
    leaked = [d._alloc() for _ in range(3)]
    d.txn_new.difference_update(leaked)  # as if a crashed writer had counted them
    d.flush()
    rep = d.check()
    assert rep.exit_code == 3 and len(rep.leaks) == 3
    assert all(f"slot {s} " in " ".join(rep.leaks) for s in leaked)
    rep = d.check(repair=True)
    assert len(rep.repaired) == 3 and rep.exit_code == 0
    d.close()
    d = NativeDriver.open(st, readonly=True, options={})
    assert d.check().exit_code == 0


def test_refcount_too_low_is_corruption() -> None:
    st = MemoryStorage("low.vdisk")
    NativeDriver.create(st, 1 << 20, {"cluster_size": 4096})
    d = NativeDriver.open(st, readonly=False, options={})
    d.write(0, os.urandom(8192))
    d.flush()
    e = d._entry(0)
    assert e is not None
    d._rc_set(e.host >> 12, 0)
    d.changed = True
    d.flush()
    rep = d.check()
    assert rep.exit_code == 2 and any("refcount 0 but 1 references" in c for c in rep.corruptions)


@pytest.mark.parametrize("runs", [[(5, 2), (4, 3)], [(4, 3), (5, 1)], [(4, 0)], [(1, 1)]])
def test_hostile_deferred_list(runs: list[tuple[int, int]]) -> None:
    buf = _image()
    d = _open(MemoryStorage("x", bytes(buf)))
    cs = d.cluster_size
    blob = b"".join(L.RUN.pack(f, n) for f, n in runs)
    host = d.host_slots * cs
    out = bytearray(buf) + bytes(max(0, host - len(buf))) + blob + bytes(cs - len(blob))
    entry = L.Entry(host, len(blob), 0, 0, L.codec.checksum(blob), 0)
    st = _with_header(out, deferred=entry, deferred_runs=len(runs), host_slots=d.host_slots + 1)
    with pytest.raises(CorruptImage, match="deferred-free run"):
        _open(st)


def test_deep_trees_and_multi_slot_blobs() -> None:
    """4 KiB clusters: refcount tree of depth 2, a deferred-free list of many runs that
    spans several slots, a mapping tree that grows from 1 to 3 levels and back."""
    st = MemoryStorage("deep.vdisk")
    NativeDriver.create(st, 16 << 20, {"cluster_size": 4096})
    d = NativeDriver.open(st, readonly=False, options={"commit_interval": 0})
    data = random.Random(9).randbytes(16 << 20)
    d.write(0, data)
    d.flush()
    assert d.rtree.depth >= 2
    for c in range(0, 4096, 2):
        d.discard(c * 4096, 4096)
    d.flush()
    assert d.hdr.deferred_runs >= 2000 and d.hdr.deferred.length > 4096
    d.close()
    d = NativeDriver.open(st, readonly=False, options={"commit_interval": 0})
    expect = bytearray(data)
    for c in range(0, 4096, 2):
        expect[c * 4096 : c * 4096 + 4096] = bytes(4096)
    assert d.read(0, 16 << 20) == expect
    assert d.check().exit_code == 0
    depth = d.map.depth
    d.truncate(1 << 30)
    d.write((1 << 30) - 4096, b"e" * 4096)
    d.flush()
    assert d.map.depth > depth
    assert d.read(0, 16 << 20) == expect
    d.truncate(8 << 20)
    d.close()
    d = NativeDriver.open(st, readonly=True, options={})
    assert d.size == 8 << 20 and d.read(0, 8 << 20) == expect[: 8 << 20]
    assert d.check().exit_code == 0


def test_random_hostile_headers_only_raise_vdisk_errors() -> None:
    """Headers with random field values and valid checksums: every outcome is an image
    that works or a VdiskError (never another exception, never a hang)."""
    from vdisk.errors import VdiskError

    rng = random.Random(11)
    buf = _image()

    def entry() -> L.Entry:
        host = rng.choice([0, 4096 * rng.randrange(100), rng.getrandbits(64)])
        length = rng.choice([0, 100, 4096, rng.getrandbits(32)])
        return L.Entry(host, length, rng.randrange(3), rng.randrange(3), rng.getrandbits(64), 0)

    gens = {
        "cluster_bits": lambda: rng.randrange(256),
        "depth": lambda: rng.randrange(256),
        "rdepth": lambda: rng.randrange(256),
        "size": lambda: rng.choice([0, 1, rng.getrandbits(64), 1 << 40]),
        "host_slots": lambda: rng.choice([0, 1, 2, 50, rng.getrandbits(64)]),
        "root": entry,
        "rroot": entry,
        "snap_table": entry,
        "deferred": entry,
        "snap_count": lambda: rng.randrange(5),
        "deferred_runs": lambda: rng.randrange(5),
        "backing_kind": lambda: rng.randrange(5),
    }
    for _ in range(300):
        changes = {k: f() for k, f in rng.sample(list(gens.items()), rng.randrange(1, 4))}
        st = _with_header(buf, **changes)
        try:
            d = NativeDriver.open(st, readonly=False, options={"commit_interval": 0})
            if d.size:
                d.read(0, min(d.size, 1 << 20))
                d.block_status(0, d.size)
                d.write(0, b"z" * 5000)
            d.check()
            d.flush()
        except VdiskError:
            pass
