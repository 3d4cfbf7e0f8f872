"""Parallels expandable images (.hdd) and the DiskDescriptor.xml bundle around them.

Spec: QEMU's ``docs/interop/parallels.txt`` (the image) and ``docs/interop/prl-xml.txt``
(the descriptor). An image is a 64-byte header ("WithoutFreeSpace" or "WithouFreSpacExt"),
the BAT (one uint32 per cluster: 0 = not allocated, else the cluster's file offset, in
sectors for the old magic and in clusters for the "Ext" magic), then the data area.

A Parallels *disk* is a directory with a DiskDescriptor.xml listing its images (GUID and
file) and the snapshot tree (each Shot's GUID and ParentGUID); the top snapshot is the one
named by TopGUID or the predefined {5fbaabe3-...}. vdisk opens such a disk either through
the descriptor (the top image is opened, its parent becomes the backing image) or through
one image file of the bundle (its parent is looked up in the descriptor beside it). The
XML is bounded in size and refused if it has a DOCTYPE or ENTITY (no entity expansion);
image paths must stay inside the bundle; a snapshot chain that loops is an error.

Overlays: ``create`` with a backing image (a Parallels image in the same directory) writes
the new image and records it in DiskDescriptor.xml as the top snapshot over its parent
(a new descriptor if there is none); ``set_backing`` rewrites its ParentGUID. The
descriptor is replaced atomically (temporary file, fsync, rename).

Writing: a new cluster is appended at the end of the file and synced, then its BAT entry
written (a crash in between leaks the cluster; the entry never names unwritten space).
A format extension (dirty bitmaps) would go stale, so it is dropped before the first write
unless it holds an unknown NECESSARY feature (then writing is refused). The header's
``in_use`` field is set before the first write and cleared on close, as Parallels and QEMU
do, so an unclean close is visible.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
import xml.etree.ElementTree as ET
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
from vdisk.formats.common import Bitset, PagedTable, refuse_writes_if_corrupt
from vdisk.storage import FileStorage, Storage

# magic, version, heads, cylinders, tracks (cluster size in sectors), BAT entries,
# disk size in sectors, in_use, data offset (sectors), flags, extension offset (sectors)
HEADER = struct.Struct("<16sIIIIIQIIIQ")
assert HEADER.size == 64
# offsets of the header fields written on their own
OFF_BAT_ENTRIES = struct.calcsize("<16sIIII")
OFF_IN_USE = struct.calcsize("<16sIIIIIQ")
OFF_FLAGS = OFF_IN_USE + 8
OFF_EXT = OFF_FLAGS + 4
assert (OFF_BAT_ENTRIES, OFF_IN_USE, OFF_FLAGS, OFF_EXT) == (32, 44, 52, 56)
MAGIC_OLD = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"
VERSION = 2
IN_USE = 0x746F6E59
CLOSED = 0x312E3276
FLAG_EMPTY = 1
SECTOR = 512
DEFAULT_CLUSTER = 1 << 20
MAX_CLUSTER = 256 << 20
MAX_DISK = 1 << 56

# format extension cluster: magic, MD5; then features: magic, flags, data size, unused
EXT_MAGIC = 0xAB234CEF23DCEA87
EXT_FEATURE = struct.Struct("<QQII")
assert EXT_FEATURE.size == 24
EXT_DIRTY_BITMAP = 0x20385FAE252CB34A
EXT_NECESSARY, EXT_TRANSIT = 1, 2

DESCRIPTOR = "DiskDescriptor.xml"
MAX_XML = 1 << 20
MAX_SHOTS = 1024
TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
NULL_GUID = "{00000000-0000-0000-0000-000000000000}"
_GUID_RE = re.compile(r"^\{[0-9a-fA-F-]{36}\}$")


# -- the descriptor ------------------------------------------------------------------------------


class Bundle:
    """What DiskDescriptor.xml says: images by GUID and the parent of each snapshot."""

    def __init__(self, images: dict[str, tuple[str, str]], parents: dict[str, str], top: str):
        self.images = images  # GUID -> (file, type)
        self.parents = parents  # GUID -> parent GUID
        self.top = top

    def chain(self, guid: str, where: str) -> list[str]:
        """``guid`` and its ancestors, newest first; a loop or a missing image is an error."""
        out: list[str] = []
        seen: set[str] = set()
        while guid != NULL_GUID:
            if guid in seen:
                raise CorruptImage(f"{where}: snapshot chain loops at {guid}")
            if guid not in self.images:
                raise CorruptImage(f"{where}: snapshot {guid} has no Image element")
            seen.add(guid)
            out.append(guid)
            if guid not in self.parents:
                raise CorruptImage(f"{where}: image {guid} has no Shot element")
            guid = self.parents[guid]
        return out

    def ref(self, guid: str) -> BackingRef:
        """The image of ``guid`` as a backing image (a Plain one is raw bytes)."""
        file, kind = self.images[guid]
        return BackingRef(file, "parallels" if kind == "Compressed" else "raw")

    def guid_of(self, file: str) -> str | None:
        for guid, (f, _t) in self.images.items():
            if os.path.normpath(f) == os.path.normpath(file):
                return guid
        return None


def _text(el: ET.Element, tag: str, where: str) -> str:
    child = el.find(tag)
    if child is None or child.text is None:
        raise CorruptImage(f"{where}: <{el.tag}> has no <{tag}>")
    return child.text.strip()


def _safe_name(name: str, where: str) -> str:
    """An image path relative to the bundle, that does not leave it."""
    norm = os.path.normpath(name.replace("\\", "/"))
    if os.path.isabs(norm) or norm == ".." or norm.startswith("../") or "\0" in norm:
        raise UnsupportedFeature(
            f"{where}: image file {name!r} is outside the bundle directory (refused)"
        )
    return norm


def parse_descriptor(raw: bytes, where: str) -> Bundle:
    """Parse DiskDescriptor.xml (bounded; no DTD, so no entity expansion)."""
    if len(raw) > MAX_XML:
        raise CorruptImage(f"{where}: descriptor of {len(raw)} bytes exceeds the limit {MAX_XML}")
    if b"\0" in raw:  # UTF-16/32 would hide a DOCTYPE from the check below
        raise UnsupportedFeature(f"{where}: descriptor is not UTF-8 (refused)")
    low = raw.lower()
    if b"<!doctype" in low or b"<!entity" in low:
        raise UnsupportedFeature(f"{where}: descriptor has a DOCTYPE or ENTITY (refused)")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise CorruptImage(f"{where}: descriptor is not well-formed XML: {e}") from None
    if root.tag != "Parallels_disk_image":
        raise CorruptImage(f"{where}: root element is <{root.tag}>, not <Parallels_disk_image>")
    params = root.find("Disk_Parameters")
    if params is not None and params.findtext("Padding", "0").strip() not in ("", "0"):
        raise UnsupportedFeature(f"{where}: Disk_Parameters Padding is not 0")
    storages = root.findall("StorageData/Storage")
    if len(storages) != 1:
        raise UnsupportedFeature(
            f"{where}: {len(storages)} Storage elements (split images are not supported)"
        )
    images: dict[str, tuple[str, str]] = {}
    for im in storages[0].findall("Image"):
        guid = _text(im, "GUID", where).lower()
        kind = _text(im, "Type", where)
        if kind not in ("Plain", "Compressed"):
            raise UnsupportedFeature(f"{where}: image {guid} has Type {kind!r}")
        images[guid] = (_safe_name(_text(im, "File", where), where), kind)
    if len(images) > MAX_SHOTS:
        raise CorruptImage(f"{where}: {len(images)} images exceed the limit {MAX_SHOTS}")
    snaps = root.find("Snapshots")
    if snaps is None:
        raise CorruptImage(f"{where}: descriptor has no <Snapshots>")
    parents: dict[str, str] = {}
    for shot in snaps.findall("Shot"):
        guid = _text(shot, "GUID", where).lower()
        parent = _text(shot, "ParentGUID", where).lower()
        for g in (guid, parent):
            if not _GUID_RE.match(g):
                raise CorruptImage(f"{where}: {g!r} is not a GUID in braces")
        parents[guid] = parent
    top = (snaps.findtext("TopGUID") or "").strip().lower() or TOP_GUID
    if top not in parents:
        if len(parents) == 1:
            top = next(iter(parents))
        else:
            raise CorruptImage(f"{where}: top snapshot {top} is not among the Shots")
    return Bundle(images, parents, top)


def _looks_like_descriptor(head: bytes) -> bool:
    return b"<Parallels_disk_image" in head[:4096]


def _read_descriptor_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_XML + 1)
    except OSError as e:
        raise CorruptImage(f"{path}: cannot read: {e.strerror}") from None


def _new_descriptor(sectors: int, cluster_sectors: int) -> ET.Element:
    """An empty DiskDescriptor.xml tree (prl-xml.txt): geometry whose product is the size."""
    heads, spt = (16, 32) if sectors % 512 == 0 else (1, 1)
    root = ET.Element("Parallels_disk_image", Version="1.0")
    params = ET.SubElement(root, "Disk_Parameters")
    for tag, value in (
        ("Disk_size", sectors),
        ("Cylinders", sectors // (heads * spt)),
        ("Heads", heads),
        ("Sectors", spt),
        ("Padding", 0),
    ):
        ET.SubElement(params, tag).text = str(value)
    st = ET.SubElement(ET.SubElement(root, "StorageData"), "Storage")
    for tag, value in (("Start", 0), ("End", sectors), ("Blocksize", cluster_sectors)):
        ET.SubElement(st, tag).text = str(value)
    ET.SubElement(root, "Snapshots")
    return root


def _add_image(root: ET.Element, guid: str, file: str, parent: str) -> None:
    storage = root.find("StorageData/Storage")
    snaps = root.find("Snapshots")
    assert storage is not None and snaps is not None  # parse_descriptor checked both
    im = ET.SubElement(storage, "Image")
    ET.SubElement(im, "GUID").text = guid
    ET.SubElement(im, "Type").text = "Compressed"
    ET.SubElement(im, "File").text = file
    shot = ET.SubElement(snaps, "Shot")
    ET.SubElement(shot, "GUID").text = guid
    ET.SubElement(shot, "ParentGUID").text = parent


def _write_descriptor(path: str, root: ET.Element) -> None:
    """Replace DiskDescriptor.xml atomically (temporary file, fsync, rename, fsync dir)."""
    raw = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise CorruptImage(f"{path}: cannot write the descriptor: {e.strerror}") from None


def _new_guid() -> str:
    return "{" + str(uuid.uuid4()) + "}"


# -- the image -----------------------------------------------------------------------------------


class ParallelsDriver(Driver):
    name = "parallels"
    aliases = ("hdd", "prl")
    extensions = (".hdd", ".hds")
    can_create = True

    def __init__(self, storage: Storage, readonly: bool) -> None:
        self.storage = storage
        self.readonly = readonly
        self.descriptor: Storage | None = None
        self._dirty = False

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        if head[:16] in (MAGIC_OLD, MAGIC_EXT):
            return 100
        if _looks_like_descriptor(head):
            return 100
        return 0

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> ParallelsDriver:
        reject_unknown_options(cls.name, options, ())
        head = storage.pread(0, 4096)
        if head[:16] not in (MAGIC_OLD, MAGIC_EXT) and _looks_like_descriptor(head):
            return cls._open_bundle(storage, readonly)
        d = cls(storage, readonly)
        d._load()
        d.backing = d._parent_from_bundle()
        return d

    @classmethod
    def _open_bundle(cls, desc: Storage, readonly: bool) -> ParallelsDriver:
        """Open the top image that DiskDescriptor.xml names; its parent is the backing."""
        where = desc.path
        size = desc.size()
        if size > MAX_XML:
            raise CorruptImage(f"{where}: descriptor of {size} bytes exceeds the limit {MAX_XML}")
        bundle = parse_descriptor(desc.pread(0, size), where)
        chain = bundle.chain(bundle.top, where)
        file, kind = bundle.images[chain[0]]
        if kind != "Compressed":
            raise UnsupportedFeature(f"{where}: the top image {file} is {kind}, not expandable")
        st = desc.sibling(file, readonly=readonly)
        try:
            if not readonly:
                st.lock(exclusive=True)
            d = cls(st, readonly)
            d._load()
            if len(chain) > 1:
                d.backing = bundle.ref(chain[1])
        except BaseException:
            st.close()
            raise
        d.descriptor = desc
        return d

    def _bundle_path(self) -> str | None:
        """DiskDescriptor.xml beside this image (or the one it was opened through)."""
        if self.descriptor is not None:
            return self.descriptor.path
        if not isinstance(self.storage, FileStorage):
            return None
        return os.path.join(os.path.dirname(os.path.abspath(self.storage.path)), DESCRIPTOR)

    def _my_name(self, desc: str) -> str:
        here = os.path.dirname(os.path.abspath(desc))
        return os.path.relpath(os.path.abspath(self.storage.path), here)

    def _parent_from_bundle(self) -> BackingRef | None:
        """The parent of this image, if a DiskDescriptor.xml beside it lists one."""
        path = self._bundle_path()
        if path is None or not os.path.isfile(path):
            return None
        bundle = parse_descriptor(_read_descriptor_file(path), path)
        guid = bundle.guid_of(self._my_name(path))
        if guid is None or guid not in bundle.parents:
            return None
        chain = bundle.chain(guid, path)
        if len(chain) < 2:
            return None
        return bundle.ref(chain[1])

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        """Rewrite this image's ParentGUID in DiskDescriptor.xml (flatten: none; rebase: the
        GUID of ``ref``'s image, which must be in the bundle directory)."""
        path = self._bundle_path()
        where = self.storage.path
        if path is None:
            raise UnsupportedFeature(f"{where}: not a file: no DiskDescriptor.xml to record it")
        if not os.path.isfile(path):
            if ref is None:
                self.backing = None
                return
            raise UnsupportedFeature(
                f"{where}: a Parallels image records its parent in a DiskDescriptor.xml "
                f"bundle, and {path} does not exist"
            )
        raw = _read_descriptor_file(path)
        bundle = parse_descriptor(raw, path)
        root = ET.fromstring(raw)
        me = bundle.guid_of(self._my_name(path))
        parent = NULL_GUID
        if ref is not None:
            pname = _safe_name(ref.path, path)
            if os.path.dirname(pname):
                raise UnsupportedFeature(
                    f"{where}: parent {ref.path} is not in the bundle directory"
                )
            found = bundle.guid_of(pname)
            if found is None:
                found = _new_guid()
                _add_image(root, found, pname, NULL_GUID)
            parent = found
        if me is None:
            _add_image(root, _new_guid(), self._my_name(path), parent)
        else:
            for shot in root.findall("Snapshots/Shot"):
                if (shot.findtext("GUID") or "").strip().lower() == me:
                    pg = shot.find("ParentGUID")
                    assert pg is not None  # parse_descriptor checked it
                    pg.text = parent
        check = ET.tostring(root, encoding="utf-8")
        b2 = parse_descriptor(check, path)  # the new tree must be valid and loop-free
        if me is not None:
            try:
                b2.chain(me, path)
            except CorruptImage as e:
                raise UnsupportedFeature(
                    f"{where}: refused: the new parent would make {e}"
                ) from None
        _write_descriptor(path, root)
        self.backing = None if ref is None else BackingRef(ref.path, ref.format or "parallels")

    def _load(self) -> None:
        st = self.storage
        where = st.path
        fsize = st.size()
        if fsize < HEADER.size:
            raise CorruptImage(
                f"{where}: file of {fsize} bytes is too short for a Parallels header"
            )
        (
            magic,
            version,
            self.heads,
            self.cylinders,
            tracks,
            nbat,
            sectors,
            self.in_use,
            data_off,
            self.flags,
            self.ext_off,
        ) = HEADER.unpack(st.pread_exact(0, HEADER.size, "Parallels header"))
        if magic not in (MAGIC_OLD, MAGIC_EXT):
            raise CorruptImage(f"{where}: bad Parallels magic {magic!r}")
        if version != VERSION:
            raise UnsupportedFeature(f"{where}: Parallels version {version} (only 2)")
        self.magic = magic
        if magic == MAGIC_OLD:
            sectors &= 0xFFFFFFFF
        cs = tracks * SECTOR
        if tracks == 0 or cs > MAX_CLUSTER:
            raise CorruptImage(
                f"{where}: Parallels cluster of {tracks} sectors is outside (0, {MAX_CLUSTER >> 9}]"
            )
        size = sectors * SECTOR
        if size == 0 or size > MAX_DISK:
            raise CorruptImage(f"{where}: Parallels disk size {size} is outside (0, {MAX_DISK}]")
        if nbat * cs < size:
            raise CorruptImage(
                f"{where}: {nbat} BAT entries of {cs}-byte clusters do not cover the disk ({size})"
            )
        bat_end = HEADER.size + 4 * nbat
        if bat_end > fsize:
            raise CorruptImage(
                f"{where}: BAT of {nbat} entries ends at {bat_end}, past the end of the file "
                f"({fsize})"
            )
        if magic == MAGIC_EXT and data_off == 0:
            raise CorruptImage(f"{where}: data_off is 0 in a WithouFreSpacExt image")
        data = data_off * SECTOR if data_off else -(-bat_end // SECTOR) * SECTOR
        if data < bat_end or data > fsize:
            raise CorruptImage(
                f"{where}: data offset {data} lies inside the BAT (which ends at {bat_end}) "
                f"or past the end of the file ({fsize})"
            )
        if self.ext_off and (self.ext_off * SECTOR < data or self.ext_off * SECTOR + cs > fsize):
            raise CorruptImage(
                f"{where}: format extension at {self.ext_off * SECTOR} is outside the data "
                f"area ({data}..{fsize})"
            )
        self.size = size
        self.cluster_size = cs
        self.data_offset = data
        self.unit = cs if magic == MAGIC_EXT else SECTOR  # what a BAT entry counts
        self.bat = PagedTable(st, HEADER.size, nbat, what="BAT")
        self.nbat = nbat
        if self.flags & FLAG_EMPTY and not self.readonly:
            self._begin_write()
            st.pwrite(HEADER.size, bytes(4 * nbat))
            self.bat = PagedTable(st, HEADER.size, nbat, what="BAT")
            self.flags &= ~FLAG_EMPTY
            st.pwrite(OFF_FLAGS, struct.pack("<I", self.flags))

    # -- mapping ----------------------------------------------------------------------------------

    def _host(self, idx: int) -> int | None:
        if self.flags & FLAG_EMPTY:
            return None
        e = self.bat.get(idx)
        if e == 0:
            return None
        host = e * self.unit
        fsize = self.storage.size()
        if host < self.data_offset or host >= fsize:
            raise CorruptImage(
                f"{self.storage.path}: BAT entry {idx} points at {host}, outside the data area "
                f"({self.data_offset}..{fsize})"
            )
        return host

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for idx, within, n in cluster_spans(offset, length, self.cluster_size):
            host = self._host(idx)
            if host is None:
                out += bytes(n)
            else:
                data = self.storage.pread(host + within, n)
                out += data + bytes(n - len(data))  # a short last cluster reads as zeros
        return bytes(out)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out = []
        pos = offset
        for idx, within, n in cluster_spans(offset, length, self.cluster_size):
            host = self._host(idx)
            if host is None:
                out.append(Extent(Kind.HOLE, pos, n))
            else:
                out.append(Extent(Kind.DATA, pos, n, host + within))
            pos += n
        return merge_extents(out)

    # -- writing --------------------------------------------------------------------------------

    def _begin_write(self) -> None:
        if not self._dirty:
            refuse_writes_if_corrupt(self, "Parallels image")  # before it is marked in use
            if self.ext_off:
                self._drop_extensions()
            self.storage.pwrite(OFF_IN_USE, struct.pack("<I", IN_USE))
            self.storage.sync()
            self._dirty = True

    def _drop_extensions(self) -> None:
        """Before the first write: the format extension's dirty bitmaps would go stale, so
        the extension is dropped (as the spec allows for extensions not marked NECESSARY);
        an unknown NECESSARY one forbids writing, a TRANSIT one keeps it as it is."""
        where = self.storage.path
        ext = self.ext_off * SECTOR
        raw = self.storage.pread_exact(ext, self.cluster_size, "Parallels format extension")
        if struct.unpack_from("<Q", raw, 0)[0] != EXT_MAGIC:
            raise CorruptImage(f"{where}: bad format extension magic at {ext}")
        pos, keep = 24, False
        while pos + EXT_FEATURE.size <= len(raw):
            magic, flags, size, _u = EXT_FEATURE.unpack_from(raw, pos)
            if magic == 0:
                break
            if flags & EXT_NECESSARY and magic != EXT_DIRTY_BITMAP:
                raise UnsupportedFeature(
                    f"{where}: format extension feature 0x{magic:016x} is NECESSARY and "
                    "unknown: the image must not be changed"
                )
            keep |= bool(flags & EXT_TRANSIT)
            pos += EXT_FEATURE.size + size + (-size % 8)
        if not keep:
            self.storage.pwrite(OFF_EXT, struct.pack("<Q", 0))
            self.ext_off = 0

    def write(self, offset: int, data: bytes) -> None:
        self._begin_write()
        view = memoryview(data)
        pos = 0
        for idx, within, n in cluster_spans(offset, len(data), self.cluster_size):
            piece = view[pos : pos + n]
            pos += n
            host = self._host(idx)
            if host is not None:
                self.storage.pwrite(host + within, piece)
            elif self.backing is not None or any(piece):
                self._allocate(idx, within, piece)

    def _allocate(self, idx: int, within: int, piece: memoryview) -> None:
        cs = self.cluster_size
        fsize = self.storage.size()
        start = max(self.data_offset, fsize)
        host = self.data_offset + -(-(start - self.data_offset) // cs) * cs
        if self.ext_off:
            ext = self.ext_off * SECTOR
            if host <= ext < host + cs:
                host = ext + cs
        if host // self.unit > 0xFFFFFFFF:
            raise UnsupportedFeature(
                f"{self.storage.path}: cluster offset {host} does not fit a 32-bit BAT entry"
            )
        self.storage.truncate(host + cs)
        self.storage.pwrite(host + within, piece)
        self.storage.sync()  # the cluster (and the file's new size) before the BAT names it
        self.bat.set(idx, host // self.unit)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._begin_write()
        for idx, within, n in cluster_spans(offset, length, self.cluster_size):
            host = self._host(idx)
            if host is not None:
                self.storage.punch_hole(host + within, n)
            elif self.backing is not None:
                self._allocate(idx, within, memoryview(bytes(n)))

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def truncate(self, size: int) -> None:
        where = self.storage.path
        if size < self.size:
            raise UnsupportedFeature(f"{where}: shrinking Parallels images is not supported")
        if size % SECTOR:
            raise UsageError(f"{where}: size {size} is not a multiple of 512")
        nbat = -(-size // self.cluster_size)
        room = (self.data_offset - HEADER.size) // 4
        if nbat > room:
            raise UnsupportedFeature(
                f"{where}: growing to {nbat} clusters needs a BAT larger than the image has room "
                f"for ({room} entries)"
            )
        if self.magic == MAGIC_OLD and size // SECTOR > 0xFFFFFFFF:
            raise UnsupportedFeature(f"{where}: WithoutFreeSpace images are limited to 2 TiB")
        self._begin_write()
        if nbat > self.nbat:
            self.storage.pwrite(HEADER.size + 4 * self.nbat, bytes(4 * (nbat - self.nbat)))
        tail = self.size % self.cluster_size
        if tail and self._host(self.nbat - 1) is not None:
            end = min(size, self.nbat * self.cluster_size)
            self.write_zeroes(self.size, end - self.size)
        self.storage.sync()
        self.storage.pwrite(OFF_BAT_ENTRIES, struct.pack("<IQ", nbat, size // SECTOR))
        self.nbat, self.size = nbat, size
        self.bat = PagedTable(self.storage, HEADER.size, nbat, what="BAT")

    def flush(self) -> None:
        self.storage.sync()

    def close(self) -> None:
        try:
            if self._dirty and not self.readonly and getattr(self.storage, "fd", 0) != -1:
                self.storage.sync()
                self.storage.pwrite(OFF_IN_USE, struct.pack("<I", CLOSED))
                self.storage.sync()
        finally:
            self.storage.close()
            if self.descriptor is not None:
                self.descriptor.close()

    # -- info, chains, check ----------------------------------------------------------------------

    def verify_backing(self, backing: Driver) -> None:
        if backing.size < self.size:
            raise BackingMismatch(
                f"{self.storage.path}: parent image {backing.storage.path} is {backing.size} "
                f"bytes, smaller than this image ({self.size})"
            )

    def info(self) -> dict[str, Any]:
        return {
            "magic": self.magic.decode(),
            "cluster-size": self.cluster_size,
            "in-use": self.in_use == IN_USE,
            "bundle": self.descriptor.path if self.descriptor is not None else None,
        }

    def stats(self) -> dict[str, Any]:
        return {"bat": self.bat.stats()}

    def check(self, *, repair: bool = False) -> CheckReport:
        """BAT entries inside the data area, cluster-aligned, each cluster used once."""
        rep = CheckReport()
        fsize = self.storage.size()
        cs = self.cluster_size
        slots = max(0, -(-(fsize - self.data_offset) // cs))
        seen = Bitset(slots)
        for idx in range(self.nbat):
            e = self.bat.get(idx)
            if e == 0 or self.flags & FLAG_EMPTY:
                continue
            host = e * self.unit
            if host < self.data_offset or host >= fsize:
                rep.corruptions.append(f"BAT entry {idx}: offset {host} outside the data area")
                continue
            if (host - self.data_offset) % cs:
                rep.corruptions.append(f"BAT entry {idx}: offset {host} is not cluster aligned")
                continue
            s = (host - self.data_offset) // cs
            if s in seen:
                rep.corruptions.append(f"BAT entry {idx}: cluster at {host} is used twice")
            seen.add(s)
        # An unclean close alone is no corruption here: vdisk's write order keeps the BAT
        # consistent (qemu counts it as one and refuses to write until repaired).
        unclean = self.in_use == IN_USE and not self._dirty
        rep.info = {"clusters": self.nbat, "closed-cleanly": not unclean}
        if unclean and repair and not rep.corruptions and not self.readonly:
            self.storage.pwrite(OFF_IN_USE, struct.pack("<I", CLOSED))
            self.storage.sync()
            self.in_use = CLOSED
            rep.repaired.append("in_use flag cleared (the image was not closed cleanly)")
        return rep

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        reject_unknown_options(cls.name, options, ("cluster_size", "backing", "backing_driver"))
        ref: BackingRef | None = options.get("backing")
        base = options.get("backing_driver")
        if ref is not None:
            cls._check_overlay(storage, ref, base)
        cs = options.get("cluster_size") or (
            base.cluster_size if isinstance(base, ParallelsDriver) else DEFAULT_CLUSTER
        )
        if cs < 4096 or cs > MAX_CLUSTER or cs % SECTOR:
            raise UsageError(f"parallels: cluster size {cs} must be in [4096, {MAX_CLUSTER}]")
        if size <= 0 or size > MAX_DISK:
            raise UsageError(f"parallels: size {size} must be in (0, {MAX_DISK}]")
        sectors = -(-size // SECTOR)
        nbat = -(-sectors * SECTOR // cs)
        if nbat > 0xFFFFFFFF:
            raise UsageError(f"parallels: {nbat} clusters exceed the 32-bit BAT")
        data = -(-(HEADER.size + 4 * nbat) // cs) * cs
        heads, spt = 16, 32
        cyl = max(1, sectors // (heads * spt))
        hdr = HEADER.pack(
            MAGIC_EXT, VERSION, heads, cyl, cs // SECTOR, nbat, sectors, 0, data // SECTOR, 0, 0
        )
        storage.pwrite(0, hdr)
        storage.truncate(data)
        if ref is not None:
            cls._link_overlay(storage, ref, sectors, cs // SECTOR)

    @classmethod
    def _check_overlay(cls, storage: Storage, ref: BackingRef, base: Any) -> None:
        if not isinstance(base, ParallelsDriver):
            raise UnsupportedFeature(
                "parallels: the parent of a Parallels image must be a Parallels image "
                f"(got {getattr(base, 'name', None)!r})"
            )
        if not isinstance(storage, FileStorage):
            raise UnsupportedFeature("parallels: overlays need a DiskDescriptor.xml beside them")
        here = os.path.realpath(os.path.dirname(os.path.abspath(storage.path)))
        there = os.path.realpath(os.path.dirname(os.path.abspath(base.storage.path)))
        if here != there:
            raise UnsupportedFeature(
                f"parallels: {storage.path} and its parent {base.storage.path} must be in one "
                "directory (a Parallels bundle records the chain in its DiskDescriptor.xml)"
            )

    @classmethod
    def _link_overlay(cls, storage: Storage, ref: BackingRef, sectors: int, cl: int) -> None:
        """Record the new image in DiskDescriptor.xml as the top snapshot over ``ref``."""
        here = os.path.dirname(os.path.abspath(storage.path))
        path = os.path.join(here, DESCRIPTOR)
        me = os.path.basename(storage.path)
        pname = os.path.basename(ref.path)
        if os.path.exists(path):
            raw = _read_descriptor_file(path)
            bundle = parse_descriptor(raw, path)
            root = ET.fromstring(raw)
            parent = bundle.guid_of(pname)
            if parent is None:
                raise UnsupportedFeature(f"{path}: does not list the parent image {pname}")
            guid = _new_guid()
            _add_image(root, guid, me, parent)
            snaps = root.find("Snapshots")
            assert snaps is not None
            top = snaps.find("TopGUID")
            if top is None:
                top = ET.Element("TopGUID")
                snaps.insert(0, top)
            top.text = guid
        else:
            root = _new_descriptor(sectors, cl)
            parent = _new_guid()
            _add_image(root, parent, pname, NULL_GUID)
            _add_image(root, TOP_GUID, me, parent)
        _write_descriptor(path, root)


DRIVER = ParallelsDriver
