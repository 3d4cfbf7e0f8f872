"""qcow2 reference counts: the two-level refcount table, cluster allocation, rebuild.

Spec: QEMU docs/interop/qcow2.txt, "Host cluster management". A refcount table (contiguous,
``refcount_table_clusters`` clusters) holds offsets of refcount blocks (one cluster each);
a block holds ``cluster_size * 8 / refcount_bits`` entries, bit 0 the least significant
for sub-byte widths, big endian for wider ones. Every width (refcount_order 0..6) is read
and written here.

Ordering (crash safety, as qemu): a refcount increment reaches the disk before the mapping
that uses the cluster (a crash leaks, never corrupts); a new refcount block reaches the
disk before the table entry that points at it; a decrement happens only after the mapping
that dropped the cluster is durable (the driver queues frees until flush).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable

from vdisk.cache.lru import LRU
from vdisk.errors import CorruptImage, UnsupportedFeature
from vdisk.storage import Storage

U64 = struct.Struct(">Q")
assert U64.size == 8
REFTABLE_LOC = struct.Struct(">QI")  # header bytes 48..59: refcount_table_offset, _clusters
assert REFTABLE_LOC.size == 12
REFTABLE_LOC_AT = 48
RT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00  # bits 9..63
MAX_REFTABLE_BYTES = 8 << 20  # qemu's implementation limit; bounds our memory too
_LITTLE = sys.byteorder == "little"


def be64_array(data: bytes) -> array:
    """Big-endian u64 table bytes -> array('Q') of native ints (8 bytes per entry)."""
    a = array("Q")
    a.frombytes(data)
    if _LITTLE:
        a.byteswap()
    return a


def zero_array(n: int) -> array:
    """n zero u64 entries."""
    return array("Q", [0]) * n


def be64_bytes(a: array) -> bytes:
    b = array("Q", a)
    if _LITTLE:
        b.byteswap()
    return b.tobytes()


def rc_get(buf: bytearray, i: int, bits: int) -> int:
    """Entry ``i`` of a refcount block of ``bits``-bit entries."""
    if bits >= 8:
        nb = bits >> 3
        return int.from_bytes(buf[i * nb : i * nb + nb], "big")
    per = 8 // bits
    return (buf[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)


def rc_set(buf: bytearray, i: int, bits: int, value: int) -> None:
    if bits >= 8:
        nb = bits >> 3
        buf[i * nb : i * nb + nb] = value.to_bytes(nb, "big")
        return
    per = 8 // bits
    shift = (i % per) * bits
    mask = ((1 << bits) - 1) << shift
    buf[i // per] = (buf[i // per] & ~mask) | (value << shift)


class IoState:
    """Whether writes were issued since the last sync: barriers sync only when needed."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.unsynced = False

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.storage.pwrite(offset, data)
        self.unsynced = True

    def barrier(self) -> None:
        if self.unsynced:
            self.storage.sync()
            self.unsynced = False


class RefBlock:
    __slots__ = ("buf", "dirty", "offset")

    def __init__(self, offset: int, buf: bytearray, dirty: bool = False) -> None:
        self.offset = offset
        self.buf = buf
        self.dirty = dirty


class Refcounts:
    """The refcount structures of one open image, with a bounded cache of blocks."""

    def __init__(
        self,
        storage: Storage,
        io: IoState,
        *,
        cluster_bits: int,
        order: int,
        table_offset: int,
        table_clusters: int,
        cache_bytes: int,
    ) -> None:
        self.storage = storage
        self.io = io
        self.path = storage.path
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.order = order
        self.bits = 1 << order
        self.max_refcount = (1 << self.bits) - 1
        self.entries_per_block = self.cs * 8 // self.bits
        self.cache: LRU[int, RefBlock] = LRU(
            max(cache_bytes, 2 * self.cs), weigh=lambda b: len(b.buf), on_evict=self._evicted
        )
        self._load_table(table_offset, table_clusters)
        file_clusters = -(-storage.size() // self.cs)
        self.hint = 1  # no free cluster below this one (cluster 0, the header, never is)
        self.alloc_end = file_clusters  # clusters >= this are neither in the file nor allocated
        self.reserved = (0, 0)  # a range being laid out: find_free skips it
        #: called with each cluster find_free hands out; raises if it holds metadata
        self.guard: Callable[[int], None] | None = None

    # -- table -----------------------------------------------------------------------

    def _load_table(self, offset: int, clusters: int) -> None:
        size = self.storage.size()
        nbytes = clusters * self.cs
        if clusters <= 0:
            raise CorruptImage(f"{self.path}: refcount_table_clusters is {clusters}, must be >= 1")
        if nbytes > MAX_REFTABLE_BYTES:
            raise CorruptImage(
                f"{self.path}: refcount table of {clusters} clusters ({nbytes} bytes) exceeds "
                f"the limit of {MAX_REFTABLE_BYTES} bytes"
            )
        if offset == 0 or offset % self.cs:
            raise CorruptImage(
                f"{self.path}: refcount_table_offset {offset:#x} is not a non-zero multiple "
                f"of the cluster size {self.cs}"
            )
        if offset + nbytes > size:
            raise CorruptImage(
                f"{self.path}: refcount table at {offset:#x} (+{nbytes} bytes) ends past the "
                f"end of the file ({size} bytes)"
            )
        self.table_offset = offset
        self.table_clusters = clusters
        self.table = be64_array(self.storage.pread_exact(offset, nbytes, "refcount table"))
        self.table_dirty: set[int] = set()
        self.blocks = {e & RT_OFFSET_MASK for e in self.table if e & RT_OFFSET_MASK}

    # -- block entries -----------------------------------------------------------------

    def _get(self, buf: bytearray, i: int) -> int:
        return rc_get(buf, i, self.bits)

    def _set(self, buf: bytearray, i: int, value: int) -> None:
        rc_set(buf, i, self.bits, value)

    def _evicted(self, key: int, block: RefBlock) -> None:
        if block.dirty:
            self.io.write(block.offset, block.buf)
            block.dirty = False

    def _load_block(self, ti: int) -> RefBlock | None:
        if ti >= len(self.table):
            return None
        off = self.table[ti] & RT_OFFSET_MASK
        if off == 0:
            return None
        blk = self.cache.get(off)
        if blk is not None:
            return blk
        if off % self.cs:
            raise CorruptImage(
                f"{self.path}: refcount table entry {ti} points to unaligned offset {off:#x}"
            )
        # checked before the read: an entry past 2**63 would overflow pread's offset
        past_end = off + self.cs > self.storage.size()
        buf = bytearray() if past_end else bytearray(self.storage.pread(off, self.cs))
        if len(buf) < self.cs:
            raise CorruptImage(
                f"{self.path}: refcount block {ti} at {off:#x} lies past the end of the file "
                f"({self.storage.size()} bytes)"
            )
        blk = RefBlock(off, buf)
        self.cache.put(off, blk)
        return blk

    def get(self, cluster: int) -> int:
        """The refcount of host cluster ``cluster`` (0 where no block covers it)."""
        ti, i = divmod(cluster, self.entries_per_block)
        blk = self._load_block(ti)
        return 0 if blk is None else self._get(blk.buf, i)

    def set_count(self, cluster: int, value: int) -> None:
        if value > self.max_refcount:
            raise UnsupportedFeature(
                f"{self.path}: refcount of cluster {cluster} would be {value}, over the "
                f"maximum {self.max_refcount} of {self.bits}-bit refcounts"
            )
        ti, i = divmod(cluster, self.entries_per_block)
        blk = self._load_block(ti) if value == 0 else self._ensure_block(ti)
        if blk is None:
            return
        # _ensure_block may have evicted nothing we hold: fetch again to be sure it is cached
        self.cache.put(blk.offset, blk)
        self._set(blk.buf, i, value)
        blk.dirty = True

    def adjust(self, cluster: int, delta: int) -> int:
        old = self.get(cluster)
        new = old + delta
        if new < 0:
            raise CorruptImage(
                f"{self.path}: refcount of cluster {cluster} (offset {cluster * self.cs:#x}) "
                f"would drop below zero (it is {old})"
            )
        self.set_count(cluster, new)
        if new == 0 and 0 < cluster < self.hint:
            self.hint = cluster
        return new

    # -- allocation --------------------------------------------------------------------

    def find_free(self) -> int:
        """The first cluster at or after the hint with refcount 0, outside the reserved
        range; it is taken (the hint moves past it) but its refcount is not set."""
        c = self.hint
        epb = self.entries_per_block
        r0, r1 = self.reserved
        while True:
            if r0 <= c < r1:
                c = r1
                continue
            if c >= self.alloc_end:
                break
            ti, i = divmod(c, epb)
            blk = self._load_block(ti)
            if blk is None:
                break
            j = self._first_zero(blk.buf, i)
            if j is None:
                c = (ti + 1) * epb
                continue
            c = ti * epb + j
            if r0 <= c < r1:
                continue
            break
        if self.guard is not None:
            self.guard(c)
        self.hint = c + 1
        self.alloc_end = max(self.alloc_end, c + 1)
        return c

    def _first_zero(self, buf: bytearray, start: int) -> int | None:
        bits = self.bits
        n = self.entries_per_block
        if bits >= 8:
            nb = bits >> 3
            pat = bytes(nb)
            pos = start * nb
            while True:
                k = buf.find(pat, pos)
                if k < 0:
                    return None
                if k % nb == 0:
                    return k // nb
                pos = k + (nb - k % nb)
        for i in range(start, n):
            if self._get(buf, i) == 0:
                return i
        return None

    def alloc(self) -> int:
        """Allocate one cluster (refcount 1); returns its host offset."""
        c = self.find_free()
        self.set_count(c, 1)
        return c * self.cs

    def alloc_contiguous(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters past everything in use; returns the offset."""
        start = max(self.alloc_end, -(-self.storage.size() // self.cs))
        if self.hint >= self.alloc_end:
            self.hint = start + n  # nothing was free below the end, nor is now
        self.reserved = (start, start + n)
        self.alloc_end = start + n
        try:
            self._set_ones(start, n)
        finally:
            self.reserved = (0, 0)
        return start * self.cs

    def tail_is_full(self) -> bool:
        """Whether no cluster below the end of what is allocated is known to be free:
        then :meth:`alloc_contiguous` takes what :meth:`alloc` would, only in one go."""
        return self.hint >= self.alloc_end

    def _set_ones(self, start: int, n: int) -> None:
        """Set the refcounts of clusters [start, start+n), all 0 before, to 1: a slice
        assignment per refcount block rather than a call per cluster."""
        epb = self.entries_per_block
        c, end = start, start + n
        while c < end:
            ti, i = divmod(c, epb)
            k = min(end - c, epb - i)
            blk = self._ensure_block(ti)
            self.cache.put(blk.offset, blk)
            if self.bits >= 8:
                nb = self.bits >> 3
                blk.buf[i * nb : (i + k) * nb] = (1).to_bytes(nb, "big") * k
            else:
                for j in range(i, i + k):
                    self._set(blk.buf, j, 1)
            blk.dirty = True
            c += k

    def _ensure_block(self, ti: int) -> RefBlock:
        """The refcount block for table index ``ti``, allocating (and growing the table)
        as needed. A new block that falls in its own range describes itself."""
        epb = self.entries_per_block
        for _ in range(64):
            if ti >= len(self.table):
                self._grow_table(ti)
                continue
            blk = self._load_block(ti)
            if blk is not None:
                return blk
            b = self.find_free()
            tj = b // epb
            if tj >= len(self.table):
                self._grow_table(tj)
            if tj == ti or self.table[tj] == 0:
                # a self-describing block for b's own range
                buf = bytearray(self.cs)
                self._set(buf, b % epb, 1)
                self._install(tj, b * self.cs, buf)
                continue
            blk_j = self._load_block(tj)
            assert blk_j is not None
            self._set(blk_j.buf, b % epb, self._get(blk_j.buf, b % epb) + 1)
            blk_j.dirty = True
            self._install(ti, b * self.cs, bytearray(self.cs))
        raise CorruptImage(f"{self.path}: could not place refcount block {ti} (allocation loop)")

    def _install(self, ti: int, offset: int, buf: bytearray) -> None:
        self.cache.put(offset, RefBlock(offset, buf, dirty=True))
        self.blocks.add(offset)
        self.table[ti] = offset
        self.table_dirty.add(ti)

    def _grow_table(self, need_ti: int) -> None:
        """Move the refcount table to a larger one past the end of everything in use.

        The new table and the new blocks that describe it are laid out together; they are
        written and synced before the header switches to them, then the old table is freed.
        """
        cs, epb = self.cs, self.entries_per_block
        self.write_dirty()
        self.io.barrier()
        start = max(self.alloc_end, -(-self.storage.size() // cs))
        entries = max(need_ti + 1, 2 * len(self.table))
        k = 0
        for _ in range(32):
            t_clusters = -(-entries * 8 // cs)
            end = start + t_clusters + k
            last_ti = (end - 1) // epb
            entries = max(entries, last_ti + 1)
            t_clusters = -(-entries * 8 // cs)
            end = start + t_clusters + k
            missing = [
                ti
                for ti in range(start // epb, (end - 1) // epb + 1)
                if ti >= len(self.table) or self.table[ti] == 0
            ]
            if len(missing) <= k and (end - 1) // epb < entries:
                break
            k = len(missing)
        else:
            raise CorruptImage(f"{self.path}: cannot lay out a larger refcount table")
        if t_clusters * cs > MAX_REFTABLE_BYTES:
            raise UnsupportedFeature(
                f"{self.path}: the refcount table would need {t_clusters * cs} bytes, over "
                f"the limit of {MAX_REFTABLE_BYTES}"
            )
        new_table = array("Q", self.table)
        new_table.extend([0] * (t_clusters * cs // 8 - len(new_table)))
        blocks: dict[int, bytearray] = {}
        for n, ti in enumerate(missing):
            off = (start + t_clusters + n) * cs
            new_table[ti] = off
            blocks[ti] = bytearray(cs)
        for c in range(start, start + t_clusters + len(missing)):
            ti, i = divmod(c, epb)
            if ti in blocks:
                self._set(blocks[ti], i, 1)
            else:
                blk = self._load_block(ti)
                assert blk is not None
                self._set(blk.buf, i, self._get(blk.buf, i) + 1)
                blk.dirty = True
        for ti, buf in blocks.items():
            self.io.write(new_table[ti], buf)
        self.write_dirty()
        self.io.write(start * cs, be64_bytes(new_table))
        self.io.barrier()
        self.io.write(REFTABLE_LOC_AT, REFTABLE_LOC.pack(start * cs, t_clusters))
        self.io.barrier()
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        self.blocks.update(new_table[ti] for ti in blocks)
        self.table_offset, self.table_clusters = start * cs, t_clusters
        self.table_dirty = set()
        self.alloc_end = max(self.alloc_end, start + t_clusters + len(missing))
        for c in range(old_off // cs, old_off // cs + old_clusters):
            self.adjust(c, -1)

    # -- write back --------------------------------------------------------------------

    def write_dirty(self) -> bool:
        """Write dirty blocks, then (after a barrier) dirty table entries."""
        wrote = False
        for _off, blk in self.cache.items():
            if blk.dirty:
                self.io.write(blk.offset, blk.buf)
                blk.dirty = False
                wrote = True
        if self.table_dirty:
            self.io.barrier()
            for ti in sorted(self.table_dirty):
                self.io.write(self.table_offset + ti * 8, U64.pack(self.table[ti]))
            self.table_dirty = set()
            wrote = True
        return wrote

    def block_counts(self, ti: int) -> array | None:
        """All refcounts of block ``ti`` as an array('Q') (None where there is no block),
        decoded in bulk for the widths that are whole bytes: check compares whole blocks."""
        blk = self._load_block(ti)
        if blk is None:
            return None
        bits = self.bits
        if bits >= 8:
            code = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
            a = array(code)
            a.frombytes(bytes(blk.buf))
            if _LITTLE and bits > 8:
                a.byteswap()
            return a if code == "Q" else array("Q", a)
        return array("Q", (self._get(blk.buf, i) for i in range(self.entries_per_block)))

    def metadata_clusters(self, skip: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Clusters holding the refcount table and blocks (but not blocks in ``skip``)."""
        cs = self.cs
        out = list(range(self.table_offset // cs, self.table_offset // cs + self.table_clusters))
        out.extend(
            (e & RT_OFFSET_MASK) // cs
            for ti, e in enumerate(self.table)
            if e & RT_OFFSET_MASK and ti not in skip
        )
        return out

    def invalid_blocks(self) -> dict[int, int]:
        """Table index -> offset of each block that is unaligned or lies past the file end."""
        fsize = self.storage.size()
        out = {}
        for ti, e in enumerate(self.table):
            off = e & RT_OFFSET_MASK
            if off and (off % self.cs or off + self.cs > fsize):
                out[ti] = off
        return out

    def covered_clusters(self) -> int:
        """One past the last cluster that has an allocated refcount block."""
        for ti in range(len(self.table) - 1, -1, -1):
            if self.table[ti] & RT_OFFSET_MASK:
                return (ti + 1) * self.entries_per_block
        return 0

    def rebuild(self, expected: array, nclusters: int, reset: Callable[[], None]) -> None:
        """Write a fresh table and blocks from ``expected`` (refcounts of clusters
        0..nclusters-1, not counting the old refcount structures) past the end of the file,
        sync, switch the header to them, sync. The old structures become free space."""
        cs, epb = self.cs, self.entries_per_block
        self.cache.clear()
        start = max(nclusters, -(-self.storage.size() // cs))
        k = 1
        for _ in range(64):
            t = -(-k * 8 // cs)
            need = -(-(start + t + k) // epb)
            if need <= k:
                break
            k = need
        t = -(-k * 8 // cs)
        if t * cs > MAX_REFTABLE_BYTES:
            raise UnsupportedFeature(f"{self.path}: rebuilt refcount table would be too large")
        table = zero_array(t * cs // 8)
        new_meta_end = start + t + k
        for ti in range(k):
            buf = bytearray(cs)
            base = ti * epb
            for i in range(epb):
                c = base + i
                if c < nclusters:
                    v = expected[c]
                elif start <= c < new_meta_end:
                    v = 1
                else:
                    continue
                if v:
                    if v > self.max_refcount:
                        raise UnsupportedFeature(
                            f"{self.path}: cluster {c} has {v} references, over the maximum "
                            f"{self.max_refcount} of {self.bits}-bit refcounts"
                        )
                    self._set(buf, i, v)
            off = (start + t + ti) * cs
            table[ti] = off
            self.io.write(off, buf)
        self.io.write(start * cs, be64_bytes(table))
        self.io.barrier()
        self.io.write(REFTABLE_LOC_AT, REFTABLE_LOC.pack(start * cs, t))
        self.io.barrier()
        self.table = table
        self.blocks = {e for e in table if e}
        self.table_offset, self.table_clusters = start * cs, t
        self.table_dirty = set()
        self.hint = 1
        self.alloc_end = new_meta_end
        reset()

    def stats(self) -> dict[str, int]:
        return self.cache.stats()
