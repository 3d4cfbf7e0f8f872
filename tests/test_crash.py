"""Power loss at every write and every sync of a workload, with the fault-injecting storage.

One workload runs once against a recording FaultyStorage; a crash after any prefix of its
log is then the bytes that prefix leaves on disk (unsynced writes dropped, kept, thinned,
reordered, or the last one torn). After each: the image opens, check() finds nothing, and
the content (live and every snapshot) is exactly that of the last durable commit, or of
the commit that was being written (never a mix, never garbage).
"""

from __future__ import annotations

import random

import pytest

from vdisk.formats.native import NativeDriver
from vdisk.formats.native_layout import HEADER_OFFSETS
from vdisk.storage import MemoryStorage
from vdisk.storage.faulty import FaultyStorage, SimulatedCrash

SIZE = 384 * 1024


class State:
    def __init__(self, content: bytes, snaps: dict[str, bytes]) -> None:
        self.content = content
        self.snaps = snaps


def _workload(cs: int, seed: int) -> tuple[FaultyStorage, int, list[tuple[int, State]]]:
    rng = random.Random(seed)
    fs = FaultyStorage()
    NativeDriver.create(fs, SIZE, {"cluster_size": cs})
    start = len(fs.log)
    d = NativeDriver.open(fs, readonly=False, options={"commit_interval": 0})
    model = bytearray(SIZE)
    snaps: dict[str, bytes] = {}
    commits = [(start, State(bytes(model), {}))]

    def committed() -> None:
        commits.append((len(fs.log), State(bytes(model), dict(snaps))))

    for step in range(120):
        r = rng.random()
        off = rng.randrange(len(model))
        n = min(rng.randrange(1, 3 * cs), len(model) - off)
        if r < 0.45:
            data = rng.randbytes(n // 2) + bytes([step]) * (n - n // 2)
            d.write(off, data)
            model[off : off + n] = data
        elif r < 0.55:
            d.write_zeroes(off, n, unmap=True)
            model[off : off + n] = bytes(n)
        elif r < 0.65:
            d.discard(off, n)
            model[off : off + n] = bytes(n)
        elif r < 0.8:
            d.flush()
            committed()
        elif r < 0.83:
            new = rng.randrange(SIZE // 2, SIZE + 1)
            d.truncate(new)
            if new < len(model):
                del model[new:]
            else:
                model.extend(bytes(new - len(model)))
        elif r < 0.85:
            d.compact()
            committed()
        elif r < 0.88 and len(snaps) < 3:
            d.flush()
            committed()
            name = f"s{step}"
            d.create_snapshot(name)
            snaps[name] = bytes(model)
            committed()
        elif r < 0.94 and snaps:
            d.flush()
            committed()
            name = rng.choice(sorted(snaps))
            d.revert_snapshot(name)
            model[:] = snaps[name]
            committed()
        elif snaps:
            d.flush()
            committed()
            name = rng.choice(sorted(snaps))
            d.delete_snapshot(name)
            del snaps[name]
            committed()
    d.flush()
    committed()
    return fs, start, commits


def _verify(img: bytes, allowed: list[State], where: str) -> int:
    st = MemoryStorage("crash.vdisk", img)
    d = NativeDriver.open(st, readonly=True, options={})
    content = d.read(0, d.size) if d.size else b""
    matches = [s for s in allowed if s.content == content]
    assert matches, f"{where}: content is neither the last commit nor the next one"
    names = {s.name for s in d.list_snapshots()}
    matches = [s for s in matches if set(s.snaps) == names]
    assert matches, f"{where}: snapshots {names} match no allowed commit"
    for name in names:
        view = d.open_snapshot(name)
        assert view.read(0, view.size) == matches[0].snaps[name], f"{where}: snapshot {name}"
        view.close()
    rep = d.check()
    assert not rep.corruptions and not rep.leaks, f"{where}: {rep.corruptions[:3]} {rep.leaks[:3]}"
    return d.generation


def _verify_older(img: bytes, gen: int, older: list[State], where: str) -> None:
    """With the newest header copy destroyed, the other copy (one commit older) must still
    describe an intact image: space freed by a commit is not reused before the next one
    is durable."""
    buf = bytearray(img)
    off = HEADER_OFFSETS[gen % 2]
    buf[off : off + 8] = b"XXXXXXXX"
    d = NativeDriver.open(MemoryStorage("older.vdisk", bytes(buf)), readonly=True, options={})
    assert d.generation < gen
    content = d.read(0, d.size) if d.size else b""
    assert any(s.content == content for s in older), f"{where}: older header content"
    rep = d.check()
    assert not rep.corruptions, f"{where}: older header: {rep.corruptions[:3]}"


def _allowed(commits: list[tuple[int, State]], k: int) -> list[State]:
    i = max(j for j, (at, _s) in enumerate(commits) if at <= k)
    return [s for _at, s in commits[i : i + 2]]


@pytest.mark.parametrize("cs,seed", [(4096, 1), (4096, 3), (16384, 2), (65536, 4)])
def test_crash_at_every_operation(cs: int, seed: int) -> None:
    fs, start, commits = _workload(cs, seed)
    rng = random.Random(seed)
    total = len(fs.log)
    assert total > 40
    for k in range(start, total + 1):
        allowed = _allowed(commits, k)
        img = fs.crash_image(k, unsynced="drop")
        gen = _verify(img, allowed, f"op {k}/{total} drop")
        if gen > 1:
            i = max(j for j, (at, _s) in enumerate(commits) if at <= k)
            older = [s for _at, s in commits[max(0, i - 6) : i + 2]]
            _verify_older(img, gen, older, f"op {k}/{total} drop")
        policy = ("keep", "random", "reorder")[k % 3]
        img = fs.crash_image(k, unsynced=policy, tear=k % 2 == 0, rng=rng)
        _verify(img, allowed, f"op {k}/{total} {policy}")


def test_recovery_after_crash_is_writable() -> None:
    """After a crash the image takes new writes and commits cleanly (freed space reused)."""
    fs, start, _commits = _workload(4096, 7)
    for k in range(start, len(fs.log) + 1, 11):
        st = MemoryStorage("crash.vdisk", fs.crash_image(k, unsynced="random"))
        d = NativeDriver.open(st, readonly=False, options={"commit_interval": 0})
        d.write(4096, b"\xab" * 10000)
        d.discard(64 * 1024, 64 * 1024)
        d.flush()
        rep = d.check()
        assert not rep.corruptions and not rep.leaks, (k, rep.corruptions, rep.leaks)
        assert d.read(4096, 10000) == b"\xab" * 10000
        d.close()


def test_simulated_crash_stops_the_writer() -> None:
    fs = FaultyStorage()
    NativeDriver.create(fs, SIZE, {"cluster_size": 4096})
    d = NativeDriver.open(fs, readonly=False, options={"commit_interval": 0})
    d.write(0, b"a" * 8192)
    d.flush()
    fs.crash_at = len(fs.log) + 3
    with pytest.raises(SimulatedCrash):
        d.write(0, b"b" * 8192)
        d.flush()
    d2 = NativeDriver.open(
        MemoryStorage("x", fs.crash_image(len(fs.log))), readonly=True, options={}
    )
    assert d2.read(0, 8192) in (b"a" * 8192, b"b" * 8192)


def test_faulty_storage_policies() -> None:
    fs = FaultyStorage()
    fs.pwrite(0, b"aaaa")
    fs.sync()
    fs.pwrite(0, b"bb")
    fs.pwrite(4, b"cccc")
    n = len(fs.log)
    assert fs.crash_image(n, unsynced="drop") == b"aaaa"
    assert fs.crash_image(n, unsynced="keep") == b"bbaacccc"
    torn = fs.crash_image(n, unsynced="keep", tear=True, rng=random.Random(1))
    assert torn.startswith(b"bbaa") and 5 <= len(torn) < 8 and set(torn[4:]) == {ord("c")}
    seen = {fs.crash_image(n, unsynced="reorder", rng=random.Random(i)) for i in range(40)}
    assert {b"aaaa", b"bbaa", b"aaaacccc", b"bbaacccc"} <= seen
    assert fs.crash_image(2, unsynced="keep") == b"aaaa"
    assert fs.syncs() == [1]
