"""The native ``.vdisk`` format: compressed, checksummed, copy-on-write, crash-safe.

docs/format.md is the spec. In short: the file is an array of cluster-sized slots; a
radix tree of mapping tables maps guest clusters to stored (lz4 or raw) clusters; a
second radix tree holds a 16-bit refcount per slot; every pointer carries the xxh3-64 of
what it points to, up to the root pointers in the header (a Merkle tree). Nothing live
is overwritten: a commit writes new tables elsewhere, syncs, and switches roots by
writing the other of two header copies with generation + 1.

Module map: native_layout.py (structs, header), native_tree.py (the CoW radix tree),
native_snap.py (snapshots), native_check.py (check, repair, compact),
this file (the driver: allocation and refcounts, mapping, I/O, commit, backing).
"""

from __future__ import annotations

import logging
import os
import struct
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from vdisk.cache import codec
from vdisk.cache.lru import LRU
from vdisk.errors import (
    BackingMismatch,
    CorruptImage,
    ReadOnlyImage,
    UnsupportedFeature,
    UsageError,
    VdiskError,
)
from vdisk.formats import native_snap
from vdisk.formats.base import (
    BackingRef,
    CheckReport,
    Driver,
    Extent,
    Kind,
    SnapshotInfo,
    cluster_spans,
    merge_extents,
    reject_unknown_options,
)
from vdisk.formats.common import LazyPool, compressor_option
from vdisk.formats.native_layout import (
    BACKING_FOREIGN,
    BACKING_NATIVE,
    BACKING_NONE,
    BACKING_UNPINNED,
    DEFAULT_CLUSTER_SIZE,
    ENTRY,
    ENTRY_BITS,
    FLAG_ZERO,
    HEADER_OFFSETS,
    HEADER_SLOT,
    INCOMPAT_ZSTD,
    KNOWN_AUTOCLEAR,
    MAGIC,
    MAX_BLOB,
    MAX_CLUSTER_BITS,
    MAX_GUEST_SIZE,
    MAX_REFCOUNT,
    MIN_CLUSTER_BITS,
    NULL_ENTRY,
    RUN,
    ZERO_ENTRY,
    Entry,
    Header,
    Runs,
    Snapshot,
    depth_for,
    first_data_slot,
    header_generation,
    pack_runs,
    pack_snapshots,
    parse_header,
    parse_snapshots,
)
from vdisk.formats.native_tree import Tree
from vdisk.storage import Storage

log = logging.getLogger(__name__)

RC = struct.Struct("<H")
IDENTITY_BYTES = 4096  # a foreign base is identified by its size and xxh3 of head + tail
PARALLEL_MIN_CLUSTERS = 4
PARALLEL_MIN_CLUSTER_SIZE = 16384
_T = TypeVar("_T")
_R = TypeVar("_R")

OPEN_OPTIONS = ("metadata_cache_mb", "commit_interval", "workers", "compress")
CREATE_OPTIONS = ("cluster_size", "backing", "backing_driver", "preallocation")


def _foreign_digest(storage: Storage) -> int:
    size = storage.size()
    head = storage.pread(0, IDENTITY_BYTES)
    tail = storage.pread(max(0, size - IDENTITY_BYTES), IDENTITY_BYTES)
    return codec.checksum(head + tail)


class NativeDriver(Driver):
    name = "vdisk"
    aliases = ("native",)
    extensions = (".vdisk",)
    can_create = True
    has_snapshots = True
    compressed_options = ({}, {"compress": "zstd"})  # archives: ~1.35x smaller than lz4

    # -- discovery and creation ------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        return 100 if head[: len(MAGIC)] == MAGIC else 0

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        reject_unknown_options(cls.name, options, CREATE_OPTIONS)
        cs = int(options.get("cluster_size") or DEFAULT_CLUSTER_SIZE)
        if cs & (cs - 1) or not (1 << MIN_CLUSTER_BITS) <= cs <= (1 << MAX_CLUSTER_BITS):
            raise UsageError(
                f"{storage.path}: cluster size {cs} must be a power of two in "
                f"[{1 << MIN_CLUSTER_BITS}, {1 << MAX_CLUSTER_BITS}]"
            )
        if not 0 <= size <= MAX_GUEST_SIZE:
            raise UsageError(f"{storage.path}: size {size} outside [0, {MAX_GUEST_SIZE}]")
        if options.get("preallocation") not in (None, "off", "metadata"):
            raise UsageError(f"{storage.path}: vdisk images are thin; preallocation must be off")
        cbits = cs.bit_length() - 1
        first = first_data_slot(cs)
        hdr = Header(
            generation=0,
            cluster_bits=cbits,
            depth=depth_for(max(1, -(-size // cs)), cbits - ENTRY_BITS, cbits - ENTRY_BITS),
            rdepth=1,
            size=size,
            host_slots=first,
            uuid=uuidlib.uuid4().bytes,
            created=time.time(),
            committed=time.time(),
            root=Entry(),
            rroot=Entry(),
            snap_table=Entry(),
            snap_count=0,
            deferred=Entry(),
            deferred_runs=0,
        )
        backing: BackingRef | None = options.get("backing")
        if backing is not None:
            _set_backing_fields(hdr, backing, options.get("backing_driver"))
        storage.truncate(0)
        storage.truncate(first * cs)
        # generation 0 has no refcount tree yet: open() builds it (reserved slots = 1) and
        # the first commit writes it. Both copies are written so either one verifies.
        raw = hdr.pack()
        storage.pwrite(HEADER_OFFSETS[0], raw)
        storage.sync()
        hdr.generation = 1
        storage.pwrite(HEADER_OFFSETS[1], hdr.pack())
        storage.sync()

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> NativeDriver:
        reject_unknown_options(cls.name, options, OPEN_OPTIONS)
        return cls(storage, readonly=readonly, options=options)

    # -- opening ---------------------------------------------------------------------

    def __init__(
        self,
        storage: Storage,
        *,
        readonly: bool,
        options: dict[str, Any],
        header: Header | None = None,
        view_of: NativeDriver | None = None,
    ) -> None:
        self.storage = storage
        self.readonly = readonly
        self.view_of = view_of
        mb = options.get("metadata_cache_mb", 8)
        interval = options.get("commit_interval", 5.0)
        try:
            self.cache_bytes = max(0, int(float(mb) * (1 << 20)))
            self.commit_interval = float(interval) if interval else 0.0
            # Measured on the idle 2-core machine, 64 KiB clusters of realistic content:
            # encoding (lz4 compress releases the GIL) on 2 threads runs 1.24x as fast as
            # on one (a sequential write through the cache ~500 -> ~540 MB/s); decoding
            # does not gain (lz4 decompress is fast and xxh3 holds the GIL up to 64 KiB):
            # 2 threads read at 0.3-0.7x. So writes use `workers` threads (default: the
            # cores, at most 2) and reads stay on the caller's thread. With other jobs
            # loading the cores, 2 threads measured 0.55-0.93x: pass workers=1 there.
            self.workers = int(options.get("workers", min(2, os.cpu_count() or 1)))
        except (TypeError, ValueError):
            raise UsageError(f"{storage.path}: bad vdisk option value in {options!r}") from None
        self.compress = compressor_option("vdisk", options.get("compress", "lz4"))
        self._threads = LazyPool(self.workers, "vdisk-codec")
        self._broken: BaseException | None = None
        self.changed = False
        self.counters = {
            "clusters_written": 0,
            "clusters_read": 0,
            "clusters_patched": 0,
            "bytes_stored": 0,
            "commits": 0,
        }
        hdr = header if header is not None else self._read_headers()
        self.hdr = hdr
        self.generation = hdr.generation
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = 1 << hdr.cluster_bits
        self.size = hdr.size
        self.host_slots = hdr.host_slots
        self.first_slot = first_data_slot(self.cluster_size)
        self.backing = (
            BackingRef(hdr.backing_path, hdr.backing_format or None)
            if hdr.backing_kind != BACKING_NONE
            else None
        )
        fan_bits = self.cluster_bits - ENTRY_BITS
        # a snapshot view gets its own cache: the generic layer may read it from another
        # thread while the live image is written, and the LRU is not thread-safe
        self.node_cache: LRU[tuple[int, int], bytes] = LRU(max(self.cache_bytes, 1))
        self.map = Tree(
            self, "mapping", hdr.depth, hdr.root, fan_bits, self.node_cache, self._map_cow
        )
        self.rtree = Tree(
            self, "refcount", hdr.rdepth, hdr.rroot, self.cluster_bits - 1, self.node_cache,
            self._rc_cow,
        )  # fmt: skip
        self.txn_new: set[int] = set()  # slots allocated since the last commit
        self.deferred: set[int] = set()  # slots released in this transaction (freed next commit)
        self.prev_deferred = Runs()  # the last commit's deferred-free list
        self.quarantine = Runs()  # freed by the commit in progress: reuse after it
        self.free_hint = self.first_slot
        self.snapshots: list[Snapshot] = []
        self.snaps_dirty = False
        self.last_commit = time.monotonic()
        if view_of is not None:
            return
        self.prev_deferred = self._load_deferred()
        self.snapshots = self._load_snapshots()
        if hdr.rroot.host == 0:
            # a fresh image: the refcount tree is built in memory and written by the first
            # commit; until then nothing but the header slots can be in use
            if self.host_slots != self.first_slot or hdr.root.host or self.snapshots:
                raise CorruptImage(
                    f"{storage.path}: header has no refcount table but {self.host_slots} "
                    f"slots in use (expected {self.first_slot})"
                )
            for s in range(self.first_slot):
                self._rc_set(s, 1)
            self.changed = False  # not a change of the image: no commit just for this

    def _read_headers(self) -> Header:
        st = self.storage
        fsize = st.size()
        if fsize < HEADER_SLOT:
            raise CorruptImage(f"{st.path}: file is {fsize} bytes, too short for a vdisk header")
        # The newest intact copy wins. A copy that is torn or flipped (bad checksum) is
        # skipped; an intact copy whose fields do not fit the file is an error, not a
        # reason to fall back silently to older data.
        copies = []
        errors: list[str] = []
        damaged: list[int] = []
        for off in HEADER_OFFSETS:
            raw = st.pread(off, HEADER_SLOT)
            gen = header_generation(raw)
            if gen is None:
                try:
                    parse_header(raw, st.path, off, fsize)
                except VdiskError as e:
                    errors.append(str(e))
                    if raw.count(0) != len(raw):
                        damaged.append(off)
                continue
            copies.append((gen, off, raw))
        if not copies:
            raise CorruptImage(f"{st.path}: no valid header copy ({'; '.join(errors)})")
        gen, off, raw = max(copies)
        if damaged:
            # a commit torn by a crash, or a damaged header: either way the other copy is
            # the last complete commit, which is what the user should know they are seeing
            log.warning(
                "%s: header copy at offset %d is damaged; opened the other copy "
                "(generation %d, the last complete commit)",
                st.path,
                damaged[0],
                gen,
            )
        return parse_header(raw, st.path, off, fsize)

    def _read_blob(self, e: Entry, what: str) -> bytes:
        if e.host == 0:
            return b""
        if e.codec != codec.RAW or e.flags or e.length > MAX_BLOB:
            raise CorruptImage(
                f"{self.storage.path}: {what}: bad entry (codec {e.codec}, flags {e.flags}, "
                f"length {e.length}, limit {MAX_BLOB})"
            )
        slot = e.host >> self.cluster_bits
        end = slot + self._blob_slots(e.length)
        if e.host & (self.cluster_size - 1) or slot < self.first_slot or end > self.host_slots:
            raise CorruptImage(
                f"{self.storage.path}: {what} at host offset {e.host} (length {e.length}) "
                f"is outside the allocated area (ends at {self.host_slots << self.cluster_bits})"
            )
        where = f"{self.storage.path}: {what} at host offset {e.host}"
        stored = self.storage.pread_exact(e.host, e.length, where)
        return codec.decode(codec.RAW, stored, e.checksum, e.length, where)

    def _blob_slots(self, length: int) -> int:
        return max(1, -(-length // self.cluster_size))

    def _blob_slot_list(self, e: Entry) -> list[int]:
        if e.host == 0:
            return []
        s = e.host >> self.cluster_bits
        return list(range(s, s + self._blob_slots(e.length)))

    def _load_deferred(self) -> Runs:
        blob = self._read_blob(self.hdr.deferred, "deferred-free list")
        if len(blob) != self.hdr.deferred_runs * RUN.size:
            raise CorruptImage(
                f"{self.storage.path}: deferred-free list is {len(blob)} bytes, "
                f"expected {self.hdr.deferred_runs} runs of {RUN.size}"
            )
        runs = Runs.from_blob(blob)
        end = self.first_slot
        for first, n in runs:
            if n < 1 or first < end or first + n > self.host_slots:
                raise CorruptImage(
                    f"{self.storage.path}: deferred-free run ({first}, {n}) is not sorted, "
                    f"overlaps, or lies outside [{self.first_slot}, {self.host_slots})"
                )
            end = first + n
        return runs

    def _load_snapshots(self) -> list[Snapshot]:
        blob = self._read_blob(self.hdr.snap_table, "snapshot table")
        return parse_snapshots(blob, self.hdr.snap_count, f"{self.storage.path}: snapshot table")

    # -- refcounts and allocation ----------------------------------------------------

    def _rc_get(self, slot: int) -> int:
        leaf, _ = self.rtree.get_leaf(slot)
        if leaf is None:
            return 0
        return RC.unpack_from(leaf, (slot & self.rtree.leaf_mask) << 1)[0]

    def _rc_set(self, slot: int, value: int) -> None:
        if value > MAX_REFCOUNT:
            raise UnsupportedFeature(
                f"{self.storage.path}: slot {slot} would be shared more than {MAX_REFCOUNT} times"
            )
        if slot >= self.host_slots:
            raise CorruptImage(
                f"{self.storage.path}: refcount of slot {slot} past the end ({self.host_slots})"
            )
        leaf = self.rtree.leaf_for_write(slot)
        RC.pack_into(leaf, (slot & self.rtree.leaf_mask) << 1, value)

    def _incref(self, slot: int) -> None:
        self._rc_set(slot, self._rc_get(slot) + 1)

    def _in_quarantine(self, slot: int) -> int | None:
        """End of the quarantined run holding ``slot``, or None."""
        return self.quarantine.end_of_run(slot)

    def _find_free(self) -> int | None:
        s = max(self.free_hint, self.first_slot)
        rt = self.rtree
        while s < self.host_slots:
            leaf, _ = rt.get_leaf(s)
            base = s & ~rt.leaf_mask
            if leaf is None:
                cand = s
            else:
                pos = (s - base) << 1
                while True:
                    pos = leaf.find(b"\0\0", pos)
                    if pos < 0 or not pos & 1:
                        break
                    pos += 1
                if pos < 0:
                    s = base + rt.leaf_mask + 1
                    continue
                cand = base + (pos >> 1)
            if cand >= self.host_slots:
                break
            q = self._in_quarantine(cand)
            if q is not None:
                s = q
                continue
            self.free_hint = cand + 1
            return cand
        self.free_hint = self.host_slots
        return None

    def _alloc(self) -> int:
        slot = self._find_free()
        if slot is None:
            slot = self.host_slots
            self.host_slots += 1
            self.free_hint = self.host_slots
        self._rc_set(slot, 1)
        self.txn_new.add(slot)
        self.changed = True
        return slot

    def _alloc_run(self, n: int) -> int:
        """``n`` contiguous slots (for blobs): a free slot for one, the end of the file for more."""
        if n == 1:
            return self._alloc()
        first = self.host_slots
        self.host_slots += n
        for s in range(first, first + n):
            self._rc_set(s, 1)
            self.txn_new.add(s)
        self.changed = True
        return first

    def _release(self, slot: int) -> None:
        """Drop the last reference to ``slot``: free now if no commit ever saw it,
        else at the next commit (then reusable once that commit is durable)."""
        if slot in self.txn_new:
            self.txn_new.discard(slot)
            self._rc_set(slot, 0)
            self.free_hint = min(self.free_hint, slot)
        else:
            if slot in self.deferred:
                raise CorruptImage(
                    f"{self.storage.path}: host offset {slot << self.cluster_bits} is "
                    "referenced more often than its refcount says (run check)"
                )
            self.deferred.add(slot)
        self.changed = True

    def _drop(self, e: Entry, child_level: int) -> None:
        """Drop one reference held by entry ``e`` (child_level -1: a data cluster)."""
        if e.host == 0:
            return
        self.map.check_entry(e, f"{self.storage.path}: entry of a dropped table")
        slot = e.host >> self.cluster_bits
        rc = self._rc_get(slot)
        if rc > 1:
            self._rc_set(slot, rc - 1)
            return
        if rc == 0:
            raise CorruptImage(
                f"{self.storage.path}: refcount of host offset {e.host} is already 0 "
                "(run check --repair)"
            )
        if child_level >= 0:
            node = self.map.load(e, child_level)
            for off in range(0, len(node), ENTRY.size):
                if node[off : off + 8] != b"\0" * 8:
                    self._drop(Entry.unpack(node, off), child_level - 1)
        self._release(slot)

    def _map_cow(self, e: Entry, level: int, node: bytearray) -> None:
        slot = e.host >> self.cluster_bits
        rc = self._rc_get(slot)
        if rc > 1:  # shared with a snapshot: the copy takes a reference to every child
            for off in range(0, len(node), ENTRY.size):
                if node[off : off + 8] != b"\0" * 8:
                    child = Entry.unpack(node, off)
                    self.map.check_entry(child, f"{self.storage.path}: entry of a shared table")
                    self._incref(child.host >> self.cluster_bits)
            self._rc_set(slot, rc - 1)
        else:
            self._release(slot)

    def _rc_cow(self, e: Entry, level: int, node: bytearray) -> None:
        self._release(e.host >> self.cluster_bits)

    # -- mapping -----------------------------------------------------------------------

    def _entry(self, c: int) -> Entry | None:
        """Leaf entry of guest cluster ``c``; None for a hole, ZERO flag for a zero subtree."""
        leaf, flags = self.map.get_leaf(c)
        if leaf is None:
            return Entry(flags=FLAG_ZERO) if flags else None
        return Entry.unpack(leaf, (c & self.map.leaf_mask) << ENTRY_BITS)

    def _runs(self, c0: int, c1: int) -> Iterator[tuple[Kind, int, int, Entry | None]]:
        """Guest clusters [c0, c1) as runs (kind, first, end, entry); DATA runs are one
        cluster each (with its entry). The one walk read, block_status, check and info use."""
        node, flags = self.map._root_node()
        if node is None:
            yield (Kind.ZERO if flags else Kind.HOLE), c0, c1, None
            return
        yield from self._walk(self.map.depth - 1, 0, node, c0, c1)

    def _walk(
        self, level: int, key: int, node: bytes | bytearray, c0: int, c1: int
    ) -> Iterator[tuple[Kind, int, int, Entry | None]]:
        t = self.map
        cspan = t.span(level - 1) if level > 0 else 0
        base = key << t.span(level)
        jlo = max(0, (c0 - base) >> cspan)
        jhi = min(1 << t.fan_bits, ((c1 - base - 1) >> cspan) + 1)
        for j in range(jlo, jhi):
            lo = base + (j << cspan)
            hi = lo + (1 << cspan)
            a, b = max(lo, c0), min(hi, c1)
            if level > 0:
                child = t.dirty.get((level - 1, (key << t.fan_bits) | j))
                if child is not None:
                    yield from self._walk(level - 1, (key << t.fan_bits) | j, child, a, b)
                    continue
            off = j << ENTRY_BITS
            if node[off : off + ENTRY.size] == NULL_ENTRY:
                yield Kind.HOLE, a, b, None
                continue
            e = Entry.unpack(node, off)
            if e.host == 0:
                t.check_entry(
                    e,
                    f"{self.storage.path}: mapping entry for guest offset {a << self.cluster_bits}",
                )
                yield (Kind.ZERO if e.flags & FLAG_ZERO else Kind.HOLE), a, b, None
            elif level == 0:
                yield Kind.DATA, a, b, e
            else:
                sub = t.load(e, level - 1)
                yield from self._walk(level - 1, (key << t.fan_bits) | j, sub, a, b)

    def _cluster_what(self, c: int, e: Entry) -> str:
        return (
            f"{self.storage.path}: cluster at guest offset {c << self.cluster_bits} "
            f"(host offset {e.host})"
        )

    def _read_cluster(self, c: int, e: Entry, lo: int = 0, hi: int | None = None) -> bytes:
        """Cluster ``c`` decoded: all of it, or its bytes [lo, hi)."""
        what = self._cluster_what(c, e)
        self.map.check_entry(e, what)
        stored = self.storage.pread_exact(e.host, e.length, what)
        if hi is not None:
            return codec.decode_range(e.codec, stored, e.checksum, self.cluster_size, lo, hi, what)
        return codec.decode(e.codec, stored, e.checksum, self.cluster_size, what)

    def _pool(self) -> ThreadPoolExecutor:
        return self._threads.get()

    def _parallel(self, n: int) -> bool:
        return (
            self.workers > 1
            and n >= PARALLEL_MIN_CLUSTERS
            and self.cluster_size >= PARALLEL_MIN_CLUSTER_SIZE
        )

    # -- I/O ----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self._read(offset, length)
        except CorruptImage as e:
            msg = str(e)
            if "guest offset" in msg:
                raise
            # a damaged table: say which guest range could not be read
            raise type(e)(f"{msg} (reading guest offset {offset}, {length} bytes)") from None

    def _read(self, offset: int, length: int) -> bytes:
        cs = self.cluster_size
        c0 = offset >> self.cluster_bits
        c1 = (offset + length + cs - 1) >> self.cluster_bits
        if c1 - c0 == 1:  # the common case (the cache reads whole clusters): no run walk
            e = self._entry(c0)
            if e is None or e.host == 0:
                return codec.zeros(length)
            self.counters["clusters_read"] += 1
            within = offset - (c0 << self.cluster_bits)
            return self._read_cluster(c0, e, within, within + length)
        out = bytearray(length)
        jobs: list[tuple[int, int, int, int, Entry]] = []  # (out pos, cluster, within, n, entry)
        for kind, a, _b, e in self._runs(c0, c1):
            if kind != Kind.DATA or e is None:
                continue
            start = max(offset, a * cs)
            end = min(offset + length, (a + 1) * cs)
            jobs.append((start - offset, a, start - a * cs, end - start, e))
        datas = [self._read_cluster(j[1], j[4]) for j in jobs]  # serial: see __init__
        if not jobs:
            return codec.zeros(length)
        for (pos, _c, within, n, _e), data in zip(jobs, datas):
            out[pos : pos + n] = memoryview(data)[within : within + n]
        self.counters["clusters_read"] += len(jobs)
        return bytes(out)

    def read_clusters(self, first: int, count: int) -> list[bytes]:
        """Whole clusters as the decoded buffers themselves: the cache keeps them as they
        are, so a miss costs one decode and no joining and splitting of a big buffer."""
        cs = self.cluster_size
        last = min(first + count, -(-self.size // cs))
        if last - first == 1 and (last * cs <= self.size):  # a random read's miss: no walk
            e = self._entry(first)
            if e is None or e.host == 0:
                return [codec.zeros(cs)]
            self.counters["clusters_read"] += 1
            return [self._read_cluster(first, e)]
        out: list[bytes] = []
        jobs: list[tuple[int, int, Entry]] = []  # (index in out, cluster, entry)
        for kind, a, b, e in self._runs(first, last):
            if kind == Kind.DATA and e is not None:
                jobs.append((len(out), a, e))
                out.append(b"")
            else:
                out.extend(codec.zeros(cs) for _ in range(a, b))
        datas = [self._read_cluster(c, e) for _i, c, e in jobs]  # serial: see __init__
        for (i, _c, _e), data in zip(jobs, datas):
            out[i] = data
        self.counters["clusters_read"] += len(jobs)
        tail = self.size - (last - 1) * cs
        if out and tail < cs:
            out[-1] = out[-1][:tail]
        return out

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyImage(f"{self.storage.path}: opened read-only")
        if self._broken is not None:
            raise VdiskError(
                f"{self.storage.path}: an earlier commit failed ({self._broken}); "
                "reopen the image (the last commit is intact)"
            )

    def _encode(self, data: bytes | bytearray) -> tuple[int, bytes, int] | None:
        if codec.is_zero(data):
            return None
        return codec.encode(data, compress=self.compress)

    def _put(self, c: int, enc: tuple[int, bytes, int] | None) -> None:
        """Point guest cluster ``c`` at newly stored bytes (None: the zero flag)."""
        leaf = self.map.leaf_for_write(c)
        off = (c & self.map.leaf_mask) << ENTRY_BITS
        old = Entry.unpack(leaf, off)
        if enc is None:
            leaf[off : off + ENTRY.size] = ZERO_ENTRY
        else:
            cdc, stored, cks = enc
            slot = self._alloc()
            self.storage.pwrite(slot << self.cluster_bits, stored)
            leaf[off : off + ENTRY.size] = Entry(
                slot << self.cluster_bits, len(stored), cdc, 0, cks, self.generation + 1
            ).pack()
            self.counters["clusters_written"] += 1
            self.counters["bytes_stored"] += len(stored)
        self._drop(old, -1)
        self.changed = True

    def _cluster_bytes(self, c: int) -> bytearray:
        e = self._entry(c)
        if e is None or e.host == 0:
            return bytearray(self.cluster_size)
        return bytearray(self._read_cluster(c, e))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write_many([(offset, bytes(data))])

    def write_many(self, writes: list[tuple[int, bytes]]) -> None:
        """Compress and checksum whole clusters in parallel, then store them in order."""
        self._check_writable()
        cs = self.cluster_size
        whole: list[tuple[int, bytes]] = []
        for offset, data in writes:
            if len(data) == cs and not offset & (cs - 1) and isinstance(data, bytes):
                whole.append((offset >> self.cluster_bits, data))  # the common case: no copy
                continue
            mv = memoryview(data)
            pos = 0
            for c, within, n in cluster_spans(offset, len(mv), cs):
                piece = mv[pos : pos + n]
                pos += n
                if n == cs:
                    whole.append((c, piece.tobytes()))
                    continue
                if whole:
                    self._store(whole)
                    whole = []
                cl = self._cluster_bytes(c)
                cl[within : within + n] = piece
                self._store([(c, bytes(cl))])
        if whole:
            self._store(whole)
        self._maybe_commit()

    def _store(self, items: list[tuple[int, bytes]]) -> None:
        if self._parallel(len(items)):
            encs = self._in_workers(lambda it: self._encode(it[1]), items)
        else:
            encs = (self._encode(d) for _c, d in items)
        for (c, _d), enc in zip(items, encs):
            self._put(c, enc)

    def _in_workers(self, fn: Callable[[_T], _R], items: list[_T]) -> Iterator[_R]:
        """``map(fn, items)`` on the worker threads, in chunks (a future per cluster cost
        ~10 us of this thread's time), yielding results in order as they come: the
        caller's pwrites and table updates overlap the encoding of later chunks."""
        n = max(1, min(16, len(items) // (4 * self.workers)))
        chunks = [items[k : k + n] for k in range(0, len(items), n)]
        for part in self._pool().map(lambda chunk: [fn(it) for it in chunk], chunks):
            yield from part

    def patch_many(
        self, items: list[tuple[int, list[tuple[int, bytes]]]], *, holes_read_zero: bool
    ) -> list[int]:
        """Read-modify-write of partly written clusters on the worker threads: each job
        reads, verifies and decodes the old cluster, applies the pieces and encodes the
        result, so a random 4 KiB write costs the caller no decode at all. The old
        clusters' slots cannot be reused under a job: freed slots wait for the next
        commit, and none happens before every job is put."""
        self._check_writable()
        cs = self.cluster_size
        jobs: list[tuple[int, Entry | None, list[tuple[int, bytes]]]] = []
        left: list[int] = []
        for c, pieces in items:
            e = self._entry(c)
            if e is None or (e.host == 0 and not e.flags & FLAG_ZERO):
                if not holes_read_zero:
                    left.append(c)
                    continue
                e = None
            elif e.host == 0:
                e = None  # a zero cluster: the pieces go onto zeros
            else:
                self.map.check_entry(e, self._cluster_what(c, e))
            jobs.append((c, e, pieces))

        def job(
            j: tuple[int, Entry | None, list[tuple[int, bytes]]],
        ) -> tuple[int, bytes, int] | None:
            c, e, pieces = j
            buf = bytearray(cs) if e is None else bytearray(self._read_cluster(c, e))
            for within, data in pieces:
                buf[within : within + len(data)] = data
            return self._encode(buf)

        encs: Iterable[tuple[int, bytes, int] | None]
        encs = self._in_workers(job, jobs) if self.workers > 1 and len(jobs) > 1 else map(job, jobs)
        for (c, _e, _p), enc in zip(jobs, encs):
            self.counters["clusters_patched"] += 1
            self._put(c, enc)
        self._maybe_commit()
        return left

    def _maybe_commit(self) -> None:
        """Commit when the interval has passed, or when the tables changed since the last
        commit outgrow the metadata cache: they cannot be evicted before a commit writes
        them, so this is what keeps memory bounded under scattered writes."""
        due = (
            self.commit_interval > 0 and time.monotonic() - self.last_commit >= self.commit_interval
        )
        dirty = (len(self.map.dirty) + len(self.rtree.dirty)) * self.map.node_size
        if due or dirty > max(self.cache_bytes, 4 * self.map.node_size):
            self.flush()

    def _set_range(self, c0: int, c1: int, value: bytes) -> None:
        """Set the entries of guest clusters [c0, c1) to NULL_ENTRY or ZERO_ENTRY, dropping
        what they pointed to; whole subtrees are replaced by one entry."""
        c1 = min(c1, self.map.capacity)
        if c0 >= c1:
            return
        root = self.map.writable_root()
        self._set_in(self.map.depth - 1, 0, root, c0, c1, value)
        self.changed = True

    def _set_in(
        self, level: int, key: int, node: bytearray, c0: int, c1: int, value: bytes
    ) -> None:
        t = self.map
        cspan = t.span(level - 1) if level > 0 else 0
        base = key << t.span(level)
        jlo = max(0, (c0 - base) >> cspan)
        jhi = min(1 << t.fan_bits, ((c1 - base - 1) >> cspan) + 1)
        for j in range(jlo, jhi):
            lo = base + (j << cspan)
            hi = lo + (1 << cspan)
            off = j << ENTRY_BITS
            if level == 0:
                old = Entry.unpack(node, off)
                node[off : off + ENTRY.size] = value
                self._drop(old, -1)
                continue
            ckey = (key << t.fan_bits) | j
            child = t.dirty.get((level - 1, ckey))
            if child is None:
                cur = bytes(node[off : off + ENTRY.size])
                if cur == value:
                    continue
                if c0 <= lo and hi <= c1:
                    node[off : off + ENTRY.size] = value
                    self._drop(Entry.unpack(cur), level - 1)
                    continue
                child = t.writable_child(level - 1, ckey, node)
            self._set_in(level - 1, ckey, child, c0, c1, value)

    def _whole(self, offset: int, length: int) -> tuple[int, int]:
        """Whole clusters inside the range (the last, short cluster counts as whole)."""
        cs = self.cluster_size
        c0 = -(-offset // cs)
        end = offset + length
        c1 = -(-end // cs) if end >= self.size else end // cs
        return c0, max(c0, c1)

    def _zero_partial(self, offset: int, length: int, c0: int, c1: int) -> None:
        """Zero the partial clusters at the edges of a range whose whole clusters are [c0, c1)."""
        cs = self.cluster_size
        end = offset + length
        if c0 >= c1:
            self._write_zero_piece(offset, length)
            return
        if offset < c0 * cs:
            self._write_zero_piece(offset, c0 * cs - offset)
        if c1 * cs < end:
            self._write_zero_piece(c1 * cs, end - c1 * cs)

    def _write_zero_piece(self, offset: int, length: int) -> None:
        for c, within, n in cluster_spans(offset, length, self.cluster_size):
            e = self._entry(c)
            if e is None or e.host == 0:
                continue  # already reads as zeros in this layer
            cl = self._cluster_bytes(c)
            cl[within : within + n] = bytes(n)
            self._store([(c, bytes(cl))])

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Whole clusters become the zero flag (their space is freed either way)."""
        self._check_writable()
        c0, c1 = self._whole(offset, length)
        self._zero_partial(offset, length, c0, c1)
        self._set_range(c0, c1, ZERO_ENTRY)
        self._maybe_commit()

    def discard(self, offset: int, length: int) -> None:
        """Whole clusters become holes (freed); partial clusters are zeroed."""
        self._check_writable()
        c0, c1 = self._whole(offset, length)
        self._zero_partial(offset, length, c0, c1)
        self._set_range(c0, c1, NULL_ENTRY)
        self._maybe_commit()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        cs = self.cluster_size
        end = offset + length
        out: list[Extent] = []
        for kind, a, b, e in self._runs(offset // cs, -(-end // cs)):
            lo, hi = max(offset, a * cs), min(end, b * cs)
            host = None
            if e is not None and e.codec == codec.RAW:
                host = e.host + (lo - a * cs)
            if out and out[-1].kind == kind and out[-1].end == lo:
                # merge as we go: a whole-disk query of a full image stays a short list
                out[-1:] = merge_extents([out[-1], Extent(kind, lo, hi - lo, host)])
            else:
                out.append(Extent(kind, lo, hi - lo, host))
        return out

    def truncate(self, size: int) -> None:
        self._check_writable()
        if not 0 <= size <= MAX_GUEST_SIZE:
            raise UsageError(f"{self.storage.path}: size {size} outside [0, {MAX_GUEST_SIZE}]")
        cs = self.cluster_size
        if size < self.size:
            keep = -(-size // cs)
            self._set_range(keep, -(-self.size // cs), NULL_ENTRY)
            if size % cs:
                self._write_zero_piece(size, keep * cs - size)
        else:
            self.map.grow(max(1, -(-size // cs)))
            if self.backing is not None:
                # the grown area reads as zeros, not as what the backing file has there
                self._set_range(-(-self.size // cs), -(-size // cs), ZERO_ENTRY)
        self.size = size
        self.changed = True

    # -- commit --------------------------------------------------------------------------

    def flush(self) -> None:
        if self.readonly or self.view_of is not None:
            return
        self._check_writable()
        if not self.changed:
            self.last_commit = time.monotonic()
            return
        try:
            self._commit()
        except BaseException as e:
            self._broken = e
            raise
        self.last_commit = time.monotonic()

    def _commit(self) -> None:
        gen = self.generation + 1
        # 1. the previous commit's releases become free; reusable once this commit is durable
        for first, n in self.prev_deferred:
            for s in range(first, first + n):
                rc = self._rc_get(s)
                if rc == 0:
                    raise CorruptImage(
                        f"{self.storage.path}: deferred-free slot {s} already has refcount 0"
                    )
                self._rc_set(s, rc - 1)
        self.quarantine = self.prev_deferred
        self.prev_deferred = Runs()
        # 2. mapping tables, bottom-up; all-empty and all-zero tables collapse into one entry
        t = self.map
        for level, key in t.dirty_by_level():
            node = t.dirty.pop((level, key))
            if node == bytes(len(node)):
                packed = NULL_ENTRY
            elif node == t.zero_node:
                packed = ZERO_ENTRY
            else:
                packed = t.write_node(self._alloc(), node, gen)
            t.set_child_entry(level, key, packed)
        # 3. the snapshot table and the deferred-free list (blobs at the end of the file)
        hdr = self.hdr
        if self.snaps_dirty:
            for s in self._blob_slot_list(hdr.snap_table):
                self._release(s)
            blob = pack_snapshots(self.snapshots)
            hdr.snap_table = self._write_blob(blob, gen)
            hdr.snap_count = len(self.snapshots)
            self.snaps_dirty = False
        for s in self._blob_slot_list(hdr.deferred):
            self._release(s)
        # 4. refcount tables: give every dirty node a slot (which dirties more), to a fixed
        # point, together with room for this commit's deferred-free list
        rt = self.rtree
        assigned: dict[tuple[int, int], int] = {}
        blob_first, blob_n = 0, 0
        while True:
            pending = [k for k in rt.dirty if k not in assigned]
            for k in pending:
                assigned[k] = self._alloc()
            need = len(pack_runs(self.deferred)) * RUN.size
            need_slots = self._blob_slots(need) if need else 0
            if not pending and need_slots <= blob_n:
                break
            if need_slots > blob_n:
                for s in range(blob_first, blob_first + blob_n):
                    self._release(s)
                blob_n = need_slots
                blob_first = self._alloc_run(blob_n)
        runs = pack_runs(self.deferred)
        used = self._blob_slots(len(runs) * RUN.size) if runs else 0
        for s in range(blob_first + used, blob_first + blob_n):
            self._release(s)  # over-provisioned: never referenced, free at once
        for level, key in rt.dirty_by_level():
            node = rt.dirty.pop((level, key))
            rt.set_child_entry(level, key, rt.write_node(assigned[(level, key)], node, gen))
        blob = b"".join(RUN.pack(f, n) for f, n in runs)
        if runs:
            self.storage.pwrite(blob_first << self.cluster_bits, blob)
            hdr.deferred = Entry(
                blob_first << self.cluster_bits, len(blob), codec.RAW, 0, codec.checksum(blob), gen
            )
        else:
            hdr.deferred = Entry()
        hdr.deferred_runs = len(runs)
        # 5. make it durable, then switch roots
        need_bytes = self.host_slots << self.cluster_bits
        if self.storage.size() < need_bytes:
            self.storage.truncate(need_bytes)
        self.storage.sync()
        hdr.generation = gen
        hdr.root = t.root
        hdr.depth = t.depth
        hdr.rroot = rt.root
        hdr.rdepth = rt.depth
        hdr.size = self.size
        hdr.host_slots = self.host_slots
        hdr.committed = time.time()
        if self.compress == "zstd":
            hdr.incompat |= INCOMPAT_ZSTD
        hdr.autoclear &= KNOWN_AUTOCLEAR
        self.storage.pwrite(HEADER_OFFSETS[gen % 2], hdr.pack())
        self.storage.sync()
        # 6. the new state is durable
        self.generation = gen
        self.prev_deferred = Runs.from_pairs(runs)
        self.deferred = set()
        self.txn_new.clear()
        if len(self.quarantine):
            self.free_hint = min(self.free_hint, int(self.quarantine.starts[0]))
        self.quarantine = Runs()
        self.changed = False
        self.counters["commits"] += 1

    def _write_blob(self, blob: bytes, gen: int) -> Entry:
        if not blob:
            return Entry()
        if len(blob) > MAX_BLOB:
            raise UnsupportedFeature(f"{self.storage.path}: metadata blob of {len(blob)} bytes")
        first = self._alloc_run(self._blob_slots(len(blob)))
        self.storage.pwrite(first << self.cluster_bits, blob)
        return Entry(first << self.cluster_bits, len(blob), codec.RAW, 0, codec.checksum(blob), gen)

    def close(self) -> None:
        try:
            if not self.readonly and self.view_of is None and self._broken is None:
                self.flush()
        finally:
            self._threads.shutdown()
            if self.view_of is None:
                self.storage.close()

    # -- backing --------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What an overlay records about this image as its base."""
        return {
            "format": self.name,
            "uuid": self.hdr.uuid.hex(),
            "generation": self.generation,
            "size": self.size,
        }

    def verify_backing(self, backing: Driver) -> None:
        h = self.hdr
        where = f"{self.storage.path}: backing file {backing.storage.path}"
        if h.backing_kind == BACKING_NATIVE:
            if not isinstance(backing, NativeDriver):
                raise BackingMismatch(f"{where} is {backing.name}, but a vdisk image was recorded")
            if backing.hdr.uuid != h.backing_uuid:
                raise BackingMismatch(
                    f"{where} is a different image (uuid {backing.hdr.uuid.hex()}, "
                    f"recorded {h.backing_uuid.hex()})"
                )
            if backing.generation != h.backing_generation:
                raise BackingMismatch(
                    f"{where} has changed since this overlay was made (generation "
                    f"{backing.generation}, recorded {h.backing_generation})"
                )
        elif h.backing_kind == BACKING_FOREIGN:
            size = backing.storage.size()
            digest = _foreign_digest(backing.storage)
            if size != h.backing_size or digest != h.backing_digest:
                raise BackingMismatch(
                    f"{where} has changed since this overlay was made (file size {size}, "
                    f"recorded {h.backing_size}; head/tail xxh3 {digest:016x}, "
                    f"recorded {h.backing_digest:016x})"
                )

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        self._check_writable()
        if ref is None:
            h = self.hdr
            h.backing_kind, h.backing_path, h.backing_format = BACKING_NONE, "", ""
            h.backing_uuid, h.backing_generation, h.backing_size, h.backing_digest = (
                bytes(16), 0, 0, 0,
            )  # fmt: skip
        else:
            _set_backing_fields(self.hdr, ref, backing)
        self.backing = ref
        self.changed = True
        self.flush()

    # -- snapshots (native_snap.py) ----------------------------------------------------

    def list_snapshots(self) -> list[SnapshotInfo]:
        return [native_snap.info(s) for s in self.snapshots]

    def create_snapshot(self, name: str) -> SnapshotInfo:
        return native_snap.create(self, name)

    def revert_snapshot(self, name: str) -> None:
        native_snap.revert(self, name)

    def delete_snapshot(self, name: str) -> None:
        native_snap.delete(self, name)

    def open_snapshot(self, name: str) -> Driver:
        return native_snap.open_view(self, name)

    # -- information ----------------------------------------------------------------------

    def _roots(self) -> list[tuple[str, Entry, int]]:
        out = [("live", self.map.root, self.map.depth)]
        out += [(f"snapshot {s.name!r}", s.root, s.depth) for s in self.snapshots]
        return out

    def info(self) -> dict[str, Any]:
        from vdisk.formats.native_check import usage

        clusters, zero, stored = usage(self)
        h = self.hdr
        out: dict[str, Any] = {
            "cluster_size": self.cluster_size,
            "generation": self.generation,
            "uuid": h.uuid.hex(),
            "allocated_clusters": clusters,
            "zero_clusters": zero,
            "stored_bytes": stored,
            "compression_ratio": round(clusters * self.cluster_size / stored, 3) if stored else 1.0,
            "host_slots": self.host_slots,
            "mapping_depth": self.map.depth,
            "refcount_depth": self.rtree.depth,
            "features": {
                "incompatible": h.incompat,
                "compatible": h.compat,
                "autoclear": h.autoclear,
            },
            "snapshots": len(self.snapshots),
            "created": h.created,
        }
        if self.backing is not None:
            out["backing"] = {
                "path": self.backing.path,
                "format": self.backing.format,
                "identity": {
                    BACKING_NATIVE: "vdisk uuid + generation",
                    BACKING_FOREIGN: "size + xxh3 of head and tail",
                    BACKING_UNPINNED: "not pinned",
                }.get(h.backing_kind, "none"),
            }
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "metadata_cache": self.node_cache.stats(),
            **self.counters,
            "dirty_tables": len(self.map.dirty) + len(self.rtree.dirty),
            "pending_free_slots": len(self.deferred) + self.prev_deferred.total(),
            "host_slots": self.host_slots,
            "generation": self.generation,
        }

    # -- check and repair ------------------------------------------------------------------

    def check(self, *, repair: bool = False) -> CheckReport:
        from vdisk.formats.native_check import check

        return check(self, repair=repair)

    def compact(self) -> int:
        from vdisk.formats.native_check import compact

        return compact(self)


def _set_backing_fields(hdr: Header, ref: BackingRef, base: Driver | None) -> None:
    """Record ``ref`` and the identity of ``base``; without a base the reference is
    unpinned (any image at that path is accepted), as `commit` needs while it rewrites it."""
    hdr.backing_path = ref.path
    hdr.backing_format = ref.format or ""
    hdr.backing_kind = BACKING_FOREIGN if base is not None else BACKING_UNPINNED
    hdr.backing_uuid, hdr.backing_generation, hdr.backing_size, hdr.backing_digest = (
        bytes(16), 0, 0, 0,
    )  # fmt: skip
    if isinstance(base, NativeDriver):
        hdr.backing_kind = BACKING_NATIVE
        hdr.backing_uuid = base.hdr.uuid
        hdr.backing_generation = base.generation
        hdr.backing_size = base.size
    elif base is not None:
        hdr.backing_size = base.storage.size()
        hdr.backing_digest = _foreign_digest(base.storage)


DRIVER = NativeDriver
