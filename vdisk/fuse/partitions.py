"""MBR and GPT partition tables, parsed from guest bytes and validated before use.

The FUSE mount shows one file per partition, so it needs the table without the host
kernel (which may not parse partitions of loop devices at all, see TESTBED.md). Numbering
follows Linux: MBR primaries are p1..p4 by slot, logical partitions of an extended one are
p5, p6, ... in chain order; GPT entries are numbered by their index in the entry array.

Specs: UEFI 2.10 section 5.2 (legacy MBR, protective MBR) and 5.3 (GPT header and entry
array); the EBR chain as the Linux kernel and util-linux understand it.

Every offset, count and length is checked against the disk size before it is used, the
EBR chain is bounded and loop-checked, and the GPT entry array is bounded in size, so a
hostile table costs at most a few reads and a clear error.
"""

from __future__ import annotations

import logging
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from vdisk.errors import CorruptImage

# -- structs -------------------------------------------------------------------------

#: MBR partition entry (UEFI table 5-2): status, CHS first, type, CHS last, LBA, sectors.
MBR_ENTRY = struct.Struct("<B3sB3sII")
assert MBR_ENTRY.size == 16
MBR_TABLE_OFFSET = 446
MBR_SIGNATURE_OFFSET = 510
MBR_SIGNATURE = b"\x55\xaa"

#: GPT header (UEFI table 5-5): signature, revision, header size, header CRC32, reserved,
#: my LBA, alternate LBA, first usable, last usable, disk GUID, entry array LBA,
#: number of entries, entry size, entry array CRC32.
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
assert GPT_HEADER.size == 92
GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000

#: GPT partition entry (UEFI table 5-6): type GUID, unique GUID, first LBA, last LBA
#: (inclusive), attributes, name (UTF-16LE).
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
assert GPT_ENTRY.size == 128

TYPE_EMPTY = 0x00
TYPE_PROTECTIVE = 0xEE
TYPES_EXTENDED = frozenset({0x05, 0x0F, 0x85})

#: Bounds that keep a hostile table cheap.
MAX_LOGICAL = 256  # logical partitions followed in one EBR chain
MAX_GPT_ARRAY = 1 << 20  # bytes of GPT entry array (the usual is 16 KiB)
MAX_GPT_ENTRY = 4096  # bytes per GPT entry
SECTOR_SIZES = (512, 4096)

Reader = Callable[[int, int], bytes]

log = logging.getLogger("vdisk.fuse")


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition: ``number`` as the table numbers it; offset and length in bytes."""

    number: int
    offset: int
    length: int
    type: str  # "0x83" for MBR, the type GUID for GPT
    name: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class Table:
    """What was found: ``kind`` is "mbr", "gpt" or None (no table)."""

    kind: str | None
    partitions: list[Partition] = field(default_factory=list)
    sector_size: int = 512
    warnings: list[str] = field(default_factory=list)


def read_table(read: Reader, size: int, name: str) -> Table:
    """Find and parse the partition table of a disk of ``size`` bytes.

    ``read(offset, length)`` returns guest bytes; ``name`` is used in messages. A disk
    without a table (for instance a file system on the whole disk) gives ``Table(None)``;
    a table that claims to be one but is inconsistent raises CorruptImage."""
    if size < 1024:
        return Table(None)
    mbr = read(0, 512)
    for ss in SECTOR_SIZES:
        if size >= 3 * ss:
            head = read(ss, min(ss, 512))
            if head[:8] == GPT_SIGNATURE:
                return _read_gpt(read, size, name, ss)
    if mbr[MBR_SIGNATURE_OFFSET:512] != MBR_SIGNATURE:
        return Table(None)
    entries = [MBR_ENTRY.unpack_from(mbr, MBR_TABLE_OFFSET + i * MBR_ENTRY.size) for i in range(4)]
    if any(e[2] == TYPE_PROTECTIVE for e in entries):
        # a protective MBR whose GPT header at LBA 1 is gone: try the backup header
        for ss in SECTOR_SIZES:
            if size >= 3 * ss and read(size - ss, 8) == GPT_SIGNATURE:
                return _read_gpt(read, size, name, ss)
        raise CorruptImage(
            f"{name}: protective MBR (type 0xEE) but no GPT header at LBA 1 or at the last LBA"
        )
    # A volume boot record (FAT, NTFS) also ends in 55 AA; its "entries" are code and
    # fail these checks, so such a disk is taken as having no table, as Linux does.
    if any(e[0] not in (0x00, 0x80) for e in entries):
        return Table(None)
    return _read_mbr(read, size, name, entries)


def scan(read: Reader, size: int, name: str) -> list[Partition]:
    """The partitions to show: a damaged table is logged and gives none (the whole disk
    stays usable, so the table can be repaired through it)."""
    try:
        table = read_table(read, size, name)
    except CorruptImage as e:
        log.warning("partition table ignored: %s", e)
        return []
    for w in table.warnings:
        log.warning("%s", w)
    return table.partitions


# -- MBR -------------------------------------------------------------------------------


def _read_mbr(
    read: Reader, size: int, name: str, entries: list[tuple[int, bytes, int, bytes, int, int]]
) -> Table:
    ss = 512
    table = Table("mbr", sector_size=ss)
    extended: tuple[int, int] | None = None
    for slot, (_status, _c1, ptype, _c2, lba, count) in enumerate(entries, start=1):
        if ptype == TYPE_EMPTY or count == 0:
            continue
        part = _bounded(table, name, f"MBR entry {slot}", slot, lba * ss, count * ss, size)
        if part is None:
            continue
        if ptype in TYPES_EXTENDED:
            if extended is not None:
                table.warnings.append(
                    f"{name}: MBR entry {slot}: second extended partition ignored"
                )
                continue
            extended = (part.offset, part.length)
            # Linux shows the extended partition itself as a 1 KiB stub; vdisk shows
            # only partitions that can hold data.
            continue
        table.partitions.append(Partition(slot, part.offset, part.length, f"0x{ptype:02x}"))
    if extended is not None:
        table.partitions.extend(_read_logical(read, size, name, extended, table))
    return table


def _read_logical(
    read: Reader, size: int, name: str, extended: tuple[int, int], table: Table
) -> list[Partition]:
    """Follow the EBR chain: entry 1 of each EBR is a logical partition relative to that
    EBR, entry 2 points at the next EBR relative to the start of the extended partition."""
    ss = 512
    ext_start, ext_len = extended
    ext_end = ext_start + ext_len
    out: list[Partition] = []
    seen: set[int] = set()
    ebr = ext_start
    number = 5
    while True:
        if ebr in seen:
            raise CorruptImage(f"{name}: EBR chain loops back to offset {ebr}")
        if len(seen) >= MAX_LOGICAL:
            raise CorruptImage(
                f"{name}: EBR chain longer than {MAX_LOGICAL} logical partitions (at offset {ebr})"
            )
        seen.add(ebr)
        if not ext_start <= ebr <= ext_end - ss:
            raise CorruptImage(
                f"{name}: EBR at offset {ebr} lies outside the extended partition "
                f"[{ext_start}, {ext_end})"
            )
        sector = read(ebr, ss)
        if sector[MBR_SIGNATURE_OFFSET:512] != MBR_SIGNATURE:
            if ebr == ext_start:  # an empty extended partition
                return out
            raise CorruptImage(f"{name}: EBR at offset {ebr} has no 55 AA signature")
        first = MBR_ENTRY.unpack_from(sector, MBR_TABLE_OFFSET)
        link = MBR_ENTRY.unpack_from(sector, MBR_TABLE_OFFSET + MBR_ENTRY.size)
        if first[2] != TYPE_EMPTY and first[5] != 0:
            off, length = ebr + first[4] * ss, first[5] * ss
            if off < ebr or off + length > ext_end:
                table.warnings.append(
                    f"{name}: logical partition {number} [{off}, {off + length}) is outside "
                    f"the extended partition [{ext_start}, {ext_end}); ignored"
                )
            else:
                part = _bounded(table, name, f"EBR at {ebr}", number, off, length, size)
                if part is not None:
                    out.append(Partition(number, off, part.length, f"0x{first[2]:02x}"))
            number += 1
        if link[2] not in TYPES_EXTENDED or link[4] == 0:
            return out
        ebr = ext_start + link[4] * ss


def _bounded(
    table: Table, name: str, what: str, number: int, offset: int, length: int, size: int
) -> Partition | None:
    """A partition clamped to the disk (as Linux does), or None with a warning when it
    starts past the end."""
    if offset >= size:
        table.warnings.append(
            f"{name}: {what}: partition starts at {offset}, past the end of the disk ({size}); ignored"
        )
        return None
    if offset + length > size:
        table.warnings.append(
            f"{name}: {what}: partition [{offset}, {offset + length}) ends past the end of "
            f"the disk ({size}); cut to the disk"
        )
        length = size - offset
    return Partition(number, offset, length, "")


# -- GPT -------------------------------------------------------------------------------


def _read_gpt(read: Reader, size: int, name: str, ss: int) -> Table:
    """The primary header at LBA 1, or the backup at the last LBA if the primary is bad."""
    errors: list[str] = []
    for lba in (1, size // ss - 1):
        try:
            return _parse_gpt(read, size, name, ss, lba)
        except CorruptImage as e:
            errors.append(str(e))
    raise CorruptImage("; ".join(errors))


def _parse_gpt(read: Reader, size: int, name: str, ss: int, lba: int) -> Table:
    where = f"{name}: GPT header at LBA {lba} (sector size {ss})"
    raw = read(lba * ss, ss)
    (
        sig,
        revision,
        hsize,
        hcrc,
        _reserved,
        my_lba,
        _alt_lba,
        first_usable,
        last_usable,
        _guid,
        array_lba,
        count,
        esize,
        acrc,
    ) = GPT_HEADER.unpack_from(raw)
    if sig != GPT_SIGNATURE:
        raise CorruptImage(f"{where}: no 'EFI PART' signature")
    if revision >> 16 != 1:
        raise CorruptImage(f"{where}: revision 0x{revision:08x}, expected 1.x")
    if not GPT_HEADER.size <= hsize <= ss:
        raise CorruptImage(f"{where}: header size {hsize} outside [{GPT_HEADER.size}, {ss}]")
    check = bytearray(raw[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        raise CorruptImage(f"{where}: header CRC32 mismatch (stored 0x{hcrc:08x})")
    if my_lba != lba:
        raise CorruptImage(f"{where}: MyLBA is {my_lba}, expected {lba}")
    last_lba = size // ss - 1
    if not first_usable <= last_usable <= last_lba:
        raise CorruptImage(
            f"{where}: usable LBAs [{first_usable}, {last_usable}] not inside the disk "
            f"(last LBA {last_lba})"
        )
    if esize < GPT_ENTRY.size or esize > MAX_GPT_ENTRY or esize % GPT_ENTRY.size:
        raise CorruptImage(
            f"{where}: entry size {esize} is not a multiple of 128 in [128, {MAX_GPT_ENTRY}]"
        )
    array_len = count * esize
    if array_len > MAX_GPT_ARRAY:
        raise CorruptImage(
            f"{where}: {count} entries of {esize} bytes ({array_len} bytes) exceed the "
            f"limit of {MAX_GPT_ARRAY} bytes"
        )
    if array_lba < 1 or array_lba * ss + array_len > size:
        raise CorruptImage(
            f"{where}: entry array at LBA {array_lba} ({array_len} bytes) is outside the "
            f"disk ({size} bytes)"
        )
    array = read(array_lba * ss, array_len)
    if zlib.crc32(array) != acrc:
        raise CorruptImage(f"{where}: entry array CRC32 mismatch (stored 0x{acrc:08x})")
    table = Table("gpt", sector_size=ss)
    for i in range(count):
        tguid, _uguid, first, last, _attrs, pname = GPT_ENTRY.unpack_from(array, i * esize)
        if tguid == bytes(16):
            continue
        number = i + 1
        if not first_usable <= first <= last <= last_usable:
            table.warnings.append(
                f"{name}: GPT entry {number}: LBAs [{first}, {last}] not inside the usable "
                f"range [{first_usable}, {last_usable}]; ignored"
            )
            continue
        label = pname.decode("utf-16-le", "replace").split("\0", 1)[0]
        table.partitions.append(
            Partition(
                number,
                first * ss,
                (last - first + 1) * ss,
                str(uuid.UUID(bytes_le=tguid)),
                label,
            )
        )
    return table
