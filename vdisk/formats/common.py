"""Pieces shared by several format drivers (one place per idea, not per format)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from vdisk.cache import codec
from vdisk.cache.lru import LRU
from vdisk.errors import CorruptImage, UsageError
from vdisk.formats.base import BackingRef, Driver
from vdisk.storage import Storage

TABLE_CACHE = 4 << 20  # bytes of table pages a PagedTable keeps in memory


class PagedTable:
    """A table of fixed-size little-endian entries in storage, read lazily in pages.

    VDI's block map, Parallels' BAT and VHDX's BAT are all flat arrays of one integer per
    block, and a hostile or merely huge image can make them far larger than memory should
    hold; so pages live in a bounded LRU whatever the table size. Writes go through to
    storage at once (one entry at a time), so an evicted page is never dirty and a crash
    never loses an entry that was written."""

    def __init__(
        self,
        storage: Storage,
        offset: int,
        count: int,
        fmt: str = "<I",
        *,
        page: int = 4096,
        capacity: int = TABLE_CACHE,
        what: str = "table",
    ) -> None:
        self.storage = storage
        self.what = what  # names the table in errors
        self.offset = offset
        self.count = count
        self.entry = struct.Struct(fmt)
        self.per_page = page // self.entry.size
        self.cache: LRU[int, bytearray] = LRU(capacity)

    def _page(self, p: int) -> bytearray:
        buf = self.cache.get(p)
        if buf is None:
            first = p * self.per_page
            n = min(self.per_page, self.count - first)
            es = self.entry.size
            at = self.offset + first * es
            buf = bytearray(self.storage.pread_exact(at, n * es, f"{self.what} page {p}"))
            self.cache.put(p, buf)
        return buf

    def get(self, i: int) -> int:
        p, k = divmod(i, self.per_page)
        return int(self.entry.unpack_from(self._page(p), k * self.entry.size)[0])

    def set(self, i: int, value: int) -> None:
        p, k = divmod(i, self.per_page)
        raw = self.entry.pack(value)
        self.storage.pwrite(self.offset + i * self.entry.size, raw)
        buf = self.cache.get(p)
        if buf is not None:
            buf[k * self.entry.size : (k + 1) * self.entry.size] = raw

    def stats(self) -> dict[str, int]:
        return self.cache.stats()


class Bitset:
    """A set of slot numbers (data blocks, MiB of the file), one bit each.

    check marks every slot a table entry claims, to find one claimed twice; sized by the
    file, not by what a (possibly hostile) table says, so memory stays 1/8 byte a slot."""

    __slots__ = ("bits",)

    def __init__(self, size: int) -> None:
        self.bits = bytearray(-(-size // 8))

    def __contains__(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def add(self, i: int) -> None:
        self.bits[i >> 3] |= 1 << (i & 7)


class LazyPool:
    """A driver's codec threads, made on first use (most opens never need them) and shut
    down with the driver (after the running jobs: none may outlive its storage)."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers, self.name = max(1, workers), name
        self._executor: ThreadPoolExecutor | None = None

    def get(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
        return self._executor

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


_ON = ("on", "true", "yes", "1")
_OFF = ("off", "false", "no", "0")


def bool_option(driver: str, name: str, value: Any) -> bool:
    """A boolean create option, also as qemu-img and the API's callers spell it in text
    ("on"/"off", "true"/"false", "yes"/"no", "1"/"0"); anything else is a usage error,
    never silently true."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _ON:
            return True
        if low in _OFF:
            return False
        raise UsageError(f"{driver}: option {name} must be on or off, not {value!r}")
    return bool(value)


def compressor_option(driver: str, value: Any) -> str:
    """An image's ``compress`` option as one of :data:`vdisk.cache.codec.COMPRESSORS`;
    booleans and the spellings :func:`bool_option` takes mean lz4 and off."""
    if isinstance(value, bool):
        return "lz4" if value else "off"
    v = str(value).strip().lower()
    if v in _ON:
        return "lz4"
    if v in _OFF:
        return "off"
    if v not in codec.COMPRESSORS:
        raise UsageError(f"{driver}: option compress={value!r}: expected on, off, lz4 or zstd")
    return v


def refuse_writes_if_corrupt(driver: Driver, what: str) -> None:
    """Before the first write of a session (VDI, Parallels, VHDX): an entry that points
    outside its area, or at space another entry or the metadata uses, would make an
    in-place write silently change a second block, so any corruption check finds (one
    pass over the table, one bit per block) refuses writing altogether."""
    bad = driver.check().corruptions
    if bad:
        raise CorruptImage(
            f"{driver.storage.path}: refusing to write to a corrupt {what}: {bad[0]} "
            f"({len(bad)} problem(s); vdisk check lists them)"
        )


@contextmanager
def create_parent(
    cls: type[Driver], storage: Storage, ref: BackingRef, given: Driver | None
) -> Iterator[Driver]:
    """The parent an overlay is created over (vhd, vmdk): the driver the generic layer
    already opened (``backing_driver``), else ``ref``'s file opened read-only beside the
    new image and closed again when the block ends."""
    if given is not None:
        yield given
        return
    own = cls.open(storage.sibling(ref.path, readonly=True), readonly=True, options={})
    try:
        yield own
    finally:
        own.close()
