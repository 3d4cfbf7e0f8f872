"""Microsoft VHD images (Virtual PC, Hyper-V generation 1): fixed, dynamic, differencing.

Spec: Microsoft "Virtual Hard Disk Image Format Specification" 1.0 (hard disk footer,
dynamic disk header, BAT, sector bitmaps, parent locators). All fields are big-endian.

- fixed: the guest bytes, then a 512-byte footer;
- dynamic: a footer copy at 0, the dynamic header (``cxsparse``), the BAT (one uint32
  sector offset per block, 0xFFFFFFFF = not allocated), blocks of [sector bitmap | data],
  the footer at the end;
- differencing: a dynamic disk whose header names its parent (unique id, UTF-16 name,
  platform locators). A bitmap bit that is clear means "this sector is not in this
  layer": vdisk reports it as HOLE so the generic layer reads the parent (qemu 7.2 reads
  zeros there instead). vdisk treats clear bits of a dynamic disk the same way (HOLE,
  which reads as zeros without a parent).

Disk size, as qemu decides it (``block/vpc.c``): Virtual PC and qemu ("vpc ", "qemu")
size a disk by its CHS geometry (cylinders x heads x sectors x 512), Hyper-V, Disk2vhd,
XenServer, XenConverter and qemu with ``force_size=on`` ("win ", "d2v ", "tap\\0",
"CTXS", "qem2") by the footer's current size; a disk with the maximum geometry
65535x16x255 always uses the current size. The ``size_calc`` open option ("chs" or
"current_size") overrides the table, as qemu's ``force_size_calc`` does.
``create`` keeps the size asked for by default, as qemu's ``force_size=on`` does (the
maximum geometry and creator "qem2", so qemu reads the current size too). With
``force_size=False`` it rounds the size up to a CHS geometry as qemu's default does (and
writes creator "vdsk": the current size then equals the CHS size, so every reader agrees).

Crash order when a block is allocated: bitmap and data are written where the footer
was, the footer is written after them, a barrier (``sync``), and only then the BAT entry
points at the block. A crash before the BAT update leaks the space; a crash before the
new footer lands leaves the footer only as the copy at offset 0, which ``open`` uses
(and, opened for writing, writes back to the end). Writes into an allocated block write
the data before the bitmap bits that make it visible. Zeroed sectors get their bits
cleared and their data zeroed too (qemu reads allocated blocks ignoring the bitmap).

A fixed VHD has no magic at its start (its only footer is at the end), so probing the
first bytes finds it only when the whole file fits in the probe: open it with format
"vhd" (qemu has the same limit and opens such files as raw).
"""

from __future__ import annotations

import itertools
import os
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
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
    cluster_spans,
    merge_extents,
    reject_unknown_options,
)
from vdisk.formats.common import PagedTable, bool_option, create_parent
from vdisk.storage import FileStorage, Storage

# -- on-disk structures -------------------------------------------------------------------

COOKIE = b"conectix"
#: cookie, features, format version, data offset, timestamp, creator application,
#: creator version, creator host OS, original size, current size, cylinders, heads,
#: sectors per track, disk type, checksum, unique id, saved state
FOOTER = struct.Struct(">8sIIQI4sIIQQHBBII16sB")
assert FOOTER.size == 85
FOOTER_SIZE = 512
DYN_COOKIE = b"cxsparse"
#: cookie, data offset (unused), table offset, header version, max table entries, block
#: size, checksum, parent unique id, parent timestamp, reserved, parent unicode name
DYN_HEADER = struct.Struct(">8sQQIIII16sII512s")
assert DYN_HEADER.size == 576
LOCATOR = struct.Struct(">IIIIQ")  # platform code, data space, data length, reserved, offset
assert LOCATOR.size == 24
N_LOCATORS = 8
DYN_HEADER_SIZE = 1024
assert DYN_HEADER.size + N_LOCATORS * LOCATOR.size + 256 == DYN_HEADER_SIZE

VERSION = 0x0001_0000
TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFF = 2, 3, 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFF: "differencing"}
UNUSED = 0xFFFF_FFFF
NO_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
SECTOR = 512
EPOCH = 946684800  # 2000-01-01T00:00:00Z, the VHD timestamp origin
W2RU, W2KU = b"W2ru", b"W2ku"  # Windows relative / absolute path, UTF-16LE
MACX = b"MacX"  # a file:// URL, UTF-8

CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
MAX_CHS = (65535, 16, 255)
MAX_GEOMETRY_SECTORS = 65535 * 16 * 255
MAX_SIZE = 0xFF00_0000 * SECTOR  # 2040 GiB, qemu's limit (and the format's practical one)
MAX_BLOCK = 256 << 20
MAX_LOCATOR = 65536
DEFAULT_BLOCK = 2 << 20
BAT_CACHE_BYTES = 4 << 20  # BAT pages kept in memory
BITMAP_CACHE_BYTES = 12 << 20  # block bitmaps kept in memory


def checksum(data: bytes | bytearray, at: int) -> int:
    """One's complement of the byte sum, the 4 bytes at ``at`` (the checksum) left out."""
    return ~(sum(data) - sum(data[at : at + 4])) & 0xFFFF_FFFF


FOOTER_CSUM_AT = 64
DYN_CSUM_AT = 36


def geometry(sectors: int) -> tuple[int, int, int]:
    """CHS for a sector count, the algorithm of the VHD spec's appendix (as qemu's)."""
    sectors = min(sectors, MAX_GEOMETRY_SECTORS)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def _chs_size(size: int) -> tuple[int, tuple[int, int, int]]:
    """qemu's rounding: the smallest CHS-representable size >= size (or size itself with
    the maximum geometry when no CHS geometry is large enough)."""
    total = (size + SECTOR - 1) // SECTOR
    c = h = s = 0
    i = 0
    while total > c * h * s:
        if total + i > MAX_GEOMETRY_SECTORS:
            return total * SECTOR, MAX_CHS
        c, h, s = geometry(total + i)
        i += 1
    if c * h * s == MAX_GEOMETRY_SECTORS:
        return total * SECTOR, MAX_CHS
    return c * h * s * SECTOR, (c, h, s)


class _Footer:
    """The hard disk footer, as parsed fields plus the raw bytes it came from."""

    cookie: bytes
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator: bytes
    creator_version: int
    creator_os: int
    orig_size: int
    current_size: int
    cyls: int
    heads: int
    spt: int
    type: int
    checksum: int
    uuid: bytes
    saved_state: int

    def __init__(self, raw: bytes) -> None:
        f = FOOTER.unpack_from(raw)
        (
            self.cookie,
            self.features,
            self.version,
            self.data_offset,
            self.timestamp,
            self.creator,
            self.creator_version,
            self.creator_os,
            self.orig_size,
            self.current_size,
            self.cyls,
            self.heads,
            self.spt,
            self.type,
            self.checksum,
            self.uuid,
            self.saved_state,
        ) = f
        self.raw = bytes(raw[:FOOTER_SIZE])

    def valid(self) -> bool:
        return self.cookie == COOKIE and self.checksum == checksum(self.raw, FOOTER_CSUM_AT)


def _pack_footer(
    *,
    data_offset: int,
    size: int,
    chs: tuple[int, int, int],
    dtype: int,
    creator: bytes,
    uid: bytes,
    timestamp: int,
) -> bytes:
    raw = bytearray(
        FOOTER.pack(
            COOKIE,
            2,
            VERSION,
            data_offset,
            timestamp,
            creator,
            0x0000_0001,
            0x5769_326B,  # "Wi2k"
            size,
            size,
            *chs,
            dtype,
            0,
            uid,
            0,
        ).ljust(FOOTER_SIZE, b"\0")
    )
    raw[FOOTER_CSUM_AT : FOOTER_CSUM_AT + 4] = struct.pack(">I", checksum(raw, FOOTER_CSUM_AT))
    return bytes(raw)


def _bitmap_size(block: int) -> int:
    return ((block // SECTOR + 7) // 8 + SECTOR - 1) // SECTOR * SECTOR


def _sector_runs(bm: bytes | bytearray, s0: int, s1: int) -> list[tuple[bool, int, int]]:
    """Runs (bit set?, first sector, end sector) of the bitmap over [s0, s1); bit 7 of byte
    0 is sector 0. Whole bytes are skipped at once."""
    out: list[tuple[bool, int, int]] = []
    s = s0
    while s < s1:
        v = bool(bm[s >> 3] & (0x80 >> (s & 7)))
        full = 0xFF if v else 0
        e = s + 1
        while e < s1:
            if not e & 7 and e + 8 <= s1 and bm[e >> 3] == full:
                e += 8
                continue
            if bool(bm[e >> 3] & (0x80 >> (e & 7))) != v:
                break
            e += 1
        out.append((v, s, e))
        s = e
    return out


def _set_bits(bm: bytearray, s0: int, s1: int, value: bool) -> tuple[int, int]:
    """Set or clear bits [s0, s1); returns the byte range touched."""
    for s in range(s0, s1):
        if value:
            bm[s >> 3] |= 0x80 >> (s & 7)
        else:
            bm[s >> 3] &= ~(0x80 >> (s & 7)) & 0xFF
    return s0 >> 3, (s1 + 7) >> 3


# -- the driver ------------------------------------------------------------------------------


class VhdDriver(Driver):
    name = "vhd"
    aliases = ("vpc",)
    extensions = (".vhd",)
    can_create = True

    def __init__(self, storage: Storage, readonly: bool) -> None:
        self.storage = storage
        self.readonly = readonly
        self.bat: PagedTable  # dynamic and differencing disks only
        self.bitmaps: LRU[int, bytearray] = LRU(BITMAP_CACHE_BYTES)
        self.footer_from_copy = False
        self.footer_repaired = False
        self.overlaps_checked = False

    # -- discovery ---------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        # Dynamic and differencing disks start with a footer copy. A fixed disk has its
        # footer only at the end, which a probe of the first bytes cannot see (qemu has
        # the same limit): open those with format "vhd"/"vpc".
        if head[:8] == COOKIE:
            return 100
        if len(head) == size >= FOOTER_SIZE:  # a fixed disk small enough to be all in the probe
            return cls.probe_tail(head[-FOOTER_SIZE:], size)
        return 0

    @classmethod
    def probe_tail(cls, tail: bytes, size: int) -> int:
        # a fixed disk: the footer is the last sector; its checksum must hold too, so a raw
        # disk that merely contains the word "conectix" there is not taken for a VHD
        if len(tail) == FOOTER_SIZE and tail[:8] == COOKIE:
            stored = int.from_bytes(tail[FOOTER_CSUM_AT : FOOTER_CSUM_AT + 4], "big")
            if stored == checksum(tail, FOOTER_CSUM_AT):
                return 90
        return 0

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> VhdDriver:
        reject_unknown_options(cls.name, options, ("size_calc",))
        calc = options.get("size_calc")
        if calc not in (None, "chs", "current_size"):
            raise UsageError(f"vhd: size_calc must be 'chs' or 'current_size', not {calc!r}")
        drv = cls(storage, readonly)
        drv._open(calc)
        return drv

    def _open(self, calc: str | None) -> None:
        st = self.storage
        where = st.path
        fsize = st.size()
        if fsize < FOOTER_SIZE:
            raise CorruptImage(f"{where}: file of {fsize} bytes is too short for a VHD footer")
        end = _Footer(st.pread_exact(fsize - FOOTER_SIZE, FOOTER_SIZE, "footer"))
        f = end
        self.footer_pos = fsize - FOOTER_SIZE
        if not end.valid():
            copy = _Footer(st.pread_exact(0, FOOTER_SIZE, "footer copy"))
            if copy.valid() and copy.type in (TYPE_DYNAMIC, TYPE_DIFF):
                # an allocation was cut short before its new footer landed
                f = copy
                self.footer_from_copy = True
                self.footer_pos = (fsize + SECTOR - 1) // SECTOR * SECTOR
            elif end.cookie != COOKIE:
                raise CorruptImage(
                    f"{where}: no VHD footer: the last 512 bytes start with {end.cookie!r}, "
                    f"expected {COOKIE!r}"
                )
            else:
                raise CorruptImage(
                    f"{where}: footer checksum is 0x{end.checksum:08x}, computed "
                    f"0x{checksum(end.raw, FOOTER_CSUM_AT):08x}"
                )
        self.footer = f
        if f.version >> 16 != 1:
            raise UnsupportedFeature(f"{where}: VHD format version 0x{f.version:08x} (need 1.x)")
        if f.type not in TYPE_NAMES:
            raise UnsupportedFeature(f"{where}: VHD disk type {f.type} (2, 3 or 4 expected)")
        self.type = f.type
        chs_sectors = f.cyls * f.heads * f.spt
        use_chs = f.creator not in CURRENT_SIZE_CREATORS
        if calc == "chs":
            use_chs = True
        if not use_chs or chs_sectors == MAX_GEOMETRY_SECTORS or calc == "current_size":
            self.size = f.current_size
            self.size_from = "current_size"
        else:
            self.size = chs_sectors * SECTOR
            self.size_from = "chs"
        if not 0 < self.size <= MAX_SIZE or self.size % SECTOR:
            raise CorruptImage(
                f"{where}: disk size {self.size} (from {self.size_from}) is not a positive "
                f"multiple of 512 up to {MAX_SIZE}"
            )
        if f.type == TYPE_FIXED:
            if self.size > self.footer_pos:
                raise CorruptImage(
                    f"{where}: fixed disk of {self.size} bytes but only {self.footer_pos} "
                    "bytes of data before the footer"
                )
            self.cluster_size = 65536
            return
        self._open_dynamic(where)

    def _open_dynamic(self, where: str) -> None:
        st, f = self.storage, self.footer
        if f.data_offset < FOOTER_SIZE or f.data_offset + DYN_HEADER_SIZE > self.footer_pos:
            raise CorruptImage(
                f"{where}: dynamic header offset {f.data_offset} is outside "
                f"{FOOTER_SIZE}..{self.footer_pos - DYN_HEADER_SIZE}"
            )
        raw = st.pread_exact(f.data_offset, DYN_HEADER_SIZE, "dynamic disk header")
        (
            cookie,
            _,
            self.bat_offset,
            version,
            self.max_entries,
            self.block_size,
            csum,
            self.parent_uuid,
            self.parent_timestamp,
            _,
            pname,
        ) = DYN_HEADER.unpack_from(raw)
        self.header_raw = raw
        if cookie != DYN_COOKIE:
            raise CorruptImage(
                f"{where}: dynamic header at {f.data_offset} has cookie {cookie!r}, "
                f"expected {DYN_COOKIE!r}"
            )
        if csum != checksum(raw, DYN_CSUM_AT):
            raise CorruptImage(
                f"{where}: dynamic header checksum is 0x{csum:08x}, computed "
                f"0x{checksum(raw, DYN_CSUM_AT):08x}"
            )
        if version >> 16 != 1:
            raise UnsupportedFeature(f"{where}: dynamic header version 0x{version:08x}")
        b = self.block_size
        if b < SECTOR or b & (b - 1) or b > MAX_BLOCK:
            raise CorruptImage(
                f"{where}: block size {b} is not a power of two in {SECTOR}..{MAX_BLOCK}"
            )
        need = (self.size + b - 1) // b
        if self.max_entries < need:
            raise CorruptImage(
                f"{where}: BAT has {self.max_entries} entries, the disk size needs {need}"
            )
        self.bat_end = self.bat_offset + self.max_entries * 4
        if self.bat_offset < FOOTER_SIZE or self.bat_end > self.footer_pos:
            raise CorruptImage(
                f"{where}: BAT at {self.bat_offset} of {self.max_entries} entries ends at "
                f"{self.bat_end}, past the footer at {self.footer_pos}"
            )
        self._new_bat()
        self.entries = need
        self.bitmap_size = _bitmap_size(b)
        self.cluster_size = min(b, 65536)
        self.header_end = f.data_offset + DYN_HEADER_SIZE
        if self.type == TYPE_DIFF:
            self.backing = BackingRef(self._parent_path(raw, pname, where), "vhd")
        if self.footer_from_copy and not self.readonly:
            st.pwrite(self.footer_pos, f.raw)
            st.sync()
            self.footer_repaired = True

    def _parent_path(self, raw: bytes, pname: bytes, where: str) -> str:
        """The parent's name from the locators (relative first, then absolute, then the
        header's bare file name), preferring one that exists."""
        found: list[str] = []
        for i in range(N_LOCATORS):
            code, _space, length, _, off = LOCATOR.unpack_from(raw, DYN_HEADER.size + i * 24)
            if code == 0:
                continue
            code_b = struct.pack(">I", code)
            if code_b not in (W2RU, W2KU, MACX):
                continue
            if length > MAX_LOCATOR or off < FOOTER_SIZE or off + length > self.footer_pos:
                raise CorruptImage(
                    f"{where}: parent locator {i} ({code_b.decode('latin-1')}) at {off} of "
                    f"{length} bytes is outside the file (limit {MAX_LOCATOR} bytes)"
                )
            data = self.storage.pread_exact(off, length, f"parent locator {i}")
            try:
                if code_b == MACX:
                    text = data.decode("utf-8").rstrip("\0")
                    if not text.startswith("file://"):
                        continue
                    text = text[len("file://") :]
                    if text.startswith("localhost/"):
                        text = text[len("localhost") :]
                else:
                    text = data.decode("utf-16-le").rstrip("\0")
            except UnicodeDecodeError:
                raise CorruptImage(
                    f"{where}: parent locator {i} ({code_b.decode()}) is not valid text"
                ) from None
            if code_b != MACX:
                text = text.replace("\\", "/")
                if code_b == W2RU and text.startswith("./"):
                    text = text[2:]
            _check_path(text, where, f"parent locator {i}")
            if text:
                found.append(text)
        try:
            name = pname.decode("utf-16-be").split("\0", 1)[0]
        except UnicodeDecodeError:
            raise CorruptImage(f"{where}: parent unicode name is not valid UTF-16") from None
        if name:
            _check_path(name, where, "parent unicode name")
            found.append(name.replace("\\", "/"))
        if not found:
            raise CorruptImage(f"{where}: differencing disk names no parent")
        rel = [p for p in found if not os.path.isabs(p) and not (len(p) > 1 and p[1] == ":")]
        ordered = rel + [p for p in found if p not in rel]
        if isinstance(self.storage, FileStorage):
            for p in ordered:
                if os.path.exists(self.storage.resolve(p)):
                    return p
        return ordered[0]

    # -- tables ---------------------------------------------------------------------------

    def _new_bat(self) -> None:
        self.bat = PagedTable(
            self.storage,
            self.bat_offset,
            self.max_entries,
            ">I",
            capacity=BAT_CACHE_BYTES,
            what="BAT",
        )

    def _bat(self, b: int) -> int:
        e = self.bat.get(b)
        if e != UNUSED:
            start = e * SECTOR
            end = start + self.bitmap_size + self.block_size
            if (
                start < self.header_end
                or end > self.footer_pos
                or (start < self.bat_end and end > self.bat_offset)
            ):
                raise CorruptImage(
                    f"{self.storage.path}: BAT entry {b} points to sector {e}: the block "
                    f"(offset {start}, {end - start} bytes) overlaps the header or BAT, or "
                    f"ends past the footer at {self.footer_pos}"
                )
        return e

    def _bitmap(self, b: int, e: int) -> bytearray:
        bm = self.bitmaps.get(b)
        if bm is None:
            bm = bytearray(self.storage.pread_exact(e * SECTOR, self.bitmap_size, f"bitmap {b}"))
            self.bitmaps.put(b, bm)
        return bm

    # -- I/O ------------------------------------------------------------------------------

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int | None]]:
        """The mapping of a dynamic or differencing disk over a guest range, as runs of
        (block, guest offset, length, host offset or None where this layer has no data).
        read and block_status both walk it, so they cannot disagree."""
        for b, within, k in cluster_spans(offset, length, self.block_size):
            base = b * self.block_size
            e = self._bat(b)
            if e == UNUSED:
                yield b, base + within, k, None
                continue
            data_at = e * SECTOR + self.bitmap_size
            bm = self._bitmap(b, e)
            s0, s1 = within // SECTOR, (within + k + SECTOR - 1) // SECTOR
            for v, a, z in _sector_runs(bm, s0, s1):
                lo, hi = max(a * SECTOR, within), min(z * SECTOR, within + k)
                yield b, base + lo, hi - lo, data_at + lo if v else None

    def read(self, offset: int, length: int) -> bytes:
        if self.type == TYPE_FIXED:
            data = self.storage.pread(offset, length)
            return data + bytes(length - len(data))
        out = bytearray()
        for b, _, n, host in self._runs(offset, length):
            out += bytes(n) if host is None else self.storage.pread_exact(host, n, f"block {b}")
        return bytes(out)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        if self.type == TYPE_FIXED:
            return [Extent(Kind.DATA, offset, length, offset)]
        return merge_extents(
            [
                Extent(Kind.HOLE, guest, n) if host is None else Extent(Kind.DATA, guest, n, host)
                for _, guest, n, host in self._runs(offset, length)
            ]
        )

    def _check_overlaps(self) -> None:
        """Before the first change of a session: no two BAT entries may name overlapping
        blocks, or an in-place write would silently change a second guest block. One pass
        over the BAT (a sorted list of the allocated entries), once per session."""
        used = sorted(e for b in range(self.entries) if (e := self._bat(b)) != UNUSED)
        span = self.bitmap_size + self.block_size
        for a, c in itertools.pairwise(used):
            if a * SECTOR + span > c * SECTOR:
                raise CorruptImage(
                    f"{self.storage.path}: refusing to write: the blocks at sectors {a} and "
                    f"{c} overlap (blocks are {span} bytes; vdisk check lists every problem)"
                )
        self.overlaps_checked = True

    def write(self, offset: int, data: bytes) -> None:
        if self.type == TYPE_FIXED:
            self.storage.pwrite(offset, data)
            return
        if not self.overlaps_checked:
            self._check_overlaps()
        pos = 0
        for b, within, k in cluster_spans(offset, len(data), self.block_size):
            self._write_block(b, within, data[pos : pos + k])
            pos += k

    def _write_block(self, b: int, within: int, piece: bytes) -> None:
        e = self._bat(b)
        if e == UNUSED:
            if self.type == TYPE_DYNAMIC and not any(piece):
                return  # an unallocated block of a dynamic disk already reads as zeros
            self._alloc_block(b, within, piece)
            return
        bm = self._bitmap(b, e)
        s0, s1 = within // SECTOR, (within + len(piece) + SECTOR - 1) // SECTOR
        head = within % SECTOR
        if head and not bm[s0 >> 3] & (0x80 >> (s0 & 7)):
            piece = bytes(head) + piece  # a sector new to this layer: the rest reads as zeros
            within -= head
        tail = (within + len(piece)) % SECTOR
        if tail and not bm[(s1 - 1) >> 3] & (0x80 >> ((s1 - 1) & 7)):
            piece = piece + bytes(SECTOR - tail)
        self.storage.pwrite(e * SECTOR + self.bitmap_size + within, piece)
        before = bytes(bm)
        lo, hi = _set_bits(bm, s0, s1, True)
        if bm != before:
            self.storage.pwrite(e * SECTOR + lo, bytes(bm[lo:hi]))

    def _alloc_block(self, b: int, within: int, piece: bytes) -> None:
        at = self.footer_pos
        head = within % SECTOR
        start = within - head
        body = bytes(head) + piece
        body += bytes(-len(body) % SECTOR)
        bm = bytearray(self.bitmap_size)
        _set_bits(bm, start // SECTOR, (start + len(body)) // SECTOR, True)
        self.storage.pwrite(at, bm)
        self.storage.pwrite(at + self.bitmap_size + start, body)
        new_footer = at + self.bitmap_size + self.block_size
        self.storage.pwrite(new_footer, self.footer.raw)
        self.storage.sync()  # block and footer durable before the BAT points at the block
        self.footer_pos = new_footer
        self.bat.set(b, at // SECTOR)
        self.bitmaps.put(b, bm)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        if self.type == TYPE_FIXED:
            self.storage.punch_hole(offset, length)
            return
        if self.type == TYPE_DIFF:
            super().write_zeroes(offset, length, unmap=unmap)  # must hide the parent
            return
        if not self.overlaps_checked:
            self._check_overlaps()
        for b, within, k in cluster_spans(offset, length, self.block_size):
            e = self._bat(b)
            if e == UNUSED:
                continue
            end = within + k
            s0, s1 = (within + SECTOR - 1) // SECTOR, end // SECTOR
            if s0 >= s1:  # no whole sector inside: write the zeros
                self._write_block(b, within, bytes(k))
                continue
            if within < s0 * SECTOR:
                self._write_block(b, within, bytes(s0 * SECTOR - within))
            if s1 * SECTOR < end:
                self._write_block(b, s1 * SECTOR, bytes(end - s1 * SECTOR))
            # whole sectors: clear their bits (a clear bit reads as zeros without a parent)
            # and zero their data (qemu reads allocated blocks ignoring the bitmap)
            bm = self._bitmap(b, e)
            lo, hi = _set_bits(bm, s0, s1, False)
            self.storage.pwrite(e * SECTOR + lo, bytes(bm[lo:hi]))
            self.storage.punch_hole(e * SECTOR + self.bitmap_size + s0 * SECTOR, (s1 - s0) * SECTOR)

    # -- resize -------------------------------------------------------------------------

    def truncate(self, size: int) -> None:
        """Grow or shrink a fixed or dynamic disk (qemu cannot resize VHDs at all).

        A CHS-sized disk keeps CHS sizing when the new size has a geometry; otherwise it
        switches to the current size (creator "qem2", maximum geometry), as qemu's
        ``force_size=on`` would have made it. Order: data structures first (a new footer
        past the data of a grown fixed disk; BAT room of a grown dynamic disk; unmapped
        blocks of a shrunk one), a barrier, then the footers that state the new size."""
        where = self.storage.path
        if self.readonly:
            raise ReadOnlyImage(f"{where}: opened read-only")
        if self.type == TYPE_DIFF:
            raise UnsupportedFeature(f"{where}: a differencing disk has its parent's size")
        if not 0 < size <= MAX_SIZE or size % SECTOR:
            raise UsageError(
                f"{where}: VHD size {size} must be a positive multiple of 512 up to {MAX_SIZE}"
            )
        if size == self.size:
            return
        st, f = self.storage, self.footer
        creator, chs = f.creator, (f.cyls, f.heads, f.spt)
        if self.size_from == "chs":
            csize, cchs = _chs_size(size)
            if csize == size and cchs != MAX_CHS:
                chs = cchs
            else:
                creator, chs = b"qem2", MAX_CHS
        elif chs != MAX_CHS:
            chs = geometry(size // SECTOR)  # Hyper-V style: the geometry below the size
        old = self.size
        if self.type == TYPE_FIXED:
            footer = self._new_footer(size, chs, creator)
            st.pwrite(size, footer)  # the new footer first: the old one stays valid till then
            st.sync()
            if size > old:
                st.pwrite(old, bytes(FOOTER_SIZE))  # the old footer becomes guest zeros
            else:
                st.truncate(size + FOOTER_SIZE)
            st.sync()
            self.footer_pos = size
        else:
            self._resize_dynamic(old, size)
            footer = self._new_footer(size, chs, creator)
            st.pwrite(self.footer_pos, footer)
            st.sync()
            st.pwrite(0, footer)
            st.sync()
            self.entries = (size + self.block_size - 1) // self.block_size
        self.footer = _Footer(footer)
        self.size = size
        if creator == b"qem2" or chs == MAX_CHS:
            self.size_from = "current_size"

    def _new_footer(self, size: int, chs: tuple[int, int, int], creator: bytes) -> bytes:
        raw = bytearray(self.footer.raw)
        struct.pack_into(">4s", raw, 28, creator)
        struct.pack_into(">QHBB", raw, 48, size, *chs)
        raw[FOOTER_CSUM_AT : FOOTER_CSUM_AT + 4] = struct.pack(">I", checksum(raw, FOOTER_CSUM_AT))
        return bytes(raw)

    def _resize_dynamic(self, old: int, size: int) -> None:
        st, b = self.storage, self.block_size
        need = (size + b - 1) // b
        # sectors past the smaller size in its last block must read as zeros later
        last = min(old, size)
        lb = last // b
        if last % b and lb < self.entries and (e := self._bat(lb)) != UNUSED:
            bm = self._bitmap(lb, e)
            s0 = (last % b) // SECTOR
            lo, hi = _set_bits(bm, s0, b // SECTOR, False)
            st.pwrite(e * SECTOR + lo, bytes(bm[lo:hi]))
            # and zeros in the data too: qemu reads allocated blocks ignoring the bitmap
            st.punch_hole(e * SECTOR + self.bitmap_size + s0 * SECTOR, b - s0 * SECTOR)
        for blk in range(need, self.entries):  # shrink: blocks past the end are dropped
            if self._bat(blk) != UNUSED:
                self.bat.set(blk, UNUSED)
        if need > self.max_entries:
            room = (self.max_entries * 4 + SECTOR - 1) // SECTOR * SECTOR // 4
            if need <= room:  # the BAT's own padding has room
                st.pwrite(
                    self.bat_offset + self.max_entries * 4, b"\xff" * (need - self.max_entries) * 4
                )
            else:  # a new, larger BAT where the footer was; the old one is left unused
                bat = bytearray(st.pread_exact(self.bat_offset, self.max_entries * 4, "BAT"))
                bat += b"\xff" * ((need - self.max_entries) * 4)
                bat += bytes(-len(bat) % SECTOR)
                at = self.footer_pos
                st.pwrite(at, bytes(bat) + self.footer.raw)
                self.bat_offset, self.footer_pos = at, at + len(bat)
            st.sync()
            self.max_entries = need
            self.bat_end = self.bat_offset + need * 4
            self._new_bat()
            hdr = bytearray(self.header_raw)
            struct.pack_into(">Q", hdr, 16, self.bat_offset)
            struct.pack_into(">I", hdr, 28, need)
            hdr[DYN_CSUM_AT : DYN_CSUM_AT + 4] = struct.pack(">I", checksum(hdr, DYN_CSUM_AT))
            # every changed field and the checksum sit in the header's first sector
            st.pwrite(self.footer.data_offset, bytes(hdr[:SECTOR]))
            self.header_raw = bytes(hdr)
        st.sync()

    # -- chain --------------------------------------------------------------------------

    @property
    def unique_id(self) -> bytes:
        return self.footer.uuid

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        """Make this a differencing disk of ``ref`` (pinned to ``backing``'s unique id when
        given), or a plain dynamic disk with ``ref`` None. New locators go where the
        footer was (the old ones are left unused); the header and both footer copies are
        rewritten in the order that keeps every crash point openable."""
        where = self.storage.path
        if self.readonly:
            raise ReadOnlyImage(f"{where}: opened read-only")
        if self.type == TYPE_FIXED:
            raise UnsupportedFeature(f"{where}: a fixed VHD cannot have a parent")
        if ref is not None and (
            ref.format not in (None, "vhd", "vpc")
            or (backing is not None and not isinstance(backing, VhdDriver))
        ):
            raise UnsupportedFeature(f"{where}: the parent of a VHD must be a VHD")
        if isinstance(backing, VhdDriver) and backing.size != self.size:
            raise UnsupportedFeature(
                f"{where}: parent {backing.storage.path} is {backing.size} bytes, this disk "
                f"{self.size} (a differencing disk has its parent's size)"
            )
        st = self.storage
        self.flush()
        puid, pts, pname, locators = bytes(16), 0, b"", b""
        if ref is not None:
            parent = backing if isinstance(backing, VhdDriver) else None
            puid, pts, pname, locators, loc_data = _parent_fields(st, ref, parent, self.footer_pos)
            new_pos = self.footer_pos + len(loc_data)
            st.pwrite(self.footer_pos, loc_data + self.footer.raw)
            st.sync()
            self.footer_pos = new_pos
        hdr = _pack_header(
            self.bat_offset, self.max_entries, self.block_size, puid, pts, pname, locators
        )
        raw = bytearray(self.footer.raw)
        raw[60:64] = struct.pack(">I", TYPE_DIFF if ref is not None else TYPE_DYNAMIC)
        raw[FOOTER_CSUM_AT : FOOTER_CSUM_AT + 4] = struct.pack(">I", checksum(raw, FOOTER_CSUM_AT))
        footer = bytes(raw)
        steps = [
            [(self.footer.data_offset, hdr)],
            [(self.footer_pos, footer), (0, footer)],
        ]
        if ref is None:  # become dynamic first: stale parent fields are then ignored
            steps.reverse()
        for step in steps:
            for at, blob in step:
                st.pwrite(at, blob)
            st.sync()
        self.footer = _Footer(footer)
        self.type = self.footer.type
        self.header_raw = hdr
        self.parent_uuid = puid
        self.backing = BackingRef(ref.path, "vhd") if ref is not None else None

    def verify_backing(self, backing: Driver) -> None:
        where = self.storage.path
        if not isinstance(backing, VhdDriver):
            raise BackingMismatch(
                f"{where}: parent {backing.storage.path} is {backing.name}, a VHD parent is needed"
            )
        try:
            if os.path.samefile(backing.storage.path, where):
                raise BackingMismatch(f"{where}: the parent locator names the image itself")
        except OSError:
            pass
        if self.parent_uuid != bytes(16) and backing.unique_id != self.parent_uuid:
            raise BackingMismatch(
                f"{where}: parent unique id is {uuid.UUID(bytes=self.parent_uuid)} but "
                f"{backing.storage.path} has {uuid.UUID(bytes=backing.unique_id)} "
                "(not the disk this one was made on)"
            )
        if backing.size != self.size:
            raise BackingMismatch(
                f"{where}: parent {backing.storage.path} is {backing.size} bytes, "
                f"this differencing disk {self.size}"
            )

    # -- metadata -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        f = self.footer
        out: dict[str, Any] = {
            "subformat": TYPE_NAMES[self.type],
            "creator": f.creator.decode("latin-1"),
            "size-from": self.size_from,
            "current-size": f.current_size,
            "geometry": [f.cyls, f.heads, f.spt],
            "unique-id": str(uuid.UUID(bytes=f.uuid)),
        }
        if self.type != TYPE_FIXED:
            out["block-size"] = self.block_size
        if self.type == TYPE_DIFF:
            out["parent-unique-id"] = str(uuid.UUID(bytes=self.parent_uuid))
        if self.footer_from_copy:
            out["footer"] = "taken from the copy at offset 0 (the last one was damaged)"
        return out

    def stats(self) -> dict[str, Any]:
        if self.type == TYPE_FIXED:
            return {}
        return {"bat": self.bat.stats(), "bitmaps": self.bitmaps.stats()}

    def check(self, *, repair: bool = False) -> CheckReport:
        """Every BAT entry inside the file, past the metadata, no two blocks overlapping;
        the footer copy at offset 0 equal to the footer (``repair`` rewrites the copy; a
        damaged footer is rewritten from the copy by any writable open)."""
        report = CheckReport()
        if self.type == TYPE_FIXED:
            return report
        where = self.storage.path
        if self.footer_from_copy:
            if self.footer_repaired:
                report.repaired.append(f"{where}: damaged footer rewritten from the copy at 0")
            else:
                report.corruptions.append(f"{where}: the footer at the end is damaged")
        elif self.storage.pread(0, FOOTER_SIZE) != self.footer.raw:
            if repair and not self.readonly:
                self.storage.pwrite(0, self.footer.raw)
                self.storage.sync()
                report.repaired.append(f"{where}: footer copy at offset 0 rewritten")
            else:
                report.corruptions.append(f"{where}: the footer copy at offset 0 differs")
        used: list[tuple[int, int]] = []
        for b in range(self.entries):
            try:
                e = self._bat(b)
            except CorruptImage as ex:
                report.corruptions.append(str(ex))
                continue
            if e != UNUSED:
                used.append((e * SECTOR, b))
        used.sort()
        span = self.bitmap_size + self.block_size
        for (a, ba), (c, bc) in itertools.pairwise(used):
            if a + span > c:
                report.corruptions.append(f"{where}: blocks {ba} and {bc} overlap at offset {c}")
        report.info["allocated-blocks"] = len(used)
        return report

    # -- creation -------------------------------------------------------------------------

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
                "force_size",
            ),
        )
        sub = str(options.get("subformat") or "dynamic").lower()
        if sub not in ("fixed", "dynamic"):
            raise UsageError(f"vhd: subformat must be 'fixed' or 'dynamic', not {sub!r}")
        block = options.get("cluster_size") or DEFAULT_BLOCK
        if block < SECTOR or block & (block - 1) or block > MAX_BLOCK:
            raise UsageError(f"vhd: block size {block} is not a power of two in 512..256 MiB")
        ref: BackingRef | None = options.get("backing")
        now = max(0, int(time.time()) - EPOCH)
        uid = uuid.uuid4().bytes
        parent: VhdDriver | None = None
        with ExitStack() as stack:
            if ref is not None:
                if sub == "fixed" and options.get("subformat"):
                    raise UsageError("vhd: a fixed disk cannot have a parent")
                p = stack.enter_context(
                    create_parent(cls, storage, ref, options.get("backing_driver"))
                )
                if not isinstance(p, VhdDriver):
                    raise UnsupportedFeature(
                        f"vhd: the parent of a differencing disk must be a VHD, "
                        f"{ref.path} is {p.name}"
                    )
                parent = p
            if parent is not None:
                if size != parent.size:
                    raise UsageError(
                        f"vhd: a differencing disk has its parent's size ({parent.size}), "
                        f"not {size}"
                    )
                pf = parent.footer
                chs = (pf.cyls, pf.heads, pf.spt)
                vsize = pf.current_size
                creator = b"qem2" if parent.size_from == "current_size" else b"vdsk"
                dtype = TYPE_DIFF
            else:
                if size <= 0:
                    raise UsageError(f"vhd: size {size} must be positive")
                if bool_option("vhd", "force_size", options.get("force_size", True)):
                    vsize, chs, creator = (size + SECTOR - 1) // SECTOR * SECTOR, MAX_CHS, b"qem2"
                else:
                    vsize, chs = _chs_size(size)
                    creator = b"qem2" if chs == MAX_CHS else b"vdsk"
                if vsize > MAX_SIZE:
                    raise UsageError(f"vhd: size {vsize} exceeds the VHD limit of 2040 GiB")
                dtype = TYPE_FIXED if sub == "fixed" else TYPE_DYNAMIC
            footer = _pack_footer(
                data_offset=NO_OFFSET if dtype == TYPE_FIXED else FOOTER_SIZE,
                size=vsize,
                chs=chs,
                dtype=dtype,
                creator=creator,
                uid=uid,
                timestamp=now,
            )
            if dtype == TYPE_FIXED:
                storage.truncate(vsize)
                storage.pwrite(vsize, footer)
                return
            _write_dynamic(storage, footer, vsize, block, parent, ref)


def _check_path(text: str, where: str, what: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise CorruptImage(f"{where}: {what} contains a control character")


def _parent_fields(
    st: Storage, ref: BackingRef, parent: VhdDriver | None, pos: int
) -> tuple[bytes, int, bytes, bytes, bytes]:
    """Parent unique id, timestamp, UTF-16BE name, locator entries and locator data (to be
    written at ``pos``). Without an open parent the id is zero: named but not pinned."""
    puid = parent.footer.uuid if parent is not None else bytes(16)
    pts = parent.footer.timestamp if parent is not None else 0
    rel = ref.path.replace("/", "\\")
    if not os.path.isabs(ref.path) and not rel.startswith(("..", ".\\")):
        rel = ".\\" + rel
    absolute = st.resolve(ref.path) if isinstance(st, FileStorage) else ref.path
    pname = os.path.basename(ref.path).encode("utf-16-be")[:510]
    locators = loc_data = b""
    for code, text in ((W2RU, rel), (W2KU, absolute)):
        data = text.encode("utf-16-le")
        space = (len(data) + SECTOR - 1) // SECTOR * SECTOR
        # the space field holds bytes, as Virtual PC and Hyper-V write it
        locators += LOCATOR.pack(struct.unpack(">I", code)[0], space, len(data), 0, pos)
        loc_data += data.ljust(space, b"\0")
        pos += space
    return puid, pts, pname, locators, loc_data


def _pack_header(
    bat_at: int, entries: int, block: int, puid: bytes, pts: int, pname: bytes, locators: bytes
) -> bytes:
    hdr = bytearray(
        DYN_HEADER.pack(
            DYN_COOKIE,
            NO_OFFSET,
            bat_at,
            VERSION,
            entries,
            block,
            0,
            puid,
            pts,
            0,
            pname.ljust(512, b"\0"),
        )
        + locators.ljust(N_LOCATORS * LOCATOR.size, b"\0")
        + bytes(256)
    )
    hdr[DYN_CSUM_AT : DYN_CSUM_AT + 4] = struct.pack(">I", checksum(hdr, DYN_CSUM_AT))
    return bytes(hdr)


def _write_dynamic(
    st: Storage,
    footer: bytes,
    size: int,
    block: int,
    parent: VhdDriver | None,
    ref: BackingRef | None,
) -> None:
    """Footer copy, dynamic header, BAT (all unused), parent locators, footer."""
    entries = (size + block - 1) // block
    bat_at = FOOTER_SIZE + DYN_HEADER_SIZE
    pos = bat_at + (entries * 4 + SECTOR - 1) // SECTOR * SECTOR
    puid, pts, pname, locators, loc_data = bytes(16), 0, b"", b"", b""
    if ref is not None:
        puid, pts, pname, locators, loc_data = _parent_fields(st, ref, parent, pos)
    hdr = _pack_header(bat_at, entries, block, puid, pts, pname, locators)
    bat = (b"\xff" * (entries * 4)).ljust(pos - bat_at, b"\0")
    st.pwrite(0, footer + hdr + bat + loc_data)
    st.pwrite(pos + len(loc_data), footer)


DRIVER = VhdDriver
