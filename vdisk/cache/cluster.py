"""The cluster cache: decompressed clusters in a bounded LRU, write-back, read-ahead.

Guest I/O is small and random, clusters are large and compressed. Between the API and a
format driver this cache keeps whole decompressed clusters, so a 4 KiB read of a cached
cluster costs a slice and a 4 KiB write costs a copy; a dirty cluster is compressed and
checksummed once, when it is written back (on flush, on eviction, at the periodic commit).

It also does what every format needs once: copy-up. A partial write into a cluster is
turned into a whole-cluster write whose other bytes come from the layer below (this image
and its backing chain), so a driver of an image with a backing file only sees whole
clusters.

Not thread-safe by itself: :class:`vdisk.api.Disk` holds a lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from vdisk.formats.base import Driver


class Below(Protocol):
    """What the cache reads from: the image's layer with its backing chain."""

    def read(self, offset: int, length: int) -> bytes: ...

    def read_clusters(self, first: int, count: int, cs: int) -> list[bytes]: ...


#: Read-ahead starts at this many bytes once reads look sequential and doubles up to the max.
READAHEAD_MIN = 256 * 1024
READAHEAD_MAX = 4 * 1024 * 1024


class ClusterCache:
    """Whole clusters of one disk, keyed by cluster index.

    ``below`` is the layer with its backing chain, where misses are read from; ``driver``
    is where dirty clusters are written back. ``capacity`` is in bytes; 0 disables caching
    (writes go straight through, with copy-up where needed). Clean clusters are kept as
    the immutable buffers the driver decoded (no copy); a cluster becomes a bytearray
    only when a partial write patches it."""

    def __init__(
        self,
        driver: Driver,
        below: Below,
        size: int,
        cluster_size: int,
        capacity: int,
        *,
        copy_up: bool,
    ) -> None:
        self.driver = driver
        self.below = below
        self.load = below.read
        self.size = size
        self.cs = cluster_size
        self.capacity = capacity
        self.copy_up = copy_up
        self.entries: OrderedDict[int, bytes | bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.used = 0
        self._next_seq = -1  # guest offset where a sequential reader would read next
        self._readahead = 0
        self.counters = {
            "hits": 0,
            "misses": 0,
            "evictions": 0,
            "writebacks": 0,
            "readahead_clusters": 0,
            "bytes_loaded": 0,
            "bytes_written_back": 0,
        }

    # -- helpers -------------------------------------------------------------------

    def _clen(self, idx: int) -> int:
        """Length of cluster ``idx`` (the last one may be short)."""
        return min(self.cs, self.size - idx * self.cs)

    def _insert(self, idx: int, data: bytes | bytearray, dirty: bool) -> None:
        old = self.entries.pop(idx, None)
        if old is not None:
            self.used -= len(old)
        self.entries[idx] = data
        self.used += len(data)
        if dirty:
            self.dirty.add(idx)

    def _evict(self) -> None:
        """Shrink to 7/8 of capacity, writing dirty victims back in one batch."""
        if self.used <= self.capacity:
            return
        target = self.capacity - self.capacity // 8
        victims: list[tuple[int, bytes]] = []
        while self.used > target and self.entries:
            idx, data = self.entries.popitem(last=False)
            self.used -= len(data)
            self.counters["evictions"] += 1
            if idx in self.dirty:
                self.dirty.discard(idx)
                victims.append((idx * self.cs, data if isinstance(data, bytes) else bytes(data)))
        if victims:
            self._write_back(victims)

    def _write_back(self, writes: list[tuple[int, bytes]]) -> None:
        writes.sort()
        self.driver.write_many(writes)
        self.counters["writebacks"] += len(writes)
        self.counters["bytes_written_back"] += sum(len(d) for _, d in writes)

    def _fetch(self, first: int, count: int) -> list[bytes]:
        """Load clusters [first, first+count) from below in one call."""
        clusters = self.below.read_clusters(first, count, self.cs)
        self.counters["bytes_loaded"] += sum(len(c) for c in clusters)
        return clusters

    # -- the operations --------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if self.capacity == 0:
            return self.load(offset, length)
        cs = self.cs
        first = offset // cs
        last = (offset + length - 1) // cs
        sequential = offset == self._next_seq
        self._next_seq = offset + length
        if sequential:
            self._readahead = min(max(self._readahead * 2, READAHEAD_MIN), READAHEAD_MAX)
        else:
            self._readahead = 0
        pieces: list[bytes | bytearray | memoryview] = []
        idx = first
        while idx <= last:
            cl = self.entries.get(idx)
            if cl is not None:
                self.entries.move_to_end(idx)
                self.counters["hits"] += 1
                lo = offset - idx * cs if idx == first else 0
                hi = offset + length - idx * cs if idx == last else len(cl)
                pieces.append(memoryview(cl)[lo:hi] if lo or hi != len(cl) else cl)
                idx += 1
                continue
            # a run of misses: fetch it (plus read-ahead past the end of the request) at once
            run_end = idx
            while run_end <= last and run_end not in self.entries:
                run_end += 1
            extra = 0
            if sequential and run_end > last:
                total = (self.size + cs - 1) // cs
                want = max(1, self._readahead // cs)
                while (
                    extra < want and run_end + extra < total and run_end + extra not in self.entries
                ):
                    extra += 1
            n = run_end - idx
            self.counters["misses"] += n
            self.counters["readahead_clusters"] += extra
            clusters = self._fetch(idx, n + extra)
            fits = (n + extra) * cs <= self.capacity // 2
            for k, cl in enumerate(clusters):
                j = idx + k
                if j <= last:
                    lo = offset - j * cs if j == first else 0
                    hi = offset + length - j * cs if j == last else len(cl)
                    pieces.append(memoryview(cl)[lo:hi] if lo or hi != len(cl) else cl)
                if fits:
                    self._insert(j, cl, False)
            idx = run_end
        out = pieces[0] if len(pieces) == 1 and isinstance(pieces[0], bytes) else b"".join(pieces)
        self._evict()
        return out

    def _pieces(self, offset: int, mv: memoryview) -> Iterator[tuple[int, int, memoryview, bool]]:
        """Split a write at cluster boundaries: (cluster, offset in it, piece, whole?)."""
        pos = 0
        while pos < len(mv):
            idx, within = divmod(offset + pos, self.cs)
            clen = self._clen(idx)
            n = min(clen - within, len(mv) - pos)
            yield idx, within, mv[pos : pos + n], n == clen
            pos += n

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        if self.capacity == 0:
            self._write_through(offset, mv)
            return
        for idx, within, piece, whole in self._pieces(offset, mv):
            if whole:
                self._insert(idx, bytes(piece), True)
                continue
            cl = self.entries.get(idx)
            if cl is None:
                self.counters["misses"] += 1
                cl = bytearray(self._fetch(idx, 1)[0])
                self._insert(idx, cl, True)
            else:
                self.counters["hits"] += 1
                if not isinstance(cl, bytearray):
                    cl = bytearray(cl)
                    self.entries[idx] = cl
                self.entries.move_to_end(idx)
                self.dirty.add(idx)
            cl[within : within + len(piece)] = piece
        self._evict()

    def _write_through(self, offset: int, mv: memoryview) -> None:
        """No cache: whole clusters go down as they are, partial ones copy up if needed."""
        if not self.copy_up:
            self.driver.write(offset, bytes(mv))
            self.counters["bytes_written_back"] += len(mv)
            return
        writes: list[tuple[int, bytes]] = []
        for idx, within, piece, whole in self._pieces(offset, mv):
            if whole:
                writes.append((idx * self.cs, bytes(piece)))
            else:
                cl = bytearray(self._fetch(idx, 1)[0])
                cl[within : within + len(piece)] = piece
                writes.append((idx * self.cs, bytes(cl)))
        self._write_back(writes)

    def _split(self, offset: int, length: int) -> tuple[int, int]:
        """The whole clusters inside [offset, offset+length), as a cluster index range."""
        cs = self.cs
        first = -(-offset // cs)
        end = offset + length
        last = end // cs if end < self.size else -(-end // cs)
        return first, max(first, last)

    def zero(self, offset: int, length: int, below: Callable[[int, int], None]) -> None:
        """Zero a range: partial clusters at the edges through the cache, whole clusters
        dropped here and handed to ``below`` (the driver's write_zeroes or discard)."""
        first, last = self._split(offset, length)
        cs = self.cs
        if first >= last:
            self.write(offset, bytes(length))
            return
        head = first * cs - offset
        if head > 0:
            self.write(offset, bytes(head))
        for idx in range(first, last):
            cl = self.entries.pop(idx, None)
            if cl is not None:
                self.used -= len(cl)
            self.dirty.discard(idx)
        mid_end = min(last * cs, self.size)
        below(first * cs, mid_end - first * cs)
        tail = offset + length - mid_end
        if tail > 0:
            self.write(mid_end, bytes(tail))

    def write_back(self, offset: int = 0, length: int | None = None) -> None:
        """Write dirty clusters (all, or those meeting a range) to the driver; no commit."""
        if not self.dirty:
            return
        if length is None:
            idxs = list(self.dirty)
        else:
            lo, hi = offset // self.cs, (offset + length - 1) // self.cs
            idxs = [i for i in self.dirty if lo <= i <= hi]
        if not idxs:
            return
        # in batches of at most 1/8 of the cache (as eviction does): the copies and the
        # driver's encoded buffers of a batch are what a write-back adds to memory
        idxs.sort()
        batch = max(1, (self.capacity // 8) // self.cs)
        for k in range(0, len(idxs), batch):
            part = idxs[k : k + batch]
            writes = []
            for i in part:
                cl = self.entries[i]
                if isinstance(cl, bytearray):  # freeze it: what was written back is clean
                    cl = bytes(cl)
                    self.entries[i] = cl
                writes.append((i * self.cs, cl))
            self.dirty.difference_update(part)
            self._write_back(writes)

    def invalidate(self) -> None:
        """Forget every clean cluster (after a revert or a resize changed what is below)."""
        assert not self.dirty, "write back before invalidating"
        self.entries.clear()
        self.used = 0

    def resize(self, size: int) -> None:
        self.write_back()
        self.invalidate()
        self.size = size

    def stats(self) -> dict[str, Any]:
        c: dict[str, Any] = dict(self.counters)
        c.update(
            capacity_bytes=self.capacity,
            cached_bytes=self.used,
            cached_clusters=len(self.entries),
            dirty_clusters=len(self.dirty),
            cluster_size=self.cs,
        )
        lookups = c["hits"] + c["misses"]
        c["hit_ratio"] = round(c["hits"] / lookups, 4) if lookups else 0.0
        return c
