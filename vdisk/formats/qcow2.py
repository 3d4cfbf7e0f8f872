"""qcow2 images (QEMU, KVM, Xen): versions 2 and 3, read and write.

Spec: QEMU docs/interop/qcow2.txt. Guest clusters map through a two-level table (L1 in
memory, L2 tables in a bounded LRU); host clusters are reference counted
(qcow2_refcount.py); internal snapshots are saved L1 tables (qcow2_snapshot.py).

Metadata is written back, not through: dirty L2 tables, refcount blocks and L1 entries
are held and written by ``flush`` in qemu's order, with a sync between stages:
refcount blocks -> refcount table -> (data is already written) -> L2 tables -> L1 table ->
then the frees queued by overwrites and discards (decrements only once nothing on disk
points at the cluster any more). An L2 table evicted from the cache is written only after
the refcounts it depends on are durable. A crash therefore leaks clusters at worst.

Crash protocol (tests/test_qcow2.py takes crash images at every sync and at random writes
and runs ``qemu-img check`` on each):

======================================  ===============================  ====================
crash point                             on disk                          open / check
======================================  ===============================  ====================
after new refcounts, before L2/L1       refcounts of unmapped clusters   leaks (check: exit 3)
after data, before its L2 entry         old mapping, new data unmapped   old data, leaks
after L2, before L1 entry               new L2 table not yet linked      old data, leaks
after L1, before queued decrements      old clusters still counted       new data, leaks
refcount table / L1 growth              new table written and synced     old or new table,
                                        before the header switches       leaks
snapshot create / delete / revert       dirty bit set first (v3)         a writable open
                                                                         rebuilds refcounts
                                                                         and COPIED flags
======================================  ===============================  ====================
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterator
from typing import Any

from vdisk.cache.lru import LRU
from vdisk.errors import CorruptImage, ReadOnlyImage, UnsupportedFeature, UsageError
from vdisk.formats.base import (
    BackingRef,
    CheckReport,
    Driver,
    Extent,
    Kind,
    SnapshotInfo,
    merge_extents,
    reject_unknown_options,
)
from vdisk.formats.common import LazyPool, bool_option
from vdisk.formats.qcow2_refcount import (
    MAX_REFTABLE_BYTES,
    U64,
    IoState,
    Refcounts,
    be64_array,
    be64_bytes,
    rc_set,
    zero_array,
)
from vdisk.formats.qcow2_snapshot import MAX_SNAPSHOTS, Snapshot, parse_table, table_bytes
from vdisk.storage import Storage

try:  # zstd-compressed clusters need the optional zstandard module
    import zstandard
except ImportError:  # pragma: no cover - depends on the installation
    zstandard = None  # type: ignore[assignment]

# -- on-disk structures (qcow2.txt "Header") ---------------------------------------------

MAGIC = b"QFI\xfb"
#: magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
#: l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
#: snapshots_offset
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
assert HEADER_V2.size == 72
#: incompatible_features, compatible_features, autoclear_features, refcount_order,
#: header_length (bytes 72..103 of a v3 header)
HEADER_V3 = struct.Struct(">QQQII")
assert HEADER_V3.size == 32
V3_HEADER_LENGTH = 112  # what we write: 104 + compression_type (1 byte) + padding
EXT = struct.Struct(">II")  # header extension: type, length
assert EXT.size == 8
FEATURE = struct.Struct(">BB46s")  # feature name table entry
assert FEATURE.size == 48

# header field offsets we rewrite in place
OFF_SIZE = 24
OFF_L1 = 36  # l1_size (u32) + l1_table_offset (u64), rewritten together
L1_LOC = struct.Struct(">IQ")
assert L1_LOC.size == 12
OFF_SNAPSHOTS = 60  # nb_snapshots (u32) + snapshots_offset (u64)
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1/L2 entries (qcow2.txt "Cluster mapping")
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
SUBCLUSTERS = 32
ALL_ALLOC = 0xFFFF_FFFF
ALL_ZERO = 0xFFFF_FFFF << 32

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu's limit (2 MiB)
MAX_L1_BYTES = 32 << 20  # qemu's limit
MAX_BACKING_NAME = 1023
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
FEATURE_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}

# internal run kinds (Kind plus compressed)
DATA, ZERO, HOLE, COMPRESSED = 0, 1, 2, 3
_KIND = {DATA: Kind.DATA, ZERO: Kind.ZERO, HOLE: Kind.HOLE, COMPRESSED: Kind.DATA}

DEFAULT_L2_CACHE = 4 << 20
MAX_PENDING_FREES = 1 << 16  # queued decrements before a write forces a flush
MAX_CHECK_ENTRIES = 1 << 28  # L2 entries check walks at most (hostile snapshot tables)
MAX_CHECK_CLUSTERS = 1 << 25  # clusters of file check counts (4 bytes each)
DEFAULT_REFCOUNT_CACHE = 1 << 20


class L2Table:
    """One L2 table in memory: u64 entries (two per guest cluster with extended L2)."""

    __slots__ = ("data", "dirty", "offset")

    def __init__(self, offset: int, data: array, dirty: bool = False) -> None:
        self.offset = offset
        self.data = data
        self.dirty = dirty


class Qcow2Driver(Driver):
    name = "qcow2"
    extensions = (".qcow2", ".qcow", ".qcow2c")
    can_create = True
    has_snapshots = True
    #: convert -c: whole clusters written to unallocated entries are stored compressed
    #: (deflate as qemu-img convert -c writes them, or zstd with compression_type=zstd)
    compressed_options = ({}, {"compress": "on"})

    # -- discovery and creation ---------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        if head[:4] != MAGIC or len(head) < 8:
            return 0
        return 100 if struct.unpack_from(">I", head, 4)[0] in (2, 3) else 50

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> Qcow2Driver:
        reject_unknown_options(
            cls.name, options, ("l2_cache_size", "refcount_cache_size", "compress")
        )
        drv = cls.__new__(cls)
        drv._open(storage, readonly, options)
        return drv

    def _open(self, storage: Storage, readonly: bool, options: dict[str, Any]) -> None:
        self.storage = storage
        self.readonly = readonly
        self.path = path = storage.path
        self._owns_storage = True
        self.io = IoState(storage)
        fsize = storage.size()
        if fsize < HEADER_V2.size:
            raise CorruptImage(
                f"{path}: file of {fsize} bytes is too small for a qcow2 header "
                f"({HEADER_V2.size} bytes)"
            )
        head = storage.pread_exact(0, min(fsize, 1 << MAX_CLUSTER_BITS), "header")
        (
            magic,
            version,
            backing_off,
            backing_len,
            cluster_bits,
            size,
            crypt,
            l1_size,
            l1_off,
            rt_off,
            rt_clusters,
            nb_snap,
            snap_off,
        ) = HEADER_V2.unpack_from(head)
        if magic != MAGIC:
            raise CorruptImage(f"{path}: bad magic {magic!r}, expected {MAGIC!r} (not qcow2)")
        if version not in (2, 3):
            raise UnsupportedFeature(f"{path}: qcow2 version {version} (vdisk knows 2 and 3)")
        self.version = version
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise CorruptImage(
                f"{path}: cluster_bits {cluster_bits} outside "
                f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
            )
        cs = 1 << cluster_bits
        self.cluster_bits, self.cluster_size = cluster_bits, cs
        incompat = compat = autoclear = 0
        order, hlen = 4, HEADER_V2.size
        if version == 3:
            if fsize < HEADER_V2.size + HEADER_V3.size:
                raise CorruptImage(f"{path}: file of {fsize} bytes is too small for a v3 header")
            incompat, compat, autoclear, order, hlen = HEADER_V3.unpack_from(head, 72)
            if hlen < 104 or hlen % 8 or hlen > cs or hlen > len(head):
                raise CorruptImage(
                    f"{path}: header_length {hlen} invalid (must be >= 104, a multiple of 8, "
                    f"at most the cluster size {cs} and inside the file)"
                )
        self.header_length = hlen
        self.incompat, self.compat, self.autoclear = incompat, compat, autoclear
        if order > 6:
            raise CorruptImage(f"{path}: refcount_order {order} over the maximum 6")
        self.refcount_order = order
        self.extl2 = bool(incompat & INCOMPAT_EXTL2)
        if self.extl2 and cluster_bits < 14:
            raise CorruptImage(
                f"{path}: extended L2 entries need cluster_bits >= 14, image has {cluster_bits}"
            )
        self.compression_type = 0
        if hlen > 104:
            self.compression_type = head[104]
        if incompat & INCOMPAT_COMPRESSION and self.compression_type == 0:
            raise CorruptImage(
                f"{path}: compression type bit set but compression_type field is 0 or absent"
            )
        if not incompat & INCOMPAT_COMPRESSION and self.compression_type != 0:
            raise CorruptImage(
                f"{path}: compression_type {self.compression_type} without its feature bit"
            )
        if self.compression_type not in COMPRESSION_TYPES:
            raise UnsupportedFeature(
                f"{path}: unknown compression_type {self.compression_type} (known: 0 zlib, 1 zstd)"
            )

        # header extensions: between the header and the backing file name (or cluster end)
        ext_end = min(cs, len(head))
        if backing_off:
            ext_end = min(ext_end, backing_off)
        self._extensions: list[tuple[int, bytes]] = []
        self.backing_format: str | None = None
        feature_names: dict[tuple[int, int], str] = {}
        pos = hlen
        while pos + EXT.size <= ext_end:
            etype, elen = EXT.unpack_from(head, pos)
            if etype == EXT_END:
                break
            if elen > ext_end - pos - EXT.size:
                raise CorruptImage(
                    f"{path}: header extension {etype:#010x} at {pos} has length {elen}, past "
                    f"the end of the extension area ({ext_end})"
                )
            data = head[pos + EXT.size : pos + EXT.size + elen]
            if etype == EXT_BACKING_FORMAT:
                try:
                    self.backing_format = data.decode()
                except UnicodeDecodeError:
                    raise CorruptImage(f"{path}: backing format name is not UTF-8") from None
            elif etype == EXT_FEATURE_TABLE:
                for k in range(elen // FEATURE.size):
                    ftype, fbit, fname = FEATURE.unpack_from(data, k * FEATURE.size)
                    feature_names[(ftype, fbit)] = fname.rstrip(b"\0").decode(errors="replace")
            elif etype == EXT_DATA_FILE:
                pass  # refused below with the feature bit
            self._extensions.append((etype, data))
            pos += EXT.size + elen + (-elen % 8)

        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            bits = [b for b in range(64) if unknown >> b & 1]
            names = ", ".join(
                f"bit {b}" + (f" ({feature_names[(0, b)]})" if (0, b) in feature_names else "")
                for b in bits
            )
            raise UnsupportedFeature(f"{path}: unknown incompatible qcow2 features: {names}")
        if incompat & INCOMPAT_DATA_FILE:
            raise UnsupportedFeature(f"{path}: qcow2 images with an external data file")
        if crypt != 0:
            method = {1: "AES", 2: "LUKS"}.get(crypt, f"method {crypt}")
            raise UnsupportedFeature(f"{path}: encrypted qcow2 image ({method} encryption)")
        if not readonly and incompat & INCOMPAT_CORRUPT:
            raise CorruptImage(
                f"{path}: image is marked corrupt (incompatible feature bit 1); open it "
                "read-only, or repair it with qemu-img check -r all"
            )

        # backing file name
        self.backing = None
        self.backing_name: str | None = None
        if backing_off:
            if backing_off > cs or backing_len > min(MAX_BACKING_NAME, cs - backing_off):
                raise CorruptImage(
                    f"{path}: backing file name at {backing_off} of {backing_len} bytes does "
                    f"not fit in the first cluster (max {MAX_BACKING_NAME} bytes)"
                )
            raw = storage.pread_exact(backing_off, backing_len, "backing file name")
            try:
                self.backing_name = raw.decode()
            except UnicodeDecodeError:
                raise CorruptImage(f"{path}: backing file name is not UTF-8") from None
            if self.backing_name:
                self.backing = BackingRef(self.backing_name, self.backing_format)

        # size and L1 table
        self.l2_entries = cs // (16 if self.extl2 else 8)
        self.subcluster_size = cs // SUBCLUSTERS
        if size >= 1 << 63:
            raise CorruptImage(f"{path}: virtual size {size} is too large")
        if l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(
                f"{path}: l1_size {l1_size} ({l1_size * 8} bytes) over the limit of "
                f"{MAX_L1_BYTES} bytes"
            )
        needed = -(-size // (cs * self.l2_entries))
        if l1_size < needed:
            raise CorruptImage(
                f"{path}: l1_size {l1_size} is too small for the virtual size {size} "
                f"(needs {needed} entries)"
            )
        if l1_size and (l1_off == 0 or l1_off % cs or l1_off + l1_size * 8 > fsize):
            raise CorruptImage(
                f"{path}: L1 table at {l1_off:#x} ({l1_size} entries) is unaligned or past the "
                f"end of the file ({fsize} bytes)"
            )
        self.size = size
        self.l1_offset, self.l1_size = l1_off, l1_size
        self.l1 = be64_array(storage.pread_exact(l1_off, l1_size * 8, "L1 table"))
        self.l1_dirty: set[int] = set()

        # refcounts and snapshots
        if rt_clusters * cs > MAX_REFTABLE_BYTES:
            raise CorruptImage(
                f"{path}: refcount_table_clusters {rt_clusters} ({rt_clusters * cs} bytes) over "
                f"the limit of {MAX_REFTABLE_BYTES} bytes"
            )
        self.refs = Refcounts(
            storage,
            self.io,
            cluster_bits=cluster_bits,
            order=order,
            table_offset=rt_off,
            table_clusters=rt_clusters,
            cache_bytes=_int_option(path, options, "refcount_cache_size", DEFAULT_REFCOUNT_CACHE),
        )
        if nb_snap > MAX_SNAPSHOTS:
            raise CorruptImage(f"{path}: nb_snapshots {nb_snap} over the limit {MAX_SNAPSHOTS}")
        self.snapshots_offset = snap_off
        self.snapshots = parse_table(storage, snap_off, nb_snap, cs)
        self._snap_table_len = len(table_bytes(self.snapshots))
        self.refs.guard = self._guard
        self._bad_blocks: set[int] = set()  # refcount blocks check found invalid

        self.l2_cache: LRU[int, L2Table] = LRU(
            _int_option(path, options, "l2_cache_size", DEFAULT_L2_CACHE),
            weigh=lambda t: len(t.data) * 8,
            on_evict=self._l2_evicted,
        )
        self._pending_free: list[tuple[int, int]] = []  # (offset, length) to decrement
        #: data write() is gathering: (host offset, bytes, end of them in the caller's buffer)
        self._run: tuple[int, memoryview, int] | None = None
        self.compress = bool_option("qcow2", "compress", options.get("compress", False))
        if self.compress and (readonly or self.extl2):
            raise UsageError(
                f"{path}: compress=on needs a writable image without extended L2 entries"
            )
        self._ctail = 0  # where the next compressed cluster may continue the last host one
        # compressed writes on 2 threads: zlib and zstd release the GIL
        self._threads = LazyPool(2, "vdisk-qcow2")
        self._comp_cache: tuple[int, bytes] | None = None
        self._comp_offset_mask = (1 << (62 - (cluster_bits - 8))) - 1
        self._csize_shift = 62 - (cluster_bits - 8)
        self._csize_mask = (1 << (cluster_bits - 8)) - 1

        if not readonly:
            if incompat & INCOMPAT_DIRTY:
                # refcounts may be stale (lazy refcounts): rebuild before any allocation
                self._rebuild_refcounts()
                self._update_snapshot_refcounts(self.l1, 0, active=True)  # COPIED flags
                self.flush()
                self._set_incompat(self.incompat & ~INCOMPAT_DIRTY)
            if autoclear:
                # we do not maintain bitmaps: clearing the bits marks them inconsistent
                self.io.write(OFF_AUTOCLEAR, U64.pack(0))
                self.io.barrier()
                self.autoclear = 0

    def _guard(self, c: int) -> None:
        """Refuse to allocate a cluster that holds metadata (its refcount must be wrong):
        writing there would destroy the image, as qemu's overlap checks guard against."""
        what = self._metadata_at(c)
        off = c * self.cluster_size
        # active L2 tables too (qemu's default overlap checks include them): one C-level
        # scan of the L1 table, whose entries carry no flag but COPIED
        if what is None and (off in self.l1 or off | OFLAG_COPIED in self.l1):
            what = "an active L2 table"
        if what is not None:
            raise CorruptImage(
                f"{self.path}: cluster {c} (offset {c * self.cluster_size:#x}) holds {what} but "
                "its refcount is 0: the refcounts are corrupt (run check with repair)"
            )

    def _check_target(self, off: int, what: str, *, data: bool = False) -> None:
        """Before writing in place at ``off`` (a cluster an entry of ours points at): it must
        lie in the file (or have been allocated by us) and must not hold other metadata
        (for a ``data`` cluster, not an active L2 table either)."""
        c = off >> self.cluster_bits
        limit = max(self.refs.alloc_end, -(-self.storage.size() // self.cluster_size))
        if c >= limit:
            raise CorruptImage(
                f"{self.path}: {what} at {off:#x} lies past the end of the file "
                f"({self.storage.size()} bytes)"
            )
        meta = self._metadata_at(c)
        if meta is None and data and (off in self.l1 or off | OFLAG_COPIED in self.l1):
            meta = "an active L2 table"
        if meta is not None:
            raise CorruptImage(f"{self.path}: {what} at {off:#x} overlaps {meta}")

    def _metadata_at(self, c: int) -> str | None:
        cs = self.cluster_size
        off = c * cs
        spans = [
            (0, cs, "the header"),
            (self.l1_offset, self.l1_size * 8, "the L1 table"),
            (self.refs.table_offset, self.refs.table_clusters * cs, "the refcount table"),
        ]
        if self.snapshots:
            spans.append((self.snapshots_offset, self._snap_table_len, "the snapshot table"))
        what = next((w for s, n, w in spans if s <= off < s + n), None)
        if what is None and off in self.refs.blocks:
            what = "a refcount block"
        return what

    # -- mapping -----------------------------------------------------------------------

    def _l2_evicted(self, key: int, t: L2Table) -> None:
        if t.dirty:
            self._write_run()  # the data this table maps goes first
            # the refcounts of the clusters this table maps must be durable first
            self.refs.write_dirty()
            self.io.barrier()
            self.io.write(t.offset, be64_bytes(t.data))
            t.dirty = False

    def _l2(self, offset: int, l1i: int) -> L2Table:
        t = self.l2_cache.get(offset)
        if t is not None:
            return t
        if offset % self.cluster_size:
            raise CorruptImage(
                f"{self.path}: L1 entry {l1i} points to unaligned L2 table offset {offset:#x}"
            )
        raw = self.storage.pread(offset, self.cluster_size)
        if len(raw) != self.cluster_size:
            raise CorruptImage(
                f"{self.path}: L2 table of L1 entry {l1i} at {offset:#x} lies past the end "
                f"of the file ({self.storage.size()} bytes)"
            )
        t = L2Table(offset, be64_array(raw))
        self.l2_cache.put(offset, t)
        return t

    def _entry(self, gidx: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of guest cluster ``gidx``; (0, 0) if unmapped."""
        l1i, l2i = divmod(gidx, self.l2_entries)
        if l1i >= len(self.l1):
            return 0, 0
        off = self.l1[l1i] & L1E_OFFSET_MASK
        if not off:
            return 0, 0
        t = self._l2(off, l1i)
        if self.extl2:
            return t.data[2 * l2i], t.data[2 * l2i + 1]
        return t.data[l2i], 0

    def _bad(self, gidx: int, what: str) -> CorruptImage:
        return CorruptImage(f"{self.path}: L2 entry of guest cluster {gidx}: {what}")

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """The one mapping iterator: ``(kind, guest offset, length, host)`` runs covering
        the range, neighbours of one kind joined (DATA only when contiguous on the host).
        For COMPRESSED, ``host`` is the L2 entry."""
        prev: list[int] | None = None
        for piece in self._cluster_pieces(offset, length):
            kind, goff, n, host = piece
            if (
                prev is not None
                and prev[0] == kind
                and prev[1] + prev[2] == goff
                and (kind in (ZERO, HOLE) or (kind == DATA and prev[3] + prev[2] == host))
            ):
                prev[2] += n
                continue
            if prev is not None:
                yield prev[0], prev[1], prev[2], prev[3]
            prev = [kind, goff, n, host]
        if prev is not None:
            yield prev[0], prev[1], prev[2], prev[3]

    def _cluster_pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        cs = self.cluster_size
        span = cs * self.l2_entries
        end = offset + length
        pos = offset
        while pos < end:
            gidx, within = divmod(pos, cs)
            l1i = gidx // self.l2_entries
            if l1i >= len(self.l1) or not self.l1[l1i] & L1E_OFFSET_MASK:
                nxt = min((l1i + 1) * span, end)  # a whole unmapped L2 range: one piece
                yield HOLE, pos, nxt - pos, 0
                pos = nxt
                continue
            if not self.extl2:
                nxt = min((l1i + 1) * span, end)
                yield from self._table_pieces(gidx, pos, nxt)
                pos = nxt
                continue
            n = min(cs - within, end - pos)
            pos += n
            goff = gidx * cs + within
            entry, bm = self._entry(gidx)
            if entry & OFLAG_COMPRESSED:
                yield COMPRESSED, goff, n, entry
                continue
            host = entry & L2E_OFFSET_MASK
            if host % cs:
                raise self._bad(gidx, f"host offset {host:#x} is not cluster aligned")
            if not self.extl2:
                if entry & OFLAG_ZERO:
                    yield ZERO, goff, n, 0
                elif host:
                    yield DATA, goff, n, host + within
                else:
                    yield HOLE, goff, n, 0
                continue
            alloc, zero = bm & ALL_ALLOC, bm >> 32
            if alloc & zero:
                raise self._bad(gidx, f"subclusters both allocated and zero (bitmap {bm:#x})")
            if alloc and not host:
                raise self._bad(gidx, "allocated subclusters without a host cluster")
            if alloc == ALL_ALLOC:
                yield DATA, goff, n, host + within
                continue
            if zero == ALL_ALLOC:
                yield ZERO, goff, n, 0
                continue
            if not alloc and not zero:
                yield HOLE, goff, n, 0
                continue
            scs = self.subcluster_size
            sub, sub_end = within, within + n
            while sub < sub_end:
                sc = sub // scs
                m = min((sc + 1) * scs, sub_end) - sub
                if alloc >> sc & 1:
                    yield DATA, gidx * cs + sub, m, host + sub
                elif zero >> sc & 1:
                    yield ZERO, gidx * cs + sub, m, 0
                else:
                    yield HOLE, gidx * cs + sub, m, 0
                sub += m

    def _table_pieces(self, gidx: int, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Pieces of [pos, end), which lies in the range of one L2 table of standard
        entries, neighbours already joined: one table lookup and a tight loop over its
        entries instead of a lookup per cluster (convert maps a whole disk this way)."""
        cs = self.cluster_size
        l1i, l2i = divmod(gidx, self.l2_entries)
        data = self._l2(self.l1[l1i] & L1E_OFFSET_MASK, l1i).data
        kind, start, host = -1, pos, 0  # the run being joined
        while pos < end:
            entry = data[l2i]
            nxt = min((gidx + 1) * cs, end)
            if entry & OFLAG_COMPRESSED:
                if kind >= 0:
                    yield kind, start, pos - start, host
                    kind = -1
                yield COMPRESSED, pos, nxt - pos, entry
            else:
                h = entry & L2E_OFFSET_MASK
                if h % cs:
                    raise self._bad(gidx, f"host offset {h:#x} is not cluster aligned")
                if entry & OFLAG_ZERO:
                    k, h = ZERO, 0
                elif h:
                    k, h = DATA, h + pos - gidx * cs
                else:
                    k = HOLE
                if k != kind or (k == DATA and host + pos - start != h):
                    if kind >= 0:
                        yield kind, start, pos - start, host
                    kind, start, host = k, pos, h
            pos = nxt
            gidx += 1
            l2i += 1
        if kind >= 0:
            yield kind, start, pos - start, host

    def _decompress(self, entry: int) -> bytes:
        if self._comp_cache is not None and self._comp_cache[0] == entry:
            return self._comp_cache[1]
        cs = self.cluster_size
        off = entry & self._comp_offset_mask
        nsec = ((entry >> self._csize_shift) & self._csize_mask) + 1
        length = nsec * 512 - (off & 511)
        data = self.storage.pread(off, length)
        if not data:
            raise CorruptImage(
                f"{self.path}: compressed cluster at {off:#x} lies past the end of the file"
            )
        try:
            if self.compression_type == 0:
                out = zlib.decompressobj(-15).decompress(data, cs)
            else:
                if zstandard is None:
                    raise UnsupportedFeature(
                        f"{self.path}: zstd-compressed clusters need the 'zstandard' Python "
                        "module (pip install zstandard)"
                    )
                # a stream reader stops at one cluster: a hostile frame cannot balloon
                reader = zstandard.ZstdDecompressor().stream_reader(
                    io.BytesIO(data), read_across_frames=False
                )
                out = b""
                while len(out) < cs:
                    chunk = reader.read(cs - len(out))
                    if not chunk:
                        break
                    out += chunk
        except (zlib.error, getattr(zstandard, "ZstdError", zlib.error)) as e:
            raise CorruptImage(
                f"{self.path}: compressed cluster at {off:#x} does not decompress: {e}"
            ) from None
        if len(out) != cs:
            raise CorruptImage(
                f"{self.path}: compressed cluster at {off:#x} decompresses to {len(out)} bytes, "
                f"expected {cs}"
            )
        self._comp_cache = (entry, out)
        return out

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        off = entry & self._comp_offset_mask
        nsec = ((entry >> self._csize_shift) & self._csize_mask) + 1
        start = off & ~511
        return start, nsec * 512

    # -- I/O -----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        runs = list(self._runs(offset, length))
        if len(runs) == 1 and runs[0][0] == DATA:  # one contiguous host run: no copies
            data = self.storage.pread(runs[0][3], length)
            if len(data) == length:
                return data
        out = bytearray(length)
        cs = self.cluster_size
        for kind, goff, n, host in runs:
            pos = goff - offset
            if kind == DATA:
                data = self.storage.pread(host, n)
                out[pos : pos + len(data)] = data
            elif kind == COMPRESSED:
                within = goff % cs
                out[pos : pos + n] = self._decompress(host)[within : within + n]
        return bytes(out)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return merge_extents(
            Extent(_KIND[k], goff, n, host if k == DATA else None)
            for k, goff, n, host in self._runs(offset, length)
        )

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyImage(f"{self.path}: image is open read-only")

    def _l2_for_write(self, gidx: int) -> tuple[L2Table, int]:
        """The L2 table of ``gidx``, made exclusively ours (allocated or copied on write)."""
        l1i, l2i = divmod(gidx, self.l2_entries)
        l1e = self.l1[l1i]
        off = l1e & L1E_OFFSET_MASK
        if off and l1e & OFLAG_COPIED:
            t = self._l2(off, l1i)
            if not t.dirty:
                self._check_target(off, f"the L2 table of L1 entry {l1i}")
            return t, l2i
        data = array("Q", self._l2(off, l1i).data) if off else zero_array(self.cluster_size // 8)
        new = self.refs.alloc()
        if off:
            self._pending_free.append((off, self.cluster_size))
        t = L2Table(new, data, dirty=True)
        self.l2_cache.put(new, t)
        self.l1[l1i] = new | OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return t, l2i

    def _set_entry(self, t: L2Table, l2i: int, entry: int, bm: int) -> None:
        if self.extl2:
            t.data[2 * l2i] = entry
            t.data[2 * l2i + 1] = bm
        else:
            t.data[l2i] = entry
        t.dirty = True
        if t.offset not in self.l2_cache:
            self.l2_cache.put(t.offset, t)

    def _drop(self, entry: int) -> None:
        """Queue the host clusters an L2 entry references for a refcount decrement."""
        if entry & OFLAG_COMPRESSED:
            self._pending_free.append(self._compressed_range(entry))
        else:
            host = entry & L2E_OFFSET_MASK
            if host:
                self._pending_free.append((host, self.cluster_size))

    def _whole(self, gidx: int, within: int, n: int) -> bool:
        """Whether a piece covers its whole cluster (or the whole tail of the last one)."""
        cs = self.cluster_size
        return within == 0 and (n == cs or gidx * cs + n >= self.size)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Map each cluster, then write the data in runs: clusters that land next to each
        other on the host (fresh allocations, in-place overwrites) go down as one pwrite
        of the caller's buffer, not one pwrite and one copy per cluster."""
        self._check_writable()
        if len(self._pending_free) > MAX_PENDING_FREES:
            self.flush()
        mv = memoryview(data).cast("B")
        cs = self.cluster_size
        total = len(mv)
        pos = 0
        try:
            while pos < total:
                gidx, within = divmod(offset + pos, cs)
                n = min(cs - within, total - pos)
                if self.compress and within == 0 and total - pos >= cs:
                    k = self._write_compressed(gidx, mv[pos : pos + (total - pos) // cs * cs])
                    if k:
                        pos += k * cs
                        continue
                if (
                    within == 0
                    and total - pos >= 2 * cs
                    and not self.compress  # this cluster only: the next may compress
                    and self.refs.tail_is_full()
                ):
                    k, fresh = self._alloc_fresh(gidx, (total - pos) // cs)
                    if k:
                        self._gather(fresh, mv, pos, pos + k * cs)
                        pos += k * cs
                        continue
                host = self._write_cluster(gidx, within, mv[pos : pos + n])
                if host is not None:
                    self._gather(host, mv, pos, pos + n)
                pos += n
        finally:
            self._write_run()

    def _gather(self, host: int, mv: memoryview, start: int, end: int) -> None:
        """Add mv[start:end], bound for ``host``, to the run being gathered (or start one)."""
        run = self._run
        if run is not None and run[0] + len(run[1]) == host and run[2] == start:
            self._run = (run[0], mv[start - len(run[1]) : end], end)
        else:
            self._write_run()
            self._run = (host, mv[start:end], end)

    @functools.cached_property
    def _compressor(self) -> Callable[[bytes | memoryview], bytes]:
        """The cluster compressor of this image's compression type, made once per open
        (its zstd contexts are per thread and reused across batches)."""
        if self.compression_type == 0:
            # raw deflate with a 4 KiB window, qemu's parameters (any reader inflates it)
            def deflate(data: bytes | memoryview) -> bytes:
                c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
                return c.compress(data) + c.flush()

            return deflate
        if zstandard is None:
            raise UnsupportedFeature(
                f"{self.path}: writing zstd-compressed clusters needs the 'zstandard' module"
            )
        local = threading.local()  # a ZstdCompressor must not be shared between threads

        def zstd(data: bytes | memoryview) -> bytes:
            c = getattr(local, "c", None)
            if c is None:
                c = local.c = zstandard.ZstdCompressor(level=3)
            return c.compress(data)

        return zstd

    def _write_compressed(self, gidx: int, data: memoryview) -> int:
        """Store whole clusters from ``gidx`` that are unallocated in this layer (and in
        one L2 table) compressed, packed byte after byte into new host clusters at the end
        of the file, as qemu-img convert -c does; written with one pwrite. Returns how many
        clusters were stored (0: the first is allocated, or does not shrink: the caller
        writes it plainly). Each host cluster's refcount is the number of compressed
        clusters whose sectors touch it (qcow2.txt, "Compressed Clusters Descriptor")."""
        cs = self.cluster_size
        t, l2i = self._l2_for_write(gidx)
        k = min(len(data) // cs, self.l2_entries - l2i)
        d = t.data
        j = 0
        while j < k and d[l2i + j] == 0:
            j += 1
        if not j:
            return 0
        pieces = [data[i * cs : (i + 1) * cs] for i in range(j)]
        fn = self._compressor
        if j >= 4 and (os.cpu_count() or 1) > 1:  # zlib and zstd release the GIL
            blobs = list(self._threads.get().map(fn, pieces))
        else:
            blobs = [fn(p) for p in pieces]
        # qemu stores a cluster plainly unless it shrinks below cs - 1 bytes; stop there
        n = next((i for i, b in enumerate(blobs) if len(b) >= cs - 1), j)
        if not n:
            return 0
        blobs = blobs[:n]
        refs = self.refs
        tail_c = (self._ctail - 1) // cs if self._ctail else -1
        after = max(refs.alloc_end, -(-self.storage.size() // cs))
        # continue in the last cluster of the previous batch if nothing came after it
        start = self._ctail if self._ctail % cs and tail_c == after - 1 else after * cs
        first_new = -(-start // cs)
        base = {tail_c: refs.get(tail_c)} if start % cs else {}
        counts: dict[int, int] = {}  # added references per host cluster
        entries = []
        out = bytearray()
        o = start
        for b in blobs:
            while True:  # narrow refcounts (refcount_bits < 16) may not take another one
                touched = range(o // cs, (o + len(b) - 1) // cs + 1)
                if all(base.get(c, 0) + counts.get(c, 0) < refs.max_refcount for c in touched):
                    break
                o = (o // cs + 1) * cs
            out += bytes(o - start - len(out))
            out += b
            for c in touched:  # the clusters its sectors touch
                counts[c] = counts.get(c, 0) + 1
            nsec = ((o + len(b) - 1) >> 9) - (o >> 9) + 1
            entries.append(OFLAG_COMPRESSED | (nsec - 1) << self._csize_shift | o)
            o += len(b)
        need = -(-o // cs) - first_new
        if need:
            got = refs.alloc_contiguous(need)  # the same end as computed above
            assert got == first_new * cs, (got, first_new * cs)
        for c, m in counts.items():
            if c < first_new:
                refs.adjust(c, m)  # the continued cluster: already counted for earlier ones
            elif m != 1:
                refs.set_count(c, m)
        self.io.write(start, out)
        d[l2i : l2i + n] = array("Q", entries)
        t.dirty = True
        if t.offset not in self.l2_cache:
            self.l2_cache.put(t.offset, t)
        self._ctail = o
        return n

    def _alloc_fresh(self, gidx: int, most: int) -> tuple[int, int]:
        """Map up to ``most`` whole clusters from ``gidx`` (within one L2 table) that are
        unallocated in this layer to one contiguous run of new host clusters at the end of
        the file, with one refcount update per block: (count, host offset); (0, 0) when
        fewer than two qualify (the per-cluster path handles those)."""
        t, l2i = self._l2_for_write(gidx)
        k = min(most, self.l2_entries - l2i)
        d = t.data
        if self.extl2:
            j = 0
            while j < k and d[2 * (l2i + j)] == 0 and d[2 * (l2i + j) + 1] == 0:
                j += 1
        elif d[l2i : l2i + k] == zero_array(k):
            j = k
        else:
            j = 0
            while j < k and d[l2i + j] == 0:
                j += 1
        if j < 2:
            return 0, 0
        host = self.refs.alloc_contiguous(j)
        cs = self.cluster_size
        first = host | OFLAG_COPIED
        entries = array("Q", range(first, first + j * cs, cs))
        if self.extl2:
            d[2 * l2i : 2 * (l2i + j) : 2] = entries
            d[2 * l2i + 1 : 2 * (l2i + j) + 1 : 2] = array("Q", [ALL_ALLOC]) * j
        else:
            d[l2i : l2i + j] = entries
        t.dirty = True
        if t.offset not in self.l2_cache:
            self.l2_cache.put(t.offset, t)
        return j, host

    def _write_run(self) -> None:
        """Write the data run that write() is gathering. Called before anything that may
        write an L2 table (which must never point at data not yet written) and at the end
        of each write."""
        run, self._run = self._run, None
        if run is not None:
            self.io.write(run[0], run[1])

    def _write_piece(self, gidx: int, within: int, data: memoryview) -> None:
        host = self._write_cluster(gidx, within, data)
        if host is not None:
            self.io.write(host, data)

    def _write_cluster(self, gidx: int, within: int, data: memoryview) -> int | None:
        """Map one piece of a cluster. Returns the host offset where ``data`` is to be
        written as it is (the caller joins neighbours into one write), or None when the
        piece was written here (read-modify-write, or the short last cluster)."""
        cs = self.cluster_size
        n = len(data)
        t, l2i = self._l2_for_write(gidx)
        if self.extl2:
            entry, bm = t.data[2 * l2i], t.data[2 * l2i + 1]
        else:
            entry, bm = t.data[l2i], 0
        compressed = bool(entry & OFLAG_COMPRESSED)
        host = 0 if compressed else entry & L2E_OFFSET_MASK
        mine = bool(host) and bool(entry & OFLAG_COPIED)
        if (
            mine
            and not (not self.extl2 and entry & OFLAG_ZERO)
            and (not self.extl2 or bm & ALL_ALLOC == ALL_ALLOC)
        ):
            self._check_target(host, f"the data cluster of guest cluster {gidx}", data=True)
            return host + within  # plain overwrite in place
        if self._whole(gidx, within, n):
            buf = None if n == cs else bytes(data) + bytes(cs - n)
        else:
            if self.backing is not None and (
                (entry == 0 and bm == 0) or (self.extl2 and ~(bm | bm >> 32) & ALL_ALLOC)
            ):
                raise UsageError(
                    f"{self.path}: partial write to guest cluster {gidx}, which is not "
                    "allocated in this overlay (the generic layer copies up whole clusters)"
                )
            self._write_run()  # what we read back may lie under it
            old = bytearray(self.read(gidx * cs, min(cs, self.size - gidx * cs)))
            old.extend(bytes(cs - len(old)))
            old[within : within + n] = data
            buf = bytes(old)
        if mine:
            target = host  # our own zero-preallocated or partly allocated cluster
            self._check_target(host, f"the data cluster of guest cluster {gidx}", data=True)
        else:
            target = self.refs.alloc()
            self._drop(entry)
        self._set_entry(t, l2i, target | OFLAG_COPIED, ALL_ALLOC if self.extl2 else 0)
        if buf is None:
            return target
        self.io.write(target, buf)
        return None

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero flags (v3) or deallocation (no backing file) for whole clusters; explicit
        zeros for partial clusters and for v2 images over a backing file."""
        self._check_writable()
        cs = self.cluster_size
        end = offset + length
        pos = offset
        span = cs * self.l2_entries
        while pos < end:
            if len(self._pending_free) > MAX_PENDING_FREES:
                self.flush()  # bounds the memory of a discard over a huge range
            gidx, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            l1i = gidx // self.l2_entries
            if self.backing is None and not self.l1[l1i] & L1E_OFFSET_MASK:
                pos = min((l1i + 1) * span, end)  # a whole unmapped L2 range reads as zeros
                continue
            entry, bm = self._entry(gidx)
            host = entry & L2E_OFFSET_MASK
            compressed = bool(entry & OFLAG_COMPRESSED)
            if self.extl2:
                plain_zero = not compressed and bm == ALL_ZERO and not host
            else:
                plain_zero = self.version == 3 and entry & ~OFLAG_COPIED == OFLAG_ZERO
            hole = entry == 0 and bm == 0
            if plain_zero or (hole and self.backing is None):
                pos += n
                continue
            if not self._whole(gidx, within, n) or (self.version == 2 and self.backing):
                self._write_piece(gidx, within, memoryview(bytes(n)))
                pos += n
                continue
            t, l2i = self._l2_for_write(gidx)
            self._drop(self._entry_of(t, l2i))
            if self.version == 2:
                self._set_entry(t, l2i, 0, 0)
            elif self.extl2:
                self._set_entry(t, l2i, 0, ALL_ZERO)
            else:
                self._set_entry(t, l2i, OFLAG_ZERO, 0)
            pos += n

    def _entry_of(self, t: L2Table, l2i: int) -> int:
        return t.data[2 * l2i] if self.extl2 else t.data[l2i]

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    # -- flush ---------------------------------------------------------------------------

    def flush(self) -> None:
        if self.readonly:
            return
        self._write_run()
        self._ctail = 0  # frees below may release that cluster: start the next afresh
        self.refs.write_dirty()
        self.io.barrier()  # refcounts and data before the mappings that use them
        for _off, t in self.l2_cache.items():
            if t.dirty:
                self.io.write(t.offset, be64_bytes(t.data))
                t.dirty = False
        self.io.barrier()  # L2 tables before the L1 entries that point at them
        if self.l1_dirty:
            self._write_l1_entries(sorted(self.l1_dirty))
            self.l1_dirty = set()
        self.io.barrier()
        if self._pending_free:
            frees, self._pending_free = self._pending_free, []
            punch: list[int] = []
            for off, length in frees:
                first, last = off >> self.cluster_bits, (off + length - 1) >> self.cluster_bits
                for c in range(first, last + 1):
                    if self.refs.adjust(c, -1) == 0:
                        punch.append(c)
            self.refs.write_dirty()
            self.io.barrier()
            for c in punch:
                self.storage.punch_hole(c * self.cluster_size, self.cluster_size)
            self._comp_cache = None

    def _write_l1_entries(self, idxs: list[int]) -> None:
        i = 0
        while i < len(idxs):
            j = i
            while j + 1 < len(idxs) and idxs[j + 1] == idxs[j] + 1:
                j += 1
            chunk = array("Q", self.l1[idxs[i] : idxs[j] + 1])
            self.io.write(self.l1_offset + idxs[i] * 8, be64_bytes(chunk))
            i = j + 1

    def close(self) -> None:
        try:
            if not self.readonly:
                self.flush()
        finally:
            self._threads.shutdown()
            if self._owns_storage:
                self.storage.close()

    # -- header rewrites -------------------------------------------------------------------

    @contextlib.contextmanager
    def _dirty_section(self) -> Iterator[None]:
        """Mark the image dirty (v3) while refcounts and COPIED flags are out of step.

        A snapshot operation changes refcounts and the COPIED flags of many tables; no
        order of writes keeps both consistent at every instant. The dirty bit tells any
        reader-writer (qemu or vdisk) to rebuild refcounts before use after a crash."""
        if self.version < 3 or self.incompat & INCOMPAT_DIRTY:
            yield
            return
        self.flush()
        self._set_incompat(self.incompat | INCOMPAT_DIRTY)
        yield
        self.flush()
        self._set_incompat(self.incompat & ~INCOMPAT_DIRTY)

    def _set_incompat(self, value: int) -> None:
        self.io.write(OFF_INCOMPAT, U64.pack(value))
        self.io.barrier()
        self.incompat = value

    def truncate(self, size: int) -> None:
        self._check_writable()
        if size < 0:
            raise UsageError(f"{self.path}: negative size {size}")
        size = -(-size // 512) * 512  # as create: qemu drops a partial last sector
        if size < self.size:
            self._drop_tail(size)
        cs = self.cluster_size
        needed = -(-size // (cs * self.l2_entries))
        if needed * 8 > MAX_L1_BYTES:
            raise UnsupportedFeature(
                f"{self.path}: size {size} needs an L1 table of {needed * 8} bytes, over the "
                f"limit of {MAX_L1_BYTES}"
            )
        self.flush()
        if needed > self.l1_size:
            new_size = needed
            clusters = -(-new_size * 8 // cs)
            new_off = self.refs.alloc_contiguous(clusters)
            table = array("Q", self.l1)
            table.extend([0] * (new_size - len(table)))
            self.refs.write_dirty()
            self.io.write(new_off, be64_bytes(table) + bytes(clusters * cs - new_size * 8))
            self.io.barrier()
            self.io.write(OFF_L1, L1_LOC.pack(new_size, new_off))
            self.io.barrier()
            old_off, old_len = self.l1_offset, self.l1_size
            self.l1, self.l1_offset, self.l1_size = table, new_off, new_size
            if old_len:
                self._pending_free.append((old_off, -(-old_len * 8 // cs) * cs))
        self.io.write(OFF_SIZE, U64.pack(size))
        self.size = size
        self.flush()
        self.io.barrier()

    def _drop_tail(self, size: int) -> None:
        """Before shrinking to ``size``: free every cluster past it and zero the rest of
        the last one, so that growing again later shows zeros, never old data."""
        cs = self.cluster_size
        if size % cs and any(
            k in (DATA, COMPRESSED)
            for k, *_ in self._runs(size, min(self.size, size - size % cs + cs) - size)
        ):
            gidx, within = divmod(size, cs)
            n = min(cs, self.size - gidx * cs) - within
            self._write_piece(gidx, within, memoryview(bytes(n)))
        span = cs * self.l2_entries
        gidx = -(-size // cs)
        end = -(-self.size // cs)
        while gidx < end:
            l1i = gidx // self.l2_entries
            if l1i >= len(self.l1) or not self.l1[l1i] & L1E_OFFSET_MASK:
                gidx = (l1i + 1) * span // cs
                continue
            entry, bm = self._entry(gidx)
            if entry or bm:
                t, l2i = self._l2_for_write(gidx)
                self._drop(self._entry_of(t, l2i))
                self._set_entry(t, l2i, 0, 0)
            gidx += 1

    def compact(self) -> int:
        """Punch every free cluster inside the file and cut a free tail off it; returns
        the bytes of host space released (as far as the storage can tell)."""
        self._check_writable()
        self.flush()
        cs = self.cluster_size
        before = self._host_bytes()
        fsize = self.storage.size()
        n = max(-(-fsize // cs), self.refs.alloc_end)
        last, run = 0, -1  # last used cluster; start of the current free run
        for c in range(1, n + 1):
            used = c < n and self.refs.get(c) != 0
            if c < n and not used:
                if run < 0:
                    run = c
                continue
            if run >= 0:
                self.storage.punch_hole(run * cs, (c - run) * cs)
                run = -1
            if used:
                last = c
        end = (last + 1) * cs
        if end < fsize:
            self.storage.truncate(end)
        self.refs.alloc_end = last + 1
        self.refs.hint = 1
        self.storage.sync()
        return max(0, before - self._host_bytes())

    def _host_bytes(self) -> int:
        allocated = getattr(self.storage, "allocated_bytes", None)
        return allocated() if allocated is not None else self.storage.size()

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        reject_unknown_options(
            cls.name,
            options,
            (
                "cluster_size",
                "backing",
                "backing_size",
                "backing_driver",
                "compat",
                "refcount_bits",
                "lazy_refcounts",
                "extended_l2",
                "preallocation",
                "compression_type",
            ),
        )
        path = storage.path
        cs = _int_option(path, options, "cluster_size", 65536)
        if cs & (cs - 1) or not 1 << MIN_CLUSTER_BITS <= cs <= 1 << MAX_CLUSTER_BITS:
            raise UsageError(f"{path}: qcow2 cluster_size {cs} must be a power of two, 512..2M")
        bits = cs.bit_length() - 1
        compat = str(options.get("compat") or "1.1")
        if compat not in ("1.1", "0.10", "v3", "v2"):
            raise UsageError(f"{path}: qcow2 compat {compat!r} (use '0.10' or '1.1')")
        version = 3 if compat in ("1.1", "v3") else 2
        rbits = _int_option(path, options, "refcount_bits", 16)
        if rbits not in (1, 2, 4, 8, 16, 32, 64) or (version == 2 and rbits != 16):
            raise UsageError(
                f"{path}: refcount_bits {rbits} (a power of two up to 64; compat 0.10 only 16)"
            )
        order = rbits.bit_length() - 1
        lazy = bool_option("qcow2", "lazy_refcounts", options.get("lazy_refcounts"))
        extl2 = bool_option("qcow2", "extended_l2", options.get("extended_l2"))
        if (lazy or extl2) and version == 2:
            raise UsageError(f"{path}: lazy_refcounts and extended_l2 need compat 1.1")
        if extl2 and cs < 16384:
            raise UsageError(f"{path}: extended_l2 needs a cluster size of at least 16 KiB")
        ctype = str(options.get("compression_type") or "zlib")
        ctypes = {v: k for k, v in COMPRESSION_TYPES.items()}
        if ctype not in ctypes or (ctype != "zlib" and version == 2):
            raise UsageError(f"{path}: compression_type {ctype!r} (zlib, or zstd with compat 1.1)")
        if options.get("preallocation") not in (None, "off", False):
            raise UnsupportedFeature(f"{path}: qcow2 preallocation other than 'off'")
        if size < 0:
            raise UsageError(f"{path}: negative size {size}")
        # qemu counts a qcow2 disk in 512-byte sectors and drops a partial last one:
        # round up, as qemu-img create does, so that qemu sees every byte
        size = -(-size // 512) * 512
        l2e = cs // (16 if extl2 else 8)
        l1_size = -(-size // (cs * l2e))
        if l1_size * 8 > MAX_L1_BYTES:
            raise UsageError(f"{path}: size {size} too large for cluster size {cs}")
        backing = options.get("backing")
        if backing is not None and not isinstance(backing, BackingRef):
            backing = BackingRef(str(backing))
        exts: list[tuple[int, bytes]] = []
        if backing is not None and backing.format:
            exts.append((EXT_BACKING_FORMAT, backing.format.encode()))
        exts.append((EXT_FEATURE_TABLE, _feature_table()))
        incompat = (INCOMPAT_EXTL2 if extl2 else 0) | (INCOMPAT_COMPRESSION if ctypes[ctype] else 0)
        compat_bits = COMPAT_LAZY_REFCOUNTS if lazy else 0

        epb = cs * 8 // rbits
        l1_clusters = max(1, -(-l1_size * 8 // cs))
        t, k = 1, 1
        for _ in range(64):
            total = 1 + t + l1_clusters + k
            nk = -(-total // epb)
            nt = -(-nk * 8 // cs)
            if nk <= k and nt <= t:
                break
            k, t = max(k, nk), max(t, nt)
        rt_off = cs
        l1_off = (1 + t) * cs
        rb_off = (1 + t + l1_clusters) * cs
        total = 1 + t + l1_clusters + k
        fields = {
            "version": version,
            "cluster_bits": bits,
            "size": size,
            "l1_size": l1_size,
            "l1_offset": l1_off,
            "rt_offset": rt_off,
            "rt_clusters": t,
            "nb_snapshots": 0,
            "snapshots_offset": 0,
            "incompat": incompat,
            "compat": compat_bits,
            "autoclear": 0,
            "refcount_order": order,
        }
        head = _header_cluster(path, fields, exts, backing.path if backing else None)
        if version == 3:
            head = head[:104] + bytes([ctypes[ctype]]) + head[105:]
        storage.truncate(0)
        storage.pwrite(0, head)
        table = zero_array(t * cs // 8)
        for i in range(k):
            table[i] = rb_off + i * cs
        storage.pwrite(rt_off, be64_bytes(table))
        storage.pwrite(l1_off, bytes(l1_clusters * cs))
        for i in range(k):
            buf = bytearray(cs)
            for c in range(i * epb, min((i + 1) * epb, total)):
                rc_set(buf, c - i * epb, rbits, 1)
            storage.pwrite(rb_off + i * cs, buf)
        storage.truncate(total * cs)
        storage.sync()

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        """Rewrite the header cluster with a new backing name and format extension."""
        self._check_writable()
        self.flush()
        exts = [(t, d) for t, d in self._extensions if t != EXT_BACKING_FORMAT]
        if ref is not None and ref.format:
            exts.insert(0, (EXT_BACKING_FORMAT, ref.format.encode()))
        fields = self._fields()
        head = _header_cluster(self.path, fields, exts, ref.path if ref else None)
        if self.version == 3:
            head = head[:104] + bytes([self.compression_type]) + head[105:]
        head += bytes(max(0, min(self.cluster_size, 4096) - len(head)))
        self.io.write(0, head)
        self.io.barrier()
        self._extensions = exts
        self.backing = ref if ref is not None and ref.path else None
        self.backing_name = ref.path if ref else None
        self.backing_format = ref.format if ref else None

    def _fields(self) -> dict[str, int]:
        return {
            "version": self.version,
            "cluster_bits": self.cluster_bits,
            "size": self.size,
            "l1_size": self.l1_size,
            "l1_offset": self.l1_offset,
            "rt_offset": self.refs.table_offset,
            "rt_clusters": self.refs.table_clusters,
            "nb_snapshots": len(self.snapshots),
            "snapshots_offset": self.snapshots_offset,
            "incompat": self.incompat,
            "compat": self.compat,
            "autoclear": self.autoclear,
            "refcount_order": self.refcount_order,
        }

    # -- metadata ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "compat": "1.1" if self.version == 3 else "0.10",
            "version": self.version,
            "cluster_size": self.cluster_size,
            "refcount_bits": 1 << self.refcount_order,
            "compression_type": COMPRESSION_TYPES[self.compression_type],
            "lazy_refcounts": bool(self.compat & COMPAT_LAZY_REFCOUNTS),
            "extended_l2": self.extl2,
            "dirty": bool(self.incompat & INCOMPAT_DIRTY),
            "corrupt": bool(self.incompat & INCOMPAT_CORRUPT),
            "l1_size": self.l1_size,
            "backing_file": self.backing_name,
            "backing_format": self.backing_format,
            "snapshots": [
                {"id": s.id, "name": s.name, "vm_state_size": s.vm_state_size}
                for s in self.snapshots
            ],
        }

    def stats(self) -> dict[str, Any]:
        return {"l2_cache": self.l2_cache.stats(), "refcount_cache": self.refs.stats()}

    # -- snapshots -----------------------------------------------------------------------------

    def list_snapshots(self) -> list[SnapshotInfo]:
        return [
            SnapshotInfo(
                id=s.id,
                name=s.name,
                created=s.date_sec + s.date_nsec / 1e9,
                size=s.disk_size if s.disk_size is not None else self.size,
                vm_state_size=s.vm_state_size,
                extra={"vm_clock_nsec": s.vm_clock_nsec, "l1_size": s.l1_size},
            )
            for s in self.snapshots
        ]

    def _find_snapshot(self, name: str) -> Snapshot:
        for s in self.snapshots:
            if s.name == name:
                return s
        for s in self.snapshots:
            if s.id == name:
                return s
        raise UsageError(f"{self.path}: no snapshot named {name!r}")

    def _snapshot_l1(self, s: Snapshot) -> array:
        """The snapshot's L1 table (its offset and size were validated when the snapshot
        table was read)."""
        raw = self.storage.pread_exact(
            s.l1_offset, s.l1_size * 8, f"L1 table of snapshot {s.name!r}"
        )
        return be64_array(raw)

    def open_snapshot(self, name: str) -> Driver:
        """A read-only view of a snapshot, sharing this image's storage."""
        s = self._find_snapshot(name)
        view = copy.copy(self)
        view.readonly = True
        view._owns_storage = False
        view.size = s.disk_size if s.disk_size is not None else self.size
        view.l1 = self._snapshot_l1(s)
        view.l1_size, view.l1_offset = s.l1_size, s.l1_offset
        view.l1_dirty = set()
        view._pending_free = []
        view._comp_cache = None
        view._run = None
        view._threads = LazyPool(2, "vdisk-qcow2")
        view.compress = False
        view.l2_cache = LRU(DEFAULT_L2_CACHE, weigh=lambda t: len(t.data) * 8)
        return view

    def _update_snapshot_refcounts(self, l1: array, delta: int, *, active: bool) -> None:
        """Add ``delta`` to the refcount of every L2 table and cluster ``l1`` references
        (delta 0 only refreshes flags); in the active tables, set the COPIED flags to match
        the new refcounts."""
        cs = self.cluster_size
        step = 2 if self.extl2 else 1
        for l1i, e in enumerate(l1):
            off = e & L1E_OFFSET_MASK
            if not off:
                continue
            t = self._l2(off, l1i)
            changed = False
            for j in range(0, len(t.data), step):
                entry = t.data[j]
                if entry & OFLAG_COMPRESSED:
                    if delta:
                        start, length = self._compressed_range(entry)
                        for c in range(start // cs, (start + length - 1) // cs + 1):
                            self.refs.adjust(c, delta)
                    continue
                host = entry & L2E_OFFSET_MASK
                if not host:
                    continue
                rc = self.refs.adjust(host // cs, delta) if delta else self.refs.get(host // cs)
                if active:
                    new = (entry | OFLAG_COPIED) if rc == 1 else (entry & ~OFLAG_COPIED)
                    if new != entry:
                        t.data[j] = new
                        changed = True
            if changed:
                t.dirty = True
                self.l2_cache.put(t.offset, t)
            rc = self.refs.adjust(off // cs, delta) if delta else self.refs.get(off // cs)
            if active:
                new = (e | OFLAG_COPIED) if rc == 1 else (e & ~OFLAG_COPIED)
                if new != l1[l1i]:
                    l1[l1i] = new
                    self.l1_dirty.add(l1i)

    def _write_snapshot_table(self, snaps: list[Snapshot]) -> None:
        """Write a new snapshot table elsewhere, then switch the header to it."""
        cs = self.cluster_size
        data = table_bytes(snaps)
        old_off, old_len = self.snapshots_offset, len(table_bytes(self.snapshots))
        new_off = 0
        if data:
            clusters = -(-len(data) // cs)
            new_off = self.refs.alloc_contiguous(clusters)
            self.refs.write_dirty()
            self.io.write(new_off, data + bytes(clusters * cs - len(data)))
        self.io.barrier()
        self.io.write(OFF_SNAPSHOTS, struct.pack(">IQ", len(snaps), new_off))
        self.io.barrier()
        self.snapshots, self.snapshots_offset = snaps, new_off
        self._snap_table_len = len(data)
        if old_off and old_len and self.snapshots_offset != old_off:
            self._pending_free.append((old_off, -(-old_len // cs) * cs))

    def create_snapshot(self, name: str) -> SnapshotInfo:
        self._check_writable()
        if any(s.name == name for s in self.snapshots):
            raise UsageError(f"{self.path}: a snapshot named {name!r} already exists")
        if self.refs.max_refcount < 2:
            raise UnsupportedFeature(
                f"{self.path}: snapshots need refcounts of at least 2 bits "
                f"(image has {self.refs.bits})"
            )
        with self._dirty_section():
            self.flush()
            cs = self.cluster_size
            # 1. references of the new snapshot (leak-safe: counts go up before it exists)
            self._update_snapshot_refcounts(self.l1, 1, active=True)
            self.flush()
            # 2. a copy of the active L1 table
            clusters = max(1, -(-self.l1_size * 8 // cs))
            l1_off = self.refs.alloc_contiguous(clusters)
            self.refs.write_dirty()
            self.io.write(l1_off, be64_bytes(self.l1) + bytes(clusters * cs - self.l1_size * 8))
            # 3. the new table, then the header
            ids = [int(s.id) for s in self.snapshots if s.id.isdigit()]
            now = time.time()
            snap = Snapshot(
                l1_offset=l1_off,
                l1_size=self.l1_size,
                id=str(max(ids, default=0) + 1),
                name=name,
                date_sec=int(now),
                date_nsec=int((now % 1) * 1e9),
                vm_clock_nsec=0,
                vm_state_size=0,
                disk_size=self.size,
                extra=b"",
            )
            self._write_snapshot_table([*self.snapshots, snap])
            self.flush()
            return self.list_snapshots()[-1]

    def delete_snapshot(self, name: str) -> None:
        self._check_writable()
        s = self._find_snapshot(name)
        with self._dirty_section():
            self.flush()
            self._write_snapshot_table([x for x in self.snapshots if x is not s])
            self._drop_l1(self._snapshot_l1(s), s.l1_offset, s.l1_size)

    def revert_snapshot(self, name: str) -> None:
        """Make the snapshot's L1 table the active one (the old state's references drop)."""
        self._check_writable()
        s = self._find_snapshot(name)
        with self._dirty_section():
            self.flush()
            cs = self.cluster_size
            snap_l1 = self._snapshot_l1(s)
            size = s.disk_size if s.disk_size is not None else self.size
            needed = -(-size // (cs * self.l2_entries))
            if s.l1_size < needed:
                raise CorruptImage(f"{self.path}: snapshot {name!r} L1 table too small")
            # references of the new active state first, then write it, then drop the old one
            self._update_snapshot_refcounts(snap_l1, 1, active=False)
            self.flush()
            clusters = max(1, -(-s.l1_size * 8 // cs))
            new_off = self.refs.alloc_contiguous(clusters)
            self.refs.write_dirty()
            self.io.write(new_off, be64_bytes(snap_l1) + bytes(clusters * cs - s.l1_size * 8))
            self.io.barrier()
            self.io.write(OFF_L1, L1_LOC.pack(s.l1_size, new_off))
            self.io.write(OFF_SIZE, U64.pack(size))
            self.io.barrier()
            old_l1, old_off, old_size = self.l1, self.l1_offset, self.l1_size
            self.l1, self.l1_offset, self.l1_size, self.size = snap_l1, new_off, s.l1_size, size
            self.l1_dirty = set()
            self.l2_cache.clear()
            self._drop_l1(old_l1, old_off, old_size)

    def _drop_l1(self, l1: array, offset: int, size: int) -> None:
        """Release an L1 table nothing points at any more (a deleted snapshot's, or the
        active one a revert replaced): what it references loses a reference, its own
        clusters are freed once that is durable, and the active tables' COPIED flags are
        brought in line with the new refcounts."""
        cs = self.cluster_size
        self._update_snapshot_refcounts(l1, -1, active=False)
        if size:
            self._pending_free.append((offset, -(-size * 8 // cs) * cs))
        self.flush()
        self._update_snapshot_refcounts(self.l1, 0, active=True)
        self.flush()

    # -- consistency check ----------------------------------------------------------------------

    def _references(self, report: CheckReport, *, with_refcounts: bool) -> tuple[array, int]:
        """Count the references to every host cluster, as qemu's check does: the header,
        each L1 table (active and snapshots) with its L2 tables and their clusters, the
        snapshot table, and (optionally) the refcount structures."""
        cs, bits = self.cluster_size, self.cluster_bits
        fsize = self.storage.size()
        nclusters = max(-(-fsize // cs), self.refs.alloc_end)
        if nclusters > MAX_CHECK_CLUSTERS:
            raise UnsupportedFeature(
                f"{self.path}: image too large to check ({nclusters} clusters, the limit is "
                f"{MAX_CHECK_CLUSTERS})"
            )
        walked = 0
        counts = array("I", [0]) * nclusters

        def add(off: int, length: int, what: str) -> None:
            if length <= 0:
                return
            first, last = off >> bits, (off + length - 1) >> bits
            if last >= nclusters:
                report.corruptions.append(
                    f"{what} at {off:#x} lies past the end of the file ({fsize} bytes)"
                )
                return
            for c in range(first, last + 1):
                counts[c] += 1

        def walk(l1: array, l1_off: int, label: str) -> None:
            add(l1_off, len(l1) * 8, f"{label} L1 table")
            step = 2 if self.extl2 else 1
            for l1i, e in enumerate(l1):
                off = e & L1E_OFFSET_MASK
                if not off:
                    continue
                if off % cs:
                    report.corruptions.append(f"{label} L1 entry {l1i}: unaligned {off:#x}")
                    continue
                add(off, cs, f"{label} L2 table {l1i}")
                nonlocal walked
                walked += self.l2_entries
                if walked > MAX_CHECK_ENTRIES:
                    raise UnsupportedFeature(
                        f"{self.path}: the L1 tables (active and snapshots) map more than "
                        f"{MAX_CHECK_ENTRIES} L2 entries: too many to check"
                    )
                raw = self.storage.pread(off, cs)
                if len(raw) != cs:
                    continue
                l2 = be64_array(raw)
                for j in range(0, len(l2), step):
                    entry = l2[j]
                    if entry & OFLAG_COMPRESSED:
                        start, length = self._compressed_range(entry)
                        add(start, length, f"{label} compressed cluster")
                        continue
                    host = entry & L2E_OFFSET_MASK
                    if not host:
                        continue
                    if host % cs:
                        report.corruptions.append(
                            f"{label} L2 table {l1i} entry {j // step}: unaligned {host:#x}"
                        )
                        continue
                    add(host, cs, f"{label} data cluster")

        add(0, cs, "header")
        walk(self.l1, self.l1_offset, "active")
        for s in self.snapshots:
            walk(self._snapshot_l1(s), s.l1_offset, f"snapshot {s.name!r}")
        if self.snapshots:
            add(self.snapshots_offset, len(table_bytes(self.snapshots)), "snapshot table")
        for etype, data in self._extensions:
            if etype == EXT_BITMAPS and len(data) >= 24:
                self._bitmap_references(data, add)
        if with_refcounts:
            for c in self.refs.metadata_clusters(skip=self._bad_blocks):
                add(c * cs, cs, "refcount structure")
        return counts, nclusters

    def _bitmap_references(self, ext: bytes, add: Callable[[int, int, str], None]) -> None:
        cs = self.cluster_size
        nb, _r, dsize, doff = struct.unpack_from(">IIQQ", ext)
        if dsize > 64 << 20 or doff % cs:
            return
        add(doff, dsize, "bitmap directory")
        d = self.storage.pread(doff, dsize)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(d):
                break
            toff, tsize, _f, _t, _g, nlen, xlen = struct.unpack_from(">QIIBBHI", d, pos)
            add(toff, tsize * 8, "bitmap table")
            if tsize * 8 <= 64 << 20:
                tab = be64_array(self.storage.pread(toff, tsize * 8)[: tsize * 8])
                for e in tab:
                    if e & L2E_OFFSET_MASK:
                        add(e & L2E_OFFSET_MASK, cs, "bitmap data")
            entry = 24 + xlen + nlen
            pos += entry + (-entry % 8)

    def check(self, *, repair: bool = False) -> CheckReport:
        if repair:
            self._check_writable()
        if not self.readonly:
            self.flush()
        report = CheckReport()
        invalid = self.refs.invalid_blocks()
        for ti, off in invalid.items():
            report.corruptions.append(
                f"ERROR refcount block {ti} at {off:#x} is unaligned or past the end of the file"
            )
        self._bad_blocks = set(invalid)
        counts, n = self._references(report, with_refcounts=True)
        cs = self.cluster_size
        end = max(n, min(self.refs.covered_clusters(), n + (1 << 20)))
        leaks: list[tuple[int, int]] = []
        bad = len(invalid)
        epb = self.refs.entries_per_block
        for ti in range(-(-end // epb)):
            base = ti * epb
            top = min(base + epb, end)
            stored_block = None if ti in self._bad_blocks else self.refs.block_counts(ti)
            stored_all = stored_block if stored_block is not None else array("Q", [0]) * epb
            want_all = array("Q", counts[base : min(top, n)])
            want_all.extend([0] * (top - base - len(want_all)))
            if stored_all[: top - base] == want_all:
                continue  # the common case: a whole block agrees
            for c in range(base, top):
                stored, want = stored_all[c - base], want_all[c - base]
                if stored == want:
                    continue
                if stored > want:
                    report.leaks.append(f"Leaked cluster {c} refcount={stored} reference={want}")
                    leaks.append((c, want))
                else:
                    report.corruptions.append(
                        f"ERROR cluster {c} refcount={stored} reference={want}"
                    )
                    bad += 1
        self._check_copied(report)
        report.info = {
            "check_errors": len(report.corruptions),
            "leaks": len(report.leaks),
            "image_end_offset": self.storage.size(),
            "total_clusters": -(-self.size // cs),
        }
        if repair and (leaks or report.corruptions):
            if bad:
                self._rebuild_refcounts()
                repaired = ["rebuilt the refcount structures", *report.corruptions, *report.leaks]
            else:
                for c, want in leaks:
                    self.refs.set_count(c, want)
                self.refs.write_dirty()
                self.io.barrier()
                repaired = [*report.leaks, *report.corruptions]
            self._bad_blocks = set()
            self._update_snapshot_refcounts(self.l1, 0, active=True)  # COPIED flags
            self.flush()
            after = self.check()  # what is still wrong (not fixable by refcounts) stays
            after.repaired = repaired
            return after
        return report

    def _stored(self, c: int) -> int:
        """The stored refcount, 0 where check found the block covering it invalid."""
        if c // self.refs.entries_per_block in self._bad_blocks:
            return 0
        return self.refs.get(c)

    def _check_copied(self, report: CheckReport) -> None:
        """COPIED flags of the active tables must say whether the refcount is exactly 1."""
        cs = self.cluster_size
        step = 2 if self.extl2 else 1
        for l1i, e in enumerate(self.l1):
            off = e & L1E_OFFSET_MASK
            if not off or off % cs:
                continue
            if bool(e & OFLAG_COPIED) != (self._stored(off // cs) == 1):
                report.corruptions.append(f"ERROR OFLAG_COPIED L2 table of L1 entry {l1i}")
            raw = self.storage.pread(off, cs)
            if len(raw) != cs:
                continue
            l2 = be64_array(raw)
            for j in range(0, len(l2), step):
                entry = l2[j]
                host = entry & L2E_OFFSET_MASK
                if entry & OFLAG_COMPRESSED or not host or host % cs:
                    continue
                if bool(entry & OFLAG_COPIED) != (self._stored(host // cs) == 1):
                    report.corruptions.append(
                        f"ERROR OFLAG_COPIED data cluster: L1 {l1i} L2 entry {j // step}"
                    )

    def _rebuild_refcounts(self) -> None:
        report = CheckReport()
        counts, n = self._references(report, with_refcounts=False)
        if report.corruptions:
            raise CorruptImage(f"{self.path}: cannot rebuild refcounts: {report.corruptions[0]}")
        self.refs.rebuild(counts, n, lambda: None)


def _int_option(path: str, options: dict[str, Any], key: str, default: int) -> int:
    """An integer option (the CLI hands them over as text); a bad one is a UsageError."""
    value = options.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{path}: option {key}={value!r} is not an integer") from None


def _feature_table() -> bytes:
    out = b""
    for bit, fname in FEATURE_NAMES.items():
        out += FEATURE.pack(0, bit, fname.encode())
    out += FEATURE.pack(1, 0, b"lazy refcounts")
    out += FEATURE.pack(2, 0, b"bitmaps")
    out += FEATURE.pack(2, 1, b"raw external data")
    return out


def _header_cluster(
    path: str, f: dict[str, int], exts: list[tuple[int, bytes]], backing: str | None
) -> bytes:
    """Header, extensions and backing file name: the content of cluster 0's used part."""
    cs = 1 << f["cluster_bits"]
    body = bytearray()
    hlen = V3_HEADER_LENGTH if f["version"] == 3 else HEADER_V2.size
    for etype, data in exts:
        body += EXT.pack(etype, len(data)) + data + bytes(-len(data) % 8)
    body += EXT.pack(EXT_END, 0)
    bname = backing.encode() if backing else b""
    if len(bname) > MAX_BACKING_NAME:
        raise UsageError(f"{path}: backing file name of {len(bname)} bytes (max 1023)")
    boff = hlen + len(body) if bname else 0
    if hlen + len(body) + len(bname) > cs:
        raise UsageError(f"{path}: header, extensions and backing name do not fit in a cluster")
    head = HEADER_V2.pack(
        MAGIC,
        f["version"],
        boff,
        len(bname),
        f["cluster_bits"],
        f["size"],
        0,
        f["l1_size"],
        f["l1_offset"],
        f["rt_offset"],
        f["rt_clusters"],
        f["nb_snapshots"],
        f["snapshots_offset"],
    )
    if f["version"] == 3:
        head += HEADER_V3.pack(
            f["incompat"], f["compat"], f["autoclear"], f["refcount_order"], hlen
        )
        head += bytes(hlen - len(head))
    return head + bytes(body) + bname


DRIVER = Qcow2Driver
