"""The cluster cache: decompressed clusters in a bounded LRU, write-back, read-ahead.

Guest I/O is small and random, clusters are large and compressed. Between the API and a
format driver this cache keeps whole decompressed clusters, so a 4 KiB read of a cached
cluster costs a slice and a 4 KiB write costs a copy; a dirty cluster is compressed and
checksummed once, when it is written back (on flush, on eviction, at the periodic commit).

A partial write into a cluster that is not cached does not read the cluster: the cache
keeps the written pieces (a *patch*) and the read-modify-write happens at write-back,
where a driver that compresses does it on its worker threads (``Driver.patch_many``), and
where several writes into one cluster cost one decode and one encode. A patch takes the
bytes written, not a whole cluster, so many more pending writes fit in the same memory.

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
#: What a patch piece costs beyond its bytes (the tuple, the bytes object, the list slot),
#: counted against the capacity so that many tiny writes cannot exceed it.
PIECE_OVERHEAD = 96
#: A patch that collects more pieces than this becomes a whole cluster (one read).
MAX_PIECES = 32
#: A random read caches its cluster on its second miss while no more than ADMIT_MAX_WASTE
#: times as many of the clusters admitted so were evicted unused as were hit first (a hit
#: saves about what an admission costs), else on its third. The counts halve at ADMIT_WINDOW.
ADMIT_MAX_WASTE = 1
ADMIT_WINDOW = 256


class Patch:
    """Pieces written into a cluster whose old content was not read: (offset, bytes) in
    write order, a later piece overriding an earlier one where they overlap."""

    __slots__ = ("nbytes", "pieces")

    def __init__(self) -> None:
        self.pieces: list[tuple[int, bytes]] = []
        self.nbytes = 0

    def add(self, within: int, data: bytes) -> None:
        self.pieces.append((within, data))
        self.nbytes += len(data) + PIECE_OVERHEAD

    def __len__(self) -> int:  # what it counts against the cache's capacity
        return self.nbytes

    def apply(self, base: bytes | bytearray) -> bytearray:
        out = bytearray(base)
        for within, data in self.pieces:
            out[within : within + len(data)] = data
        return out

    def covers(self, n: int) -> bool:
        """Whether the pieces cover [0, n): then the old content is never needed (small
        sequential writes fill a cluster without reading it)."""
        if self.nbytes - PIECE_OVERHEAD * len(self.pieces) < n:
            return False
        end = 0
        for within, data in sorted(self.pieces):
            if within > end:
                return False
            end = max(end, within + len(data))
        return end >= n


Entry = bytes | bytearray | Patch


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
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.dirty: set[int] = set()
        self.used = 0
        self._next_seq = -1  # guest offset where a sequential reader would read next
        self._readahead = 0
        self._ghost: OrderedDict[int, int] = OrderedDict()  # cluster -> misses, lately
        self._trial: set[int] = set()  # admitted by a second miss and not hit since
        self._useful = 0  # admitted clusters hit before eviction, lately
        self._wasted = 0  # admitted clusters evicted unused, lately
        self.counters = {
            "hits": 0,
            "misses": 0,
            "evictions": 0,
            "writebacks": 0,
            "readahead_clusters": 0,
            "bytes_loaded": 0,
            "bytes_written_back": 0,
            "patched_writes": 0,
        }

    # -- helpers -------------------------------------------------------------------

    def _clen(self, idx: int) -> int:
        """Length of cluster ``idx`` (the last one may be short)."""
        return min(self.cs, self.size - idx * self.cs)

    def _insert(self, idx: int, data: Entry, dirty: bool) -> None:
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
        victims: list[tuple[int, Entry]] = []
        while self.used > target and self.entries:
            idx, data = self.entries.popitem(last=False)
            self.used -= len(data)
            self.counters["evictions"] += 1
            if idx in self._trial:
                self._judge(idx, useful=False)
            if idx in self.dirty:
                self.dirty.discard(idx)
                victims.append((idx, data))
        if victims:
            self._write_back(victims)

    def _write_back(self, items: list[tuple[int, Entry]]) -> None:
        """Hand dirty clusters to the driver: whole ones as they are, patches to the
        driver's read-modify-write; what it leaves (holes over a backing image, or every
        patch for a driver without one) is completed here from the layer below.

        If the driver fails (a damaged old cluster under a patch, a full disk), every item
        is dirty again, so that no later flush can report as durable what never was."""
        try:
            self._hand_down(items)
        except BaseException:
            if self.capacity:
                for idx, data in items:
                    if idx in self.entries:
                        self.dirty.add(idx)
                    else:
                        self._insert(idx, data, True)
            raise

    def _hand_down(self, items: list[tuple[int, Entry]]) -> None:
        items.sort(key=lambda it: it[0])
        whole: list[tuple[int, bytes]] = []
        patches: dict[int, Patch] = {}
        for idx, data in items:
            if isinstance(data, Patch) and data.covers(self._clen(idx)):
                whole.append((idx * self.cs, bytes(data.apply(bytes(self._clen(idx))))))
            elif isinstance(data, Patch):
                patches[idx] = data
            else:
                whole.append((idx * self.cs, data if isinstance(data, bytes) else bytes(data)))
        if patches:
            left = self.driver.patch_many(
                [(idx, p.pieces) for idx, p in patches.items()], holes_read_zero=not self.copy_up
            )
            for idx in left:
                whole.append((idx * self.cs, bytes(patches[idx].apply(self._fetch(idx, 1)[0]))))
            whole.sort()
        if whole:
            self.driver.write_many(whole)
        self.counters["writebacks"] += len(items)
        self.counters["bytes_written_back"] += sum(
            len(d) if not isinstance(d, Patch) else self._clen(i) for i, d in items
        )

    def _materialize(self, idx: int, patch: Patch) -> bytearray:
        """A patch becomes the whole (dirty) cluster: its old content read once, the
        pieces applied on top."""
        clen = self._clen(idx)
        base = bytes(clen) if patch.covers(clen) else self._fetch(idx, 1)[0]
        cl = patch.apply(base)
        self._insert(idx, cl, True)
        return cl

    def _fetch(self, first: int, count: int) -> list[bytes]:
        """Load clusters [first, first+count) from below in one call."""
        clusters = self.below.read_clusters(first, count, self.cs)
        self.counters["bytes_loaded"] += sum(len(c) for c in clusters)
        return clusters

    # -- the operations --------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        pieces = self.read_pieces(offset, length)
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)

    def read_pieces(self, offset: int, length: int) -> list[bytes | memoryview]:
        """The bytes of [offset, offset+length) as consecutive immutable pieces (slices of
        cached clusters, no joining copy): a front end can send them as they are."""
        if self.capacity == 0:
            return [self.load(offset, length)]
        cs = self.cs
        first = offset // cs
        last = (offset + length - 1) // cs
        sequential = offset == self._next_seq
        self._next_seq = offset + length
        if sequential:
            self._readahead = min(max(self._readahead * 2, READAHEAD_MIN), READAHEAD_MAX)
        else:
            self._readahead = 0
            if first == last:  # a random read inside one cluster: the short way
                return [self._read_one(first, offset - first * cs, length)]
        pieces: list[bytes | memoryview] = []
        idx = first
        while idx <= last:
            cl = self.entries.get(idx)
            if isinstance(cl, Patch):
                self.counters["misses"] += 1
                cl = self._materialize(idx, cl)
            elif cl is not None:
                self.counters["hits"] += 1
                if idx in self._trial:
                    self._judge(idx, useful=True)
            if cl is not None:
                self.entries.move_to_end(idx)
                lo = offset - idx * cs if idx == first else 0
                hi = offset + length - idx * cs if idx == last else len(cl)
                if isinstance(cl, bytearray):  # dirty: a later write would change the piece
                    pieces.append(bytes(cl[lo:hi]))
                else:
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
        self._evict()
        return pieces

    def prefetch(self, offset: int, length: int) -> int:
        """Load the clusters of a range that are not cached, verified, as read-ahead does
        (at most half the cache: the rest stays for what is in use); how many were loaded."""
        cs = self.cs
        if self.capacity == 0 or length == 0:
            return 0
        first = offset // cs
        last = min((offset + length - 1) // cs, first + self.capacity // 2 // cs - 1)
        loaded = 0
        idx = first
        while idx <= last:
            if idx in self.entries:
                idx += 1
                continue
            end = idx
            while end <= last and end not in self.entries:
                end += 1
            for k, cl in enumerate(self._fetch(idx, end - idx)):
                self._insert(idx + k, cl, False)
            loaded += end - idx
            idx = end
        self.counters["readahead_clusters"] += loaded
        self._evict()
        return loaded

    def _read_one(self, idx: int, lo: int, length: int) -> bytes:
        """A random read inside one cluster. A cluster is cached on its second miss (as in
        2Q), or its third while that does not pay (:meth:`_admit_after`): the misses before
        only count in a small ghost list and read just the bytes asked for (a compressed
        cluster is then decoded only up to their end). A random read of a big disk then
        costs less, and a re-read set still gets cached."""
        cl = self.entries.get(idx)
        if cl is None:
            self.counters["misses"] += 1
            if self.cs > self.capacity // 2:
                return self.load(idx * self.cs + lo, length)
            ghost = self._ghost
            misses = ghost.pop(idx, 0) + 1
            if misses < self._admit_after():
                ghost[idx] = misses
                if len(ghost) > max(16, 2 * self.capacity // self.cs):
                    ghost.popitem(last=False)
                self.counters["bytes_loaded"] += length
                return self.load(idx * self.cs + lo, length)
            cl = self._fetch(idx, 1)[0]
            self._insert(idx, cl, False)
            self._trial.add(idx)
            self._evict()
        elif isinstance(cl, Patch):
            self.counters["misses"] += 1
            cl = self._materialize(idx, cl)
            self._evict()
        else:
            self.counters["hits"] += 1
            self.entries.move_to_end(idx)
            if idx in self._trial:
                self._judge(idx, useful=True)
        return bytes(cl[lo : lo + length]) if lo or length != len(cl) else bytes(cl)

    def _admit_after(self) -> int:
        """On which miss a random read caches its cluster. Caching costs a whole decode
        instead of a partial one and pays only if the cluster is read again before it is
        evicted: not when random reads spread over a disk many times the cache (then only
        a third miss, much rarer, admits), but yes for a working set that fits."""
        return 2 if self._wasted <= ADMIT_MAX_WASTE * self._useful else 3

    def _judge(self, idx: int, useful: bool) -> None:
        """Cluster ``idx``, admitted on trial, was hit (useful) or evicted unused."""
        self._trial.discard(idx)
        if useful:
            self._useful += 1
        else:
            self._wasted += 1
        if self._useful + self._wasted >= ADMIT_WINDOW:
            self._useful //= 2
            self._wasted //= 2

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
            if cl is None or isinstance(cl, Patch):
                # not read: the pieces wait for the write-back's read-modify-write
                self.counters["patched_writes"] += 1
                if cl is None:
                    p = Patch()
                    p.add(within, bytes(piece))
                    self._insert(idx, p, True)
                else:
                    p = cl
                    p.add(within, bytes(piece))
                    self.used += len(piece) + PIECE_OVERHEAD
                    self.entries.move_to_end(idx)
                if len(p.pieces) > MAX_PIECES or p.nbytes > self.cs:
                    self._materialize(idx, p)
                continue
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
        writes: list[tuple[int, Entry]] = []
        for idx, within, piece, whole in self._pieces(offset, mv):
            if whole:
                writes.append((idx, bytes(piece)))
            else:
                p = Patch()
                p.add(within, bytes(piece))
                writes.append((idx, p))
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
            self._trial.discard(idx)
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
            writes: list[tuple[int, Entry]] = []
            for i in part:
                cl = self.entries[i]
                if isinstance(cl, Patch):  # written back, it is no longer cached
                    del self.entries[i]
                    self.used -= len(cl)
                elif isinstance(cl, bytearray):  # freeze it: what was written back is clean
                    cl = bytes(cl)
                    self.entries[i] = cl
                writes.append((i, cl))
            self.dirty.difference_update(part)
            self._write_back(writes)

    def invalidate(self) -> None:
        """Forget every clean cluster (after a revert or a resize changed what is below)."""
        assert not self.dirty, "write back before invalidating"
        self.entries.clear()
        self._trial.clear()
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
            patched_clusters=sum(isinstance(e, Patch) for e in self.entries.values()),
            cluster_size=self.cs,
        )
        lookups = c["hits"] + c["misses"]
        c["hit_ratio"] = round(c["hits"] / lookups, 4) if lookups else 0.0
        return c
