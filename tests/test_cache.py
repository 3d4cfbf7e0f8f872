"""The cluster cache: write-back, eviction under pressure, read-ahead, bounds, counters.

Correctness against a model with cache sizes from nothing to large is in
test_conformance.py; here are the cache's own promises, on raw images so that what
reached the storage can be seen directly in the file.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import vdisk
from tests.conftest import pattern


def _raw(tmp_path, size=16 << 20) -> str:
    p = str(tmp_path / "a.raw")
    vdisk.create(p, size, format="raw")
    return p


def test_write_back_until_flush(tmp_path):
    p = _raw(tmp_path)
    with vdisk.open(p, cache_mb=8, commit_interval=None) as d:
        d.write(5000, b"A" * 3000)
        assert Path(p).read_bytes()[5000:8000] == bytes(3000), "write reached storage before flush"
        assert d.read(5000, 3000) == b"A" * 3000
        assert d.stats()["cache"]["dirty_clusters"] == 1
        d.flush()
        assert Path(p).read_bytes()[5000:8000] == b"A" * 3000
        assert d.stats()["cache"]["dirty_clusters"] == 0


def test_close_writes_back(tmp_path):
    p = _raw(tmp_path)
    with vdisk.open(p, cache_mb=8, commit_interval=None) as d:
        d.write(70000, b"B" * 100)
    assert Path(p).read_bytes()[70000:70100] == b"B" * 100


def test_eviction_under_pressure_keeps_data_and_bounds(tmp_path):
    p = _raw(tmp_path)
    cap = 4 * 65536
    model = bytearray(16 << 20)
    rng = random.Random(1)
    with vdisk.open(p, cache_mb=cap / (1 << 20), commit_interval=None) as d:
        for i in range(400):
            off = rng.randrange(0, len(model) - 5000)
            data = pattern(off, rng.choice([1, 4096, 5000]), seed=i)
            d.write(off, data)
            model[off : off + len(data)] = data
            st = d.stats()["cache"]
            assert st["cached_bytes"] <= cap, st
        st = d.stats()["cache"]
        assert st["evictions"] > 100 and st["writebacks"] > 100
        for off in range(0, len(model), 1 << 20):
            assert d.read(off, 1 << 20) == model[off : off + (1 << 20)]
    assert Path(p).read_bytes() == bytes(model)


def test_hits_misses_and_readahead(tmp_path):
    p = _raw(tmp_path)
    with open(p, "r+b") as f:
        f.write(pattern(0, 16 << 20))
    with vdisk.open(p, cache_mb=32, readonly=True) as d:
        for off in range(0, 8 << 20, 65536):  # a sequential reader in 64 KiB steps
            assert d.read(off, 65536) == pattern(off, 65536)
        st = d.stats()["cache"]
        assert st["readahead_clusters"] > 32, st
        assert st["hits"] > st["misses"], "read-ahead should turn most sequential reads into hits"
        before = d.stats()["cache"]["hits"]
        d.read(65536 + 4096, 4096)  # read (and cached) by the sequential pass
        assert d.stats()["cache"]["hits"] == before + 1


def test_a_random_read_caches_a_cluster_on_its_second_miss(tmp_path):
    """2Q-like admission: the first random miss reads only the bytes asked for (a
    compressed cluster decoded up to their end) and remembers the cluster; the second
    caches it; the third is a hit."""
    p = _native(tmp_path)
    with vdisk.open(p, cache_mb=8, readonly=True) as d:
        for k in range(3):
            assert d.read(5 * 65536 + 1000, 3000) == pattern(5 * 65536 + 1000, 3000)
            st = d.stats()["cache"]
            assert (st["misses"], st["hits"], st["cached_clusters"]) == [
                (1, 0, 0),
                (2, 0, 1),
                (2, 1, 1),
            ][k]


def test_random_read_admission_turns_off_when_it_does_not_pay(tmp_path):
    """Random reads over a disk 64 times the cache: clusters cached on a second miss are
    evicted before anyone reads them again, so admission stops (but for a rare probe)
    and misses keep reading only the bytes asked for. A set that fits turns it back on."""
    p = _native(tmp_path, 64 << 20)
    rng = random.Random(5)
    with vdisk.open(p, cache_mb=1, readonly=True) as d:
        for _ in range(30000):
            off = rng.randrange(0, (64 << 20) // 4096) * 4096
            assert d.read(off, 4096) == pattern(off, 4096)
        st = d.stats()["cache"]
        whole = (st["bytes_loaded"] - 4096 * st["misses"]) // (65536 - 4096)
        # ~4000 second misses in 30000 reads: without the check most of them load a cluster
        assert whole < 1200, st
        for _ in range(20):  # a hot set of 8 clusters (of 16 that fit)
            for k in range(8):
                off = (100 + 3 * k) * 65536 + rng.randrange(16) * 4096
                assert d.read(off, 4096) == pattern(off, 4096)
        before = d.stats()["cache"]["hits"]
        for k in range(8):
            d.read((100 + 3 * k) * 65536, 4096)
        assert d.stats()["cache"]["hits"] == before + 8


def test_read_pieces_are_the_read_and_stay_unchanged(tmp_path):
    """read_pieces hands out slices of cached clusters without joining them; a later write
    into a (dirty, cached) cluster must not change a piece already handed out."""
    p = _native(tmp_path)
    with vdisk.open(p, cache_mb=8, commit_interval=None) as d:
        d.write(3 * 65536, b"X" * 65536)  # cluster 3 cached and dirty
        for off, n in ((0, 5 * 65536), (1000, 300000), (3 * 65536 + 5, 70000), (7, 1)):
            pieces = d.read_pieces(off, n)
            assert sum(len(x) for x in pieces) == n
            assert b"".join(pieces) == d.read(off, n)
        pieces = d.read_pieces(2 * 65536, 3 * 65536)
        before = b"".join(pieces)
        d.write(3 * 65536 + 100, b"Y" * 1000)
        d.write(2 * 65536 + 100, b"Z" * 1000)
        assert b"".join(pieces) == before
        assert d.read_pieces(0, 0) == []


def test_random_reads_do_not_read_ahead(tmp_path):
    p = _raw(tmp_path)
    rng = random.Random(2)
    with vdisk.open(p, cache_mb=32, readonly=True) as d:
        for _ in range(100):
            d.read(rng.randrange(0, (16 << 20) - 4096), 4096)
        assert d.stats()["cache"]["readahead_clusters"] == 0


def test_concurrent_readers_and_writers_same_clusters(tmp_path):
    """Writers rewrite whole records in shared clusters; readers must only ever see whole
    records (each read is atomic against each write)."""
    p = _raw(tmp_path, 1 << 20)
    rec = 1000
    stop = threading.Event()
    errors: list[str] = []
    with vdisk.open(p, cache_mb=0.25, commit_interval=None) as d:

        def writer(k: int) -> None:
            rng = random.Random(k)
            for i in range(300):
                slot = rng.randrange(100)
                d.write(slot * rec * 10 + 123, bytes([(k * 31 + i) % 255 + 1]) * rec)

        def reader() -> None:
            rng = random.Random(99)
            while not stop.is_set():
                slot = rng.randrange(100)
                data = d.read(slot * rec * 10 + 123, rec)
                if len(set(data)) != 1:
                    errors.append(f"torn record in slot {slot}")

        ws = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        rs = [threading.Thread(target=reader) for _ in range(2)]
        for t in ws + rs:
            t.start()
        for t in ws:
            t.join()
        stop.set()
        for t in rs:
            t.join()
    assert not errors, errors[:3]


# -- patches: partial writes into clusters that are not cached ----------------------------


def _native(tmp_path, size=8 << 20, name="a.vdisk") -> str:
    p = str(tmp_path / name)
    vdisk.create(p, size, format="vdisk")
    with vdisk.open(p) as d:
        d.write(0, pattern(0, size))
    return p


def test_partial_write_miss_reads_nothing_until_write_back(tmp_path):
    """A 4 KiB write into an uncached cluster keeps only its bytes; the read-modify-write
    happens once, at write-back, however many pieces went into the cluster."""
    p = _native(tmp_path)
    model = bytearray(pattern(0, 8 << 20))
    with vdisk.open(p, cache_mb=8, commit_interval=None) as d:
        for off, n, seed in [(70000, 4096, 1), (72000, 100, 2), (65536 + 60000, 8000, 3)]:
            data = pattern(off, n, seed=seed)
            d.write(off, data)
            model[off : off + n] = data
        st = d.stats()["cache"]
        assert st["bytes_loaded"] == 0 and st["patched_writes"] == 4  # one write spans two
        assert st["patched_clusters"] == 2 and st["dirty_clusters"] == 2
        d.flush()
        assert d.stats()["format"]["clusters_patched"] == 2
        assert d.read(0, 8 << 20) == model
    with vdisk.open(p, readonly=True) as d:
        assert d.read(0, 8 << 20) == model
        assert d.check().exit_code == 0


def test_reading_a_patched_cluster_merges_old_and_new(tmp_path):
    p = _native(tmp_path)
    with vdisk.open(p, cache_mb=8, commit_interval=None) as d:
        d.write(131072 + 10, b"new")
        d.write(131072 + 11, b"EW!")  # overlaps: the later piece wins
        got = d.read(131072, 65536)
        want = bytearray(pattern(131072, 65536))
        want[10:14] = b"nEW!"
        assert got == want
        assert d.stats()["cache"]["patched_clusters"] == 0  # it became a whole cluster


def test_many_small_patches_stay_within_the_cache(tmp_path):
    """1-byte writes cost more than a byte (each piece is counted with its overhead), and
    a cluster with many pieces becomes a whole cluster: the capacity holds either way."""
    p = _native(tmp_path)
    cap = 4 * 65536
    model = bytearray(pattern(0, 8 << 20))
    rng = random.Random(3)
    with vdisk.open(p, cache_mb=cap / (1 << 20), commit_interval=None) as d:
        for i in range(3000):
            off = rng.randrange(0, 8 << 20) if i % 3 else rng.randrange(0, 65536)
            b = bytes([i & 0xFF])
            d.write(off, b)
            model[off] = b[0]
            assert d.stats()["cache"]["cached_bytes"] <= cap
        assert d.read(0, 8 << 20) == model
    with vdisk.open(p, readonly=True) as d:
        assert d.read(0, 8 << 20) == model


def test_patches_over_a_backing_image_copy_up(tmp_path):
    """Holes of an overlay take the rest of the cluster from the base, for the native
    driver (which patches on its threads) and for a driver without patch_many (qcow2)."""
    _native(tmp_path, name="base.vdisk")
    for fmt in ("vdisk", "qcow2"):
        top = str(tmp_path / f"top.{fmt}")
        vdisk.create(top, None, format=fmt, backing="base.vdisk")
        model = bytearray(pattern(0, 8 << 20))
        with vdisk.open(top, cache_mb=1, commit_interval=None) as d:
            for k in range(40):
                off = k * 200000 + 123
                d.write(off, b"%d" % k * 50)
                model[off : off + len(b"%d" % k * 50)] = b"%d" % k * 50
        with vdisk.open(top, readonly=True) as d:
            assert d.read(0, 8 << 20) == model, fmt


def test_a_failed_write_back_keeps_the_data_dirty(tmp_path):
    """A patch over a damaged cluster cannot be written back: flush fails, and keeps
    failing, rather than a later flush reporting the data as durable."""
    p = _native(tmp_path)
    with vdisk.open(p, readonly=True) as d:
        e = d.driver._entry(3)
    with open(p, "r+b") as f:
        f.seek(e.host + 50)
        f.write(b"\xff" * 8)
    with vdisk.open(p, cache_mb=8, commit_interval=None) as d:
        d.write(3 * 65536 + 100, b"x" * 10)
        d.write(5 * 65536 + 100, b"y" * 10)
        for _ in range(2):
            try:
                d.flush()
            except vdisk.ChecksumMismatch as err:
                assert "guest offset 196608" in str(err)
            else:
                raise AssertionError("flush succeeded over a damaged cluster")
        assert d.stats()["cache"]["dirty_clusters"] >= 1
        d.write(3 * 65536, bytes(65536))  # a whole-cluster write replaces the damage
        d.flush()
    with vdisk.open(p, readonly=True) as d:
        assert d.read(5 * 65536 + 100, 10) == b"y" * 10
        assert d.read(3 * 65536, 65536) == bytes(65536)


def test_small_sequential_writes_fill_clusters_without_reading_them(tmp_path):
    """4 KiB writes that together cover clusters never read the old content."""
    p = _native(tmp_path)
    new = pattern(0, 1 << 20, seed=9)
    with vdisk.open(p, cache_mb=8, commit_interval=None) as d:
        for off in range(0, 1 << 20, 4096):
            d.write(off, new[off : off + 4096])
        d.flush()
        st = d.stats()
        assert st["cache"]["bytes_loaded"] == 0
        assert st["format"]["clusters_patched"] == 0  # written whole, no read-modify-write
        assert d.read(0, 1 << 20) == new
    with vdisk.open(p, readonly=True) as d:
        assert d.read(0, 2 << 20) == new + pattern(1 << 20, 1 << 20)


def test_prefetch_loads_checked_clusters_up_to_half_the_cache(tmp_path):
    p = _native(tmp_path)
    with vdisk.open(p, cache_mb=1, readonly=True) as d:  # 16 clusters of 64 KiB
        assert d.prefetch(65536 + 5, 3 * 65536) == 4  # clusters 1..4
        assert d.prefetch(65536, 65536) == 0  # already there
        assert d.prefetch(0, 8 << 20) == 4  # half the cache: clusters 0..7, of which 1..4 are in
        hits = d.stats()["cache"]["hits"]
        assert d.read(2 * 65536 + 100, 4096) == pattern(2 * 65536 + 100, 4096)
        assert d.stats()["cache"]["hits"] == hits + 1
    with vdisk.open(p, cache_mb=0, readonly=True) as d:
        assert d.prefetch(0, 1 << 20) == 0
