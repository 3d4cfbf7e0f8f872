"""A fault-injecting Storage for crash tests (in the spirit of QEMU's blkdebug).

:class:`FaultyStorage` passes every call to an inner store and records each mutation
(pwrite, truncate, punch_hole) and each ``sync`` in ``log``. A test then asks what a disk
could hold after a power loss at any point of that log: :meth:`FaultyStorage.crash_image`
replays the log up to the crash point, keeping everything before the last sync and only
some of the writes after it: none, all, a random subset, in a random order, with the last
kept write torn (only a prefix of it reached the disk).

``crash_at`` makes the storage raise :class:`SimulatedCrash` at a given operation, for
tests that want the writer to stop there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vdisk.storage import MemoryStorage, Storage


class SimulatedCrash(Exception):
    """Raised by FaultyStorage at the operation named by ``crash_at`` (not a VdiskError:
    nothing should catch it but the test)."""


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # "write", "truncate", "punch", "sync"
    offset: int = 0
    data: bytes = b""
    length: int = 0


class FaultyStorage(Storage):
    """Records every mutation and sync of an inner store (a MemoryStorage by default)."""

    def __init__(self, inner: Storage | None = None, *, path: str = "<faulty>") -> None:
        self.inner = inner if inner is not None else MemoryStorage(path)
        self.path = path
        self.readonly = False
        self.initial = bytes(self.inner.pread(0, self.inner.size()))
        self.log: list[Op] = []
        self.crash_at: int | None = None

    def _record(self, op: Op) -> None:
        if self.crash_at is not None and len(self.log) >= self.crash_at:
            raise SimulatedCrash(f"simulated power loss at operation {len(self.log)}")
        self.log.append(op)

    # -- Storage --------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._record(Op("write", offset, bytes(data)))
        self.inner.pwrite(offset, data)

    def size(self) -> int:
        return self.inner.size()

    def truncate(self, size: int) -> None:
        self._record(Op("truncate", size))
        self.inner.truncate(size)

    def punch_hole(self, offset: int, length: int) -> None:
        self._record(Op("punch", offset, length=length))
        self.inner.punch_hole(offset, length)

    def sync(self) -> None:
        self._record(Op("sync"))
        self.inner.sync()

    def close(self) -> None:
        pass

    # -- crash images -----------------------------------------------------------------------

    def syncs(self) -> list[int]:
        """Log indices of the sync operations."""
        return [i for i, op in enumerate(self.log) if op.kind == "sync"]

    def crash_image(
        self,
        n_ops: int,
        *,
        unsynced: str = "drop",
        tear: bool = False,
        rng: random.Random | None = None,
    ) -> bytes:
        """The bytes on disk after a power loss following the first ``n_ops`` operations.

        Everything up to the last sync among them is durable. Of the operations after it,
        ``unsynced`` says what reached the disk: "drop" none, "keep" all in order, "random"
        a random subset, "reorder" a random subset in random order. ``tear`` cuts the last
        write that reached the disk to a random prefix."""
        rng = rng or random.Random(n_ops)
        ops = self.log[:n_ops]
        last_sync = max((i for i, op in enumerate(ops) if op.kind == "sync"), default=-1)
        durable, pending = (
            ops[: last_sync + 1],
            [op for op in ops[last_sync + 1 :] if op.kind != "sync"],
        )
        if unsynced == "drop":
            pending = []
        elif unsynced == "random":
            pending = [op for op in pending if rng.random() < 0.5]
        elif unsynced == "reorder":
            pending = [op for op in pending if rng.random() < 0.5]
            rng.shuffle(pending)
        elif unsynced != "keep":
            raise ValueError(f"unknown unsynced policy {unsynced!r}")
        if tear:
            for i in range(len(pending) - 1, -1, -1):
                op = pending[i]
                if op.kind == "write" and len(op.data) > 1:
                    cut = rng.randrange(1, len(op.data))
                    pending[i] = Op("write", op.offset, op.data[:cut])
                    break
        disk = MemoryStorage(self.path, self.initial)
        for op in durable + pending:
            if op.kind == "write":
                disk.pwrite(op.offset, op.data)
            elif op.kind == "truncate":
                disk.truncate(op.offset)
            elif op.kind == "punch":
                disk.pwrite(op.offset, bytes(op.length))
        return bytes(disk.buf)
