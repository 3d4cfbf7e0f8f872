"""Random reads, writes, zeroes, discards and truncates of a native image against a
bytearray model, across close/reopen and commits, for several cluster sizes (hypothesis)."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vdisk.formats.native import NativeDriver
from vdisk.storage import MemoryStorage


class NativeModel(RuleBasedStateMachine):
    @initialize(
        cs=st.sampled_from([4096, 16384, 65536]),
        extra=st.integers(0, 5000),
        clusters=st.integers(1, 9),
    )
    def create(self, cs: int, extra: int, clusters: int) -> None:
        self.cs = cs
        self.st = MemoryStorage("model.vdisk")
        size = clusters * cs + extra
        NativeDriver.create(self.st, size, {"cluster_size": cs})
        self.d = NativeDriver.open(self.st, readonly=False, options={"commit_interval": 0})
        self.model = bytearray(size)
        self.snaps: dict[str, bytes] = {}

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        size = len(self.model)
        if size == 0:
            return 0, 0
        # bias towards cluster boundaries so ranges cross them
        anchor = data.draw(st.integers(0, max(0, size - 1) // self.cs)) * self.cs
        off = min(size - 1, max(0, anchor + data.draw(st.integers(-600, 600))))
        n = data.draw(st.integers(1, max(1, min(size - off, 3 * self.cs))))
        return off, min(n, size - off)

    @rule(data=st.data(), fill=st.sampled_from(["random", "zero", "text"]))
    def write(self, data: st.DataObject, fill: str) -> None:
        off, n = self._range(data)
        if n == 0:
            return
        if fill == "random":
            buf = data.draw(st.binary(min_size=16, max_size=16)) * (n // 16 + 1)
            buf = bytes((b + i) & 0xFF for i, b in enumerate(buf[:n])) if n < 4096 else buf[:n]
        elif fill == "zero":
            buf = bytes(n)
        else:
            buf = (b"hello vdisk %d " % off) * (n // 10 + 1)
        buf = buf[:n]
        self.d.write(off, buf)
        self.model[off : off + n] = buf

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        off, n = self._range(data)
        if n:
            self.d.write_zeroes(off, n, unmap=unmap)
            self.model[off : off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        off, n = self._range(data)
        if n:
            self.d.discard(off, n)
            self.model[off : off + n] = bytes(n)

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        new = data.draw(st.integers(0, 12 * self.cs + 3000))
        self.d.truncate(new)
        if new < len(self.model):
            del self.model[new:]
        else:
            self.model.extend(bytes(new - len(self.model)))

    @rule()
    def flush(self) -> None:
        self.d.flush()

    @rule()
    def reopen(self) -> None:
        self.d.close()
        self.d = NativeDriver.open(self.st, readonly=False, options={"commit_interval": 0})
        assert self.d.size == len(self.model)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        off, n = self._range(data)
        if n:
            assert self.d.read(off, n) == self.model[off : off + n]

    @rule(name=st.sampled_from(["a", "b", "c"]))
    def snapshot_create(self, name: str) -> None:
        if name in self.snaps:
            return
        self.d.create_snapshot(name)
        self.snaps[name] = bytes(self.model)

    @precondition(lambda self: bool(getattr(self, "snaps", None)))
    @rule(data=st.data())
    def snapshot_revert(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.d.revert_snapshot(name)
        self.model = bytearray(self.snaps[name])
        assert self.d.size == len(self.model)

    @precondition(lambda self: bool(getattr(self, "snaps", None)))
    @rule(data=st.data())
    def snapshot_delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.d.delete_snapshot(name)
        del self.snaps[name]

    @precondition(lambda self: bool(getattr(self, "snaps", None)))
    @rule(data=st.data())
    def snapshot_view(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        view = self.d.open_snapshot(name)
        want = self.snaps[name]
        assert view.size == len(want)
        if want:
            assert view.read(0, len(want)) == want
        view.close()

    @invariant()
    def block_status_covers(self) -> None:
        if not hasattr(self, "d") or not self.model:
            return
        ext = self.d.block_status(0, len(self.model))
        assert ext[0].offset == 0 and ext[-1].end == len(self.model)
        for a, b in itertools.pairwise(ext):
            assert a.end == b.offset

    def teardown(self) -> None:
        if not hasattr(self, "d"):
            return
        assert self.d.read(0, len(self.model)) == self.model if self.model else True
        rep = self.d.check()
        assert not rep.corruptions and not rep.leaks, (rep.corruptions, rep.leaks)
        self.d.close()
        d = NativeDriver.open(self.st, readonly=True, options={})
        if self.model:
            assert d.read(0, len(self.model)) == self.model
        d.close()


NativeModel.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, derandomize=True
)
test_native_model = NativeModel.TestCase
