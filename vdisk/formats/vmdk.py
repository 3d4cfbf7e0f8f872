"""VMware VMDK images: hosted sparse, flat and stream-optimized extents.

Spec: VMware "Virtual Disk Format 5.0" (the sparse extent header, grain directory and
grain tables, the text descriptor, the stream-optimized markers); QEMU's ``block/vmdk.c``
behaviour is the reference for what real images look like.

A VMDK disk is a text *descriptor* naming one or more *extents*, concatenated in order:

- ``monolithicSparse``/``streamOptimized``: one file, a sparse header at offset 0 with
  the descriptor embedded in it;
- ``monolithicFlat``/``twoGbMaxExtent*``: a descriptor file plus extent files beside it
  (opened with ``storage.sibling``; names must stay inside the descriptor's directory).

A sparse extent maps a guest grain through the grain directory (GD, one uint32 sector
offset per grain table) and a grain table (GT, ``numGTEsPerGT`` uint32 sector offsets of
grains). GT entry 0 is "not in this layer" (HOLE, falls through to the parent), 1 is a
zeroed grain. Stream-optimized extents store each grain deflate-compressed behind a
12-byte grain marker; their GD may live at the end of the file ("GD at end", found via
the footer, a copy of the header 1024 bytes before the end of the file).

Writing: flat and sparse extents fully (a GD entry of 0 gets a new GT, and its redundant
copy, at the end of the file). Stream-optimized (compressed) extents accept any write,
not only qemu's whole-grain appends: a write to a grain appends a new compressed copy of
the whole grain and repoints the GT; the old copy stays behind as unreferenced space
(``compact`` does not reclaim it, nor the space of grains unmapped by ``discard`` or
whole-grain ``write_zeroes``). vdisk's own streamOptimized images keep GTs and GD at
the end of the file ("GD at end"), rewritten at every ``flush``; while such an image is
being appended to it has no valid footer until ``flush``/``close`` (as VMware's stream
writer), so a crash in between leaves it unreadable.

Crash order for the new grains of a batch (``write_many``, what the cluster cache uses):
grain data, a barrier, then the GT entries (and the redundant GT's), so a GT entry never
names a grain that a crash could lose. A lone ``write`` skips the barrier; ``flush`` makes
everything durable. The first write of a session gives the disk a new CID, so children
made on the old content notice (as VMware and qemu do).
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import sys
import zlib
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field, replace
from typing import Any

from vdisk.cache.lru import LRU
from vdisk.errors import (
    BackingMismatch,
    CorruptImage,
    ReadOnlyImage,
    UnsupportedFeature,
    UsageError,
)
from vdisk.formats.base import (
    BackingRef,
    CheckReport,
    Driver,
    Extent,
    Kind,
    merge_extents,
    reject_unknown_options,
)
from vdisk.formats.common import LazyPool, bool_option, create_parent
from vdisk.storage import Storage

# -- on-disk structures (VMDK 5.0 spec, "Hosted Sparse Extent Header") ------------------

MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"  # VMware 3 / ESX vmfsSparse: not supported
#: magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
#: numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, the four newline
#: detection characters, compressAlgorithm (all sizes and offsets in 512-byte sectors)
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
assert HEADER.size == 79
HEADER_SIZE = 512  # the struct padded with zeros to one sector
NEWLINE_CHECK = b"\n \r\n"
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF

FLAG_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GT = 1 << 1
FLAG_ZEROED_GTE = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
KNOWN_FLAGS = (
    FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT | FLAG_ZEROED_GTE | FLAG_COMPRESSED | FLAG_MARKERS
)
COMPRESS_NONE, COMPRESS_DEFLATE = 0, 1

#: stream-optimized markers: value (LBA or sectors of metadata), size (compressed bytes,
#: 0 for a metadata marker), type (only meaningful when size == 0)
MARKER = struct.Struct("<QII")
assert MARKER.size == 16
GRAIN_MARKER = struct.Struct("<QI")  # the compressed data follows directly
assert GRAIN_MARKER.size == 12
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

GTE_UNALLOCATED, GTE_ZEROED = 0, 1
COMPRESS_LEVEL = 6  # zlib's default, as qemu uses
SECTOR = 512

# -- limits against hostile images -------------------------------------------------------

MAX_DESCRIPTOR = 1 << 20  # a descriptor (embedded or a file) larger than this is refused
MAX_CAPACITY = 64 << 40  # 64 TiB: larger than any VMDK VMware writes
MAX_GRAIN_SECTORS = 1 << 16  # 32 MiB grains
MAX_GTES = 1 << 16
MAX_GD_BYTES = 64 << 20
MAX_EXTENTS = 4096
GT_CACHE_BYTES = 32 << 20
DEFAULT_GRAIN = 65536
TWO_GB = 2 << 30

KEY_NAME = re.compile(r"[A-Za-z0-9_.]+")
ACCESS = ("RW", "RDONLY", "NOACCESS")
MAX_LINE = 4096  # a longer descriptor line is refused (no path or value needs more)


def _key_value(line: str) -> tuple[str, str] | None:
    """``key = value`` split by hand (a regex over untrusted text could backtrack)."""
    key, eq, value = line.partition("=")
    key = key.strip()
    if not eq or not KEY_NAME.fullmatch(key):
        return None
    return key, value.strip()


def _digits(t: str) -> bool:
    return t.isascii() and t.isdigit()


def _extent_line(line: str) -> ExtentLine | None:
    """``ACCESS SECTORS TYPE ["FILE" [OFFSET]]``, or None when malformed."""
    parts = line.split(None, 3)
    if len(parts) < 3 or parts[0] not in ACCESS or not _digits(parts[1]):
        return None
    if not (parts[2].isascii() and parts[2].isalpha() and parts[2].isupper()):
        return None
    fname, off = None, 0
    if len(parts) == 4:
        rest = parts[3]
        if not rest.startswith('"'):
            return None
        close = rest.find('"', 1)
        if close < 0:
            return None
        fname = rest[1:close]
        tail = rest[close + 1 :].strip()
        if tail:
            if not _digits(tail):
                return None
            off = int(tail)
    return ExtentLine(parts[0], int(parts[1]), parts[2], fname, off)


SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
)


def _le_u32(data: bytes) -> array[int]:
    """Little-endian uint32 table as an array (byte-swapped on a big-endian host)."""
    a = array("I", data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _u32_bytes(a: array[int]) -> bytes:
    if sys.byteorder != "little":
        a = array("I", a)
        a.byteswap()
    return a.tobytes()


def _align(n: int, to: int = SECTOR) -> int:
    return (n + to - 1) // to * to


# -- the descriptor ------------------------------------------------------------------------


@dataclass(slots=True)
class ExtentLine:
    access: str
    sectors: int
    type: str
    filename: str | None
    offset: int  # sectors into a flat file


@dataclass(slots=True)
class Descriptor:
    """A parsed descriptor; ``lines`` keep the original text so it can be rewritten."""

    fields: dict[str, str]
    extents: list[ExtentLine]
    lines: list[str] = field(default_factory=list)

    @property
    def cid(self) -> int | None:
        return _hex_field(self.fields, "CID")

    @property
    def parent_cid(self) -> int | None:
        return _hex_field(self.fields, "parentCID")

    @property
    def create_type(self) -> str:
        return self.fields.get("createType", "")

    def without_field(self, key: str) -> str:
        """The descriptor text with every ``key=...`` line removed."""
        out = []
        for line in self.lines:
            kv = _key_value(line)
            if kv and kv[0] == key and not line.lstrip().startswith("#"):
                continue
            out.append(line)
        return "\n".join(out).rstrip("\n") + "\n"

    def with_field(self, key: str, value: str) -> str:
        """The descriptor text with ``key`` set (replaced in place, or added after CID)."""
        out, done = [], False
        for line in self.lines:
            kv = _key_value(line)
            if kv and kv[0] == key and not line.lstrip().startswith("#"):
                out.append(f"{key}={value}")
                done = True
            else:
                out.append(line)
        if not done:
            at = next((i + 1 for i, ln in enumerate(out) if ln.startswith("createType")), len(out))
            out.insert(at, f"{key}={value}")
        return "\n".join(out).rstrip("\n") + "\n"


def _hex_field(fields: dict[str, str], key: str) -> int | None:
    v = fields.get(key)
    if v is None:
        return None
    try:
        return int(v, 16) & 0xFFFF_FFFF
    except ValueError:
        raise CorruptImage(f"descriptor field {key}={v!r} is not a hexadecimal number") from None


def _clean_text(raw: bytes, where: str) -> str:
    """Descriptor bytes to text: the text ends at the first NUL. What follows may be stale
    text, not only padding: qemu rewrites a shorter descriptor in place (a new CID with
    fewer hex digits) without clearing the old tail, so it is ignored, never parsed."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptImage(f"{where}: descriptor is not UTF-8 text (byte {e.start})") from None


def parse_descriptor(raw: bytes, where: str) -> Descriptor:
    """Parse descriptor text strictly: every line is a comment, ``key=value`` (each key
    once) or an extent line; control characters, unterminated quotes and duplicate keys
    are refused so that nothing can be smuggled into the extent list."""
    if len(raw) > MAX_DESCRIPTOR:
        raise CorruptImage(
            f"{where}: descriptor is {len(raw)} bytes, more than the limit {MAX_DESCRIPTOR}"
        )
    text = _clean_text(raw, where)
    lines = text.split("\n")
    fields: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for no, line in enumerate(lines, 1):
        body = line[:-1] if line.endswith("\r") else line
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in body):
            raise CorruptImage(f"{where}: descriptor line {no} contains a control character")
        s = body.strip()
        if not s or s.startswith("#"):
            continue
        if len(s) > MAX_LINE:
            raise CorruptImage(
                f"{where}: descriptor line {no} is {len(s)} characters long (limit {MAX_LINE})"
            )
        if s.split(None, 1)[0] in ACCESS:
            ext = _extent_line(s)
            if ext is None:
                raise CorruptImage(
                    f"{where}: descriptor line {no} is a malformed extent: {s[:80]!r}"
                )
            if len(extents) >= MAX_EXTENTS:
                raise CorruptImage(f"{where}: more than {MAX_EXTENTS} extents")
            extents.append(ext)
            continue
        kv = _key_value(s)
        if kv is None:
            raise CorruptImage(
                f"{where}: descriptor line {no} is neither key=value nor an extent: {s[:80]!r}"
            )
        key, value = kv
        if value.startswith('"'):
            if len(value) < 2 or not value.endswith('"') or '"' in value[1:-1]:
                raise CorruptImage(
                    f"{where}: descriptor line {no}: badly quoted value for {key}: {value[:80]!r}"
                )
            value = value[1:-1]
        elif '"' in value:
            raise CorruptImage(f"{where}: descriptor line {no}: stray quote in {key}")
        if key in fields:
            raise CorruptImage(f"{where}: descriptor key {key!r} appears twice (line {no})")
        fields[key] = value
    if not extents:
        raise CorruptImage(f"{where}: descriptor names no extents")
    return Descriptor(fields, extents, lines)


def _check_extent_name(name: str | None, where: str) -> str:
    """Extent files must sit in (or below) the descriptor's directory."""
    if not name:
        raise CorruptImage(f"{where}: extent without a file name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise CorruptImage(f"{where}: extent file {name!r} is an absolute path (not allowed)")
    if ".." in re.split(r"[/\\]", name):
        raise CorruptImage(f"{where}: extent file {name!r} leaves the image's directory")
    return name


# -- extents -----------------------------------------------------------------------------


class _Flat:
    """A FLAT/VMFS extent: guest bytes at a fixed offset of a plain file."""

    compressed = False

    def __init__(self, storage: Storage, base: int, length: int, writable: bool) -> None:
        self.storage, self.base, self.length, self.writable = storage, base, length, writable

    def read(self, off: int, n: int) -> bytes:
        data = self.storage.pread(self.base + off, n)
        return data + bytes(n - len(data)) if len(data) < n else data

    def status(self, off: int, n: int) -> list[Extent]:
        return [Extent(Kind.DATA, off, n, self.base + off)]

    def write(self, off: int, data: bytes) -> None:
        self.storage.pwrite(self.base + off, data)

    def zero(self, off: int, n: int) -> None:
        self.storage.punch_hole(self.base + off, n)

    def flush(self) -> None:
        self.storage.sync()


class _Zero:
    """A ZERO extent: reads as zeros, stores nothing."""

    compressed = False
    writable = False

    def __init__(self, length: int) -> None:
        self.length = length

    def read(self, off: int, n: int) -> bytes:
        return bytes(n)

    def status(self, off: int, n: int) -> list[Extent]:
        return [Extent(Kind.ZERO, off, n)]

    def flush(self) -> None:
        pass


@dataclass(slots=True)
class _Header:
    version: int
    flags: int
    capacity: int
    grain: int
    desc_offset: int
    desc_size: int
    gtes: int
    rgd: int
    gd: int
    overhead: int
    unclean: int
    newline: bytes
    compress: int

    @classmethod
    def unpack(cls, raw: bytes) -> _Header:
        f = HEADER.unpack_from(raw)
        return cls(*f[1:])

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, *astuple(self)).ljust(HEADER_SIZE, b"\0")


def _validate_header(h: _Header, file_size: int, where: str, footer: bool = False) -> None:
    """Every field checked against its limit and the file size before anything is read."""
    what = "footer" if footer else "header"
    if h.version not in (1, 2, 3):
        raise UnsupportedFeature(f"{where}: VMDK {what} version {h.version} (supported: 1-3)")
    if h.flags & ~KNOWN_FLAGS:
        raise UnsupportedFeature(
            f"{where}: VMDK {what} has unknown flags 0x{h.flags & ~KNOWN_FLAGS:x}"
        )
    if h.flags & FLAG_NEWLINE_TEST and h.newline != NEWLINE_CHECK:
        raise CorruptImage(
            f"{where}: newline check bytes are {h.newline!r}, expected {NEWLINE_CHECK!r} "
            "(the file was damaged by a text-mode transfer)"
        )
    if h.capacity == 0 or h.capacity * SECTOR > MAX_CAPACITY:
        raise CorruptImage(
            f"{where}: capacity {h.capacity} sectors is outside 1..{MAX_CAPACITY // SECTOR}"
        )
    if h.grain == 0 or h.grain & (h.grain - 1) or h.grain > MAX_GRAIN_SECTORS:
        raise CorruptImage(
            f"{where}: grainSize {h.grain} sectors is not a power of two up to {MAX_GRAIN_SECTORS}"
        )
    if not 1 <= h.gtes <= MAX_GTES:
        raise CorruptImage(f"{where}: numGTEsPerGT {h.gtes} is outside 1..{MAX_GTES}")
    if h.flags & FLAG_COMPRESSED:
        if h.compress != COMPRESS_DEFLATE:
            raise UnsupportedFeature(f"{where}: compressAlgorithm {h.compress} (only 1, deflate)")
        if not h.flags & FLAG_MARKERS:
            raise UnsupportedFeature(f"{where}: compressed grains without markers")
    if h.desc_offset:
        end = (h.desc_offset + h.desc_size) * SECTOR
        if h.desc_size * SECTOR > MAX_DESCRIPTOR or end > file_size:
            raise CorruptImage(
                f"{where}: embedded descriptor at sector {h.desc_offset} of {h.desc_size} "
                f"sectors ends past the file ({file_size} bytes) or exceeds {MAX_DESCRIPTOR}"
            )
    gd_bytes = _gd_entries(h) * 4
    if gd_bytes > MAX_GD_BYTES:
        raise CorruptImage(f"{where}: grain directory of {gd_bytes} bytes exceeds {MAX_GD_BYTES}")
    for name, off in (("gdOffset", h.gd), ("rgdOffset", h.rgd)):
        if name == "rgdOffset" and not (h.flags & FLAG_REDUNDANT_GT and off):
            continue
        if name == "gdOffset" and off == GD_AT_END and not footer:
            continue
        if off == 0 or off * SECTOR + gd_bytes > file_size:
            raise CorruptImage(
                f"{where}: {name} {off} (sectors) with {gd_bytes} bytes of directory "
                f"is outside the file ({file_size} bytes)"
            )


#: _Sparse._check_layout sorts at most this many spans (grains and tables): ~200 MB
MAX_LAYOUT_SPANS = 2 << 20


def _gd_entries(h: _Header) -> int:
    cover = h.grain * h.gtes
    return (h.capacity + cover - 1) // cover


class _Sparse:
    """A hosted sparse (or stream-optimized) extent: GD in memory, GTs in the shared LRU."""

    def __init__(
        self,
        drv: VmdkDriver,
        index: int,
        storage: Storage,
        h: _Header,
        writable: bool,
        where: str,
    ) -> None:
        self.drv, self.index, self.storage, self.h, self.where = drv, index, storage, h, where
        self.writable = writable
        self.length = h.capacity * SECTOR
        self.grain = h.grain * SECTOR
        self.compressed = bool(h.flags & FLAG_COMPRESSED)
        self.gt_bytes = h.gtes * 4
        self.file_size = storage.size()
        self.gd_at_end = h.gd == GD_AT_END
        self.footer: _Header | None = None
        if self.gd_at_end:
            self._read_footer()
        hh = self.footer or h
        n = _gd_entries(hh)
        self.gd = _le_u32(storage.pread_exact(hh.gd * SECTOR, n * 4, "grain directory"))
        self.rgd: array[int] | None = None
        if not self.gd_at_end and hh.flags & FLAG_REDUNDANT_GT and hh.rgd:
            self.rgd = _le_u32(
                storage.pread_exact(hh.rgd * SECTOR, n * 4, "redundant grain directory")
            )
        self.eof = _align(self.file_size)
        self.dirty_gts: dict[int, array[int]] = {}  # GD-at-end mode: GTs not yet written out
        self.tail_open = False  # GD-at-end mode: the trailer was cut off for appending
        self.layout_checked = False  # no grain overlaps another or the metadata
        self._last: tuple[int, bytes] | None = None  # last decompressed grain
        #: while write_many runs: GT entries of new grains, written after a barrier
        self.pending: dict[int, int] | None = None

    def _read_footer(self) -> None:
        """GD at end: the footer (a header copy with the real gdOffset) sits 1024 bytes
        before the end, behind a footer marker and followed by an end-of-stream marker."""
        size = self.file_size
        if size < HEADER_SIZE + 3 * SECTOR:
            raise CorruptImage(f"{self.where}: gdOffset says GD-at-end but the file has no footer")
        marker = MARKER.unpack_from(self.storage.pread_exact(size - 1536, 16, "footer marker"))
        raw = self.storage.pread_exact(size - 1024, HEADER_SIZE, "footer")
        if marker[1] != 0 or marker[2] != MARKER_FOOTER or raw[:4] != MAGIC:
            raise CorruptImage(
                f"{self.where}: gdOffset says GD-at-end but there is no footer at offset "
                f"{size - 1024} (file truncated, or a write was interrupted before flush)"
            )
        f = _Header.unpack(raw)
        _validate_header(f, size, self.where, footer=True)
        if (f.capacity, f.grain, f.gtes, f.flags & FLAG_COMPRESSED) != (
            self.h.capacity,
            self.h.grain,
            self.h.gtes,
            self.h.flags & FLAG_COMPRESSED,
        ):
            raise CorruptImage(f"{self.where}: footer disagrees with the header")
        self.footer = f

    # -- mapping ---------------------------------------------------------------------

    def _gt(self, gi: int) -> array[int] | None:
        t = self.dirty_gts.get(gi)
        if t is not None:
            return t
        key = (self.index, gi)
        t = self.drv.gt_cache.get(key)
        if t is not None:
            return t
        off = self.gd[gi]
        if off == 0:
            return None
        if off * SECTOR + self.gt_bytes > self.file_size:
            raise CorruptImage(
                f"{self.where}: grain directory entry {gi} points to sector {off}, "
                f"past the end of the file ({self.file_size} bytes)"
            )
        t = _le_u32(self.storage.pread_exact(off * SECTOR, self.gt_bytes, f"grain table {gi}"))
        self.drv.gt_cache.put(key, t)
        return t

    def entry(self, g: int) -> int:
        if self.pending:
            v = self.pending.get(g)
            if v is not None:
                return v
        t = self._gt(g // self.h.gtes)
        return 0 if t is None else t[g % self.h.gtes]

    def _spans(self, off: int, n: int) -> list[tuple[int, int, int, int]]:
        """(grain, offset in grain, length, GT entry) for each grain the range touches."""
        out = []
        end = off + n
        while off < end:
            g, within = divmod(off, self.grain)
            k = min(self.grain - within, end - off)
            out.append((g, within, k, self.entry(g)))
            off += k
        return out

    def _host(self, g: int, e: int, within: int, k: int) -> int:
        """The host offset of bytes of grain ``g`` (entry ``e``), checked: an uncompressed
        grain lies wholly inside the file (qemu and VMware write whole grains)."""
        need = 12 if self.compressed else min(self.grain, self.length - g * self.grain)
        if e * SECTOR < HEADER_SIZE or e * SECTOR + need > self.file_size:
            raise CorruptImage(
                f"{self.where}: grain {g} at sector {e} ({need} bytes) is outside the file "
                f"({self.file_size} bytes)"
            )
        return e * SECTOR + within

    def _grain_data(self, g: int, e: int) -> bytes:
        """A whole grain (decompressed when the extent is compressed)."""
        if not self.compressed:
            host = self._host(g, e, 0, self.grain)
            data = self.storage.pread(host, self.grain)
            return data + bytes(self.grain - len(data))
        if self._last is not None and self._last[0] == e:
            return self._last[1]
        host, comp = self._fetch(g, e)
        data = self._inflate(g, host, comp)
        self._last = (e, data)
        return data

    def _fetch(self, g: int, e: int) -> tuple[int, bytes]:
        """The compressed bytes of grain ``g`` behind its (checked) grain marker."""
        host = self._host(g, e, 0, 12)
        head = self.storage.pread_exact(host, GRAIN_MARKER.size, f"grain marker of grain {g}")
        lba, size = GRAIN_MARKER.unpack(head)
        if lba != g * self.h.grain:
            raise CorruptImage(
                f"{self.where}: grain marker at {host} names sector {lba}, "
                f"expected {g * self.h.grain}"
            )
        if size == 0 or size > 2 * self.grain + 4096:
            raise CorruptImage(
                f"{self.where}: compressed grain {g} at {host} claims {size} bytes "
                f"(limit {2 * self.grain + 4096})"
            )
        return host, self.storage.pread_exact(host + 12, size, f"compressed grain {g}")

    def _inflate(self, g: int, host: int, comp: bytes) -> bytes:
        """Inflate one grain, never past its size (thread-safe: touches no state)."""
        try:
            d = zlib.decompressobj()
            data = d.decompress(comp, self.grain)
            if d.unconsumed_tail or not d.eof:
                raise CorruptImage(
                    f"{self.where}: compressed grain {g} at {host} does not inflate to "
                    f"one grain of {self.grain} bytes"
                )
        except zlib.error as ex:
            raise CorruptImage(
                f"{self.where}: compressed grain {g} at {host} is damaged: {ex}"
            ) from None
        return data + bytes(self.grain - len(data))

    def _read_compressed(self, off: int, n: int) -> bytes:
        """Compressed grains: fetched in order, inflated on the driver's workers when the
        range holds several (zlib releases the GIL)."""
        out = bytearray(n)
        jobs: list[tuple[int, int, int, int, int, bytes]] = []  # pos, g, within, k, host, comp
        pos = 0
        for g, within, k, e in self._spans(off, n):
            if e not in (GTE_UNALLOCATED, GTE_ZEROED):
                if self._last is not None and self._last[0] == e:
                    out[pos : pos + k] = self._last[1][within : within + k]
                else:
                    jobs.append((pos, g, within, k, *self._fetch(g, e)))
            pos += k
        pool = self.drv._pool() if len(jobs) >= 4 else None
        if pool is not None:
            grains = list(pool.map(lambda j: self._inflate(j[1], j[4], j[5]), jobs))
        else:
            grains = [self._inflate(j[1], j[4], j[5]) for j in jobs]
        for (p, _g, within, k, _h, _c), data in zip(jobs, grains):
            out[p : p + k] = data[within : within + k]
        return bytes(out)

    def read(self, off: int, n: int) -> bytes:
        if self.compressed:
            return self._read_compressed(off, n)
        out = bytearray(n)
        pos = 0
        run_host = run_pos = run_len = 0  # grains stored back to back: one pread

        def take() -> None:
            if run_len:
                out[run_pos : run_pos + run_len] = self.storage.pread_exact(
                    run_host, run_len, "grains"
                )

        for g, within, k, e in self._spans(off, n):
            if e in (GTE_UNALLOCATED, GTE_ZEROED):
                pass  # out is zero-filled
            else:
                host = self._host(g, e, within, k)
                if run_len and run_host + run_len == host and run_pos + run_len == pos:
                    run_len += k
                else:
                    take()
                    run_host, run_pos, run_len = host, pos, k
            pos += k
        take()
        return bytes(out)

    def status(self, off: int, n: int) -> list[Extent]:
        out = []
        pos = off
        for g, within, k, e in self._spans(off, n):
            if e == GTE_UNALLOCATED:
                out.append(Extent(Kind.HOLE, pos, k))
            elif e == GTE_ZEROED:
                out.append(Extent(Kind.ZERO, pos, k))
            elif self.compressed:
                out.append(Extent(Kind.DATA, pos, k))
            else:
                out.append(Extent(Kind.DATA, pos, k, self._host(g, e, within, k)))
            pos += k
        return out

    # -- writing -------------------------------------------------------------------

    def _set_entry(self, g: int, value: int) -> None:
        gi, idx = divmod(g, self.h.gtes)
        t = self._gt(gi)
        if t is None:
            t = self._new_gt(gi)
        t[idx] = value
        if self.gd_at_end:
            self.dirty_gts[gi] = t
            self.drv.gt_cache.pop((self.index, gi))
            if len(self.dirty_gts) > 64:  # bound memory: write the oldest out now
                old = next(iter(self.dirty_gts))
                self._append_gt(old, self.dirty_gts.pop(old))
            return
        raw = struct.pack("<I", value)
        self.storage.pwrite(self.gd[gi] * SECTOR + idx * 4, raw)
        if self.rgd is not None and self.rgd[gi]:
            self.storage.pwrite(self.rgd[gi] * SECTOR + idx * 4, raw)

    def _new_gt(self, gi: int) -> array[int]:
        """A GD entry of 0: give it a zeroed GT (and a redundant one) at the end of file."""
        t = array("I", bytes(self.gt_bytes))
        if self.gd_at_end:
            return t
        size = _align(self.gt_bytes)
        for gd, pos in ((self.gd, 0), (self.rgd, 4)):
            if gd is None:
                continue
            at = self._alloc(size)
            self.storage.pwrite(at, bytes(size))
            gd[gi] = at // SECTOR
            hh = self.footer or self.h
            base = (hh.gd if pos == 0 else hh.rgd) * SECTOR
            self.storage.pwrite(base + gi * 4, struct.pack("<I", at // SECTOR))
        self.drv.gt_cache.put((self.index, gi), t)
        return t

    def _alloc(self, n: int) -> int:
        if self.gd_at_end and not self.tail_open:
            self._open_tail()
        at = self.eof
        self.eof = _align(at + n)
        self.file_size = max(self.file_size, at + n)
        return at

    def _open_tail(self) -> None:
        """Before appending to a GD-at-end extent, cut off its GD and footer when they are
        the last things in the file (the GTs before them stay: the GD names them)."""
        f = self.footer
        assert f is not None
        gd_end = f.gd * SECTOR + _align(len(self.gd) * 4)
        if f.gd >= 1 and gd_end + 3 * SECTOR == self.file_size:
            self.eof = (f.gd - 1) * SECTOR
            self.storage.truncate(self.eof)
            self.file_size = self.eof
        self.tail_open = True

    def _append_gt(self, gi: int, t: array[int]) -> None:
        at = self._alloc(SECTOR + _align(self.gt_bytes))
        body = _u32_bytes(t).ljust(_align(self.gt_bytes), b"\0")
        marker = MARKER.pack(len(body) // SECTOR, 0, MARKER_GT).ljust(SECTOR, b"\0")
        self.storage.pwrite(at, marker + body)
        self.gd[gi] = at // SECTOR + 1
        self.drv.gt_cache.put((self.index, gi), t)

    def _check_layout(self) -> None:
        """Before the first in-place write of a session: no grain may overlap another
        grain, a grain table or a grain directory, or the write would silently change a
        second guest grain or the metadata. One sort of every allocated span (skipped,
        to bound memory, past MAX_LAYOUT_SPANS of them)."""
        names = ("grain", "grain table", "redundant GT", "grain directory", "RGD", "descriptor")
        gts = -(-self.gt_bytes // SECTOR)
        hh = self.footer or self.h
        gd_sectors = -(-len(self.gd) * 4 // SECTOR)
        spans = [(hh.gd, gd_sectors, 3, 0)]  # (start sector, sectors, kind, index)
        if self.rgd is not None:
            spans.append((hh.rgd, gd_sectors, 4, 0))
        if self.h.desc_offset:
            spans.append((self.h.desc_offset, self.h.desc_size, 5, 0))
        for kind, table in ((1, self.gd), (2, self.rgd)):
            spans.extend((off, gts, kind, gi) for gi, off in enumerate(table or ()) if off)
        for gi in range(len(self.gd)):
            t = self._gt(gi)
            if t is None:
                continue
            if len(spans) > MAX_LAYOUT_SPANS:
                self.layout_checked = True
                return
            base = gi * self.h.gtes
            spans.extend((e, self.h.grain, 0, base + i) for i, e in enumerate(t) if e > GTE_ZEROED)
        spans.sort()
        for i in range(1, len(spans)):
            a, n, ka, ia = spans[i - 1]
            c, _m, kc, ic = spans[i]
            if a + n > c:
                raise CorruptImage(
                    f"{self.where}: refusing to write: {names[ka]} {ia} (sector {a}, {n} "
                    f"sectors) overlaps {names[kc]} {ic} at sector {c} (vdisk check lists "
                    "every problem)"
                )
        self.layout_checked = True

    def write(self, off: int, data: bytes) -> None:
        pos = 0
        for g, within, k, e in self._spans(off, len(data)):
            self._write_grain(g, within, data[pos : pos + k], e)
            pos += k

    def _write_grain(
        self, g: int, within: int, piece: bytes, e: int, comp: bytes | None = None
    ) -> None:
        """Write into grain ``g`` (GT entry ``e``); ``comp`` is the whole grain already
        compressed (by write_many's workers), for a whole-grain write."""
        allocated = e not in (GTE_UNALLOCATED, GTE_ZEROED)
        if not allocated and not any(piece) and (e == GTE_ZEROED or not self.drv.has_parent):
            return  # already reads as zeros in this layer
        if allocated and not self.compressed:
            if not self.layout_checked:
                self._check_layout()
            self.storage.pwrite(self._host(g, e, within, len(piece)), piece)
            return
        if len(piece) == self.grain:
            full = piece
        else:
            base = self._grain_data(g, e) if allocated else bytes(self.grain)
            full = base[:within] + piece + base[within + len(piece) :]
        grain_end = min(self.grain, self.length - g * self.grain)
        if grain_end < self.grain:  # the last grain: what lies past the disk is zeros
            full = full[:grain_end] + bytes(self.grain - grain_end)
        if self.compressed:
            if comp is None:
                comp = zlib.compress(full, COMPRESS_LEVEL)
            blob = GRAIN_MARKER.pack(g * self.h.grain, len(comp)) + comp
            blob = blob.ljust(_align(len(blob)), b"\0")
            at = self._alloc(len(blob))
            self.storage.pwrite(at, blob)
            self._last = (at // SECTOR, full)
        else:
            at = self._alloc(self.grain)
            self.storage.pwrite(at, full)
        if self.pending is not None and not self.gd_at_end:
            self.pending[g] = at // SECTOR
        else:
            self._set_entry(g, at // SECTOR)

    def commit_pending(self) -> None:
        """The grains of a batch are on disk: one barrier, then the GT entries naming
        them, so no GT entry ever names a grain that a crash could lose."""
        pending, self.pending = self.pending, None
        if pending:
            self.storage.sync()
            for g in sorted(pending):
                self._set_entry(g, pending[g])

    def zero(self, off: int, n: int) -> None:
        """Whole grains become unallocated (no parent) or zeroed grains; the rest is written."""
        for g, within, k, e in self._spans(off, n):
            whole = within == 0 and k == min(self.grain, self.length - g * self.grain)
            if whole and not self.drv.has_parent:
                if e != GTE_UNALLOCATED:
                    self._set_entry(g, GTE_UNALLOCATED)
            elif whole and self.h.flags & FLAG_ZEROED_GTE:
                if e != GTE_ZEROED:
                    self._set_entry(g, GTE_ZEROED)
            else:
                self._write_grain(g, within, bytes(k), e)

    def flush(self) -> None:
        if self.gd_at_end and (self.tail_open or self.dirty_gts):
            self._write_trailer()
        self.storage.sync()

    def _write_trailer(self) -> None:
        """GD-at-end: dirty GTs, then GD marker + GD, footer marker, footer, EOS marker."""
        for gi in sorted(self.dirty_gts):
            self._append_gt(gi, self.dirty_gts[gi])
        self.dirty_gts.clear()
        gd_body = _u32_bytes(self.gd).ljust(_align(len(self.gd) * 4), b"\0")
        at = self._alloc(SECTOR + len(gd_body) + 3 * SECTOR)
        f = replace(self.footer or self.h, gd=at // SECTOR + 1, rgd=0)
        blob = (
            MARKER.pack(len(gd_body) // SECTOR, 0, MARKER_GD).ljust(SECTOR, b"\0")
            + gd_body
            + MARKER.pack(1, 0, MARKER_FOOTER).ljust(SECTOR, b"\0")
            + f.pack()
            + bytes(SECTOR)
        )
        self.storage.pwrite(at, blob)
        self.footer = f
        self.file_size = self.eof = at + len(blob)
        self.tail_open = False

    def check(self, report: CheckReport) -> None:
        for gi in range(len(self.gd)):
            try:
                t = self._gt(gi)
            except CorruptImage as ex:
                report.corruptions.append(str(ex))
                continue
            if t is None:
                continue
            for idx, e in enumerate(t):
                if e > GTE_ZEROED:
                    g = gi * self.h.gtes + idx
                    end = e * SECTOR + (12 if self.compressed else self.grain)
                    if e * SECTOR < HEADER_SIZE or end > self.file_size:
                        report.corruptions.append(
                            f"{self.where}: grain {g} at sector {e} is outside the file "
                            f"({self.file_size} bytes)"
                        )
            if self.rgd is not None and self.rgd[gi] and not self.gd_at_end:
                try:
                    red = _le_u32(
                        self.storage.pread_exact(
                            self.rgd[gi] * SECTOR, self.gt_bytes, f"redundant grain table {gi}"
                        )
                    )
                except CorruptImage as ex:
                    report.corruptions.append(str(ex))
                    continue
                if red != t:
                    report.corruptions.append(
                        f"{self.where}: grain table {gi} and its redundant copy differ"
                    )


def _open_sparse_header(storage: Storage, where: str) -> _Header:
    size = storage.size()
    raw = storage.pread(0, HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise CorruptImage(f"{where}: file of {size} bytes is too short for a VMDK header")
    if raw[:4] == COWD_MAGIC:
        raise UnsupportedFeature(f"{where}: VMware 3 / vmfsSparse (COWD) extents")
    if raw[:4] != MAGIC:
        raise CorruptImage(f"{where}: bad magic {raw[:4]!r} (expected {MAGIC!r})")
    h = _Header.unpack(raw)
    _validate_header(h, size, where)
    return h


# -- the driver ------------------------------------------------------------------------------


class VmdkDriver(Driver):
    name = "vmdk"
    extensions = (".vmdk",)
    can_create = True
    compressed_options = ({"subformat": "streamOptimized"}, {})  # deflate-compressed grains

    def __init__(self, storage: Storage, readonly: bool) -> None:
        self.storage = storage
        self.readonly = readonly
        self.gt_cache: LRU[tuple[int, int], array[int]] = LRU(
            GT_CACHE_BYTES, weigh=lambda a: len(a) * 4
        )
        self.extents: list[_Flat | _Zero | _Sparse] = []
        self.starts: list[int] = []
        self.others: list[Storage] = []  # sibling files we opened (closed with us)
        self.desc: Descriptor | None = None
        self.desc_embedded: _Header | None = None
        self.cid_bumped = False
        self.has_parent = False
        self.size = 0
        self.workers = min(4, os.cpu_count() or 1)
        self._threads = LazyPool(self.workers, "vdisk-vmdk")

    # -- discovery -----------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        if head[:4] == MAGIC:
            return 100
        if head.startswith(b"# Disk DescriptorFile"):
            return 100
        if head[:4] == COWD_MAGIC:
            return 50
        return 0

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> VmdkDriver:
        reject_unknown_options(cls.name, options, ())
        drv = cls(storage, readonly)
        try:
            drv._open()
        except BaseException:
            for s in drv.others:
                s.close()
            raise
        return drv

    def _open(self) -> None:
        st = self.storage
        where = st.path
        head = st.pread(0, 4)
        if head in (MAGIC, COWD_MAGIC):
            h = _open_sparse_header(st, where)
            desc = None
            if h.desc_offset and h.desc_size:
                raw = st.pread_exact(h.desc_offset * SECTOR, h.desc_size * SECTOR, "descriptor")
                if raw.strip(b"\0"):
                    desc = parse_descriptor(raw, where)
            if desc is not None:
                ext = desc.extents
                if len(ext) != 1 or ext[0].type != "SPARSE":
                    raise CorruptImage(
                        f"{where}: an embedded descriptor must name one SPARSE extent, "
                        f"found {len(ext)} ({', '.join(e.type for e in ext)})"
                    )
                if ext[0].sectors != h.capacity:
                    raise CorruptImage(
                        f"{where}: descriptor extent of {ext[0].sectors} sectors does not "
                        f"match the header capacity {h.capacity}"
                    )
                _check_extent_name(ext[0].filename, where)
                self.desc, self.desc_embedded = desc, h
            writable = not self.readonly and (desc is None or ext[0].access == "RW")
            self._add(_Sparse(self, 0, st, h, writable, where))
        else:
            size = st.size()
            if size > MAX_DESCRIPTOR:
                raise CorruptImage(
                    f"{where}: bad magic {head!r} (expected {MAGIC!r}), and too large "
                    f"({size} bytes) to be a descriptor (limit {MAX_DESCRIPTOR})"
                )
            self.desc = parse_descriptor(st.pread(0, size), where)
            for i, e in enumerate(self.desc.extents):
                self._add(self._open_extent(i, e, where))
        if self.desc is not None:
            if self.desc.fields.get("version", "1") not in ("1", "2", "3"):
                raise UnsupportedFeature(
                    f"{where}: descriptor version {self.desc.fields['version']!r}"
                )
            _ = self.desc.cid  # validates the field
            pcid = self.desc.parent_cid
            hint = self.desc.fields.get("parentFileNameHint")
            if pcid is not None and pcid != 0xFFFF_FFFF and not hint:
                raise CorruptImage(
                    f"{where}: parentCID is {pcid:08x} but no parentFileNameHint names the parent"
                )
            if hint:  # as qemu: the hint makes the parent; parentCID ffffffff = not pinned
                self.backing = BackingRef(hint, "vmdk")
                self.has_parent = True
        self.size = sum(e.length for e in self.extents)
        if self.size == 0 or self.size > MAX_CAPACITY:
            raise CorruptImage(f"{where}: disk size {self.size} is outside 1..{MAX_CAPACITY}")
        grains = [e.grain for e in self.extents if isinstance(e, _Sparse)]
        self.cluster_size = max(grains) if grains else DEFAULT_GRAIN
        for start, x in zip(self.starts, self.extents):
            if isinstance(x, _Sparse) and start % self.cluster_size:
                raise UnsupportedFeature(
                    f"{where}: sparse extent at guest offset {start} is not aligned to "
                    f"{self.cluster_size}-byte grains"
                )

    def _add(self, ext: _Flat | _Zero | _Sparse) -> None:
        self.starts.append(sum(e.length for e in self.extents))
        self.extents.append(ext)

    def _open_extent(self, i: int, e: ExtentLine, where: str) -> _Flat | _Zero | _Sparse:
        if e.access == "NOACCESS":
            raise UnsupportedFeature(f"{where}: extent {i + 1} is NOACCESS")
        if e.sectors == 0 or e.sectors * SECTOR > MAX_CAPACITY:
            raise CorruptImage(f"{where}: extent {i + 1} has {e.sectors} sectors")
        length = e.sectors * SECTOR
        writable = not self.readonly and e.access == "RW"
        if e.type == "ZERO":
            return _Zero(length)
        if e.type not in ("FLAT", "VMFS", "SPARSE"):
            raise UnsupportedFeature(f"{where}: extent {i + 1} has unsupported type {e.type}")
        name = _check_extent_name(e.filename, where)
        st = self.storage.sibling(name, readonly=not writable)
        self.others.append(st)
        ewhere = f"{where}: extent {name}"
        if e.type == "SPARSE":
            if e.offset:
                raise CorruptImage(f"{ewhere}: a SPARSE extent takes no offset")
            h = _open_sparse_header(st, ewhere)
            if h.capacity != e.sectors:
                raise CorruptImage(
                    f"{ewhere}: header capacity {h.capacity} sectors does not match the "
                    f"descriptor's {e.sectors}"
                )
            return _Sparse(self, i, st, h, writable, ewhere)
        need = (e.offset + e.sectors) * SECTOR
        if st.size() < need:
            raise CorruptImage(
                f"{ewhere}: flat extent needs {need} bytes (offset {e.offset} + {e.sectors} "
                f"sectors) but the file has {st.size()}"
            )
        return _Flat(st, e.offset * SECTOR, length, writable)

    # -- I/O --------------------------------------------------------------------------

    def _pieces(self, offset: int, length: int) -> list[tuple[Any, int, int, int]]:
        """(extent, offset in extent, guest offset, length) for each extent touched."""
        out = []
        end = offset + length
        for start, e in zip(self.starts, self.extents):
            s, t = max(offset, start), min(end, start + e.length)
            if s < t:
                out.append((e, s - start, s, t - s))
        return out

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(e.read(off, n) for e, off, _, n in self._pieces(offset, length))

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for e, off, guest, _n in self._pieces(offset, length):
            for x in e.status(off, _n):
                out.append(Extent(x.kind, guest + x.offset - off, x.length, x.host))
        return merge_extents(out)

    def _writable(self, e: Any) -> None:
        if self.readonly:
            raise ReadOnlyImage(f"{self.storage.path}: opened read-only")
        if not e.writable:
            raise ReadOnlyImage(f"{self.storage.path}: extent is read-only (RDONLY or ZERO)")
        if not self.cid_bumped:
            # the layout check before the CID changes: a refused write changes nothing
            for x in self.extents:
                if isinstance(x, _Sparse) and not x.compressed and not x.layout_checked:
                    x._check_layout()
            self._bump_cid()

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        for e, off, _, n in self._pieces(offset, len(data)):
            self._writable(e)
            e.write(off, data[pos : pos + n])
            pos += n

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        for e, off, _, n in self._pieces(offset, length):
            if isinstance(e, _Zero):
                continue  # reads as zeros already
            self._writable(e)
            e.zero(off, n)

    def flush(self) -> None:
        if self.readonly:
            return
        for e in self.extents:
            e.flush()
        self.storage.sync()

    def write_many(self, writes: list[tuple[int, bytes]]) -> None:
        """As write, but whole grains of compressed extents are deflated on a few worker
        threads (zlib releases the GIL) before they are appended in order."""
        batch: list[tuple[_Sparse, int, bytes]] = []

        def drain() -> None:
            if len(batch) > 1 and (pool := self._pool()) is not None:
                comps: list[bytes | None] = list(
                    pool.map(lambda b: zlib.compress(b[2], COMPRESS_LEVEL), batch)
                )
            else:
                comps = [None] * len(batch)
            for (ext, g, full), comp in zip(batch, comps):
                ext._write_grain(g, 0, full, ext.entry(g), comp)
            batch.clear()

        sparse = [e for e in self.extents if isinstance(e, _Sparse) and not e.gd_at_end]
        for e in sparse:
            e.pending = {}
        try:
            self._write_batch(writes, batch, drain)
        finally:
            for e in sparse:
                e.commit_pending()

    def _write_batch(
        self,
        writes: list[tuple[int, bytes]],
        batch: list[tuple[_Sparse, int, bytes]],
        drain: Callable[[], None],
    ) -> None:
        for offset, data in writes:
            pos = 0
            for e, off, _, n in self._pieces(offset, len(data)):
                self._writable(e)
                piece = data[pos : pos + n]
                pos += n
                if not (isinstance(e, _Sparse) and e.compressed):
                    drain()
                    e.write(off, piece)
                    continue
                at = 0
                for g, within, k, _e in e._spans(off, n):
                    chunk = piece[at : at + k]
                    at += k
                    if within == 0 and k == min(e.grain, e.length - g * e.grain):
                        batch.append((e, g, chunk.ljust(e.grain, b"\0")))
                    else:
                        drain()
                        e._write_grain(g, within, chunk, e.entry(g))
        drain()

    def _pool(self) -> ThreadPoolExecutor | None:
        return self._threads.get() if self.workers > 1 else None

    def close(self) -> None:
        try:
            if not self.readonly:
                self.flush()
        finally:
            self._threads.shutdown()
            for s in self.others:
                s.close()
            self.others.clear()
            self.storage.close()

    # -- descriptor and chain --------------------------------------------------------

    def _bump_cid(self) -> None:
        """A new CID on the first write of a session, so children of the old content
        see that their parent changed (VMware's rule)."""
        self.cid_bumped = True
        if self.desc is None:
            return
        cid = secrets.randbits(32)
        while cid == 0xFFFF_FFFF:
            cid = secrets.randbits(32)
        text = self.desc.with_field("CID", f"{cid:08x}").encode()
        h = self.desc_embedded
        if h is not None and len(text) >= h.desc_size * SECTOR:
            return  # no room to grow the descriptor: keep the old CID
        self._write_descriptor(text)

    def _write_descriptor(self, text: bytes) -> None:
        h = self.desc_embedded
        if h is not None:
            if len(text) >= h.desc_size * SECTOR:
                raise UnsupportedFeature(
                    f"{self.storage.path}: the new descriptor ({len(text)} bytes) does not fit "
                    f"its {h.desc_size * SECTOR}-byte slot"
                )
            self.storage.pwrite(h.desc_offset * SECTOR, text.ljust(h.desc_size * SECTOR, b"\0"))
        else:
            self.storage.pwrite(0, text)
            self.storage.truncate(len(text))
        self.desc = parse_descriptor(text, self.storage.path)

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        """Rewrite parentCID and parentFileNameHint. With a ref but no open ``backing`` the
        parent is named but not pinned (parentCID ffffffff: any CID is accepted)."""
        where = self.storage.path
        if self.readonly:
            raise ReadOnlyImage(f"{where}: opened read-only")
        if self.desc is None:
            raise UnsupportedFeature(
                f"{where}: a bare sparse extent has no descriptor for a parent"
            )
        pcid, hint = 0xFFFF_FFFF, None
        if ref is not None:
            if ref.format not in (None, "vmdk") or (
                backing is not None and not isinstance(backing, VmdkDriver)
            ):
                raise UnsupportedFeature(f"{where}: the parent of a VMDK must be a VMDK")
            if _bad_hint(ref.path):
                raise UsageError(
                    f"{where}: parent path {ref.path!r} contains a quote or control character"
                )
            if isinstance(backing, VmdkDriver) and backing.cid is not None:
                pcid = backing.cid
            hint = ref.path
        self.flush()
        text = self.desc.with_field("parentCID", f"{pcid:08x}")
        desc = parse_descriptor(text.encode(), where)
        text = (
            desc.with_field("parentFileNameHint", f'"{hint}"')
            if hint
            else desc.without_field("parentFileNameHint")
        )
        self._write_descriptor(text.encode())
        self.storage.sync()
        self.backing = BackingRef(hint, "vmdk") if hint else None
        self.has_parent = hint is not None

    @property
    def cid(self) -> int | None:
        return None if self.desc is None else self.desc.cid

    def verify_backing(self, backing: Driver) -> None:
        where = self.storage.path
        if not isinstance(backing, VmdkDriver):
            raise BackingMismatch(
                f"{where}: parent {backing.storage.path} is {backing.name}, a VMDK parent is needed"
            )
        try:
            if os.path.samefile(backing.storage.path, where):
                raise BackingMismatch(f"{where}: parentFileNameHint names the image itself")
        except OSError:
            pass
        want = self.desc.parent_cid if self.desc else None
        if want == 0xFFFF_FFFF:
            return  # not pinned (set while a commit into the parent was under way)
        if want != backing.cid:
            have = "none" if backing.cid is None else f"{backing.cid:08x}"
            raise BackingMismatch(
                f"{where}: parentCID is {want or 0:08x} but parent {backing.storage.path} has CID "
                f"{have} (the parent changed after this image was made on it)"
            )

    # -- metadata -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "create-type": self.desc.create_type if self.desc else "sparse extent",
            "cid": None if self.cid is None else f"{self.cid:08x}",
            "extents": [],
        }
        if self.desc is not None and self.desc.parent_cid not in (None, 0xFFFF_FFFF):
            out["parent-cid"] = f"{self.desc.parent_cid:08x}"
        for start, e in zip(self.starts, self.extents):
            d: dict[str, Any] = {"offset": start, "length": e.length}
            if isinstance(e, _Sparse):
                d.update(
                    type="sparse",
                    file=e.storage.path,
                    grain=e.grain,
                    compressed=e.compressed,
                    version=e.h.version,
                )
            elif isinstance(e, _Flat):
                d.update(type="flat", file=e.storage.path, base=e.base)
            else:
                d["type"] = "zero"
            out["extents"].append(d)
        return out

    def stats(self) -> dict[str, Any]:
        return {"grain-tables": self.gt_cache.stats()}

    def check(self, *, repair: bool = False) -> CheckReport:
        report = CheckReport()
        for e in self.extents:
            if isinstance(e, _Sparse):
                e.check(report)
        return report

    # -- creation -----------------------------------------------------------------------

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        reject_unknown_options(
            cls.name,
            options,
            (
                "cluster_size",
                "backing",
                "backing_driver",
                "backing_size",
                "subformat",
                "adapter_type",
                "zeroed_grain",
            ),
        )
        sub = options.get("subformat") or "monolithicSparse"
        match = {s.lower(): s for s in SUBFORMATS}.get(str(sub).lower())
        if match is None:
            raise UsageError(f"vmdk: unknown subformat {sub!r} (known: {', '.join(SUBFORMATS)})")
        sub = match
        grain = options.get("cluster_size") or DEFAULT_GRAIN
        if grain < 4096 or grain & (grain - 1) or grain > MAX_GRAIN_SECTORS * SECTOR:
            raise UsageError(f"vmdk: grain size {grain} is not a power of two in 4 KiB..32 MiB")
        if size <= 0 or size > MAX_CAPACITY:
            raise UsageError(f"vmdk: size {size} is outside 1..{MAX_CAPACITY}")
        adapter = options.get("adapter_type") or "ide"
        if adapter not in ("ide", "lsilogic", "buslogic", "legacyESX"):
            raise UsageError(f"vmdk: unknown adapter_type {adapter!r}")
        sectors = (size + SECTOR - 1) // SECTOR
        parent_cid, hint = 0xFFFF_FFFF, None
        ref: BackingRef | None = options.get("backing")
        if ref is not None:
            if sub not in ("monolithicSparse", "twoGbMaxExtentSparse"):
                raise UsageError(f"vmdk: a {sub} image cannot have a parent")
            with create_parent(cls, storage, ref, options.get("backing_driver")) as parent:
                if not isinstance(parent, VmdkDriver) or parent.cid is None:
                    raise UnsupportedFeature(
                        f"vmdk: the parent {ref.path} must be a VMDK image with a descriptor"
                    )
                parent_cid = parent.cid
                if _bad_hint(ref.path):
                    raise UsageError(
                        f"vmdk: parent path {ref.path!r} contains a quote or control character"
                    )
                hint = ref.path
        base = os.path.basename(storage.path)
        stem = base[:-5] if base.lower().endswith(".vmdk") else base
        zeroed = bool_option("vmdk", "zeroed_grain", options.get("zeroed_grain", False))
        extents: list[str] = []
        if sub in ("monolithicSparse", "streamOptimized"):
            if _bad_hint(base):
                raise UsageError(f"vmdk: file name {base!r} cannot be named in a descriptor")
            extents.append(f'RW {sectors} SPARSE "{base}"')
            text = _descriptor_text(sub, extents, parent_cid, hint, sectors, adapter)
            if sub == "streamOptimized":
                _write_stream(storage, sectors, grain // SECTOR, text)
            else:
                _write_sparse(storage, sectors, grain // SECTOR, text, zeroed)
            return
        chunk = TWO_GB // SECTOR if sub.startswith("twoGb") else sectors
        files = []
        left, n = sectors, 0
        while left > 0:
            k = min(chunk, left)
            n += 1
            if sub == "monolithicFlat":
                name = f"{stem}-flat.vmdk"
            else:
                name = f"{stem}-{'s' if sub.endswith('Sparse') else 'f'}{n:03d}.vmdk"
            if _bad_hint(name):
                raise UsageError(f"vmdk: file name {name!r} cannot be named in a descriptor")
            files.append((name, k))
            extents.append(
                f'RW {k} SPARSE "{name}"' if sub.endswith("Sparse") else f'RW {k} FLAT "{name}" 0'
            )
            left -= k
        for name, k in files:
            ext = storage.sibling(name, readonly=False, create=True)
            try:
                if sub.endswith("Sparse"):
                    _write_sparse(ext, k, grain // SECTOR, None, zeroed)
                else:
                    ext.truncate(k * SECTOR)
                ext.sync()
            finally:
                ext.close()
        text = _descriptor_text(sub, extents, parent_cid, hint, sectors, adapter)
        storage.pwrite(0, text.encode())


def _bad_hint(name: str) -> bool:
    return '"' in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)


def _descriptor_text(
    sub: str,
    extents: list[str],
    parent_cid: int,
    hint: str | None,
    sectors: int,
    adapter: str,
) -> str:
    cid = secrets.randbits(32)
    while cid == 0xFFFF_FFFF:
        cid = secrets.randbits(32)
    cyls = min(65535, max(1, (sectors + 16 * 63 - 1) // (16 * 63)))
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{sub}"',
    ]
    if hint is not None:
        lines.append(f'parentFileNameHint="{hint}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", ""]
    lines += [
        'ddb.virtualHWVersion = "4"',
        f'ddb.geometry.cylinders = "{cyls}"',
        'ddb.geometry.heads = "16"',
        'ddb.geometry.sectors = "63"',
        f'ddb.adapterType = "{adapter}"',
    ]
    return "\n".join(lines) + "\n"


DESC_SECTORS = 20


def _write_sparse(st: Storage, sectors: int, grain: int, text: str | None, zeroed: bool) -> None:
    """qemu's layout: header, descriptor, redundant GD + GTs, GD + GTs, then grains, all
    GTs preallocated (qemu cannot allocate a GT later, so images it must write need them)."""
    gtes = 512
    n = (sectors + grain * gtes - 1) // (grain * gtes)
    gd_sectors = _align(n * 4) // SECTOR
    gt_sectors = _align(gtes * 4) // SECTOR
    desc = (text or "").encode()
    if len(desc) >= DESC_SECTORS * SECTOR:
        raise UsageError(f"vmdk: descriptor of {len(desc)} bytes does not fit its 10 KiB")
    rgd = 1 + DESC_SECTORS
    gd = rgd + gd_sectors + n * gt_sectors
    overhead = _align((gd + gd_sectors + n * gt_sectors) * SECTOR, grain * SECTOR) // SECTOR
    h = _Header(
        2 if zeroed else 1,
        FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT | (FLAG_ZEROED_GTE if zeroed else 0),
        sectors,
        grain,
        1,
        DESC_SECTORS,
        gtes,
        rgd,
        gd,
        overhead,
        0,
        NEWLINE_CHECK,
        COMPRESS_NONE,
    )
    st.truncate(overhead * SECTOR)
    st.pwrite(0, h.pack() + desc)
    for base in (rgd, gd):
        first = base + gd_sectors
        table = array("I", range(first, first + n * gt_sectors, gt_sectors))
        st.pwrite(base * SECTOR, _u32_bytes(table))


def _write_stream(st: Storage, sectors: int, grain: int, text: str) -> None:
    """An empty streamOptimized image, GD at end: header, descriptor, (grains go here),
    GD marker + GD, footer marker, footer, end-of-stream marker."""
    gtes = 512
    n = (sectors + grain * gtes - 1) // (grain * gtes)
    desc = text.encode()
    if len(desc) >= DESC_SECTORS * SECTOR:
        raise UsageError(f"vmdk: descriptor of {len(desc)} bytes does not fit its 10 KiB")
    overhead = 128
    h = _Header(
        3,
        FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
        sectors,
        grain,
        1,
        DESC_SECTORS,
        gtes,
        0,
        GD_AT_END,
        overhead,
        0,
        NEWLINE_CHECK,
        COMPRESS_DEFLATE,
    )
    gd_body = bytes(_align(n * 4))
    gd_at = overhead + 1
    footer = replace(h, gd=gd_at)
    st.pwrite(0, h.pack() + desc)
    st.pwrite(
        overhead * SECTOR,
        MARKER.pack(len(gd_body) // SECTOR, 0, MARKER_GD).ljust(SECTOR, b"\0")
        + gd_body
        + MARKER.pack(1, 0, MARKER_FOOTER).ljust(SECTOR, b"\0")
        + footer.pack()
        + bytes(SECTOR),
    )


DRIVER = VmdkDriver
