"""VirtualBox VDI images: static, dynamic and differencing.

Layout (VirtualBox's VDI 1.1 header, as QEMU's ``block/vdi.c`` documents it): a 64-byte
text line, the signature 0xBEDA107F and version 1.1, then the header proper (image type,
offsets of the block map and of the data area, disk size, block size, block counts and
four UUIDs). The block map holds one uint32 per guest block: the index of its data block
in the data area, 0xFFFFFFFF for "not allocated" (falls through to the parent of a
differencing image) or 0xFFFFFFFE for "discarded" (reads as zeros).

A differencing image records only UUIDs: ``uuid_link`` is the parent's creation UUID and
``uuid_parent`` its modification UUID. The parent's path is not stored, so it comes from
``options["backing"]`` or from a search of the image's directory for a ``.vdi`` whose
creation UUID matches (bounded: at most ``MAX_SCAN`` files are looked at). The first write
of a session gives the image a new modification UUID (as VirtualBox does), so a
differencing image made on the old content refuses the changed parent.

Crash order of a block allocation: the data block is written past the end of the file,
and synced, then its block map entry, then the header's allocated-block count. A crash
before the map entry leaves an unreferenced block at the end of the file (a leak); the
next allocation takes its index from the file size, so it never lands on a referenced
block. A count that disagrees with the map after a crash is a leak that check repairs. Discarding
an allocated block punches a hole in it and keeps it allocated (so ``blocks_allocated``
stays equal to the number of referenced blocks, which ``qemu-img check`` verifies).
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import astuple, dataclass, replace
from typing import Any

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
from vdisk.formats.common import Bitset, PagedTable, bool_option, refuse_writes_if_corrupt
from vdisk.storage import FileStorage, Storage

# Pre-header: text line, signature, version (VDI 1.1).
PREHEADER = struct.Struct("<64sII")
assert PREHEADER.size == 72
# Header v1.1 up to the UUIDs; the 56 bytes after them are unused.
HEADER = struct.Struct("<III256sIIIIIIIQIIII16s16s16s16s")
assert HEADER.size == 384
HEADER_AREA = 512  # pre-header + header + unused padding
SIGNATURE = 0xBEDA107F
VERSION = 0x00010001
TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"

TYPE_DYNAMIC, TYPE_STATIC, TYPE_UNDO, TYPE_DIFF = 1, 2, 3, 4
TYPE_NAMES = {TYPE_DYNAMIC: "dynamic", TYPE_STATIC: "static", TYPE_DIFF: "differencing"}
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
SECTOR = 512
DEFAULT_BLOCK = 1 << 20
MAX_BLOCK = 256 << 20
MAX_DISK = 1 << 56  # 64 PiB: anything larger is a hostile header
MAX_SCAN = 256  # files looked at when searching a directory for a parent by UUID

# Offsets of header fields in the file (for single-field updates).
OFF_TYPE = 72 + 4
OFF_BLOCKS_ALLOCATED = 72 + 4 + 4 + 4 + 256 + 4 * 7 + 8 + 12
OFF_UUIDS = OFF_BLOCKS_ALLOCATED + 4
assert OFF_BLOCKS_ALLOCATED == 0x184 and OFF_UUIDS == 0x188


def _uuid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes=raw))


@dataclass
class VdiHeader:
    """The decoded VDI 1.1 header: PREHEADER's fields, then HEADER's, in their order."""

    text: bytes
    signature: int
    version: int
    header_size: int
    image_type: int
    image_flags: int
    description: bytes
    offset_bmap: int
    offset_data: int
    cylinders: int
    heads: int
    sectors: int
    sector_size: int
    unused: int  # written back as 0
    disk_size: int
    block_size: int
    block_extra: int
    blocks_in_image: int
    blocks_allocated: int
    uuid_image: bytes
    uuid_last_snap: bytes
    uuid_link: bytes
    uuid_parent: bytes

    @classmethod
    def unpack(cls, raw: bytes) -> VdiHeader:
        text, signature, version = PREHEADER.unpack_from(raw, 0)
        body = HEADER.unpack_from(raw, PREHEADER.size)
        return cls(text.split(b"\0", 1)[0], signature, version, *body)

    def pack(self) -> bytes:
        fields = astuple(replace(self, unused=0))
        out = PREHEADER.pack(*fields[:3]) + HEADER.pack(*fields[3:])
        return out + bytes(HEADER_AREA - len(out))


def _peek_header(path: str) -> VdiHeader | None:
    """The header of another file that may be a VDI (a parent candidate), None if it is
    not one. Only its UUIDs are used, so nothing else is validated; OSError passes."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_AREA)
    if len(raw) < HEADER_AREA:
        return None
    h = VdiHeader.unpack(raw)
    return h if h.signature == SIGNATURE else None


def read_header(storage: Storage) -> VdiHeader:
    """Read and validate the header against the file size (nothing is trusted before)."""
    where = storage.path
    fsize = storage.size()
    if fsize < HEADER_AREA:
        raise CorruptImage(f"{where}: file of {fsize} bytes is too short for a VDI header (512)")
    h = VdiHeader.unpack(storage.pread_exact(0, HEADER_AREA, "VDI header"))
    if h.signature != SIGNATURE:
        raise CorruptImage(f"{where}: bad VDI signature 0x{h.signature:08x} (expected 0xbeda107f)")
    if h.version != VERSION:
        raise UnsupportedFeature(f"{where}: VDI version 0x{h.version:08x} (only 1.1 is supported)")
    if h.header_size < HEADER.size:
        raise CorruptImage(f"{where}: VDI header_size {h.header_size} is below {HEADER.size}")
    if h.image_type not in TYPE_NAMES:
        raise UnsupportedFeature(
            f"{where}: VDI image type {h.image_type} is not supported "
            "(1 dynamic, 2 static, 4 differencing)"
        )
    if h.sector_size != SECTOR:
        raise UnsupportedFeature(f"{where}: VDI sector_size {h.sector_size} (only 512)")
    if h.block_extra != 0:
        raise UnsupportedFeature(f"{where}: VDI block_extra {h.block_extra} (only 0)")
    bs = h.block_size
    if bs < SECTOR or bs > MAX_BLOCK or bs & (bs - 1):
        raise CorruptImage(
            f"{where}: VDI block_size {bs} is not a power of two in [{SECTOR}, {MAX_BLOCK}]"
        )
    if h.disk_size > MAX_DISK:
        raise CorruptImage(f"{where}: VDI disk_size {h.disk_size} exceeds the limit {MAX_DISK}")
    if h.blocks_in_image * bs < h.disk_size:
        raise CorruptImage(
            f"{where}: VDI blocks_in_image {h.blocks_in_image} x block_size {bs} "
            f"does not cover disk_size {h.disk_size}"
        )
    if h.blocks_allocated > h.blocks_in_image:
        raise CorruptImage(
            f"{where}: VDI blocks_allocated {h.blocks_allocated} exceeds "
            f"blocks_in_image {h.blocks_in_image}"
        )
    bmap_end = h.offset_bmap + 4 * h.blocks_in_image
    if h.offset_bmap < HEADER_AREA or h.offset_bmap % SECTOR:
        raise CorruptImage(
            f"{where}: VDI offset_bmap {h.offset_bmap} is not a sector-aligned offset >= 512"
        )
    if bmap_end > fsize:
        raise CorruptImage(
            f"{where}: VDI block map at {h.offset_bmap} of {h.blocks_in_image} entries ends at "
            f"{bmap_end}, past the end of the file ({fsize})"
        )
    if h.offset_data < bmap_end or h.offset_data % SECTOR or h.offset_data > fsize:
        raise CorruptImage(
            f"{where}: VDI offset_data {h.offset_data} overlaps the block map "
            f"(ends at {bmap_end}), is not sector-aligned or lies past the end of the file "
            f"({fsize})"
        )
    return h


class VdiDriver(Driver):
    name = "vdi"
    aliases = ()
    extensions = (".vdi",)
    can_create = True

    def __init__(self, storage: Storage, h: VdiHeader, readonly: bool) -> None:
        self.storage = storage
        self.readonly = readonly
        self.h = h
        self.size = h.disk_size
        self.block_size = h.block_size
        self.cluster_size = h.block_size
        self.bmap = PagedTable(storage, h.offset_bmap, h.blocks_in_image, what="block map")
        fsize = storage.size()
        used = max(0, fsize - h.offset_data)
        self.next_index = max(h.blocks_allocated, -(-used // h.block_size))
        self._modified = False

    # -- discovery, open, create ------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        if len(head) >= PREHEADER.size:
            _text, sig, _ver = PREHEADER.unpack_from(head, 0)
            if sig == SIGNATURE:
                return 100
        return 0

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> VdiDriver:
        reject_unknown_options(cls.name, options, ("backing",))
        h = read_header(storage)
        d = cls(storage, h, readonly)
        if h.image_type == TYPE_DIFF:
            d.backing = d._find_parent(options.get("backing"))
        return d

    def _find_parent(self, hint: Any) -> BackingRef:
        """The parent of a differencing image: the caller's hint, else the first ``.vdi``
        beside the image whose creation UUID is our ``uuid_link``."""
        if isinstance(hint, BackingRef):
            hint = hint.path
        if isinstance(hint, str) and hint:
            if "\0" in hint:
                raise UsageError(f"{self.storage.path}: option backing is not a usable path")
            return BackingRef(hint, "vdi")
        if hint is not None:
            raise UsageError(f"{self.storage.path}: option backing must be a path")
        want = self.h.uuid_link
        where = self.storage.path
        if not isinstance(self.storage, FileStorage):
            raise BackingMismatch(f"{where}: differencing VDI needs its parent named (backing=)")
        here = os.path.dirname(os.path.abspath(where))
        me = os.path.realpath(where)
        try:
            names = sorted(n for n in os.listdir(here) if n.lower().endswith(".vdi"))
        except OSError as e:
            raise BackingMismatch(f"{where}: cannot list {here} for the parent: {e}") from None
        for name in names[:MAX_SCAN]:
            path = os.path.join(here, name)
            if os.path.realpath(path) == me:
                continue
            try:
                cand = _peek_header(path)
            except OSError:
                continue
            if cand is not None and cand.uuid_image == want:
                return BackingRef(name, "vdi")
        raise BackingMismatch(
            f"{where}: parent VDI with UUID {_uuid_text(want)} does not exist in {here} "
            "(no .vdi there has that UUID; name the parent with the backing option)"
        )

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        reject_unknown_options(
            cls.name, options, ("cluster_size", "backing", "backing_driver", "static")
        )
        bs = options.get("cluster_size") or DEFAULT_BLOCK
        if bs < 4096 or bs > MAX_BLOCK or bs & (bs - 1):
            raise UsageError(f"vdi: block size {bs} must be a power of two in [4096, {MAX_BLOCK}]")
        if size <= 0 or size % SECTOR or size > MAX_DISK:
            raise UsageError(
                f"vdi: size {size} must be a positive multiple of 512 up to {MAX_DISK}"
            )
        static = bool_option("vdi", "static", options.get("static"))
        base = options.get("backing_driver")
        if options.get("backing") is not None:
            if static:
                raise UsageError("vdi: a differencing image cannot be static")
            if not isinstance(base, VdiDriver):
                raise UnsupportedFeature(
                    "vdi: a differencing VDI can only have a VDI parent "
                    f"(got {getattr(base, 'name', None)!r})"
                )
        blocks = -(-size // bs)
        if blocks >= DISCARDED:
            raise UsageError(f"vdi: {blocks} blocks exceed the VDI limit")
        h = VdiHeader.unpack(bytes(HEADER_AREA))
        h.text, h.signature, h.version = TEXT, SIGNATURE, VERSION
        h.header_size = HEADER.size
        h.image_type = TYPE_STATIC if static else TYPE_DYNAMIC
        h.offset_bmap = HEADER_AREA
        h.offset_data = HEADER_AREA + -(-(4 * blocks) // SECTOR) * SECTOR
        if static:  # keep data blocks aligned to their size on the host, as VirtualBox does
            h.offset_data = -(-h.offset_data // min(bs, 1 << 20)) * min(bs, 1 << 20)
        h.sector_size = SECTOR
        h.disk_size = size
        h.block_size = bs
        h.blocks_in_image = blocks
        h.blocks_allocated = blocks if static else 0
        h.uuid_image = uuid.uuid4().bytes
        h.uuid_last_snap = uuid.uuid4().bytes
        if isinstance(base, VdiDriver):
            if base.block_size != bs:
                raise UsageError(
                    f"vdi: block size {bs} differs from the parent's {base.block_size}"
                )
            h.image_type = TYPE_DIFF
            h.uuid_link = base.h.uuid_image
            h.uuid_parent = base.h.uuid_last_snap
        storage.pwrite(0, h.pack())
        chunk = 1 << 16
        for first in range(0, blocks, chunk):
            n = min(chunk, blocks - first)
            ident = struct.pack(f"<{n}I", *range(first, first + n))
            raw = ident if static else b"\xff" * (4 * n)
            storage.pwrite(HEADER_AREA + 4 * first, raw)
        end = h.offset_data + (blocks * bs if static else 0)
        storage.truncate(max(end, h.offset_data))

    # -- mapping ------------------------------------------------------------------------

    def _host(self, idx: int, entry: int) -> int:
        if entry >= self.h.blocks_in_image:
            raise CorruptImage(
                f"{self.storage.path}: block map entry {idx} is {entry}, "
                f"not below blocks_in_image {self.h.blocks_in_image}"
            )
        return self.h.offset_data + entry * self.block_size

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        fsize = self.storage.size()
        for idx, within, n in cluster_spans(offset, length, self.block_size):
            entry = self.bmap.get(idx)
            if entry >= DISCARDED:
                out += bytes(n)
                continue
            host = self._host(idx, entry)
            if host >= fsize:
                raise CorruptImage(
                    f"{self.storage.path}: block {idx} maps to offset {host}, "
                    f"past the end of the file ({fsize})"
                )
            data = self.storage.pread(host + within, n)
            out += data + bytes(n - len(data))  # a short last block reads as zeros
        return bytes(out)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos = offset
        for idx, within, n in cluster_spans(offset, length, self.block_size):
            entry = self.bmap.get(idx)
            if entry == UNALLOCATED:
                out.append(Extent(Kind.HOLE, pos, n))
            elif entry == DISCARDED:
                out.append(Extent(Kind.ZERO, pos, n))
            else:
                out.append(Extent(Kind.DATA, pos, n, self._host(idx, entry) + within))
            pos += n
        return merge_extents(out)

    # -- writing ------------------------------------------------------------------------

    def _allocate(self, idx: int, within: int, data: bytes) -> None:
        """Give guest block ``idx`` a new data block holding ``data`` at ``within``."""
        if self.next_index >= self.h.blocks_in_image:
            raise CorruptImage(
                f"{self.storage.path}: no free data block (next index {self.next_index}, "
                f"blocks_in_image {self.h.blocks_in_image}): run check"
            )
        new = self.next_index
        host = self.h.offset_data + new * self.block_size
        end = host + self.block_size
        if self.storage.size() < end:
            self.storage.truncate(end)  # sparse zeros: the rest of the block reads as zero
        self.storage.pwrite(host + within, data)
        self.storage.sync()  # the block (and the file's new size) before the map names it
        self.bmap.set(idx, new)
        self.next_index = new + 1
        self.h.blocks_allocated += 1
        self.storage.pwrite(OFF_BLOCKS_ALLOCATED, struct.pack("<I", self.h.blocks_allocated))

    def _begin_write(self) -> None:
        """Before the first change of a session: a new modification UUID, so that
        differencing images made on the old content notice (as VirtualBox does)."""
        if not self._modified:
            # an entry past the data area would also alias a new block once allocation
            # reaches it
            refuse_writes_if_corrupt(self, "VDI")
            self._modified = True
            self.h.uuid_last_snap = uuid.uuid4().bytes
            self.storage.pwrite(OFF_UUIDS + 16, self.h.uuid_last_snap)

    def write(self, offset: int, data: bytes) -> None:
        self._begin_write()
        view = memoryview(data)
        pos = 0
        for idx, within, n in cluster_spans(offset, len(data), self.block_size):
            piece = bytes(view[pos : pos + n])
            pos += n
            entry = self.bmap.get(idx)
            if entry < DISCARDED:
                self.storage.pwrite(self._host(idx, entry) + within, piece)
            elif not any(piece) and (entry == DISCARDED or self.h.image_type != TYPE_DIFF):
                continue  # zeros over a range that already reads as zeros
            else:
                self._allocate(idx, within, piece)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._begin_write()
        for idx, within, n in cluster_spans(offset, length, self.block_size):
            entry = self.bmap.get(idx)
            if entry < DISCARDED:
                host = self._host(idx, entry) + within
                if unmap or n == self.block_size:
                    self.storage.punch_hole(host, n)
                else:
                    self.storage.pwrite(host, bytes(n))
            elif entry == UNALLOCATED:
                if n == self.block_size or idx * self.block_size + within + n >= self.size:
                    self.bmap.set(idx, DISCARDED)
                elif self.h.image_type == TYPE_DIFF:
                    self._allocate(idx, within, bytes(n))

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def truncate(self, size: int) -> None:
        if size % SECTOR or size <= 0:
            raise UsageError(f"{self.storage.path}: size {size} is not a multiple of 512")
        blocks = -(-size // self.block_size)
        if size < self.size:
            raise UnsupportedFeature(f"{self.storage.path}: shrinking VDI images is not supported")
        last = self.size // self.block_size
        if self.size % self.block_size and self.bmap.get(last) < DISCARDED:
            # the old last block's bytes past the old end must read as zeros
            end = min(size, (last + 1) * self.block_size)
            host = self._host(last, self.bmap.get(last)) + self.size % self.block_size
            self.storage.pwrite(host, bytes(end - self.size))
        if blocks > self.h.blocks_in_image:
            room = (self.h.offset_data - self.h.offset_bmap) // 4
            if blocks > room:
                raise UnsupportedFeature(
                    f"{self.storage.path}: growing to {blocks} blocks needs a larger block map "
                    f"than the image has room for ({room} entries)"
                )
            old = self.h.blocks_in_image
            if self.h.image_type == TYPE_STATIC:  # a static image keeps every block allocated
                first = max(self.next_index, self.h.blocks_allocated)
                n = blocks - old
                raw = struct.pack(f"<{n}I", *range(first, first + n))
                self.storage.truncate(self.h.offset_data + (first + n) * self.block_size)
                self.next_index = first + n
                self.h.blocks_allocated += n
            else:
                raw = b"\xff" * (4 * (blocks - old))
            self.storage.pwrite(self.h.offset_bmap + 4 * old, raw)
            self.h.blocks_in_image = blocks
            self.bmap = PagedTable(self.storage, self.h.offset_bmap, blocks, what="block map")
        self.h.disk_size = size
        self.size = size
        self._write_header()

    def _write_header(self) -> None:
        self.storage.pwrite(0, self.h.pack()[: PREHEADER.size + HEADER.size])

    # -- chains, info, check --------------------------------------------------------------

    def verify_backing(self, backing: Driver) -> None:
        if not isinstance(backing, VdiDriver):
            raise BackingMismatch(
                f"{self.storage.path}: the parent of a differencing VDI must be a VDI, "
                f"{backing.storage.path} is {backing.name}"
            )
        if backing.h.uuid_image != self.h.uuid_link:
            raise BackingMismatch(
                f"{self.storage.path}: parent {backing.storage.path} has UUID "
                f"{_uuid_text(backing.h.uuid_image)}, the image links to "
                f"{_uuid_text(self.h.uuid_link)}"
            )
        if any(self.h.uuid_parent) and backing.h.uuid_last_snap != self.h.uuid_parent:
            raise BackingMismatch(
                f"{self.storage.path}: parent {backing.storage.path} was modified since this "
                f"image was made (modification UUID {_uuid_text(backing.h.uuid_last_snap)}, "
                f"expected {_uuid_text(self.h.uuid_parent)})"
            )

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        """Flatten (no ``ref``), rebase (``ref`` and its driver) or, during a commit, unpin
        the parent's modification UUID (``ref`` without a driver); the link UUID stays, so
        the parent can still be found."""
        if ref is None:
            self.h.image_type = TYPE_DYNAMIC
            self.h.uuid_link = self.h.uuid_parent = bytes(16)
            self.backing = None
        elif backing is None:
            if self.h.image_type != TYPE_DIFF:  # link to the UUID of the file ref names
                self._link_by_path(ref)
            self.h.uuid_parent = bytes(16)
            self.backing = BackingRef(ref.path, "vdi")
        else:
            if not isinstance(backing, VdiDriver):
                raise UnsupportedFeature(
                    f"{self.storage.path}: a differencing VDI can only have a VDI parent"
                )
            if self.h.image_type == TYPE_STATIC:
                raise UnsupportedFeature(f"{self.storage.path}: a static VDI cannot have a parent")
            if backing.block_size != self.block_size:
                raise UnsupportedFeature(
                    f"{self.storage.path}: parent block size {backing.block_size} differs "
                    f"from {self.block_size}"
                )
            self.h.image_type = TYPE_DIFF
            self.h.uuid_link = backing.h.uuid_image
            self.h.uuid_parent = backing.h.uuid_last_snap
            self.backing = BackingRef(ref.path, "vdi")
        self._write_header()

    def _link_by_path(self, ref: BackingRef) -> None:
        """Become a differencing image of the VDI that ``ref`` names (its creation UUID)."""
        where = self.storage.path
        if self.h.image_type == TYPE_STATIC:
            raise UnsupportedFeature(f"{where}: a static VDI cannot have a parent")
        path = self.storage.resolve(ref.path)
        try:
            parent = _peek_header(path)
        except OSError as e:
            raise BackingMismatch(f"{where}: cannot read parent {path}: {e.strerror}") from None
        if parent is None:
            raise UnsupportedFeature(f"{where}: parent {path} is not a VDI image")
        self.h.image_type = TYPE_DIFF
        self.h.uuid_link = parent.uuid_image

    def info(self) -> dict[str, Any]:
        return {
            "subformat": TYPE_NAMES[self.h.image_type],
            "uuid": _uuid_text(self.h.uuid_image),
            "modification-uuid": _uuid_text(self.h.uuid_last_snap),
            "parent-uuid": _uuid_text(self.h.uuid_link) if any(self.h.uuid_link) else None,
            "blocks-allocated": self.h.blocks_allocated,
        }

    def stats(self) -> dict[str, Any]:
        return {"block-map": self.bmap.stats()}

    def check(self, *, repair: bool = False) -> CheckReport:
        """Every map entry in range and pointing at a block of its own; the allocated
        count as recorded. Memory: one bit per data block the file can hold."""
        rep = CheckReport()
        h = self.h
        fsize = self.storage.size()
        slots = max(0, -(-(fsize - h.offset_data) // self.block_size))
        seen = Bitset(slots)
        count = 0
        for idx in range(h.blocks_in_image):
            e = self.bmap.get(idx)
            if e >= DISCARDED:
                continue
            count += 1
            if e >= h.blocks_in_image or e >= slots:
                rep.corruptions.append(
                    f"block {idx}: entry {e} points past the data area "
                    f"({min(slots, h.blocks_in_image)} blocks)"
                )
                continue
            if e in seen:
                rep.corruptions.append(f"block {idx}: data block {e} is used twice")
            seen.add(e)
        if count != h.blocks_allocated:
            # the count and the map entry live in different sectors: a power loss between
            # the two leaves them apart. Allocation goes by the file size, so no data is at
            # risk: a leak to repair (qemu-img check calls it an error).
            msg = f"blocks_allocated is {h.blocks_allocated}, the map references {count}"
            if repair and not self.readonly:
                h.blocks_allocated = count
                self.storage.pwrite(OFF_BLOCKS_ALLOCATED, struct.pack("<I", count))
                self.storage.sync()
                rep.repaired.append(msg)
            else:
                rep.leaks.append(msg)
        for e in range(min(slots, h.blocks_in_image)):
            if e not in seen and h.image_type != TYPE_STATIC:
                rep.leaks.append(f"data block {e} is not referenced")
        rep.info = {"blocks": h.blocks_in_image, "allocated": count}
        return rep


DRIVER = VdiDriver
