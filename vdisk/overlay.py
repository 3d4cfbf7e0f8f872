"""Throw-away overlays: ``vdisk.open(path, snapshot=True)``, like ``qemu -snapshot``.

Writes land in an anonymous temporary file (unlinked from the start, so nothing is left
behind even after kill -9) with one bit per cluster saying what was written; the image
below is opened read-only and never changes. It is a Driver like any other, so the
generic layer puts the cache, the copy-up and the lock in front of it, and it works over
every format vdisk reads, including those it cannot create.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from vdisk.errors import StorageError
from vdisk.formats.base import Driver, Extent, Kind, cluster_spans, merge_extents
from vdisk.storage import FileStorage, Storage


class _ScratchStorage(FileStorage):
    def __init__(self, fd: int, label: str) -> None:
        self.path = label
        self.readonly = False
        self.fd = fd

    def lock(self, *, exclusive: bool) -> None:
        pass

    def sync(self) -> None:
        pass  # nothing here must survive a crash


class ScratchDriver(Driver):
    """A sparse scratch file plus a bitmap: DATA where written, HOLE elsewhere."""

    name = "scratch"
    wants_cache = False

    def __init__(self, size: int, cluster_size: int, label: str, tmpdir: str | None = None) -> None:
        try:
            fd, path = tempfile.mkstemp(prefix="vdisk-overlay-", dir=tmpdir)
            os.unlink(path)
        except OSError as e:
            raise StorageError(
                f"cannot create a scratch file for the throw-away overlay: {e.strerror}"
            ) from None
        self.storage: Storage = _ScratchStorage(fd, f"{label} (throw-away overlay)")
        self.size = size
        self.cluster_size = cluster_size
        self.readonly = False
        self._bits = bytearray(size // cluster_size // 8 + 1)
        self.written = 0

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        return 0

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> Driver:
        raise NotImplementedError("scratch overlays are made by vdisk.open(snapshot=True)")

    def _has(self, idx: int) -> bool:
        return bool(self._bits[idx >> 3] & (1 << (idx & 7)))

    def read(self, offset: int, length: int) -> bytes:
        data = self.storage.pread(offset, length)
        return data + bytes(length - len(data)) if len(data) < length else data

    def _mark(self, offset: int, length: int) -> None:
        for idx, _, _ in cluster_spans(offset, length, self.cluster_size):
            if not self._has(idx):
                self._bits[idx >> 3] |= 1 << (idx & 7)
                self.written += 1

    def write(self, offset: int, data: bytes) -> None:
        self.storage.pwrite(offset, data)
        self._mark(offset, len(data))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self.storage.punch_hole(offset, length)
        self._mark(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out = []
        for idx, within, n in cluster_spans(offset, length, self.cluster_size):
            pos = idx * self.cluster_size + within
            out.append(Extent(Kind.DATA if self._has(idx) else Kind.HOLE, pos, n))
        return merge_extents(out)

    def truncate(self, size: int) -> None:
        self.storage.truncate(size)
        bits = bytearray(size // self.cluster_size // 8 + 1)
        keep = min(len(bits), len(self._bits))
        bits[:keep] = self._bits[:keep]
        self._bits = bits
        self.size = size

    def info(self) -> dict[str, Any]:
        return {"throw-away-overlay": True, "clusters-written": self.written}
