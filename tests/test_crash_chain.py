"""Power loss in the middle of chain operations: commit, rebase, flatten, snapshot delete.

Every storage operation on every file involved is recorded in one global order. For each
point of that order we build what the disks could hold after a power loss there (per file:
everything up to its last sync; of the rest, nothing or everything), open the result and
check the promises of docs/crash-safety.md: every image opens, `check` finds no
corruption, and the guest content of the overlay is what it was before the operation.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

import vdisk
from tests.conftest import pattern
from vdisk import api, formats, ops
from vdisk.storage import FileStorage, MemoryStorage, Storage

pytestmark = pytest.mark.skipif("vdisk" not in formats.names(), reason="native format missing")

SIZE = 1 << 20


class Recording(Storage):
    """Passes through to a real file and appends (tag, op, args) to a shared log."""

    def __init__(self, inner: FileStorage, tag: str, log: list) -> None:
        self.inner, self.tag, self.log = inner, tag, log
        self.path, self.readonly = inner.path, inner.readonly

    def pread(self, offset, length):
        return self.inner.pread(offset, length)

    def pwrite(self, offset, data):
        self.log.append((self.tag, "write", offset, bytes(data)))
        self.inner.pwrite(offset, data)

    def size(self):
        return self.inner.size()

    def truncate(self, size):
        self.log.append((self.tag, "truncate", size, b""))
        self.inner.truncate(size)

    def punch_hole(self, offset, length):
        self.log.append((self.tag, "punch", offset, bytes(length)))
        self.inner.punch_hole(offset, length)

    def sync(self):
        self.log.append((self.tag, "sync", 0, b""))
        self.inner.sync()

    def resolve(self, name):
        return self.inner.resolve(name)

    def lock(self, *, exclusive):
        self.inner.lock(exclusive=exclusive)

    def close(self):
        self.inner.close()

    def allocated_bytes(self):
        return self.inner.allocated_bytes()


def _crash_state(
    initial: dict[str, bytes], log: list, k: int, keep_pending: bool
) -> dict[str, bytes]:
    out = {}
    for tag, data in initial.items():
        mine = [op for op in log[:k] if op[0] == tag]
        last_sync = max((i for i, op in enumerate(mine) if op[1] == "sync"), default=-1)
        replay = mine if keep_pending else mine[: last_sync + 1]
        disk = MemoryStorage(tag, data)
        for _, kind, a, b in replay:
            if kind in ("write", "punch"):
                disk.pwrite(a, b)
            elif kind == "truncate":
                disk.truncate(a)
        out[tag] = bytes(disk.buf)
    return out


def _content(path: str) -> bytes:
    with vdisk.open(path, readonly=True, force_share=True) as d:
        rep = d.check()
        assert not rep.corruptions, rep.corruptions
        return d.read(0, d.size)


def _run_recorded(monkeypatch, files: list[str], fn) -> tuple[dict[str, bytes], list]:
    log: list = []
    initial = {os.path.basename(p): open(p, "rb").read() for p in files}  # noqa: SIM115
    real = api.open_storage

    def recording_open(path, *, readonly, create=False):
        st = real(path, readonly=readonly, create=create)
        name = os.path.basename(path)
        if name in initial and isinstance(st, FileStorage):
            return Recording(st, name, log)
        return st

    monkeypatch.setattr(api, "open_storage", recording_open)
    try:
        fn()
    finally:
        monkeypatch.setattr(api, "open_storage", real)
    return initial, log


def _check_every_point(tmp_path, initial, log, top: str, expect_top: bytes, extra=None) -> int:
    """Rebuild the files at each crash point in a scratch dir and check them."""
    points = 0
    for k in range(len(log) + 1):
        for keep in (False, True):
            scratch = tmp_path / f"crash-{k}-{int(keep)}"
            scratch.mkdir()
            for name, data in _crash_state(initial, log, k, keep).items():
                (scratch / name).write_bytes(data)
            got = _content(str(scratch / top))
            assert got == expect_top, (
                f"crash after op {k} (pending {'kept' if keep else 'dropped'}): overlay content changed"
            )
            if extra:
                extra(scratch)
            shutil.rmtree(scratch)
            points += 1
    return points


def _make_chain(tmp_path, n: int) -> list[str]:
    rng = random.Random(n)
    paths = []
    for i in range(n):
        p = str(tmp_path / f"l{i}.vdisk")
        if i == 0:
            vdisk.create(p, SIZE, format="vdisk", cluster_size=65536)
        else:
            vdisk.create(p, None, format="vdisk", backing=os.path.basename(paths[-1]))
        with vdisk.open(p) as d:
            for j in range(4):
                off = rng.randrange(0, SIZE - 100000)
                d.write(off, pattern(off, rng.choice([3000, 70000, 100000]), seed=10 * i + j))
        paths.append(p)
    return paths


def test_power_loss_during_commit(tmp_path, monkeypatch):
    paths = _make_chain(tmp_path, 3)
    before = _content(paths[2])
    base_before = _content(paths[1])
    initial, log = _run_recorded(monkeypatch, paths, lambda: ops.commit(paths[2], cache_mb=0.125))
    assert any(op[1] == "sync" for op in log)
    base_after = _content(paths[1])

    def base_is_old_or_new(scratch):
        assert _content(str(scratch / "l1.vdisk")) in (base_before, base_after)

    n = _check_every_point(tmp_path, initial, log, "l2.vdisk", before, base_is_old_or_new)
    assert n > 10


def test_power_loss_during_rebase_and_flatten(tmp_path, monkeypatch):
    paths = _make_chain(tmp_path, 3)
    before = _content(paths[2])
    initial, log = _run_recorded(
        monkeypatch, paths, lambda: ops.rebase(paths[2], paths[0], cache_mb=0.125)
    )
    _check_every_point(tmp_path, initial, log, "l2.vdisk", before)
    initial, log = _run_recorded(monkeypatch, paths, lambda: ops.flatten(paths[2], cache_mb=0.125))
    _check_every_point(tmp_path, initial, log, "l2.vdisk", before)


def test_power_loss_during_snapshot_delete(tmp_path, monkeypatch):
    p = str(tmp_path / "s.vdisk")
    vdisk.create(p, SIZE, format="vdisk")
    with vdisk.open(p) as d:
        d.write(0, pattern(0, 300000, seed=1))
        d.snapshots.create("a")
        d.write(100000, pattern(100000, 300000, seed=2))
        d.snapshots.create("b")
        d.write(50000, pattern(50000, 100000, seed=3))
    before = _content(p)

    def delete():
        with vdisk.open(p) as d:
            d.snapshots.delete("a")

    initial, log = _run_recorded(monkeypatch, [p], delete)

    def snapshot_b_intact(scratch):
        with vdisk.open(str(scratch / "s.vdisk"), readonly=True, force_share=True) as d:
            names = [s.name for s in d.snapshots.list()]
            assert "b" in names
            with d.snapshots.open("b") as v:
                assert v.read(100000, 300000) == pattern(100000, 300000, seed=2)

    _check_every_point(tmp_path, initial, log, "s.vdisk", before, snapshot_b_intact)
