"""On-disk structures of the native ``.vdisk`` format (docs/format.md is the spec).

Everything is little-endian. The file is an array of *slots* of ``cluster_size`` bytes;
slot 0 (and slot 1 when clusters are 4 KiB) holds the two header copies, every other
slot holds one stored cluster, one table, or a part of a blob.
"""

from __future__ import annotations

import bisect
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from vdisk.cache import codec
from vdisk.errors import CorruptImage, UnsupportedFeature

# -- docs/format.md "Header" -------------------------------------------------------------

MAGIC = b"VDISK\r\n\x1a"
VERSION = 1
HEADER_SLOT = 4096  # bytes per header copy
HEADER_OFFSETS = (0, HEADER_SLOT)
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 12, 21
DEFAULT_CLUSTER_SIZE = 65536
MAX_DEPTH = 12  # deeper trees than any 2**63-byte disk needs are refused
MAX_GUEST_SIZE = 1 << 62
MAX_BLOB = 64 << 20  # snapshot table / deferred-free list: refuse bigger (memory bound)
MAX_SNAPSHOTS = 65535
MAX_REFCOUNT = 0xFFFF

# Feature bits: unknown incompatible bits are refused, unknown compatible bits are ignored,
# unknown autoclear bits are cleared on the next commit.
INCOMPAT_ZSTD = 1 << 0  # some entries may use codec 2 (zstd): readers must know it
KNOWN_INCOMPAT = INCOMPAT_ZSTD
KNOWN_COMPAT = 0
KNOWN_AUTOCLEAR = 0

#: A pointer to a stored block: host byte offset, stored length, codec id, flags,
#: reserved, xxh3-64 of the stored bytes, generation of the commit that wrote it.
ENTRY = struct.Struct("<QIBBHQQ")
assert ENTRY.size == 32
ENTRY_BITS = 5
FLAG_ZERO = 0x01  # the pointed-to range reads as zeros (host must be 0)
KNOWN_FLAGS = FLAG_ZERO
NULL_ENTRY = bytes(ENTRY.size)
ZERO_ENTRY = ENTRY.pack(0, 0, 0, FLAG_ZERO, 0, 0, 0)

HEADER = struct.Struct(
    "<8sII"  # magic, version, header length (incl. strings and the 8-byte checksum)
    "QQQ"  # incompatible, compatible, autoclear feature masks
    "Q"  # generation
    "BBBB"  # cluster bits, mapping depth, refcount depth, reserved
    "I"  # reserved
    "QQ"  # guest size, host slots (slots in use: the allocation high-water mark)
    "16s"  # image uuid
    "dd"  # created, committed (Unix time)
    "32s32s"  # mapping root entry, refcount root entry
    "32sI"  # snapshot table entry, snapshot count
    "32sI"  # deferred-free list entry, number of runs in it
    "BBHHH"  # backing kind, reserved, backing path length, format length, reserved
    "16sQQQ"  # backing uuid, backing generation, backing size, backing digest
)
assert HEADER.size == 288
HEADER_CHECKSUM = struct.Struct("<Q")

BACKING_NONE, BACKING_NATIVE, BACKING_FOREIGN, BACKING_UNPINNED = 0, 1, 2, 3

# -- docs/format.md "Snapshot table" / "Deferred-free list" -------------------------------

SNAP = struct.Struct("<QdQBBH32s")  # id, created, guest size, depth, reserved, name length, root
assert SNAP.size == 60
RUN = struct.Struct("<QQ")  # first slot, number of slots
assert RUN.size == 16


@dataclass(slots=True)
class Entry:
    """A parsed ENTRY."""

    host: int = 0
    length: int = 0
    codec: int = 0
    flags: int = 0
    checksum: int = 0
    birth: int = 0

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, off: int = 0) -> Entry:
        host, length, cdc, flags, _res, cks, birth = ENTRY.unpack_from(buf, off)
        return cls(host, length, cdc, flags, cks, birth)

    def pack(self) -> bytes:
        return ENTRY.pack(
            self.host, self.length, self.codec, self.flags, 0, self.checksum, self.birth
        )

    @property
    def is_null(self) -> bool:
        return self.host == 0 and not self.flags & FLAG_ZERO

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & FLAG_ZERO)


@dataclass(slots=True)
class Snapshot:
    id: int
    name: str
    created: float
    size: int
    depth: int
    root: Entry


@dataclass(slots=True)
class Header:
    generation: int
    cluster_bits: int
    depth: int
    rdepth: int
    size: int
    host_slots: int
    uuid: bytes
    created: float
    committed: float
    root: Entry
    rroot: Entry
    snap_table: Entry
    snap_count: int
    deferred: Entry
    deferred_runs: int
    incompat: int = 0
    compat: int = 0
    autoclear: int = 0
    backing_kind: int = BACKING_NONE
    backing_path: str = ""
    backing_format: str = ""
    backing_uuid: bytes = bytes(16)
    backing_generation: int = 0
    backing_size: int = 0
    backing_digest: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def pack(self) -> bytes:
        path = self.backing_path.encode()
        fmt = self.backing_format.encode()
        length = HEADER.size + len(path) + len(fmt) + HEADER_CHECKSUM.size
        if length > HEADER_SLOT:
            raise CorruptImage(f"backing path too long for the header ({len(path)} bytes)")
        body = (
            HEADER.pack(
                MAGIC,
                VERSION,
                length,
                self.incompat,
                self.compat,
                self.autoclear,
                self.generation,
                self.cluster_bits,
                self.depth,
                self.rdepth,
                0,
                0,
                self.size,
                self.host_slots,
                self.uuid,
                self.created,
                self.committed,
                self.root.pack(),
                self.rroot.pack(),
                self.snap_table.pack(),
                self.snap_count,
                self.deferred.pack(),
                self.deferred_runs,
                self.backing_kind,
                0,
                len(path),
                len(fmt),
                0,
                self.backing_uuid,
                self.backing_generation,
                self.backing_size,
                self.backing_digest,
            )
            + path
            + fmt
        )
        return body + HEADER_CHECKSUM.pack(codec.checksum(body))


def depth_for(items: int, leaf_bits: int, fan_bits: int) -> int:
    """Levels a radix tree needs so that ``items`` leaf items are addressable (>= 1)."""
    depth, span = 1, leaf_bits
    while items > (1 << span):
        depth += 1
        span += fan_bits
    return depth


def first_data_slot(cluster_size: int) -> int:
    """Slots before this one hold the two header copies."""
    return max(1, (2 * HEADER_SLOT) // cluster_size)


def header_generation(raw: bytes) -> int | None:
    """The generation of an intact header copy (magic, length and checksum verify), else None."""
    if len(raw) < HEADER.size + HEADER_CHECKSUM.size or raw[: len(MAGIC)] != MAGIC:
        return None
    _magic, _version, length = struct.unpack_from("<8sII", raw, 0)
    if not HEADER.size + HEADER_CHECKSUM.size <= length <= min(HEADER_SLOT, len(raw)):
        return None
    (stored,) = HEADER_CHECKSUM.unpack_from(raw, length - HEADER_CHECKSUM.size)
    if codec.checksum(raw[: length - HEADER_CHECKSUM.size]) != stored:
        return None
    return int(HEADER.unpack_from(raw, 0)[6])


def parse_header(raw: bytes, path: str, where: int, file_size: int) -> Header:
    """Parse and validate one header copy; CorruptImage/UnsupportedFeature say why not."""
    what = f"{path}: header at offset {where}"
    if len(raw) < HEADER.size + HEADER_CHECKSUM.size:
        raise CorruptImage(f"{what}: file too short for a header ({len(raw)} bytes)")
    fields = HEADER.unpack_from(raw, 0)
    magic, version, length = fields[0], fields[1], fields[2]
    if magic != MAGIC:
        raise CorruptImage(f"{what}: bad magic {magic!r} (expected {MAGIC!r})")
    if not HEADER.size + HEADER_CHECKSUM.size <= length <= min(HEADER_SLOT, len(raw)):
        raise CorruptImage(
            f"{what}: header length {length} outside [{HEADER.size + 8}, {HEADER_SLOT}]"
        )
    body = raw[: length - HEADER_CHECKSUM.size]
    (stored,) = HEADER_CHECKSUM.unpack_from(raw, length - HEADER_CHECKSUM.size)
    if codec.checksum(body) != stored:
        raise CorruptImage(f"{what}: header checksum mismatch")
    if version != VERSION:
        raise UnsupportedFeature(f"{what}: format version {version} (this vdisk reads {VERSION})")
    (
        _m,
        _v,
        _l,
        incompat,
        compat,
        autoclear,
        generation,
        cbits,
        depth,
        rdepth,
        _r1,
        _r2,
        size,
        host_slots,
        uuid,
        created,
        committed,
        root,
        rroot,
        snap_table,
        snap_count,
        deferred,
        deferred_runs,
        bkind,
        _r3,
        plen,
        flen,
        _r4,
        buuid,
        bgen,
        bsize,
        bdigest,
    ) = fields
    unknown = incompat & ~KNOWN_INCOMPAT
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        raise UnsupportedFeature(
            f"{what}: unknown incompatible feature bit {bit} (mask {incompat:#x}); "
            "this image needs a newer vdisk"
        )
    if not MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS:
        raise CorruptImage(
            f"{what}: cluster bits {cbits} outside [{MIN_CLUSTER_BITS}, {MAX_CLUSTER_BITS}]"
        )
    cs = 1 << cbits
    if size > MAX_GUEST_SIZE:
        raise CorruptImage(f"{what}: guest size {size} exceeds the limit {MAX_GUEST_SIZE}")
    need = depth_for(max(1, -(-size // cs)), cbits - ENTRY_BITS, cbits - ENTRY_BITS)
    if not need <= depth <= MAX_DEPTH:
        raise CorruptImage(
            f"{what}: mapping depth {depth} outside [{need}, {MAX_DEPTH}] for size {size}"
        )
    first = first_data_slot(cs)
    max_slots = file_size // cs
    if not first <= host_slots <= max_slots:
        raise CorruptImage(
            f"{what}: host slot count {host_slots} outside [{first}, {max_slots}] "
            f"(file is {file_size} bytes)"
        )
    rneed = depth_for(host_slots, cbits - 1, cbits - ENTRY_BITS)
    if not rneed <= rdepth <= MAX_DEPTH:
        raise CorruptImage(f"{what}: refcount depth {rdepth} outside [{rneed}, {MAX_DEPTH}]")
    if snap_count > MAX_SNAPSHOTS:
        raise CorruptImage(f"{what}: snapshot count {snap_count} exceeds {MAX_SNAPSHOTS}")
    if HEADER.size + plen + flen + HEADER_CHECKSUM.size != length:
        raise CorruptImage(
            f"{what}: backing path ({plen}) and format ({flen}) lengths do not fill the header"
        )
    if bkind > BACKING_UNPINNED:
        raise CorruptImage(f"{what}: unknown backing kind {bkind}")
    try:
        bpath = raw[HEADER.size : HEADER.size + plen].decode()
        bfmt = raw[HEADER.size + plen : HEADER.size + plen + flen].decode()
    except UnicodeDecodeError:
        raise CorruptImage(f"{what}: backing path is not UTF-8") from None
    if bkind != BACKING_NONE and not bpath:
        raise CorruptImage(f"{what}: backing kind {bkind} without a backing path")
    return Header(
        generation=generation,
        cluster_bits=cbits,
        depth=depth,
        rdepth=rdepth,
        size=size,
        host_slots=host_slots,
        uuid=uuid,
        created=created,
        committed=committed,
        root=Entry.unpack(root),
        rroot=Entry.unpack(rroot),
        snap_table=Entry.unpack(snap_table),
        snap_count=snap_count,
        deferred=Entry.unpack(deferred),
        deferred_runs=deferred_runs,
        incompat=incompat,
        compat=compat,
        autoclear=autoclear,
        backing_kind=bkind,
        backing_path=bpath,
        backing_format=bfmt,
        backing_uuid=buuid,
        backing_generation=bgen,
        backing_size=bsize,
        backing_digest=bdigest,
    )


def pack_snapshots(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for s in snaps:
        name = s.name.encode()
        out += SNAP.pack(s.id, s.created, s.size, s.depth, 0, len(name), s.root.pack()) + name
    return bytes(out)


def parse_snapshots(blob: bytes, count: int, what: str) -> list[Snapshot]:
    out: list[Snapshot] = []
    pos = 0
    for i in range(count):
        if pos + SNAP.size > len(blob):
            raise CorruptImage(
                f"{what}: snapshot record {i} runs past the table ({len(blob)} bytes)"
            )
        sid, created, size, depth, _r, nlen, root = SNAP.unpack_from(blob, pos)
        pos += SNAP.size
        if pos + nlen > len(blob):
            raise CorruptImage(f"{what}: snapshot {i} name runs past the table")
        try:
            name = blob[pos : pos + nlen].decode()
        except UnicodeDecodeError:
            raise CorruptImage(f"{what}: snapshot {i} name is not UTF-8") from None
        pos += nlen
        if size > MAX_GUEST_SIZE or not 1 <= depth <= MAX_DEPTH:
            raise CorruptImage(f"{what}: snapshot {name!r} has size {size}, depth {depth}")
        out.append(Snapshot(sid, name, created, size, depth, Entry.unpack(root)))
    if pos != len(blob):
        raise CorruptImage(f"{what}: {len(blob) - pos} stray bytes after {count} snapshots")
    return out


class Runs:
    """Sorted, disjoint runs of slots in two flat arrays: 16 bytes per run, whatever the
    count (a deferred-free list may hold millions of runs)."""

    def __init__(self, starts: array | None = None, counts: array | None = None) -> None:
        self.starts = starts if starts is not None else array("Q")
        self.counts = counts if counts is not None else array("Q")

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, int]]) -> Runs:
        return cls(array("Q", [f for f, _n in pairs]), array("Q", [n for _f, n in pairs]))

    @classmethod
    def from_blob(cls, blob: bytes) -> Runs:
        flat = array("Q")
        flat.frombytes(blob)
        if sys.byteorder != "little":
            flat.byteswap()
        return cls(flat[0::2], flat[1::2])

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.starts, self.counts)

    def total(self) -> int:
        return sum(self.counts)

    def end_of_run(self, slot: int) -> int | None:
        """The end of the run holding ``slot``, or None if no run holds it."""
        i = bisect.bisect_right(self.starts, slot) - 1
        if i >= 0 and slot < self.starts[i] + self.counts[i]:
            return int(self.starts[i] + self.counts[i])
        return None


def pack_runs(slots: set[int] | list[int]) -> list[tuple[int, int]]:
    """Sorted slot numbers -> (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for s in sorted(slots):
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs
