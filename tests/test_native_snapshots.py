"""Internal snapshots of native images: cheap to take, shared until written, revert,
delete with space reclaimed, read-only views; checked against a model."""

from __future__ import annotations

import random
import time

import pytest

import vdisk
from vdisk.errors import ReadOnlyImage, UsageError
from vdisk.formats.native import NativeDriver
from vdisk.storage import MemoryStorage

CS = 4096
SIZE = 512 * 1024


def _drv() -> tuple[MemoryStorage, NativeDriver]:
    st = MemoryStorage("snap.vdisk")
    NativeDriver.create(st, SIZE, {"cluster_size": CS})
    return st, NativeDriver.open(st, readonly=False, options={"commit_interval": 0})


def _clean(d: NativeDriver) -> None:
    rep = d.check()
    assert not rep.corruptions and not rep.leaks, (rep.corruptions[:3], rep.leaks[:3])


def test_snapshot_is_cheap_and_shares_data() -> None:
    _st, d = _drv()
    d.write(0, random.Random(1).randbytes(SIZE))
    d.flush()
    slots = d.host_slots
    t = time.perf_counter()
    info = d.create_snapshot("one")
    assert time.perf_counter() - t < 0.1
    assert info.name == "one" and info.size == SIZE and abs(info.created - time.time()) < 60
    assert d.host_slots <= slots + 4  # a root reference, not a copy
    d.write(0, b"x" * CS)  # copy-on-write of one cluster and its path
    d.flush()
    assert d.host_slots <= slots + 12
    _clean(d)


def test_snapshots_against_model() -> None:
    rng = random.Random(3)
    st, d = _drv()
    model = bytearray(SIZE)
    snaps: dict[str, bytes] = {}
    for step in range(150):
        r = rng.random()
        if r < 0.5:
            off = rng.randrange(SIZE)
            n = min(rng.randrange(1, 3 * CS), SIZE - off)
            data = rng.randbytes(n)
            d.write(off, data)
            model[off : off + n] = data
        elif r < 0.6:
            off = rng.randrange(SIZE)
            n = min(rng.randrange(1, 8 * CS), SIZE - off)
            d.discard(off, n)
            model[off : off + n] = bytes(n)
        elif r < 0.7:
            name = f"s{step}"
            d.create_snapshot(name)
            snaps[name] = bytes(model)
        elif r < 0.78 and snaps:
            name = rng.choice(sorted(snaps))
            d.revert_snapshot(name)
            model[:] = snaps[name]
        elif r < 0.86 and snaps:
            name = rng.choice(sorted(snaps))
            d.delete_snapshot(name)
            del snaps[name]
        elif r < 0.93 and snaps:
            name = rng.choice(sorted(snaps))
            view = d.open_snapshot(name)
            assert view.read(0, SIZE) == snaps[name]
            with pytest.raises(ReadOnlyImage):
                view.write(0, b"x")
            view.close()
        else:
            d.close()
            d = NativeDriver.open(st, readonly=False, options={"commit_interval": 0})
        assert sorted(s.name for s in d.list_snapshots()) == sorted(snaps)
    assert d.read(0, SIZE) == model
    _clean(d)
    for name in list(snaps):
        d.delete_snapshot(name)
    _clean(d)
    d.close()


def test_delete_reclaims_space_and_keeps_shared() -> None:
    _st, d = _drv()
    a = random.Random(2).randbytes(SIZE)
    d.write(0, a)
    d.create_snapshot("a")
    b = random.Random(4).randbytes(SIZE // 2)
    d.write(0, b)  # first half differs, second half shared with "a"
    d.create_snapshot("b")
    d.discard(0, SIZE)
    d.flush()
    assert d.open_snapshot("a").read(0, SIZE) == a
    d.delete_snapshot("a")  # first half of "a" is freed, the shared half stays for "b"
    assert d.open_snapshot("b").read(0, SIZE) == b + a[SIZE // 2 :]
    _clean(d)
    d.delete_snapshot("b")
    _clean(d)
    compact_before = d.host_slots
    d.compact()
    assert d.host_slots < compact_before
    assert d.info()["allocated_clusters"] == 0
    used = sum(1 for s in range(d.host_slots) if d._rc_get(s))
    assert used < 12, used  # only headers and a little metadata remain
    _clean(d)


def test_snapshot_errors() -> None:
    _st, d = _drv()
    d.create_snapshot("x")
    with pytest.raises(UsageError, match="already exists"):
        d.create_snapshot("x")
    with pytest.raises(UsageError, match="no snapshot"):
        d.revert_snapshot("nope")
    with pytest.raises(UsageError, match="no snapshot"):
        d.delete_snapshot("nope")
    with pytest.raises(UsageError):
        d.create_snapshot("")


def test_revert_restores_size() -> None:
    _st, d = _drv()
    d.write(SIZE - 100, b"z" * 100)
    d.create_snapshot("full")
    d.truncate(SIZE // 2)
    d.truncate(SIZE * 2)
    assert d.read(SIZE - 100, 100) == bytes(100)
    d.revert_snapshot("full")
    assert d.size == SIZE and d.read(SIZE - 100, 100) == b"z" * 100
    _clean(d)


def test_snapshots_through_the_api(tmp_path) -> None:
    p = str(tmp_path / "s.vdisk")
    vdisk.create(p, "1M", cluster_size=4096)
    with vdisk.open(p) as disk:
        disk.write(0, b"before" * 100)
        disk.snapshots.create("s1")
        disk.write(0, b"after!" * 100)
        with disk.snapshots.open("s1") as view:
            assert view.read(0, 600) == b"before" * 100
        assert [s.name for s in disk.snapshots.list()] == ["s1"]
        disk.snapshots.revert("s1")
        assert disk.read(0, 600) == b"before" * 100
        disk.snapshots.delete("s1")
        assert disk.snapshots.list() == []
        assert disk.check().exit_code == 0


def test_many_snapshots_multi_slot_table() -> None:
    st, d = _drv()
    for i in range(120):
        d.write(i * CS, bytes([i + 1]) * CS)
        d.create_snapshot(f"snapshot-number-{i:03d}")
    assert d.hdr.snap_table.length > CS
    d.close()
    d = NativeDriver.open(st, readonly=False, options={"commit_interval": 0})
    assert len(d.list_snapshots()) == 120
    v = d.open_snapshot("snapshot-number-050")
    assert v.read(50 * CS, CS) == bytes([51]) * CS and v.read(51 * CS, CS) == bytes(CS)
    for i in range(0, 120, 2):
        d.delete_snapshot(f"snapshot-number-{i:03d}")
    _clean(d)
