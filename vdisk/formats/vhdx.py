"""Hyper-V VHDX images: fixed, dynamic and differencing; the log is replayed.

Spec: Microsoft "VHDX Format Specification v1.0". The file starts with a 64 KiB file
type identifier, two 4 KiB headers (at 64 KiB and 128 KiB; the valid one with the larger
sequence number is current; CRC-32C protected) and two copies of the region table (at
192 KiB and 256 KiB), which locates the BAT and the metadata region. Metadata items give
the block size, the virtual size, the sector sizes and, for a differencing disk, the
parent locator (UTF-16 key/value pairs: ``parent_linkage`` is the parent's
DataWriteGuid, ``relative_path``/``absolute_win32_path`` name the file).

The BAT has one 64-bit entry per payload block (state in bits 0-2, file offset in MiB in
bits 20-63), with one sector bitmap entry after every ``chunk_ratio`` payload entries.
A differencing disk's PARTIALLY_PRESENT block has a bit per logical sector in its chunk's
sector bitmap block: 1 = sector in this file, 0 = the parent's.

The log: a header with a non-zero LogGuid means log entries may hold metadata updates
that did not reach their final place. On open the active sequence (the valid entries with
consecutive sequence numbers ending at the newest one, starting at its tail) is replayed
into the file when writable, or applied in memory (``_LogOverlay``) when read-only.

vdisk writes payload without the log, in this order (new space is at the end of the file):

=================================  ===================================  =====================
crash after                        on disk                              next open
=================================  ===================================  =====================
header update (new write GUIDs)    both headers valid, newer wins       new GUIDs only
file extended, block data written  data in an unreferenced block        a leak, old content
sync, sector bitmap bits written   bits of a block still NOT_PRESENT    old content
BAT entry (8 bytes, one sector)    the new block is live                new content
=================================  ===================================  =====================

A write to sectors not yet present in a PARTIALLY_PRESENT block syncs its data before the
bits that make it visible, so a power loss never shows stale bytes instead of the parent's.

Zeroing or discarding an allocated block punches a hole in it and keeps it allocated
(a fixed disk's blocks are never unallocated), so no space is leaked in the file.

Metadata changes (the parent locator and the has-parent flag, on rebase, commit and
flatten) do go through the log: one entry with the new pages, LogGuid set in the headers,
the pages written in place, LogGuid cleared. A crash in between is replayed on next open.
The first write of a session gives the file new FileWriteGuid and DataWriteGuid values, so
a differencing disk made on the old content refuses the changed parent (``verify_backing``).
Log entries are checked before they are replayed: none may write the headers, the log
itself or past the file size the log records.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import astuple, dataclass, replace
from typing import Any

from vdisk.cache.lru import LRU
from vdisk.errors import BackingMismatch, CorruptImage, UnsupportedFeature, UsageError
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
from vdisk.formats.common import Bitset, PagedTable, refuse_writes_if_corrupt
from vdisk.storage import Storage

KiB, MiB = 1 << 10, 1 << 20

# -- structures (VHDX spec v1.0, section 2) ---------------------------------------------------

FILE_ID_SIG = b"vhdxfile"
HEADER_SIG, REGION_SIG, META_SIG = b"head", b"regi", b"metadata"
LOG_SIG, DESC_SIG, ZERO_SIG, DATA_SIG = b"loge", b"desc", b"zero", b"data"

# signature, checksum, sequence number, FileWriteGuid, DataWriteGuid, LogGuid,
# LogVersion, Version, LogLength, LogOffset (then reserved up to 4 KiB)
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
assert HEADER.size == 80
HEADER_SIZE = 4 * KiB
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
# signature, checksum, entry count, reserved
REGION_HDR = struct.Struct("<4sIII")
assert REGION_HDR.size == 16
# GUID, file offset, length, flags (bit 0: required)
REGION_ENTRY = struct.Struct("<16sQII")
assert REGION_ENTRY.size == 32
REGION_SIZE = 64 * KiB
REGION_OFFSETS = (192 * KiB, 256 * KiB)
MAX_REGIONS = 2047
# signature, reserved, entry count, reserved
META_HDR = struct.Struct("<8sHH20s")
assert META_HDR.size == 32
# item id, offset (in the region), length, flags (IsUser 1, IsVirtualDisk 2, IsRequired 4), reserved
META_ENTRY = struct.Struct("<16sIII4x")
assert META_ENTRY.size == 32
META_TABLE_SIZE = 64 * KiB
MAX_META_ITEM = 1 * MiB
# log entry header: signature, checksum, entry length, tail, sequence number, descriptor
# count, reserved, LogGuid, FlushedFileOffset, LastFileOffset
LOG_HDR = struct.Struct("<4sIIIQII16sQQ")
assert LOG_HDR.size == 64
# descriptor: signature, trailing bytes / reserved, leading bytes / zero length, file
# offset, sequence number
LOG_DESC = struct.Struct("<4sIQQQ")
assert LOG_DESC.size == 32
# data sector: signature, sequence high, 4084 data bytes, sequence low
LOG_DATA = struct.Struct("<4sI4084sI")
assert LOG_DATA.size == 4096
LOG_SECTOR = 4096
MAX_LOG = 32 * MiB  # larger logs are refused (they are read whole when replayed)
# parent locator header: locator type, reserved, key/value count; entry: key offset,
# value offset, key length, value length
LOCATOR_HDR = struct.Struct("<16sHH")
assert LOCATOR_HDR.size == 20
LOCATOR_ENTRY = struct.Struct("<IIHH")
assert LOCATOR_ENTRY.size == 12
MAX_LOCATOR_ENTRIES = 256
NULL_LINKAGE = "{00000000-0000-0000-0000-000000000000}"


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
KNOWN_META = {
    FILE_PARAMS_GUID,
    DISK_SIZE_GUID,
    PAGE83_GUID,
    LOGICAL_SECTOR_GUID,
    PHYSICAL_SECTOR_GUID,
    PARENT_LOCATOR_GUID,
}
META_USER, META_VIRTUAL_DISK, META_REQUIRED = 1, 2, 4
FLAG_LEAVE_ALLOCATED, FLAG_HAS_PARENT = 1, 2

# BAT entry states
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6
STATE_NAMES = {
    NOT_PRESENT: "NOT_PRESENT",
    UNDEFINED: "UNDEFINED",
    ZERO: "ZERO",
    UNMAPPED: "UNMAPPED",
    FULLY_PRESENT: "FULLY_PRESENT",
    PARTIALLY_PRESENT: "PARTIALLY_PRESENT",
}
STATE_MASK = 7
OFFSET_SHIFT = 20

MIN_BLOCK, MAX_BLOCK, DEFAULT_BLOCK = 1 * MiB, 256 * MiB, 8 * MiB
MAX_DISK = 64 << 40  # 64 TiB, the spec's limit
MAX_FILE = 2 * MAX_DISK  # no valid image file is larger (data, bitmaps, metadata, log)
SECTOR_BITMAP_BLOCK = 1 * MiB
BITMAP_CACHE = 4 << 20
DIFF_CLUSTER = 64 * KiB


# -- CRC-32C (Castagnoli), reflected, table driven --------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C as VHDX uses it (the checksum of headers, region tables and log entries)."""
    t = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _with_checksum(buf: bytearray, at: int = 4) -> bytearray:
    """Fill the 32-bit checksum field at ``at`` of ``buf`` (computed with it zeroed)."""
    struct.pack_into("<I", buf, at, 0)
    struct.pack_into("<I", buf, at, crc32c(buf))
    return buf


def _checksum_ok(buf: bytes, at: int = 4) -> bool:
    stored = struct.unpack_from("<I", buf, at)[0]
    tmp = bytearray(buf)
    struct.pack_into("<I", tmp, at, 0)
    return crc32c(tmp) == stored


def _guid_str(raw: bytes) -> str:
    return "{" + str(uuid.UUID(bytes_le=raw)).upper() + "}"


# -- headers ------------------------------------------------------------------------------------


@dataclass
class Header:
    """One of the two 4 KiB headers (HEADER's fields in their order)."""

    signature: bytes
    checksum: int
    seq: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        return cls(*HEADER.unpack_from(raw, 0))

    def pack(self) -> bytes:
        """The 4 KiB header block with its signature and checksum."""
        buf = bytearray(HEADER_SIZE)
        HEADER.pack_into(buf, 0, *astuple(replace(self, signature=HEADER_SIG, checksum=0)))
        return bytes(_with_checksum(buf))


def _read_headers(st: Storage) -> tuple[Header, int]:
    """The current header (valid, highest sequence number) and its slot."""
    best: tuple[Header, int] | None = None
    for slot, off in enumerate(HEADER_OFFSETS):
        raw = st.pread_exact(off, HEADER_SIZE, f"VHDX header {slot + 1}")
        if raw[:4] != HEADER_SIG or not _checksum_ok(raw):
            continue
        h = Header.unpack(raw)
        if best is None or h.seq > best[0].seq:
            best = (h, slot)
    if best is None:
        raise CorruptImage(
            f"{st.path}: neither VHDX header (at 64 KiB and 128 KiB) has a valid signature "
            "and CRC-32C"
        )
    h = best[0]
    if h.version != 1:
        raise UnsupportedFeature(f"{st.path}: VHDX header version {h.version} (only 1)")
    if h.log_version != 0:
        raise UnsupportedFeature(f"{st.path}: VHDX log version {h.log_version} (only 0)")
    return best


# -- the log ------------------------------------------------------------------------------------


class _LogEntry:
    def __init__(self, pos: int, raw: bytes) -> None:
        (
            _sig,
            _crc,
            self.length,
            self.tail,
            self.seq,
            self.ndesc,
            _r,
            self.guid,
            self.flushed,
            self.last,
        ) = LOG_HDR.unpack_from(raw, 0)
        self.pos = pos
        self.raw = raw

    def writes(self) -> list[tuple[int, int, bytes | None]]:
        """(file offset, length, data or None for zeros), in order."""
        out: list[tuple[int, int, bytes | None]] = []
        dsec = -(-(LOG_HDR.size + LOG_DESC.size * self.ndesc) // LOG_SECTOR)
        data_at = dsec * LOG_SECTOR
        for i in range(self.ndesc):
            sig, trail, lead, off, _seq = LOG_DESC.unpack_from(
                self.raw, LOG_HDR.size + i * LOG_DESC.size
            )
            if sig == ZERO_SIG:
                out.append((off, lead, None))
            else:
                _s, _hi, body, _lo = LOG_DATA.unpack_from(self.raw, data_at)
                data_at += LOG_SECTOR
                out.append(
                    (off, LOG_SECTOR, struct.pack("<Q", lead) + body + struct.pack("<I", trail))
                )
        return out


def _parse_log_entry(log: bytes, pos: int, guid: bytes) -> _LogEntry | None:
    """The valid log entry at ``pos`` of the log, or None (wrong signature, GUID, CRC or
    sequence numbers: anything that was not completely written)."""
    size = len(log)
    if log[pos : pos + 4] != LOG_SIG:
        return None
    _s, _c, length, tail, seq, ndesc, _r, eguid, _f, _l = LOG_HDR.unpack_from(log, pos)
    if eguid != guid or length < LOG_SECTOR or length % LOG_SECTOR or length > size:
        return None
    if tail % LOG_SECTOR or tail >= size:
        return None
    raw = (
        log[pos : pos + length] if pos + length <= size else log[pos:] + log[: pos + length - size]
    )
    dsec = -(-(LOG_HDR.size + LOG_DESC.size * ndesc) // LOG_SECTOR)
    ndata = 0
    for i in range(ndesc):
        if LOG_HDR.size + (i + 1) * LOG_DESC.size > length:
            return None
        dsig, _t, lead, off, dseq = LOG_DESC.unpack_from(raw, LOG_HDR.size + i * LOG_DESC.size)
        if dseq != seq or off % LOG_SECTOR:
            return None
        if dsig == DESC_SIG:
            ndata += 1
        elif dsig != ZERO_SIG or lead % LOG_SECTOR:
            return None
    if (dsec + ndata) * LOG_SECTOR != length or not _checksum_ok(raw):
        return None
    for k in range(ndata):
        s, hi, _b, lo = LOG_DATA.unpack_from(raw, (dsec + k) * LOG_SECTOR)
        if s != DATA_SIG or (hi << 32 | lo) != seq:
            return None
    return _LogEntry(pos, raw)


def read_log(st: Storage, h: Header) -> tuple[list[_LogEntry], int]:
    """The entries of the active sequence, oldest first, and the file size the head entry
    says the file must reach (LastFileOffset). Empty when nothing is to be replayed."""
    where = st.path
    if h.log_length == 0 or h.log_length % MiB or h.log_offset % MiB or h.log_offset < MiB:
        raise CorruptImage(
            f"{where}: VHDX log at {h.log_offset} of {h.log_length} bytes is not 1 MiB aligned"
        )
    if h.log_length > MAX_LOG:
        raise UnsupportedFeature(
            f"{where}: VHDX log of {h.log_length} bytes exceeds the limit {MAX_LOG}"
        )
    fsize = st.size()
    if h.log_offset + h.log_length > fsize:
        raise CorruptImage(
            f"{where}: VHDX log at {h.log_offset}+{h.log_length} is past the end of the file "
            f"({fsize})"
        )
    log = st.pread_exact(h.log_offset, h.log_length, "VHDX log")
    entries: dict[int, _LogEntry] = {}
    for pos in range(0, len(log), LOG_SECTOR):
        e = _parse_log_entry(log, pos, h.log_guid)
        if e is not None:
            entries[pos] = e
    best: list[_LogEntry] = []
    for start in entries.values():
        seqn = [start]
        seen = {start.pos}
        while True:
            cur = seqn[-1]
            nxt = entries.get((cur.pos + cur.length) % len(log))
            if nxt is None or nxt.seq != cur.seq + 1 or nxt.pos in seen:
                break
            seqn.append(nxt)
            seen.add(nxt.pos)
        head = seqn[-1]
        tail_at = next((i for i, e in enumerate(seqn) if e.pos == head.tail), None)
        if tail_at is None:
            continue
        active = seqn[tail_at:]
        if not best or head.seq > best[-1].seq:
            best = active
    if not best:
        return [], 0
    head = best[-1]
    if fsize < head.flushed:
        raise CorruptImage(
            f"{where}: file is {fsize} bytes but the VHDX log says {head.flushed} were flushed "
            "(the file was truncated)"
        )
    if head.last > MAX_FILE:
        raise CorruptImage(
            f"{where}: VHDX log LastFileOffset {head.last} exceeds the limit {MAX_FILE}"
        )
    limit = max(fsize, head.last)
    log_span = (h.log_offset, h.log_offset + h.log_length)
    for e in best:
        for off, n, _data in e.writes():
            # the log never rewrites the headers or itself, nor writes past the file's end
            if (
                off < REGION_OFFSETS[0]
                or off + n > limit
                or (off < log_span[1] and log_span[0] < off + n)
            ):
                raise CorruptImage(
                    f"{where}: VHDX log entry {e.seq} writes {n} bytes at {off}, outside "
                    f"[{REGION_OFFSETS[0]}, {limit}) or into the log"
                )
    return best, head.last


class _LogOverlay(Storage):
    """A read-only view of a file with a dirty log applied in memory.

    Memory is bounded by the log's size: data pages are kept, zeroed ranges are ranges."""

    def __init__(self, inner: Storage, entries: list[_LogEntry], last: int) -> None:
        self.inner = inner
        self.path = inner.path
        self.readonly = True
        self.pages: dict[int, bytes] = {}
        self.zeros: list[tuple[int, int]] = []
        self.end = max(inner.size(), last)
        for e in entries:
            for off, n, data in e.writes():
                if data is None:
                    self.zeros.append((off, off + n))
                    for p in [p for p in self.pages if off <= p < off + n]:
                        del self.pages[p]
                else:
                    self.pages[off] = data
                self.end = max(self.end, off + n)

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.end - offset))
        buf = bytearray(self.inner.pread(offset, length))
        buf += bytes(length - len(buf))
        end = offset + length
        for a, b in self.zeros:
            lo, hi = max(a, offset), min(b, end)
            if lo < hi:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
        first = offset - offset % LOG_SECTOR
        if len(self.pages) < (end - first) // LOG_SECTOR:
            pages = [p for p in self.pages if p < end and p + LOG_SECTOR > offset]
        else:
            pages = [p for p in range(first, end, LOG_SECTOR) if p in self.pages]
        for p in pages:
            lo, hi = max(p, offset), min(p + LOG_SECTOR, end)
            buf[lo - offset : hi - offset] = self.pages[p][lo - p : hi - p]
        return bytes(buf)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise CorruptImage(f"{self.path}: internal error: write to a read-only log view")

    def size(self) -> int:
        return self.end

    def truncate(self, size: int) -> None:
        raise CorruptImage(f"{self.path}: internal error: truncate of a read-only log view")

    def sync(self) -> None:
        pass

    def resolve(self, name: str) -> str:
        return self.inner.resolve(name)

    def close(self) -> None:
        self.inner.close()


def replay_log(st: Storage, entries: list[_LogEntry], last: int) -> None:
    """Write the active sequence to its final place and make it durable."""
    for e in entries:
        for off, n, data in e.writes():
            if data is None:
                pos, end = off, off + n
                while pos < end:  # in bounded pieces: punch_hole may fall back to writing
                    k = min(64 * MiB, end - pos)
                    st.punch_hole(pos, k)
                    pos += k
            else:
                st.pwrite(off, data)
    if st.size() < last:
        st.truncate(last)
    st.sync()


# -- region table and metadata ------------------------------------------------------------------


def _read_regions(st: Storage, fsize: int) -> dict[bytes, tuple[int, int]]:
    where = st.path
    table: bytes | None = None
    for off in REGION_OFFSETS:
        raw = st.pread_exact(off, REGION_SIZE, "VHDX region table")
        if raw[:4] == REGION_SIG and _checksum_ok(raw):
            table = raw
            break
    if table is None:
        raise CorruptImage(f"{where}: neither VHDX region table has a valid signature and CRC-32C")
    _sig, _crc, count, _r = REGION_HDR.unpack_from(table, 0)
    if count > MAX_REGIONS:
        raise CorruptImage(f"{where}: VHDX region table has {count} entries (limit {MAX_REGIONS})")
    regions: dict[bytes, tuple[int, int]] = {}
    spans: list[tuple[int, int]] = []
    for i in range(count):
        guid, off, length, flags = REGION_ENTRY.unpack_from(table, REGION_HDR.size + i * 32)
        if guid not in (BAT_GUID, METADATA_GUID):
            if flags & 1:
                raise UnsupportedFeature(
                    f"{where}: VHDX region {_guid_str(guid)} is required but unknown"
                )
            continue
        what = "BAT" if guid == BAT_GUID else "metadata"
        if off % MiB or length % MiB or off < MiB or length == 0:
            raise CorruptImage(
                f"{where}: VHDX {what} region at {off} of {length} bytes is not 1 MiB aligned "
                "or overlaps the header area"
            )
        if off + length > fsize:
            raise CorruptImage(
                f"{where}: VHDX {what} region at {off}+{length} ends past the end of the file "
                f"({fsize})"
            )
        if guid in regions:
            raise CorruptImage(f"{where}: VHDX {what} region is listed twice")
        for a, b in spans:
            if off < b and a < off + length:
                raise CorruptImage(f"{where}: VHDX {what} region at {off} overlaps another region")
        spans.append((off, off + length))
        regions[guid] = (off, length)
    for guid, what in ((BAT_GUID, "BAT"), (METADATA_GUID, "metadata")):
        if guid not in regions:
            raise CorruptImage(f"{where}: VHDX region table has no {what} region")
    return regions


def _read_metadata(st: Storage, off: int, length: int) -> dict[bytes, bytes]:
    where = st.path
    if length < META_TABLE_SIZE:
        raise CorruptImage(f"{where}: VHDX metadata region of {length} bytes is too short")
    table = st.pread_exact(off, META_TABLE_SIZE, "VHDX metadata table")
    sig, _r, count, _r2 = META_HDR.unpack_from(table, 0)
    if sig != META_SIG:
        raise CorruptImage(f"{where}: bad VHDX metadata table signature {sig!r} at {off}")
    if count > MAX_REGIONS:
        raise CorruptImage(f"{where}: VHDX metadata table has {count} entries (limit 2047)")
    items: dict[bytes, bytes] = {}
    for i in range(count):
        item, ioff, ilen, flags = META_ENTRY.unpack_from(table, META_HDR.size + i * 32)
        if item not in KNOWN_META:
            if flags & META_REQUIRED:
                raise UnsupportedFeature(
                    f"{where}: VHDX metadata item {_guid_str(item)} is required but unknown"
                )
            continue
        if ilen > MAX_META_ITEM or (ilen and (ioff < META_TABLE_SIZE or ioff + ilen > length)):
            raise CorruptImage(
                f"{where}: VHDX metadata item {_guid_str(item)} at {ioff} of {ilen} bytes is "
                f"outside the metadata region ({META_TABLE_SIZE}..{length})"
            )
        if item in items:
            raise CorruptImage(f"{where}: VHDX metadata item {_guid_str(item)} is listed twice")
        items[item] = st.pread_exact(off + ioff, ilen, "VHDX metadata item") if ilen else b""
    return items


def _item(items: dict[bytes, bytes], guid: bytes, size: int, where: str, what: str) -> bytes:
    raw = items.get(guid)
    if raw is None:
        raise CorruptImage(f"{where}: VHDX metadata has no {what} item")
    if len(raw) < size:
        raise CorruptImage(f"{where}: VHDX {what} item is {len(raw)} bytes, needs {size}")
    return raw


def parse_locator(raw: bytes, where: str) -> dict[str, str]:
    """The parent locator's key/value pairs (UTF-16LE strings inside the item)."""
    if len(raw) < LOCATOR_HDR.size:
        raise CorruptImage(f"{where}: VHDX parent locator is {len(raw)} bytes, needs 20")
    ltype, _r, count = LOCATOR_HDR.unpack_from(raw, 0)
    if ltype != VHDX_LOCATOR_TYPE:
        raise UnsupportedFeature(f"{where}: VHDX parent locator type {_guid_str(ltype)} is unknown")
    if count > MAX_LOCATOR_ENTRIES or LOCATOR_HDR.size + count * LOCATOR_ENTRY.size > len(raw):
        raise CorruptImage(f"{where}: VHDX parent locator claims {count} entries")
    out: dict[str, str] = {}
    for i in range(count):
        ko, vo, kl, vl = LOCATOR_ENTRY.unpack_from(raw, LOCATOR_HDR.size + i * LOCATOR_ENTRY.size)
        if ko + kl > len(raw) or vo + vl > len(raw) or kl % 2 or vl % 2:
            raise CorruptImage(f"{where}: VHDX parent locator entry {i} is out of bounds")
        try:
            key = raw[ko : ko + kl].decode("utf-16-le")
            value = raw[vo : vo + vl].decode("utf-16-le")
        except UnicodeDecodeError:
            raise CorruptImage(f"{where}: VHDX parent locator entry {i} is not UTF-16") from None
        out[key] = value
    return out


def build_log_entry(
    seq: int,
    guid: bytes,
    writes: list[tuple[int, bytes | None]],
    flushed: int,
    last: int,
    tail: int = 0,
) -> bytes:
    """One log entry: a 4 KiB page per data write, or a zero descriptor of 4 KiB for None.
    ``tail`` is the log offset of the oldest entry still needed (its own when alone)."""
    ndesc = len(writes)
    dsec = -(-(LOG_HDR.size + LOG_DESC.size * ndesc) // LOG_SECTOR)
    ndata = sum(1 for _o, d in writes if d is not None)
    length = (dsec + ndata) * LOG_SECTOR
    buf = bytearray(length)
    LOG_HDR.pack_into(buf, 0, LOG_SIG, 0, length, tail, seq, ndesc, 0, guid, flushed, last)
    k = 0
    for i, (off, payload) in enumerate(writes):
        at = LOG_HDR.size + LOG_DESC.size * i
        if payload is None:
            LOG_DESC.pack_into(buf, at, ZERO_SIG, 0, LOG_SECTOR, off, seq)
            continue
        if len(payload) != LOG_SECTOR or off % LOG_SECTOR:
            raise ValueError("log writes are whole aligned 4 KiB pages")
        lead = struct.unpack_from("<Q", payload, 0)[0]
        trail = struct.unpack_from("<I", payload, LOG_SECTOR - 4)[0]
        LOG_DESC.pack_into(buf, at, DESC_SIG, trail, lead, off, seq)
        LOG_DATA.pack_into(
            buf, (dsec + k) * LOG_SECTOR, DATA_SIG, seq >> 32, payload[8:-4], seq & 0xFFFFFFFF
        )
        k += 1
    return bytes(_with_checksum(buf))


def build_locator(pairs: dict[str, str]) -> bytes:
    keys = list(pairs.items())
    head = LOCATOR_HDR.pack(VHDX_LOCATOR_TYPE, 0, len(keys))
    table = b""
    blob = b""
    base = LOCATOR_HDR.size + LOCATOR_ENTRY.size * len(keys)
    for k, v in keys:
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        ko = base + len(blob)
        vo = ko + len(kb)
        blob += kb + vb
        table += LOCATOR_ENTRY.pack(ko, vo, len(kb), len(vb))
    return head + table + blob


# -- the driver -----------------------------------------------------------------------------------


class VhdxDriver(Driver):
    name = "vhdx"
    aliases = ()
    extensions = (".vhdx",)
    can_create = True

    def __init__(self, storage: Storage, readonly: bool) -> None:
        self.storage = storage
        self.readonly = readonly
        self._session_started = False
        self.replayed = False

    # -- discovery and opening -----------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        return 100 if head[:8] == FILE_ID_SIG else 0

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> VhdxDriver:
        reject_unknown_options(cls.name, options, ())
        d = cls(storage, readonly)
        d._load()
        return d

    def _load(self) -> None:
        st = self.storage
        where = st.path
        fsize = st.size()
        if fsize < MiB:
            raise CorruptImage(f"{where}: file of {fsize} bytes is too short for VHDX (1 MiB)")
        if st.pread_exact(0, 8, "VHDX file identifier") != FILE_ID_SIG:
            raise CorruptImage(f"{where}: no VHDX file identifier ('vhdxfile') at offset 0")
        self.header, self.header_slot = _read_headers(st)
        clear_log = False  # an empty log's GUID is cleared once the rest has validated
        if any(self.header.log_guid):
            entries, last = read_log(st, self.header)
            if entries:
                if self.readonly:
                    self.storage = st = _LogOverlay(st, entries, last)
                else:
                    replay_log(st, entries, last)
                    self.replayed = True
            if not self.readonly:
                self.header.log_guid = bytes(16)
                if entries:
                    self._write_headers()
                else:
                    clear_log = True
            fsize = st.size()
        regions = _read_regions(st, fsize)
        self.bat_offset, self.bat_length = regions[BAT_GUID]
        self.meta_offset, self.meta_length = regions[METADATA_GUID]
        items = _read_metadata(st, self.meta_offset, self.meta_length)
        bs, flags = struct.unpack_from(
            "<II", _item(items, FILE_PARAMS_GUID, 8, where, "file parameters")
        )
        self.size = struct.unpack_from("<Q", _item(items, DISK_SIZE_GUID, 8, where, "disk size"))[0]
        lss = struct.unpack_from(
            "<I", _item(items, LOGICAL_SECTOR_GUID, 4, where, "logical sector size")
        )[0]
        pss = struct.unpack_from(
            "<I", _item(items, PHYSICAL_SECTOR_GUID, 4, where, "physical sector size")
        )[0]
        if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
            raise CorruptImage(
                f"{where}: VHDX block size {bs} is not a power of two in [{MIN_BLOCK}, {MAX_BLOCK}]"
            )
        if lss not in (512, 4096) or pss not in (512, 4096):
            raise CorruptImage(f"{where}: VHDX sector sizes {lss}/{pss} (512 or 4096 expected)")
        if self.size == 0 or self.size > MAX_DISK or self.size % lss:
            raise CorruptImage(
                f"{where}: VHDX virtual disk size {self.size} is not a multiple of {lss} "
                f"in (0, {MAX_DISK}]"
            )
        self.block_size, self.flags, self.lss, self.pss = bs, flags, lss, pss
        self.has_parent = bool(flags & FLAG_HAS_PARENT)
        self.chunk_ratio = (1 << 23) * lss // bs
        self.blocks = -(-self.size // bs)
        nbat = self._bat_entries(self.blocks)
        if nbat * 8 > self.bat_length:
            raise CorruptImage(
                f"{where}: VHDX BAT region of {self.bat_length} bytes holds fewer than the "
                f"{nbat} entries the disk needs"
            )
        self.bat = PagedTable(st, self.bat_offset, nbat, "<Q", what="BAT")
        # a differencing disk tracks presence per sector, so copy-up can be small; a dynamic
        # disk's cluster is only the cache's unit
        self.cluster_size = min(bs, DIFF_CLUSTER if self.has_parent else MiB)
        self.page83 = items.get(PAGE83_GUID, b"")[:16]
        self.locator: dict[str, str] = {}
        if self.has_parent:
            raw = items.get(PARENT_LOCATOR_GUID)
            if raw is None:
                raise CorruptImage(f"{where}: differencing VHDX has no parent locator")
            self.locator = parse_locator(raw, where)
            self.backing = BackingRef(self._parent_path(), "vhdx")
        self.bitmaps: LRU[int, bytearray] = LRU(BITMAP_CACHE)
        self.spb = bs // lss  # sectors per block
        if clear_log:  # not before: an image refused at open is left as it was
            self._write_headers()

    def _bat_entries(self, blocks: int) -> int:
        cr = self.chunk_ratio
        if self.has_parent:
            return -(-blocks // cr) * (cr + 1)
        return blocks + (blocks - 1) // cr

    def _parent_path(self) -> str:
        where = self.storage.path
        cands = []
        for key in ("relative_path", "absolute_win32_path"):
            v = self.locator.get(key)
            if v:
                if "\0" in v or len(v) > 4096:
                    raise CorruptImage(f"{where}: VHDX parent locator {key} is not a usable path")
                path = v.replace("\\", "/")
                if key == "relative_path" and path.startswith("./"):
                    path = path[2:]
                cands.append(path)
        if not cands:
            raise CorruptImage(
                f"{where}: VHDX parent locator has neither relative_path nor absolute_win32_path"
            )
        for c in cands:
            if os.path.exists(self.storage.resolve(c)):
                return c
        return cands[0]

    # -- mapping ----------------------------------------------------------------------------------

    def _bat_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def _entry(self, block: int) -> tuple[int, int]:
        """(state, host offset) of a payload block, validated."""
        raw = self.bat.get(self._bat_index(block))
        state = raw & STATE_MASK
        host = (raw >> OFFSET_SHIFT) * MiB
        if state in (FULLY_PRESENT, PARTIALLY_PRESENT):
            if state == PARTIALLY_PRESENT and not self.has_parent:
                raise CorruptImage(
                    f"{self.storage.path}: block {block} is PARTIALLY_PRESENT in a VHDX "
                    "without a parent"
                )
            fsize = self.storage.size()
            used = self._used(block)  # qemu's fixed disks end right after the last block's data
            if host < MiB or host + used > fsize:
                raise CorruptImage(
                    f"{self.storage.path}: BAT entry of block {block} points at {host}, but "
                    f"its {used} bytes must lie in the file's data area (1 MiB..{fsize})"
                )
        elif state not in STATE_NAMES:
            raise CorruptImage(f"{self.storage.path}: BAT entry of block {block} has state {state}")
        return state, host

    def _used(self, block: int) -> int:
        """Bytes of payload block ``block`` that hold guest data (less for the last one)."""
        return min(self.block_size, self.size - block * self.block_size)

    def _bitmap(self, block: int) -> bytearray:
        """The sector bitmap bits of one payload block (bit i = sector i is in this file)."""
        bm = self.bitmaps.get(block)
        if bm is not None:
            return bm
        chunk, k = divmod(block, self.chunk_ratio)
        raw = self.bat.get(chunk * (self.chunk_ratio + 1) + self.chunk_ratio)
        nbytes = self.spb // 8
        if raw & STATE_MASK == SB_PRESENT:
            host = (raw >> OFFSET_SHIFT) * MiB
            if host < MiB or host + SECTOR_BITMAP_BLOCK > self.storage.size():
                raise CorruptImage(
                    f"{self.storage.path}: sector bitmap of chunk {chunk} points at {host}, "
                    f"past the end of the file ({self.storage.size()})"
                )
            bm = bytearray(self.storage.pread_exact(host + k * nbytes, nbytes, "sector bitmap"))
        else:
            bm = bytearray(nbytes)
        self.bitmaps.put(block, bm)
        return bm

    def _runs(self, block: int, within: int, n: int) -> list[tuple[bool, int, int]]:
        """(present, offset in block, length) runs of a PARTIALLY_PRESENT block."""
        bm = self._bitmap(block)
        lss = self.lss
        out: list[tuple[bool, int, int]] = []
        pos, end = within, within + n
        while pos < end:
            s = pos // lss
            present = bool(bm[s >> 3] >> (s & 7) & 1)
            stop = min((s + 1) * lss, end)
            if out and out[-1][0] == present:
                out[-1] = (present, out[-1][1], out[-1][2] + stop - pos)
            else:
                out.append((present, pos, stop - pos))
            pos = stop
        return out

    def _extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for blk, within, n in cluster_spans(offset, length, self.block_size):
            base = blk * self.block_size
            state, host = self._entry(blk)
            if state == FULLY_PRESENT:
                out.append(Extent(Kind.DATA, base + within, n, host + within))
            elif state == PARTIALLY_PRESENT:
                for present, o, k in self._runs(blk, within, n):
                    if present:
                        out.append(Extent(Kind.DATA, base + o, k, host + o))
                    else:
                        out.append(Extent(Kind.HOLE, base + o, k))
            elif state in (ZERO, UNMAPPED):
                out.append(Extent(Kind.ZERO, base + within, n))
            else:  # NOT_PRESENT, UNDEFINED: the parent's (zeros without one)
                out.append(Extent(Kind.HOLE, base + within, n))
        return out

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for e in self._extents(offset, length):
            if e.kind == Kind.DATA and e.host is not None:
                out += self.storage.pread_exact(e.host, e.length, "VHDX payload block")
            else:
                out += bytes(e.length)
        return bytes(out)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return merge_extents(self._extents(offset, length))

    # -- writing --------------------------------------------------------------------------------

    def _write_headers(self) -> None:
        """Write the header to both slots, the older first, each with a new sequence number,
        so that a torn write leaves the other one valid."""
        h = self.header
        for slot in (1 - self.header_slot, self.header_slot):
            h.seq += 1
            self.storage.pwrite(HEADER_OFFSETS[slot], h.pack())
            self.storage.sync()

    def _begin_write(self) -> None:
        """Before the first change of a session: new FileWriteGuid and DataWriteGuid, so that
        differencing disks made on the old content notice."""
        if self._session_started:
            return
        refuse_writes_if_corrupt(self, "VHDX")  # the log and headers count as metadata
        self.header.file_write_guid = uuid.uuid4().bytes_le
        self.header.data_write_guid = uuid.uuid4().bytes_le
        self._write_headers()
        self._session_started = True

    def _file_end(self) -> int:
        end = self.storage.size()
        return -(-end // MiB) * MiB

    def _new_space(self, length: int) -> int:
        """Extend the file by ``length`` zero bytes at a 1 MiB boundary; returns the offset."""
        host = self._file_end()
        self.storage.truncate(host + length)
        return host

    def _set_entry(self, index: int, state: int, host: int) -> None:
        self.bat.set(index, (host // MiB) << OFFSET_SHIFT | state)

    def _set_bits(self, block: int, within: int, n: int, *, synced: bool = False) -> None:
        """Mark the sectors of [within, within+n) of ``block`` as present in this file.

        The sectors' data must be durable before a bit says so (else a power loss could
        show stale bytes instead of the parent's): unless the caller just synced, a sync
        comes first whenever a bit changes."""
        bm = self._bitmap(block)
        first, last = within // self.lss, (within + n - 1) // self.lss
        if all(bm[s >> 3] >> (s & 7) & 1 for s in range(first, last + 1)):
            return
        if not synced:
            self.storage.sync()
        chunk, k = divmod(block, self.chunk_ratio)
        sbi = chunk * (self.chunk_ratio + 1) + self.chunk_ratio
        raw = self.bat.get(sbi)
        if raw & STATE_MASK != SB_PRESENT:
            host = self._new_space(SECTOR_BITMAP_BLOCK)
            self.storage.sync()
            self._set_entry(sbi, SB_PRESENT, host)
        else:
            host = (raw >> OFFSET_SHIFT) * MiB
        for s in range(first, last + 1):
            bm[s >> 3] |= 1 << (s & 7)
        nbytes = self.spb // 8
        lo, hi = first >> 3, (last >> 3) + 1
        self.storage.pwrite(host + k * nbytes + lo, bytes(bm[lo:hi]))

    def write(self, offset: int, data: bytes) -> None:
        self._begin_write()
        view = memoryview(data)
        pos = 0
        for blk, within, n in cluster_spans(offset, len(data), self.block_size):
            piece = view[pos : pos + n]
            pos += n
            state, host = self._entry(blk)
            if state == FULLY_PRESENT:
                self.storage.pwrite(host + within, piece)
            elif state == PARTIALLY_PRESENT:
                self.storage.pwrite(host + within, piece)
                self._set_bits(blk, within, n)
            else:
                self._allocate(blk, state, within, piece)

    def _allocate(self, blk: int, state: int, within: int, piece: memoryview) -> None:
        falls_through = self.has_parent and state in (NOT_PRESENT, UNDEFINED)
        if not falls_through and not any(piece):
            return  # zeros over a block that reads as zeros
        whole = within == 0 and len(piece) == self._used(blk)
        host = self._new_space(self.block_size)
        self.storage.pwrite(host + within, piece)
        self.storage.sync()  # the block and the file size are durable before the BAT says so
        if falls_through and not whole:
            self._set_bits(blk, within, len(piece), synced=True)
            new_state = PARTIALLY_PRESENT
        else:
            new_state = FULLY_PRESENT
        self._set_entry(self._bat_index(blk), new_state, host)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._begin_write()
        for blk, within, n in cluster_spans(offset, length, self.block_size):
            state, host = self._entry(blk)
            if state == FULLY_PRESENT:
                self.storage.punch_hole(host + within, n)
            elif state == PARTIALLY_PRESENT:
                self.storage.punch_hole(host + within, n)
                self._set_bits(blk, within, n)
            elif state in (NOT_PRESENT, UNDEFINED) and self.has_parent:
                if within == 0 and n == self._used(blk):
                    self._set_entry(self._bat_index(blk), ZERO, 0)
                else:
                    self._allocate(blk, state, within, memoryview(bytes(n)))

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def truncate(self, size: int) -> None:
        where = self.storage.path
        if size < self.size:
            raise UnsupportedFeature(f"{where}: shrinking VHDX images is not supported")
        if size % self.lss or size > MAX_DISK:
            raise UsageError(
                f"{where}: size {size} is not a multiple of {self.lss} up to {MAX_DISK}"
            )
        blocks = -(-size // self.block_size)
        nbat = self._bat_entries(blocks)
        if nbat * 8 > self.bat_length:
            raise UnsupportedFeature(
                f"{where}: growing to {size} bytes needs {nbat} BAT entries, the BAT region "
                f"holds {self.bat_length // 8}"
            )
        if self.flags & FLAG_LEAVE_ALLOCATED and blocks > self.blocks:
            raise UnsupportedFeature(f"{where}: growing fixed VHDX images is not supported")
        self._begin_write()
        old = self.bat.count
        if nbat > old:
            self.storage.pwrite(self.bat_offset + old * 8, bytes((nbat - old) * 8))
        # the old last block may be short: its tail beyond the old size must read as zeros
        tail = self.size % self.block_size
        if tail:
            last = self.blocks - 1
            state, host = self._entry(last)
            if state in (FULLY_PRESENT, PARTIALLY_PRESENT):
                end = min(size, self.blocks * self.block_size)
                self.write_zeroes(self.size, end - self.size)
                # qemu's fixed disks end where the last block's data ends: make room
                need = host + min(self.block_size, size - last * self.block_size)
                if self.storage.size() < need:
                    self.storage.truncate(need)
        self.storage.sync()
        item = self._meta_item_offset(DISK_SIZE_GUID)
        page = item - item % LOG_SECTOR
        buf = bytearray(self.storage.pread_exact(page, LOG_SECTOR, "VHDX metadata"))
        struct.pack_into("<Q", buf, item - page, size)
        self._logged_write([(page, bytes(buf))])
        self.size, self.blocks = size, blocks
        self.bat = PagedTable(self.storage, self.bat_offset, nbat, "<Q", what="BAT")

    def _meta_item_offset(self, guid: bytes) -> int:
        table = self.storage.pread_exact(self.meta_offset, META_TABLE_SIZE, "VHDX metadata table")
        count = META_HDR.unpack_from(table, 0)[2]
        for i in range(count):
            item, ioff, _l, _f = META_ENTRY.unpack_from(table, META_HDR.size + i * 32)
            if item == guid:
                return self.meta_offset + ioff
        raise CorruptImage(f"{self.storage.path}: VHDX metadata item {_guid_str(guid)} vanished")

    # -- chains, info, check ----------------------------------------------------------------------

    def verify_backing(self, backing: Driver) -> None:
        where = self.storage.path
        if not isinstance(backing, VhdxDriver):
            raise BackingMismatch(
                f"{where}: the parent of a differencing VHDX must be a VHDX, "
                f"{backing.storage.path} is {backing.name}"
            )
        want = {self.locator.get("parent_linkage", ""), self.locator.get("parent_linkage2", "")}
        want = {w.strip().upper() for w in want if w}
        if want == {NULL_LINKAGE}:
            return  # unpinned while a commit rewrites the parent (see set_backing)
        have = _guid_str(backing.header.data_write_guid)
        if have not in want:
            raise BackingMismatch(
                f"{where}: parent {backing.storage.path} has DataWriteGuid {have}, the parent "
                f"locator links to {', '.join(sorted(want)) or 'nothing'} (the parent changed "
                "since this disk was made)"
            )

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        """Rebase (``ref`` and its driver), unpin during a commit (``ref``, no driver: any
        parent at that path is accepted until pinned again) or flatten (no ``ref``).

        The metadata changes go through the log, as the spec wants: a crash leaves either
        the old or the new parent locator and flags."""
        where = self.storage.path
        if ref is None:
            if self.has_parent:
                self._drop_partial_blocks()
                self._update_metadata(self.flags & ~FLAG_HAS_PARENT, None)
            self.backing = None
            return
        if backing is not None and not isinstance(backing, VhdxDriver):
            raise UnsupportedFeature(
                f"{where}: the parent of a differencing VHDX must be a VHDX, not {backing.name}"
            )
        if self.flags & FLAG_LEAVE_ALLOCATED:
            raise UnsupportedFeature(f"{where}: a fixed VHDX cannot have a parent")
        if not self.has_parent:
            cr = self.chunk_ratio
            need = -(-self.blocks // cr) * (cr + 1)
            if need * 8 > self.bat_length:
                raise UnsupportedFeature(
                    f"{where}: the BAT region has no room for the sector bitmap entries of a "
                    "differencing disk"
                )
        linkage = NULL_LINKAGE if backing is None else _guid_str(backing.header.data_write_guid)
        pairs = {"parent_linkage": linkage, "relative_path": ref.path.replace("/", "\\")}
        absolute = self.storage.resolve(ref.path)
        if os.path.isabs(absolute):
            pairs["absolute_win32_path"] = absolute.replace("/", "\\")
        self._update_metadata(self.flags | FLAG_HAS_PARENT, build_locator(pairs))
        self.locator = pairs
        self.backing = BackingRef(ref.path, "vhdx")

    def _drop_partial_blocks(self) -> None:
        """Before the parent goes away: sectors not present in a PARTIALLY_PRESENT block read
        as zeros from now on (the caller copied what differed), the block becomes FULLY_PRESENT
        and the sector bitmaps are no longer referenced."""
        self._begin_write()
        for blk in range(self.blocks):
            state, host = self._entry(blk)
            if state != PARTIALLY_PRESENT:
                continue
            n = self._used(blk)
            for present, o, k in self._runs(blk, 0, n):
                if not present:
                    self.storage.punch_hole(host + o, k)
            self.storage.sync()
            self._set_entry(self._bat_index(blk), FULLY_PRESENT, host)
        cr = self.chunk_ratio
        for sbi in range(cr, self.bat.count, cr + 1):
            if self.bat.get(sbi):
                self.bat.set(sbi, 0)
        self.bitmaps.clear()
        self.storage.sync()

    def _update_metadata(self, flags: int, locator: bytes | None) -> None:
        """Write new file parameter flags and parent locator (None: remove it) via the log."""
        where = self.storage.path
        self._begin_write()
        st = self.storage
        table = bytearray(st.pread_exact(self.meta_offset, META_TABLE_SIZE, "VHDX metadata table"))
        count = META_HDR.unpack_from(table, 0)[2]
        entries = [META_ENTRY.unpack_from(table, META_HDR.size + i * 32) for i in range(count)]
        used = max([META_TABLE_SIZE] + [o + n for _g, o, n, _f in entries])
        changes: list[tuple[int, bytes]] = []
        out = []
        placed = locator is None
        for guid, ioff, ilen, fl in entries:
            if guid == FILE_PARAMS_GUID:
                changes.append(
                    (self.meta_offset + ioff, struct.pack("<II", self.block_size, flags))
                )
            if guid == PARENT_LOCATOR_GUID:
                if locator is None:
                    continue
                if len(locator) > ilen:
                    ioff = -(-used // 8) * 8
                ilen = len(locator)
                changes.append((self.meta_offset + ioff, locator))
                placed = True
            out.append((guid, ioff, ilen, fl))
        if not placed and locator is not None:
            ioff = -(-used // 8) * 8
            out.append((PARENT_LOCATOR_GUID, ioff, len(locator), META_REQUIRED))
            changes.append((self.meta_offset + ioff, locator))
        for _g, ioff, ilen, _fl in out:
            if ioff + ilen > self.meta_length or ilen > MAX_META_ITEM:
                raise UnsupportedFeature(f"{where}: the metadata region has no room for the change")
        table[META_HDR.size :] = bytes(len(table) - META_HDR.size)
        META_HDR.pack_into(table, 0, META_SIG, 0, len(out), bytes(20))
        for i, e in enumerate(out):
            META_ENTRY.pack_into(table, META_HDR.size + i * 32, *e)
        pages: dict[int, bytearray] = {}

        def patch(off: int, data: bytes) -> None:
            pos = 0
            while pos < len(data):
                page = (off + pos) - (off + pos) % LOG_SECTOR
                if page not in pages:
                    pages[page] = bytearray(st.pread_exact(page, LOG_SECTOR, "VHDX metadata"))
                k = min(len(data) - pos, page + LOG_SECTOR - (off + pos))
                at = off + pos - page
                pages[page][at : at + k] = data[pos : pos + k]
                pos += k

        for off, data in changes:
            patch(off, data)
        patch(self.meta_offset, bytes(table))
        self._logged_write(sorted((p, bytes(b)) for p, b in pages.items()))
        self.flags = flags
        self.has_parent = bool(flags & FLAG_HAS_PARENT)
        self.bat = PagedTable(st, self.bat_offset, self._bat_entries(self.blocks), "<Q", what="BAT")
        self.cluster_size = min(self.block_size, DIFF_CLUSTER if self.has_parent else MiB)
        if locator is None:
            self.locator = {}

    def _logged_write(self, pages: list[tuple[int, bytes]]) -> None:
        """Write 4 KiB pages through the log: entry, LogGuid in the header, the pages in
        place, LogGuid cleared. A crash anywhere leaves all or none of them after replay."""
        h = self.header
        guid = uuid.uuid4().bytes_le
        fsize = self.storage.size()
        entry = build_log_entry(1, guid, [(off, data) for off, data in pages], fsize, fsize)
        if len(entry) > h.log_length:
            raise UnsupportedFeature(
                f"{self.storage.path}: a log entry of {len(entry)} bytes does not fit the log "
                f"({h.log_length})"
            )
        self.storage.pwrite(h.log_offset, entry)
        self.storage.sync()
        h.log_guid = guid
        self._write_headers()
        for off, data in pages:
            self.storage.pwrite(off, data)
        self.storage.sync()
        h.log_guid = bytes(16)
        self._write_headers()

    def info(self) -> dict[str, Any]:
        fixed = bool(self.flags & FLAG_LEAVE_ALLOCATED)
        out: dict[str, Any] = {
            "subformat": "differencing" if self.has_parent else "fixed" if fixed else "dynamic",
            "block-size": self.block_size,
            "logical-sector-size": self.lss,
            "physical-sector-size": self.pss,
            "data-write-guid": _guid_str(self.header.data_write_guid),
            "log-replayed": self.replayed,
            "log-applied-in-memory": isinstance(self.storage, _LogOverlay),
        }
        if self.locator:
            out["parent-locator"] = dict(self.locator)
        return out

    def stats(self) -> dict[str, Any]:
        return {"bat": self.bat.stats(), "sector-bitmaps": self.bitmaps.stats()}

    def check(self, *, repair: bool = False) -> CheckReport:
        """Every BAT entry has a known state and points inside the file, at a block of its
        own (one bit per MiB of the file marks what is taken)."""
        rep = CheckReport()
        fsize = self.storage.size()
        mib = -(-fsize // MiB)
        taken = Bitset(mib)
        for a, b in (
            (0, MiB),
            (self.bat_offset, self.bat_offset + self.bat_length),
            (self.meta_offset, self.meta_offset + self.meta_length),
            (self.header.log_offset, self.header.log_offset + self.header.log_length),
        ):
            for m in range(a // MiB, min(mib, -(-b // MiB))):
                taken.add(m)

        def claim(what: str, host: int, length: int) -> None:
            if host < MiB or host + length > fsize:
                rep.corruptions.append(f"{what} at {host} is outside the file ({fsize})")
                return
            for m in range(host // MiB, -(-(host + length) // MiB)):
                if m in taken:
                    rep.corruptions.append(f"{what} at {host} overlaps other data")
                    return
                taken.add(m)

        for i in range(self.bat.count):
            raw = self.bat.get(i)
            state, host = raw & STATE_MASK, (raw >> OFFSET_SHIFT) * MiB
            if (i + 1) % (self.chunk_ratio + 1) == 0:
                if state == SB_PRESENT:
                    claim(f"sector bitmap entry {i}", host, SECTOR_BITMAP_BLOCK)
                elif state != NOT_PRESENT:
                    rep.corruptions.append(f"sector bitmap entry {i} has state {state}")
                continue
            if state in (FULLY_PRESENT, PARTIALLY_PRESENT):
                blk = i - i // (self.chunk_ratio + 1)
                claim(f"BAT entry {i}", host, self._used(blk) if blk < self.blocks else 0)
            elif state not in STATE_NAMES:
                rep.corruptions.append(f"BAT entry {i} has state {state}")
        rep.info = {"bat-entries": self.bat.count, "log-replayed": self.replayed}
        return rep

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        reject_unknown_options(
            cls.name,
            options,
            (
                "cluster_size",
                "block_size",
                "backing",
                "backing_driver",
                "subformat",
                "logical_sector_size",
                "physical_sector_size",
            ),
        )
        bs = options.get("block_size") or options.get("cluster_size") or DEFAULT_BLOCK
        if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
            raise UsageError(f"vhdx: block size {bs} must be a power of two in [1 MiB, 256 MiB]")
        lss = int(options.get("logical_sector_size") or 512)
        pss = int(options.get("physical_sector_size") or 4096)
        if lss not in (512, 4096) or pss not in (512, 4096):
            raise UsageError("vhdx: sector sizes must be 512 or 4096")
        if size <= 0 or size > MAX_DISK:
            raise UsageError(f"vhdx: size {size} must be in (0, {MAX_DISK}]")
        size = -(-size // lss) * lss
        subformat = options.get("subformat") or "dynamic"
        if subformat not in ("dynamic", "fixed"):
            raise UsageError(f"vhdx: subformat {subformat!r} (dynamic or fixed)")
        ref: BackingRef | None = options.get("backing")
        base = options.get("backing_driver")
        flags = FLAG_LEAVE_ALLOCATED if subformat == "fixed" else 0
        locator = b""
        if ref is not None:
            if subformat == "fixed":
                raise UsageError("vhdx: a differencing disk cannot be fixed")
            if not isinstance(base, VhdxDriver):
                raise UnsupportedFeature(
                    "vhdx: a differencing VHDX can only have a VHDX parent "
                    f"(got {getattr(base, 'name', None)!r})"
                )
            if size != base.size:
                raise UsageError(f"vhdx: size {size} differs from the parent's {base.size}")
            flags |= FLAG_HAS_PARENT
            pairs = {
                "parent_linkage": _guid_str(base.header.data_write_guid),
                "relative_path": ref.path.replace("/", "\\"),
            }
            absolute = storage.resolve(ref.path)
            if os.path.isabs(absolute):
                pairs["absolute_win32_path"] = absolute.replace("/", "\\")
            locator = build_locator(pairs)
            if len(locator) > MAX_META_ITEM - META_TABLE_SIZE:
                raise UsageError("vhdx: parent path is too long for the parent locator")

        blocks = -(-size // bs)
        cr = (1 << 23) * lss // bs
        nbat = -(-blocks // cr) * (cr + 1) if ref is not None else blocks + (blocks - 1) // cr
        log_off, log_len = 1 * MiB, 1 * MiB
        meta_off, meta_len = 2 * MiB, 1 * MiB
        bat_off = 3 * MiB
        bat_len = -(-(nbat * 8) // MiB) * MiB
        data_off = bat_off + bat_len

        st = storage
        ident = bytearray(64 * KiB)
        ident[:8] = FILE_ID_SIG
        creator = "vdisk".encode("utf-16-le")
        ident[8 : 8 + len(creator)] = creator
        st.pwrite(0, bytes(ident))

        regions = bytearray(REGION_SIZE)
        REGION_HDR.pack_into(regions, 0, REGION_SIG, 0, 2, 0)
        REGION_ENTRY.pack_into(regions, 16, BAT_GUID, bat_off, bat_len, 1)
        REGION_ENTRY.pack_into(regions, 48, METADATA_GUID, meta_off, meta_len, 1)
        _with_checksum(regions)
        for off in REGION_OFFSETS:
            st.pwrite(off, bytes(regions))

        table = bytearray(META_TABLE_SIZE)
        vd, req = META_VIRTUAL_DISK, META_REQUIRED
        items = [
            (FILE_PARAMS_GUID, struct.pack("<II", bs, flags), req),
            (DISK_SIZE_GUID, struct.pack("<Q", size), vd | req),
            (PAGE83_GUID, uuid.uuid4().bytes_le, vd | req),
            (LOGICAL_SECTOR_GUID, struct.pack("<I", lss), vd | req),
            (PHYSICAL_SECTOR_GUID, struct.pack("<I", pss), vd | req),
        ]
        if locator:
            items.append((PARENT_LOCATOR_GUID, locator, req))
        META_HDR.pack_into(table, 0, META_SIG, 0, len(items), bytes(20))
        at = META_TABLE_SIZE
        blob = bytearray()
        for i, (guid, value, fl) in enumerate(items):
            META_ENTRY.pack_into(
                table, META_HDR.size + i * 32, guid, at + len(blob), len(value), fl
            )
            blob += value
            blob += bytes(-len(blob) % 8)
        st.pwrite(meta_off, bytes(table) + bytes(blob))

        end = data_off
        if subformat == "fixed":
            chunk_entries = []
            for blk in range(blocks):
                chunk_entries.append(
                    (
                        blk + blk // cr,
                        ((data_off + blk * bs) // MiB) << OFFSET_SHIFT | FULLY_PRESENT,
                    )
                )
                if len(chunk_entries) >= 65536 or blk == blocks - 1:
                    buf = bytearray()
                    first = chunk_entries[0][0]
                    for idx, val in chunk_entries:
                        buf += bytes((idx - first) * 8 - (len(buf)))
                        buf += struct.pack("<Q", val)
                    st.pwrite(bat_off + first * 8, bytes(buf))
                    chunk_entries = []
            end = data_off + blocks * bs

        h = Header.unpack(bytes(HEADER.size))
        h.file_write_guid = uuid.uuid4().bytes_le
        h.data_write_guid = uuid.uuid4().bytes_le
        h.log_guid = bytes(16)
        h.log_version, h.version = 0, 1
        h.log_length, h.log_offset = log_len, log_off
        for seq, off in enumerate(HEADER_OFFSETS):
            h.seq = seq + 1
            st.pwrite(off, h.pack())
        st.truncate(max(end, st.size()))


DRIVER = VhdxDriver
