"""``vdisk-s3``: the native format's object-store layout, for images shared by many hosts.

An image ``s3://BUCKET/NAME`` is a chain of numbered manifests; its clusters live in
immutable, content-addressed packs shared by every image of the bucket.
docs/object-store.md is the spec; in short, every key of the bucket is one of:

``packs/<id>``
    A few MiB of stored clusters, back to back, each encoded by ``vdisk.cache.codec``
    (lz4 when it pays, xxh3-64 of the stored bytes). Read with range GETs. ``<id>`` is
    32 random hex digits. Never rewritten; deleted only by ``vdisk gc``.
``index/<id>``
    What pack ``<id>`` holds: (content key, offset, length, codec, checksum) per cluster.
    The bucket-wide dedup index is the union of these; also used for read-ahead.
``pages/<id>``
    One map page: :data:`PAGE_ENTRIES` mapping entries of an image, lz4-compressed, named
    randomly and verified by the xxh3-128 the manifest records for it.
``images/NAME/manifest/<0000000001>``
    A commit: guest size, cluster size, the page list, snapshots (each the number of the
    manifest holding its state), backing reference, parent number, and an xxh3-64 of its
    own bytes. Created with ``If-None-Match: *``: of two writers committing the same
    number exactly one wins; the other gets ImageLocked and nothing is lost.
``gc/condemned/<id>``
    A pack that ``vdisk gc`` found unreferenced: its index is gone (no new dedup hits);
    the pack itself is deleted by a later run once the marker is older than the grace.

A cluster's content key is the xxh3-128 of its *uncompressed* bytes: identical clusters of
any image of the bucket are stored once. xxh3 is not a cryptographic hash: a writer who
can craft collisions can make another image's cluster read its bytes. Share a bucket only
between writers that trust each other.

Crash safety: a commit writes packs, then their indexes, then pages, then the manifest.
Until the manifest exists none of the new objects is referenced, so a crash at any point
leaves the previous manifest, and everything it references, intact; the orphans are
younger than the gc grace period while the commit runs, and collected after it.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import xxhash

from vdisk.cache import codec
from vdisk.cache.lru import LRU
from vdisk.errors import (
    BackingMismatch,
    ChecksumMismatch,
    CorruptImage,
    ImageLocked,
    ImageNotFound,
    ReadOnlyImage,
    StorageError,
    UnsupportedFeature,
    UsageError,
    VdiskError,
)
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
from vdisk.formats.common import bool_option, compressor_option
from vdisk.storage import Storage
from vdisk.storage.s3 import LocalCache, S3Client, S3Storage, is_url, parse_url, split_pin

log = logging.getLogger("vdisk.remote")

# -- structures (docs/object-store.md) -----------------------------------

FORMAT = "vdisk-s3"
VERSION = 1
#: A mapping entry: pack id, offset in the pack, stored length, codec, flags, reserved,
#: xxh3-64 of the stored bytes, xxh3-128 of the uncompressed cluster (the content key).
ENTRY = struct.Struct("<16sQIBBHQ16s")
assert ENTRY.size == 56
FLAG_DATA, FLAG_ZERO = 0x01, 0x02
NULL_ENTRY = bytes(ENTRY.size)  # HOLE: not in this layer
ZERO_ENTRY = ENTRY.pack(bytes(16), 0, 0, 0, FLAG_ZERO, 0, 0, bytes(16))

PAGE_ENTRIES = 1024
PAGE_BYTES = PAGE_ENTRIES * ENTRY.size
PAGE_MAGIC = b"VDS3PAGE"
#: magic, version, codec, reserved, entry count, xxh3-64 of the stored payload
PAGE_HEAD = struct.Struct("<8sBBHIQ")
assert PAGE_HEAD.size == 24
MAX_PAGE_OBJECT = PAGE_HEAD.size + PAGE_BYTES

INDEX_MAGIC = b"VDS3INDX"
#: magic, version, entry count, xxh3-64 of the entries
INDEX_HEAD = struct.Struct("<8sIIQ")
assert INDEX_HEAD.size == 24
#: content key, offset, stored length, codec, reserved, checksum of the stored bytes
INDEX_ENTRY = struct.Struct("<16sQIB3xQ")
assert INDEX_ENTRY.size == 40

MANIFEST_DIGITS = 10
MIN_CLUSTER, MAX_CLUSTER = 4096, 2 << 20
MAX_GUEST_SIZE = 1 << 56
MAX_SNAPSHOTS = 4096
MAX_PAGES = 1 << 20  # map pages per image: 64 TiB at 64 KiB clusters; keeps manifests < 64 MiB
MAX_MANIFEST = 64 << 20
MAX_INDEX_ENTRIES = 1 << 16  # per pack (a writer seals a pack at this many clusters)
MAX_SESSION = 1 << 18  # clusters an open remembers for dedup within itself
MAX_INDEX_OBJECT = INDEX_HEAD.size + MAX_INDEX_ENTRIES * INDEX_ENTRY.size
MAX_DEDUP_ENTRIES = 1 << 19  # bucket-wide dedup index in memory (~128 MiB); beyond it, none
DEFAULT_PACK_SIZE = 4 << 20
DEFAULT_READAHEAD = 1 << 20
MAX_INFLIGHT = 4  # packs uploading in the background at once (memory: 4 x pack_size)
MAX_DIRTY_PAGES = 256  # ~14 MiB of dirty map pages, then they are uploaded ahead of the commit
COALESCE_GAP = 256 << 10
MAX_RANGE = 1 << 20  # bigger misses become several range GETs, fetched in parallel

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MANIFEST_KEY = re.compile(r"^images/(.+)/manifest/(\d{10})$")

OPTIONS = (
    "cache_dir",
    "cache_bytes",
    "pack_size",
    "readahead",
    "dedup",
    "compress",
    "manifest",
    "workers",
)


def manifest_key(name: str, number: int) -> str:
    return f"images/{name}/manifest/{number:0{MANIFEST_DIGITS}d}"


def content_key(raw: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(raw)


@dataclass(frozen=True, slots=True)
class Loc:
    """Where a stored cluster is: pack id (16 bytes), offset, stored length, codec, checksum."""

    pack: bytes
    offset: int
    length: int
    codec: int
    cks: int


def _opt_size(options: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """An integer option (sizes may be given as 4M, 256K, ...), within [lo, hi]."""
    v = options.get(key, default)
    if isinstance(v, str):
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        t = v.strip().upper().removesuffix("B").removesuffix("I")
        mult = units.get(t[-1:], 1)
        t = t[:-1] if t[-1:] in units else t
        if not t.isdigit():
            raise UsageError(f"{FORMAT}: option {key}={v!r} is not a number or size")
        v = int(t) * mult
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise UsageError(f"{FORMAT}: option {key}={v!r} outside {lo}..{hi}")
    return v


def _check_size(where: str, size: int, cs: int) -> None:
    limit = min(MAX_GUEST_SIZE, MAX_PAGES * PAGE_ENTRIES * cs)
    if size < 0 or size > limit:
        raise UsageError(f"{where}: size {size} outside 0..{limit} (cluster size {cs})")


# -- manifests ---------------------------------------------------------------------------


def encode_manifest(m: dict[str, Any]) -> bytes:
    body = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
    return body + b"\n" + f"{codec.checksum(body):016x}".encode() + b"\n"


def decode_manifest(data: bytes, where: str, number: int, name: str) -> dict[str, Any]:
    """Parse and validate one manifest object; every field is checked before use."""
    if len(data) > MAX_MANIFEST:
        raise CorruptImage(f"{where}: manifest of {len(data)} bytes exceeds {MAX_MANIFEST}")
    body, sep, tail = data.rstrip(b"\n").rpartition(b"\n")
    if not sep or len(tail) != 16:
        raise CorruptImage(f"{where}: manifest has no checksum line")
    try:
        want = int(tail, 16)
    except ValueError:
        raise CorruptImage(f"{where}: manifest checksum {tail!r} is not hex") from None
    codec.verify(body, want, f"{where}: manifest")
    try:
        m = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise CorruptImage(f"{where}: manifest is not JSON: {e}") from None
    if not isinstance(m, dict):
        raise CorruptImage(f"{where}: manifest is not an object")

    def need(key: str, typ: type | tuple[type, ...]) -> Any:
        v = m.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise CorruptImage(f"{where}: manifest field {key!r} is {v!r}, expected {typ}")
        return v

    if m.get("format") != FORMAT:
        raise CorruptImage(f"{where}: format {m.get('format')!r}, expected {FORMAT!r}")
    if need("version", int) > VERSION:
        raise UnsupportedFeature(
            f"{where}: manifest version {m['version']} (this vdisk knows up to {VERSION})"
        )
    if need("number", int) != number:
        raise CorruptImage(f"{where}: manifest says number {m['number']}, its key says {number}")
    if m.get("name") != name:
        raise CorruptImage(f"{where}: manifest names image {m.get('name')!r}, expected {name!r}")
    cs = need("cluster_size", int)
    if cs < MIN_CLUSTER or cs > MAX_CLUSTER or cs & (cs - 1):
        raise CorruptImage(
            f"{where}: cluster_size {cs} (a power of two from {MIN_CLUSTER} to {MAX_CLUSTER})"
        )
    size = need("size", int)
    if size < 0 or size > MAX_GUEST_SIZE:
        raise CorruptImage(f"{where}: guest size {size} outside 0..{MAX_GUEST_SIZE}")
    pages = need("pages", list)
    want_pages = -(-size // (cs * PAGE_ENTRIES))
    if want_pages > MAX_PAGES:
        raise CorruptImage(f"{where}: {want_pages} map pages (limit {MAX_PAGES})")
    if len(pages) != want_pages:
        raise CorruptImage(
            f"{where}: {len(pages)} map pages for {size} bytes, expected {want_pages}"
        )
    for i, p in enumerate(pages):
        if p is None:
            continue
        if (
            not isinstance(p, list)
            or len(p) != 2
            or not all(isinstance(x, str) and _HEX32.match(x) for x in p)
        ):
            raise CorruptImage(f"{where}: map page {i} is {p!r}, expected [id, xxh3-128]")
    snaps = need("snapshots", list)
    if len(snaps) > MAX_SNAPSHOTS:
        raise CorruptImage(f"{where}: {len(snaps)} snapshots (limit {MAX_SNAPSHOTS})")
    for s in snaps:
        if not (
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and isinstance(s.get("id"), int)
            and isinstance(s.get("manifest"), int)
            and 0 < s["manifest"] <= number
            and isinstance(s.get("created"), (int, float))
            and isinstance(s.get("size"), int)
        ):
            raise CorruptImage(f"{where}: bad snapshot record {s!r}")
    b = m.get("backing")
    if b is not None and not (
        isinstance(b, dict)
        and isinstance(b.get("path"), str)
        and isinstance(b.get("format"), (str, type(None)))
    ):
        raise CorruptImage(f"{where}: bad backing record {b!r}")
    if not isinstance(m.get("uuid"), str):
        raise CorruptImage(f"{where}: manifest has no image uuid")
    return m


def list_manifests(client: S3Client, name: str, after: int = 0) -> list[int]:
    """Numbers of the image's manifests above ``after``, ascending."""
    prefix = f"images/{name}/manifest/"
    start = manifest_key(name, after) if after else ""
    out = []
    for o in client.list(prefix, start):
        tail = o.key[len(prefix) :]
        if len(tail) == MANIFEST_DIGITS and tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def load_manifest(client: S3Client, name: str, number: int) -> dict[str, Any]:
    key = manifest_key(name, number)
    data = client.get(key, limit=MAX_MANIFEST)
    if data is None:
        raise ImageNotFound(f"{client.where(key)}: manifest {number} does not exist")
    return decode_manifest(data, client.where(key), number, name)


# -- pages and pack indexes --------------------------------------------------------------


def encode_page(raw: bytes) -> bytes:
    cdc, stored, cks = codec.encode(raw)
    return PAGE_HEAD.pack(PAGE_MAGIC, VERSION, cdc, 0, PAGE_ENTRIES, cks) + stored


def decode_page(data: bytes, want: bytes, where: str) -> bytearray:
    if len(data) < PAGE_HEAD.size:
        raise CorruptImage(f"{where}: map page of {len(data)} bytes is shorter than its header")
    magic, ver, cdc, _r, n, cks = PAGE_HEAD.unpack_from(data)
    if magic != PAGE_MAGIC:
        raise CorruptImage(f"{where}: bad map page magic {magic!r}")
    if ver != VERSION or n != PAGE_ENTRIES:
        raise CorruptImage(
            f"{where}: map page version {ver}, {n} entries (expected {PAGE_ENTRIES})"
        )
    raw = codec.decode(cdc, data[PAGE_HEAD.size :], cks, PAGE_BYTES, f"{where}: map page")
    if content_key(raw) != want:
        raise ChecksumMismatch(f"{where}: map page content does not match the manifest's xxh3-128")
    return bytearray(raw)


def encode_index(entries: list[tuple[bytes, Loc]]) -> bytes:
    body = b"".join(
        INDEX_ENTRY.pack(k, loc.offset, loc.length, loc.codec, loc.cks) for k, loc in entries
    )
    return INDEX_HEAD.pack(INDEX_MAGIC, VERSION, len(entries), codec.checksum(body)) + body


def decode_index(data: bytes, pack: bytes, where: str) -> list[tuple[bytes, Loc]]:
    if len(data) < INDEX_HEAD.size:
        raise CorruptImage(f"{where}: pack index of {len(data)} bytes is shorter than its header")
    magic, ver, n, cks = INDEX_HEAD.unpack_from(data)
    if magic != INDEX_MAGIC or ver != VERSION:
        raise CorruptImage(f"{where}: bad pack index magic {magic!r} or version {ver}")
    if n > MAX_INDEX_ENTRIES or len(data) != INDEX_HEAD.size + n * INDEX_ENTRY.size:
        raise CorruptImage(
            f"{where}: pack index claims {n} entries in {len(data)} bytes (limit {MAX_INDEX_ENTRIES})"
        )
    body = data[INDEX_HEAD.size :]
    codec.verify(body, cks, f"{where}: pack index")
    out = []
    for i in range(n):
        k, off, ln, cdc, c = INDEX_ENTRY.unpack_from(body, i * INDEX_ENTRY.size)
        out.append((k, Loc(pack, off, ln, cdc, c)))
    return out


# -- the driver --------------------------------------------------------------------------


class RemoteDriver(Driver):
    """One remote image at one manifest; writable opens commit new manifests at flush."""

    name = FORMAT
    aliases = ("s3", "vdisk-remote")
    extensions = ()
    can_create = True
    has_snapshots = True
    remote = True
    compressed_options = ({}, {"compress": "zstd"})

    storage: S3Storage

    def __init__(
        self,
        storage: S3Storage,
        manifest: dict[str, Any],
        *,
        readonly: bool,
        options: dict[str, Any],
        cache: LocalCache | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.storage = storage
        self.client = storage.client
        self.image = storage.name
        self.readonly = readonly
        self.options = options
        self._apply(manifest)
        # what an overlay of another format records of this base: the version opened
        self.storage.identity = f"{FORMAT}\n{self.uuid}\n{self.number}\n".encode()
        self.pack_size = _opt_size(options, "pack_size", DEFAULT_PACK_SIZE, 64 << 10, 64 << 20)
        self.readahead = _opt_size(options, "readahead", DEFAULT_READAHEAD, 0, 64 << 20)
        self.dedup = bool_option("vdisk-s3", "dedup", options.get("dedup", True))
        self.compress = compressor_option("vdisk-s3", options.get("compress", "lz4"))
        workers = _opt_size(options, "workers", 8, 1, 64)
        cache_bytes = options.get("cache_bytes")
        self.cache = cache or LocalCache(
            options.get("cache_dir"),
            None if cache_bytes is None else _opt_size(options, "cache_bytes", 0, 0, 1 << 50),
        )
        self._owns_cache = cache is None
        self._owns_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="vdisk-s3"
        )
        self.pages_lru: LRU[int, bytearray] = LRU(32 << 20)
        self.dirty: dict[int, bytearray] = {}
        # parsed pack indexes, bounded by their total number of entries
        self.pack_idx: LRU[bytes, list[tuple[bytes, Loc]]] = LRU(1 << 18, weigh=len)
        self.changed = False
        self._next_read = -1
        self._from_store = False  # check: verify the store itself, not the local cache
        self._sequential = False
        self._backing_size: int | None = None  # known once the generic layer verified it
        self.stale: str | None = None  # set once another writer has committed past us
        # this session's uncommitted packs
        self._spill: Any = None
        self._spill_id = b""
        self._spill_len = 0
        self._spill_entries: list[tuple[bytes, Loc]] = []
        self._session: dict[bytes, Loc] = {}  # clusters this open stored, by content key
        # packs uploading in the background, and those whose upload failed (kept to retry)
        self._inflight: dict[bytes, tuple[Any, bytes, list[tuple[bytes, Loc]]]] = {}
        self._failed: dict[bytes, tuple[Any, bytes, list[tuple[bytes, Loc]]]] = {}
        self._refs: set[bytes] = set()  # packs clusters were mapped to since the last commit
        self._bucket_index: dict[bytes, Loc] | None = None
        self._lock = threading.Lock()  # guards counters touched by worker threads
        self.counters = {
            "clusters_read_remote": 0,
            "range_gets": 0,
            "readahead_clusters": 0,
            "clusters_stored": 0,
            "clusters_deduplicated": 0,
            "packs_written": 0,
            "commits": 0,
        }

    @property
    def pinned_url(self) -> str:
        """This version of the image, for overlays to record: ``s3://B/NAME@N``."""
        return f"s3://{self.storage.bucket}/{self.image}@{self.number}"

    def _apply(self, m: dict[str, Any]) -> None:
        self.manifest = m
        self.number = m["number"]
        self.size = m["size"]
        self.cluster_size = m["cluster_size"]
        self.pages: list[list[str] | None] = list(m["pages"])
        self.snapshots: list[dict[str, Any]] = list(m["snapshots"])
        b = m.get("backing")
        self.backing = BackingRef(b["path"], b.get("format")) if b else None
        self.uuid = m["uuid"]
        self.storage.measure = self._stored_bytes

    # -- discovery and creation ---------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        return 0  # never a local file: s3:// URLs are dispatched by scheme

    @staticmethod
    def _storage(storage: Storage) -> S3Storage:
        if not isinstance(storage, S3Storage):
            raise UsageError(
                f"{storage.path}: {FORMAT} images live in an object store (s3://BUCKET/NAME)"
            )
        return storage

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> RemoteDriver:
        st = cls._storage(storage)
        reject_unknown_options(FORMAT, options, OPTIONS)
        pin = _opt_size(options, "manifest", 0, 1, 10**10 - 1) if "manifest" in options else st.pin
        numbers = [] if pin is not None and readonly else list_manifests(st.client, st.name)
        if pin is not None:
            if not readonly and (not numbers or pin != numbers[-1]):
                # writing NAME@N means "N and what follows": only while N is the latest
                raise ImageLocked(
                    f"{st.path}: version {pin} is not the latest "
                    f"({numbers[-1] if numbers else 'none'}); only the latest can be written"
                )
            return cls(
                st, load_manifest(st.client, st.name, pin), readonly=readonly, options=options
            )
        if not numbers:
            raise ImageNotFound(f"{st.path}: no such image (no manifest under images/{st.name}/)")
        m = None
        for n in reversed(numbers):
            try:
                m = load_manifest(st.client, st.name, n)
            except (CorruptImage, ImageNotFound) as e:
                if not readonly:
                    raise CorruptImage(
                        f"{e}; the latest manifest {n} is unreadable, refusing to write "
                        "(open read-only to see the last good version)"
                    ) from None
                log.warning("%s: skipping unreadable manifest %d: %s", st.path, n, e)
                continue
            break
        if m is None:
            raise CorruptImage(f"{st.path}: no readable manifest among {len(numbers)}")
        return cls(st, m, readonly=readonly, options=options)

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        st = cls._storage(storage)
        reject_unknown_options(
            FORMAT, options, ("cluster_size", "backing", "backing_driver", *OPTIONS)
        )
        cs = int(options.get("cluster_size") or 65536)
        if cs < MIN_CLUSTER or cs > MAX_CLUSTER or cs & (cs - 1):
            raise UsageError(
                f"{st.path}: cluster size {cs} (a power of two from {MIN_CLUSTER} to {MAX_CLUSTER})"
            )
        _check_size(st.path, size, cs)
        backing = options.get("backing")
        brec = None
        if backing is not None:
            if not is_url(backing.path):
                raise UsageError(
                    f"{st.path}: the backing image of a remote image must be remote too "
                    f"(s3://...), not {backing.path!r}"
                )
            brec = {"path": backing.path, "format": backing.format}
            base = options.get("backing_driver")
            if isinstance(base, RemoteDriver):
                # pinned to the base's current version: later commits to the base (or its
                # garbage collection) never change what this overlay reads
                brec.update(path=base.pinned_url, uuid=base.uuid)
        st.client.ensure_bucket()
        m = {
            "format": FORMAT,
            "version": VERSION,
            "name": st.name,
            "number": 1,
            "parent": 0,
            "uuid": uuid.uuid4().hex,
            "created": time.time(),
            "size": size,
            "cluster_size": cs,
            "pages": [None] * (-(-size // (cs * PAGE_ENTRIES))),
            "snapshots": [],
            "backing": brec,
        }
        key, body = manifest_key(st.name, 1), encode_manifest(m)
        if not st.client.put(key, body, if_none_match=True):
            raise VdiskError(f"{st.path}: already exists (refusing to overwrite)")
        # the commit protocol rests on conditional PUTs: refuse a store that ignores them
        # (the probe writes the same bytes again, so even there nothing changes)
        if st.client.put(key, body, if_none_match=True, adopt=False):
            st.client.delete(key)
            raise UnsupportedFeature(
                f"{st.client.where(key)}: this store ignores 'If-None-Match: *' on PUT, "
                "so two writers could lose updates; vdisk-s3 needs conditional PUTs "
                "(AWS S3, SeaweedFS, MinIO and Ceph RGW releases since 2024 have them)"
            )

    # -- the map ---------------------------------------------------------------------

    def _page(self, pidx: int, *, for_write: bool = False) -> bytearray | None:
        """Map page ``pidx`` (None: every entry is a hole). A page to write is made dirty."""
        page = self.dirty.get(pidx)
        if page is not None:
            return page
        page = self.pages_lru.get(pidx)
        if page is None and self.pages[pidx] is not None:
            pid, want = self.pages[pidx]  # type: ignore[misc]
            key = f"pages/{pid}"
            data = self.client.get(key, limit=MAX_PAGE_OBJECT)
            if data is None:
                raise CorruptImage(
                    f"{self.storage.path}: map page {pidx} ({self.client.where(key)}) is missing"
                )
            page = decode_page(data, bytes.fromhex(want), self.client.where(key))
            self.pages_lru.put(pidx, page)
        if for_write:
            page = bytearray(page) if page is not None else bytearray(PAGE_BYTES)
            self.pages_lru.pop(pidx)
            self.dirty[pidx] = page
            self.changed = True
            if len(self.dirty) > MAX_DIRTY_PAGES:
                self._upload_pages(keep=pidx)
        return page

    def _entry(self, idx: int) -> bytes:
        page = self._page(idx // PAGE_ENTRIES)
        if page is None:
            return NULL_ENTRY
        off = (idx % PAGE_ENTRIES) * ENTRY.size
        return bytes(page[off : off + ENTRY.size])

    def _set_entry(self, idx: int, entry: bytes) -> None:
        page = self._page(idx // PAGE_ENTRIES, for_write=True)
        assert page is not None
        off = (idx % PAGE_ENTRIES) * ENTRY.size
        page[off : off + ENTRY.size] = entry

    def _parse(self, idx: int, entry: bytes) -> tuple[int, Loc | None, bytes]:
        """(flags, location, content key) of an entry, validated."""
        pack, off, ln, cdc, flags, _r, cks, key = ENTRY.unpack(entry)
        if flags & ~(FLAG_DATA | FLAG_ZERO) or flags == FLAG_DATA | FLAG_ZERO:
            raise CorruptImage(f"{self.storage.path}: cluster {idx}: bad entry flags {flags:#x}")
        if flags & FLAG_DATA:
            if ln == 0 or ln > self.cluster_size + 1024 or cdc not in codec.CODEC_NAMES:
                raise CorruptImage(
                    f"{self.storage.path}: cluster {idx}: stored length {ln} / codec {cdc} "
                    f"invalid (cluster size {self.cluster_size})"
                )
            return flags, Loc(pack, off, ln, cdc, cks), key
        return flags, None, key

    # -- reading ---------------------------------------------------------------------

    def _clen(self, idx: int) -> int:
        return min(self.cluster_size, self.size - idx * self.cluster_size)

    def _decoded(self, first: int, last: int, offset: int, length: int) -> list[bytes]:
        """Clusters [first, last] of this layer, decoded and verified (holes as zeros)."""
        want: dict[int, tuple[Loc, bytes]] = {}
        for idx in range(first, last + 1):
            _flags, loc, key = self._parse(idx, self._entry(idx))
            if loc is not None:
                want[idx] = (loc, key)
        # full read-ahead into the cache tier for sequential readers; a random reader gets
        # a quarter (neighbours in a pack were usually written together, but a 1 MiB GET
        # per 4 KiB miss costs more latency than it saves)
        self._sequential = offset == self._next_read
        self._next_read = offset + length
        stored = self._fetch(want)
        out = []
        for idx in range(first, last + 1):
            if idx not in want:
                out.append(codec.zeros(self.cluster_size))
                continue
            loc, key = want[idx]
            where = f"{self.storage.path}: cluster {idx} (pack {loc.pack.hex()} at {loc.offset})"
            raw = codec.decode(loc.codec, stored[idx], loc.cks, self.cluster_size, where)
            if content_key(raw) != key:
                raise ChecksumMismatch(f"{where}: content does not match its xxh3-128 key")
            out.append(raw)
        return out

    def read(self, offset: int, length: int) -> bytes:
        cs = self.cluster_size
        first, last = offset // cs, (offset + length - 1) // cs
        clusters = self._decoded(first, last, offset, length)
        if len(clusters) == 1:
            within = offset - first * cs
            return clusters[0][within : within + length]
        out = bytearray()
        for idx, within, n in cluster_spans(offset, length, cs):
            out += memoryview(clusters[idx - first])[within : within + n]
        return bytes(out)

    def read_clusters(self, first: int, count: int) -> list[bytes]:
        """The decoded buffers themselves, for the cache (no join and split per miss)."""
        cs = self.cluster_size
        last = min(first + count, -(-self.size // cs)) - 1
        out = self._decoded(first, last, first * cs, (last + 1 - first) * cs)
        tail = self.size - last * cs
        if out and tail < cs:
            out[-1] = out[-1][:tail]
        return out

    def _fetch(self, want: dict[int, tuple[Loc, bytes]]) -> dict[int, bytes]:
        """Stored bytes of the given clusters: spill file, local cache, then the store
        (range GETs coalesced per pack, in parallel, with read-ahead into the cache)."""
        got: dict[int, bytes] = {}
        remote: dict[bytes, list[tuple[int, Loc, bytes]]] = {}
        for idx, (loc, key) in want.items():
            if loc.pack == self._spill_id and self._spill is not None:
                self._spill.seek(loc.offset)
                got[idx] = self._spill.read(loc.length)
                continue
            pending = self._inflight.get(loc.pack) or self._failed.get(loc.pack)
            if pending is not None:
                got[idx] = pending[1][loc.offset : loc.offset + loc.length]
                continue
            data = (
                None
                if self._from_store
                else self.cache.get(loc.pack, loc.offset, loc.length, loc.cks)
            )
            if data is not None:
                got[idx] = data
                continue
            remote.setdefault(loc.pack, []).append((idx, loc, key))
        if not remote:
            return got
        jobs = []
        for pack, items in remote.items():
            items.sort(key=lambda t: t[1].offset)
            run: list[tuple[int, Loc, bytes]] = []
            for it in items:
                if run:
                    start = run[0][1].offset
                    end = run[-1][1].offset + run[-1][1].length
                    if (
                        it[1].offset - end > COALESCE_GAP
                        or it[1].offset + it[1].length - start > MAX_RANGE
                    ):
                        jobs.append((pack, run, False))
                        run = []
                run.append(it)
            jobs.append((pack, run, True))  # only the last run of a pack reads ahead
        results = (
            [self._get_run(*jobs[0])]
            if len(jobs) == 1
            else list(self.executor.map(lambda j: self._get_run(*j), jobs))
        )
        for r in results:
            got.update(r)
        return got

    def _get_run(
        self, pack: bytes, run: list[tuple[int, Loc, bytes]], read_ahead: bool = False
    ) -> dict[int, bytes]:
        """One range GET covering ``run`` (plus read-ahead); verified pieces go to the cache."""
        start = run[0][1].offset
        end = run[-1][1].offset + run[-1][1].length
        extra: list[tuple[bytes, Loc]] = []
        ahead = 0
        if read_ahead:
            ahead = self.readahead if self._sequential else self.readahead // 4
        if ahead and self.cache.max_bytes > 0:
            index = self._pack_index(pack)
            if index:
                limit = end + ahead
                for k, loc in index:
                    if loc.offset >= end and loc.offset + loc.length <= limit:
                        extra.append((k, loc))
                if extra:
                    end = max(loc.offset + loc.length for _, loc in extra)
        key = f"packs/{pack.hex()}"
        data = self.client.get(key, start, end - start)
        if data is None:
            raise CorruptImage(
                f"{self.storage.path}: {self.client.where(key)} is missing "
                "(deleted by gc while this old version was open?)"
            )
        out = {}
        for idx, loc, _key in run:
            piece = data[loc.offset - start : loc.offset - start + loc.length]
            codec.verify(
                piece,
                loc.cks,
                f"{self.storage.path}: cluster {idx} in {self.client.where(key)} at {loc.offset}",
            )
            out[idx] = piece
        pieces = [(loc.offset, loc.length, loc.cks) for _i, loc, _k in run]
        pieces += [(loc.offset, loc.length, loc.cks) for _k, loc in extra]
        self.cache.put_range(pack, start, data, pieces)
        with self._lock:
            self.counters["range_gets"] += 1
            self.counters["clusters_read_remote"] += len(run)
            self.counters["readahead_clusters"] += len(extra)
        return out

    def _pack_index(self, pack: bytes) -> list[tuple[bytes, Loc]] | None:
        with self._lock:
            got = self.pack_idx.get(pack)
        if got is not None:
            return got
        key = f"index/{pack.hex()}"
        local = self.cache.get_blob(pack.hex())  # indexes are immutable: kept locally too
        if local is not None:
            try:
                entries = decode_index(local, pack, key)
            except CorruptImage:
                self.cache.drop_blob(pack.hex())
            else:
                with self._lock:
                    self.pack_idx.put(pack, entries)
                return entries
        data = self.client.get(key, limit=MAX_INDEX_OBJECT)
        if data is None:
            return None  # condemned by gc, or a pack of a crashed commit: no read-ahead
        try:
            entries = decode_index(data, pack, self.client.where(key))
        except CorruptImage as e:
            log.warning("%s", e)
            return None
        self.cache.put_blob(pack.hex(), data)
        with self._lock:
            self.pack_idx.put(pack, entries)
        return entries

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out = []
        for idx, within, n in cluster_spans(offset, length, self.cluster_size):
            flags, _loc, _k = self._parse(idx, self._entry(idx))
            kind = Kind.DATA if flags & FLAG_DATA else Kind.ZERO if flags & FLAG_ZERO else Kind.HOLE
            out.append(Extent(kind, idx * self.cluster_size + within, n))
        return merge_extents(out)

    # -- writing ---------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyImage(f"{self.storage.path}: opened read-only")
        if self.stale:
            raise ImageLocked(self.stale)

    def write(self, offset: int, data: bytes) -> None:
        self.write_many([(offset, data)])

    def write_many(self, writes: list[tuple[int, bytes]]) -> None:
        self._check_writable()
        clusters: dict[int, bytes | bytearray] = {}  # later pieces patch earlier ones
        cs = self.cluster_size
        for offset, data in writes:
            mv = memoryview(data)
            pos = 0
            for idx, within, n in cluster_spans(offset, len(mv), cs):
                piece = mv[pos : pos + n]
                pos += n
                if n == self._clen(idx):
                    clusters[idx] = bytes(piece)
                    continue
                cl = clusters.get(idx)  # partial cluster: read-modify-write
                if not isinstance(cl, bytearray):
                    cl = bytearray(cl if cl is not None else self.read(idx * cs, self._clen(idx)))
                    clusters[idx] = cl
                cl[within : within + n] = piece
        whole = [(idx, bytes(cl)) for idx, cl in clusters.items()]
        prepared = (
            list(self.executor.map(self._prepare, whole))
            if len(whole) > 2
            else [self._prepare(w) for w in whole]
        )
        for idx, raw, key, enc in prepared:
            self._store(idx, raw, key, enc)

    def _prepare(
        self, item: tuple[int, bytes]
    ) -> tuple[int, bytes, bytes | None, tuple[int, bytes, int] | None]:
        """(idx, raw, content key, encoded) of one cluster; zeros need neither (in a thread)."""
        idx, raw = item
        if len(raw) < self.cluster_size:  # the short last cluster is stored padded
            raw = raw + bytes(self.cluster_size - len(raw))
        if codec.is_zero(raw):
            return idx, raw, None, None
        key = content_key(raw)
        if self._session.get(key) is not None:
            return idx, raw, key, None
        return idx, raw, key, codec.encode(raw, compress=self.compress)

    def _store(
        self, idx: int, raw: bytes, key: bytes | None, enc: tuple[int, bytes, int] | None
    ) -> None:
        if key is None:
            self._set_entry(idx, ZERO_ENTRY)
            return
        loc = self._session.get(key)
        if loc is None and self.dedup:
            loc = self._dedup_lookup(key)
        if loc is not None:
            self.counters["clusters_deduplicated"] += 1
        else:
            if enc is None:
                enc = codec.encode(raw, compress=self.compress)
            loc = self._append(key, *enc)
        self._refs.add(loc.pack)  # checked at commit
        self._set_entry(
            idx, ENTRY.pack(loc.pack, loc.offset, loc.length, loc.codec, FLAG_DATA, 0, loc.cks, key)
        )

    def _append(self, key: bytes, cdc: int, stored: bytes, cks: int) -> Loc:
        """Add a stored cluster to the pack being filled (a local spill file)."""
        if self._spill is None:
            # closed by _seal or close; lives across calls, so no context manager
            self._spill = tempfile.TemporaryFile(prefix="vdisk-s3-pack-")  # noqa: SIM115
            self._spill_id = uuid.uuid4().bytes
            self._spill_len = 0
            self._spill_entries = []
        loc = Loc(self._spill_id, self._spill_len, len(stored), cdc, cks)
        self._spill.seek(self._spill_len)
        self._spill.write(stored)
        self._spill_len += len(stored)
        self._spill_entries.append((key, loc))
        if len(self._session) >= MAX_SESSION:
            self._session.clear()  # memory bound: older clusters are no longer matched
        self._session[key] = loc
        self.counters["clusters_stored"] += 1
        if self._spill_len >= self.pack_size or len(self._spill_entries) >= MAX_INDEX_ENTRIES:
            self._seal()
        return loc

    def _seal(self) -> None:
        """Upload the pack being filled and its index; it stays unreferenced until a commit."""
        if self._spill is None:
            return
        self._spill.seek(0)
        data = self._spill.read(self._spill_len)
        pack, entries = self._spill_id, list(self._spill_entries)
        # the writer's own reads stay local: the pack goes to the cache tier now
        pieces = [(loc.offset, loc.length, loc.cks) for _k, loc in entries]
        self.cache.put_range(pack, 0, data, pieces)
        with self._lock:
            self.pack_idx.put(pack, entries)
        self._spill.close()
        self._spill = None
        self._spill_id = b""
        # upload in the background (bounded); the commit waits for every upload first
        self._submit(pack, data, entries)
        while len(self._inflight) > MAX_INFLIGHT:
            self._wait_oldest()

    def _upload_pack(self, pack: bytes, data: bytes, entries: list[tuple[bytes, Loc]]) -> None:
        pid = pack.hex()
        self.client.put(f"packs/{pid}", data, if_none_match=True)
        self.client.put(f"index/{pid}", encode_index(entries), if_none_match=True)
        with self._lock:
            self.counters["packs_written"] += 1

    def _submit(self, pack: bytes, data: bytes, entries: list[tuple[bytes, Loc]]) -> None:
        fut = self.executor.submit(self._upload_pack, pack, data, entries)
        self._inflight[pack] = (fut, data, entries)

    def _wait_oldest(self) -> None:
        pack = next(iter(self._inflight))
        fut, data, entries = self._inflight.pop(pack)
        try:
            fut.result()
        except BaseException:
            self._failed[pack] = (None, data, entries)  # uploaded again by the next commit
            raise

    def _drain(self) -> None:
        """Wait for every pack upload (failed ones are tried again first); the first
        failure is raised after all have ended."""
        for pack, (_none, data, entries) in list(self._failed.items()):
            del self._failed[pack]
            self._submit(pack, data, entries)
        err: BaseException | None = None
        while self._inflight:
            try:
                self._wait_oldest()
            except BaseException as e:
                err = err or e
        if err is not None:
            raise err

    def _dedup_lookup(self, key: bytes) -> Loc | None:
        if self._bucket_index is None:
            self._bucket_index = self._load_bucket_index()
        return self._bucket_index.get(key)

    def _load_bucket_index(self) -> dict[bytes, Loc]:
        """Every pack index of the bucket, for dedup (bounded: past the limit, no dedup)."""
        out: dict[bytes, Loc] = {}
        keys = [o.key for o in self.client.list("index/")]
        packs = [k.split("/", 1)[1] for k in keys if _HEX32.match(k.split("/", 1)[1])]
        for entries in self.executor.map(lambda p: self._pack_index(bytes.fromhex(p)) or [], packs):
            for k, loc in entries:
                out.setdefault(k, loc)
            if len(out) > MAX_DEDUP_ENTRIES:
                log.warning(
                    "%s: bucket holds over %d clusters: deduplicating within this image only",
                    self.storage.path,
                    MAX_DEDUP_ENTRIES,
                )
                return {}
        return out

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_writable()
        cs = self.cluster_size
        for idx, within, n in cluster_spans(offset, length, cs):
            if n == self._clen(idx):
                # without a backing image a hole reads as zeros too, and is cheaper to keep
                self._set_entry(idx, NULL_ENTRY if unmap and self.backing is None else ZERO_ENTRY)
            else:
                self.write_many([(idx * cs + within, bytes(n))])

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def truncate(self, size: int) -> None:
        self._check_writable()
        _check_size(self.storage.path, size, self.cluster_size)
        cs = self.cluster_size
        if size < self.size and size % cs and self.backing is not None:
            flags, _loc, _key = self._parse(size // cs, self._entry(size // cs))
            if not flags:  # its bytes are the backing image's: this layer cannot cut them
                raise UnsupportedFeature(
                    f"{self.storage.path}: shrinking an overlay to {size} bytes would cut "
                    f"cluster {size // cs}, which only the backing image holds; resize to a "
                    f"multiple of the cluster size ({cs})"
                )
        if size < self.size:
            # forget clusters past the new end so growing again shows zeros
            first = -(-size // cs)
            last = -(-self.size // cs)
            for idx in range(first, min(last, -(-first // PAGE_ENTRIES) * PAGE_ENTRIES)):
                self._set_entry(idx, NULL_ENTRY)
            if size % cs:  # the new last cluster keeps only its bytes below the new end
                idx = size // cs
                keep = self.read(idx * cs, size - idx * cs)
                self.size = size
                self.write_many([(idx * cs, keep)])
        npages = -(-size // (cs * PAGE_ENTRIES))
        for p in list(self.dirty):
            if p >= npages:
                del self.dirty[p]
        for p in range(npages, len(self.pages)):
            self.pages_lru.pop(p)
        self.pages = self.pages[:npages] + [None] * (npages - len(self.pages))
        old, self.size = self.size, size
        if size > old and self.backing is not None:
            # grown space reads as zeros, not as whatever the backing image has there
            hi = min(size, self._backing_size if self._backing_size is not None else size)
            for idx in range(-(-old // cs), -(-hi // cs)):
                self._set_entry(idx, ZERO_ENTRY)
        self.changed = True

    # -- commits ---------------------------------------------------------------------

    def _upload_pages(self, keep: int | None = None) -> None:
        """Seal the pack, then store dirty map pages as objects (still uncommitted)."""
        self._seal()
        self._drain()
        todo = [p for p in self.dirty if p != keep]

        def up(p: int) -> tuple[int, list[str] | None]:
            raw = bytes(self.dirty[p])
            if raw == codec.zeros(PAGE_BYTES):
                return p, None
            pid = uuid.uuid4().hex
            self.client.put(f"pages/{pid}", encode_page(raw), if_none_match=True)
            return p, [pid, content_key(raw).hex()]

        for p, ref in self.executor.map(up, todo):
            self.pages[p] = ref
            page = self.dirty.pop(p)
            if ref is not None:
                self.pages_lru.put(p, page)

    def _mapped_to(self, pack: bytes) -> list[int]:
        """Clusters whose entry points into ``pack`` (scans the map: only for rescues)."""
        out = []
        for pidx in range(len(self.pages)):
            page = self._page(pidx)
            if page is None or pack not in page:
                continue
            for i in range(PAGE_ENTRIES):
                e = ENTRY.unpack_from(page, i * ENTRY.size)
                if e[0] == pack and e[4] & FLAG_DATA:
                    out.append(pidx * PAGE_ENTRIES + i)
        return out

    def push(self) -> None:
        """Upload everything written so far (packs, not the map) without committing: the
        background half of a flush, for callers that want the store to have the bytes."""
        self._seal()
        self._drain()

    def _rescue(self) -> None:
        """Every pack a cluster was mapped to since the last commit (deduplicated against
        another image's pack, or our own pack uploaded long ago): if gc has condemned it
        (its index is gone), store those clusters again in a new pack, so a commit never
        references a pack that gc is about to delete. One HEAD per pack, in parallel."""
        self._seal()
        self._drain()
        packs = list(self._refs)
        alive = list(
            self.executor.map(lambda p: self.client.head(f"index/{p.hex()}") is not None, packs)
        )
        for pack, ok in zip(packs, alive):
            if ok:
                continue
            log.info(
                "%s: pack %s was condemned by gc: storing its clusters again",
                self.storage.path,
                pack.hex(),
            )
            self._session = {k: v for k, v in self._session.items() if v.pack != pack}
            if self._bucket_index is not None:
                for k in [k for k, loc in self._bucket_index.items() if loc.pack == pack]:
                    del self._bucket_index[k]
            for idx in self._mapped_to(pack):
                _flags, loc, key = self._parse(idx, self._entry(idx))
                assert loc is not None
                stored = self._get_run(pack, [(idx, loc, key)])[idx]
                new = self._append(key, loc.codec, stored, loc.cks)
                self._set_entry(
                    idx,
                    ENTRY.pack(
                        new.pack, new.offset, new.length, new.codec, FLAG_DATA, 0, new.cks, key
                    ),
                )
        self._refs.clear()

    def flush(self) -> None:
        if self.readonly or not self.changed:
            return
        self._check_writable()
        self._commit()

    def _commit(self, snapshots: list[dict[str, Any]] | None = None) -> None:
        self._rescue()
        self._upload_pages()
        number = self.number + 1
        m = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.image,
            "number": number,
            "parent": self.number,
            "uuid": self.uuid,
            "created": time.time(),
            "size": self.size,
            "cluster_size": self.cluster_size,
            "pages": self.pages,
            "snapshots": self.snapshots if snapshots is None else snapshots,
            "backing": self.manifest.get("backing"),
        }
        if not self.client.put(
            manifest_key(self.image, number), encode_manifest(m), if_none_match=True
        ):
            self.stale = (
                f"{self.storage.path}: another writer committed manifest {number} first; "
                f"the changes of this open since manifest {self.number} were not committed "
                "(the image is in use on another host: reopen to see its version)"
            )
            raise ImageLocked(self.stale)
        self._apply(m)
        self.changed = False
        self.counters["commits"] += 1

    # -- snapshots -------------------------------------------------------------------

    def list_snapshots(self) -> list[SnapshotInfo]:
        return [
            SnapshotInfo(
                str(s["id"]), s["name"], s["created"], s["size"], extra={"manifest": s["manifest"]}
            )
            for s in self.snapshots
        ]

    def _find(self, name: str) -> dict[str, Any]:
        for s in self.snapshots:
            if s["name"] == name or str(s["id"]) == name:
                return s
        raise UsageError(f"{self.storage.path}: no snapshot {name!r}")

    def create_snapshot(self, name: str) -> SnapshotInfo:
        self._check_writable()
        if not name or any(s["name"] == name for s in self.snapshots):
            raise UsageError(f"{self.storage.path}: snapshot name {name!r} is empty or taken")
        if len(self.snapshots) >= MAX_SNAPSHOTS:
            raise UsageError(f"{self.storage.path}: {MAX_SNAPSHOTS} snapshots already")
        rec = {
            "id": max((s["id"] for s in self.snapshots), default=0) + 1,
            "name": name,
            "created": time.time(),
            "size": self.size,
            "manifest": self.number + 1,  # the state committed right now is the snapshot
        }
        self._commit([*self.snapshots, rec])
        return self.list_snapshots()[-1]

    def revert_snapshot(self, name: str) -> None:
        self._check_writable()
        s = self._find(name)
        m = load_manifest(self.client, self.image, s["manifest"])
        self.dirty.clear()
        self.pages_lru.clear()
        self.pages = list(m["pages"])
        self.size = m["size"]
        self.changed = True
        self._commit()

    def delete_snapshot(self, name: str) -> None:
        self._check_writable()
        s = self._find(name)
        self.changed = True
        self._commit([x for x in self.snapshots if x is not s])

    def open_snapshot(self, name: str) -> Driver:
        s = self._find(name)
        m = load_manifest(self.client, self.image, s["manifest"])
        st = S3Storage(f"{self.storage.path}", readonly=True)
        return RemoteDriver(
            st, m, readonly=True, options=self.options, cache=self.cache, executor=self.executor
        )

    # -- backing, information, checks ------------------------------------------------

    def verify_backing(self, backing: Driver) -> None:
        self._backing_size = backing.size
        b = self.manifest.get("backing") or {}
        want = b.get("uuid")
        if want and getattr(backing, "uuid", None) != want:
            raise BackingMismatch(
                f"{self.storage.path}: backing image {b.get('path')} has uuid "
                f"{getattr(backing, 'uuid', None)}, this overlay was made on {want}"
            )

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        self._check_writable()
        if ref is not None and not is_url(ref.path):
            raise UsageError(f"{self.storage.path}: the backing image must be remote (s3://...)")
        rec = None
        if ref is not None:
            rec = {"path": ref.path, "format": ref.format}
            if isinstance(backing, RemoteDriver):
                rec.update(path=backing.pinned_url, uuid=backing.uuid)
        self.manifest = dict(self.manifest, backing=rec)
        self.backing = ref
        self.changed = True

    def _referenced(self, pages: list[list[str] | None]) -> tuple[set[bytes], int, int]:
        """Packs referenced by a page list, data clusters, stored bytes (loads the pages)."""
        packs: set[bytes] = set()
        clusters = stored = 0
        for ref in pages:
            if ref is None:
                continue
            data = self.client.get(f"pages/{ref[0]}", limit=MAX_PAGE_OBJECT)
            if data is None:
                raise CorruptImage(f"{self.storage.path}: map page pages/{ref[0]} is missing")
            page = decode_page(data, bytes.fromhex(ref[1]), f"pages/{ref[0]}")
            for i in range(PAGE_ENTRIES):
                e = ENTRY.unpack_from(page, i * ENTRY.size)
                if e[4] & FLAG_DATA:
                    packs.add(e[0])
                    clusters += 1
                    stored += e[2]
        return packs, clusters, stored

    def _stored_bytes(self) -> int:
        """Bytes stored for this version's clusters (shared ones counted once); 0 for
        images of more than 4096 map pages, where this would load too much."""
        if len(self.pages) > 4096:
            return 0
        seen: set[tuple[bytes, int]] = set()
        total = 0
        for pidx in range(len(self.pages)):
            page = self._page(pidx)
            if page is None:
                continue
            for i in range(PAGE_ENTRIES):
                e = ENTRY.unpack_from(page, i * ENTRY.size)
                if e[4] & FLAG_DATA and (e[0], e[1]) not in seen:
                    seen.add((e[0], e[1]))
                    total += e[2]
        return total

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bucket": self.storage.bucket,
            "image": self.image,
            "endpoint": self.client.endpoint,
            "manifest": self.number,
            "uuid": self.uuid,
            "map-pages": sum(1 for p in self.pages if p is not None),
            "uncommitted": self.changed,
        }
        return out

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "pages": self.pages_lru.stats(),
            "dirty_pages": len(self.dirty),
            "local_cache": self.cache.stats(),
            "s3": dict(self.client.counters),
        }

    def _check(self, repair: bool) -> CheckReport:
        rep = CheckReport()
        if repair:
            rep.info["repair"] = "nothing to repair: committed objects are never rewritten"
        versions = [("current", self.pages, self.size)]
        for s in self.snapshots:
            try:
                m = load_manifest(self.client, self.image, s["manifest"])
                versions.append((f"snapshot {s['name']!r}", m["pages"], m["size"]))
            except VdiskError as e:
                rep.corruptions.append(f"snapshot {s['name']!r}: {e}")
        seen: set[tuple[bytes, int]] = set()
        clusters = 0
        for label, pages, size in versions:
            for pidx, ref in enumerate(pages):
                if ref is None:
                    continue
                try:
                    data = self.client.get(f"pages/{ref[0]}", limit=MAX_PAGE_OBJECT)
                    if data is None:
                        raise CorruptImage(f"map page pages/{ref[0]} is missing")
                    page = decode_page(data, bytes.fromhex(ref[1]), f"pages/{ref[0]}")
                except VdiskError as e:
                    rep.corruptions.append(f"{label}: page {pidx}: {e}")
                    continue
                want: dict[int, tuple[Loc, bytes]] = {}
                for i in range(PAGE_ENTRIES):
                    idx = pidx * PAGE_ENTRIES + i
                    raw_entry = bytes(page[i * ENTRY.size : (i + 1) * ENTRY.size])
                    try:
                        _flags, loc, key = self._parse(idx, raw_entry)
                    except CorruptImage as err:
                        rep.corruptions.append(f"{label}: {err}")
                        continue
                    if loc is None:
                        continue
                    if idx * self.cluster_size >= size:
                        rep.corruptions.append(f"{label}: cluster {idx} mapped past the end")
                        continue
                    if (loc.pack, loc.offset) in seen:
                        continue
                    seen.add((loc.pack, loc.offset))
                    want[idx] = (loc, key)
                try:  # one batch per page: range GETs coalesced per pack
                    batch = self._fetch(want)
                except VdiskError:
                    batch = {}  # some cluster is bad: fetch one by one to name it
                for idx, (loc, key) in want.items():
                    clusters += 1
                    try:
                        stored = batch.get(idx) or self._fetch({idx: (loc, key)})[idx]
                        raw = codec.decode(
                            loc.codec, stored, loc.cks, self.cluster_size, f"cluster {idx}"
                        )
                        if content_key(raw) != key:
                            raise ChecksumMismatch(f"cluster {idx}: content does not match its key")
                    except (VdiskError, StorageError) as err:
                        rep.corruptions.append(f"{label}: {err}")
        rep.info["clusters-checked"] = clusters
        return rep

    def check(self, *, repair: bool = False) -> CheckReport:
        """Every map page of the image and its snapshots, every referenced pack, and every
        stored cluster read back from the store (not the local cache) and verified."""
        self._from_store = True
        try:
            return self._check(repair)
        finally:
            self._from_store = False

    def close(self) -> None:
        try:
            self._drain()
        except VdiskError as e:  # uncommitted work only: what was committed is intact
            log.warning("%s: %s", self.storage.path, e)
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._owns_executor:
            self.executor.shutdown(wait=True)
        if self._owns_cache:
            self.cache.close()


DRIVER = RemoteDriver


# -- garbage collection ------------------------------------------------------------------


@dataclass
class GCReport:
    images: int = 0
    live_manifests: int = 0
    live_packs: int = 0
    condemned: int = 0
    deleted_packs: int = 0
    deleted_pages: int = 0
    deleted_manifests: int = 0
    deleted_bytes: int = 0
    kept_young: int = 0


def gc(url: str, *, grace: float = 3600.0, dry_run: bool = False) -> GCReport:
    """Delete what no live manifest references, safely while other hosts write.

    Live: each image's latest manifest, the manifests its snapshots name, the base
    versions that overlays in the bucket are pinned to (``s3://B/BASE@N``), and every
    manifest younger than ``grace``. Unreferenced packs are deleted in two runs: the first
    condemns one (deletes its dedup index and writes ``gc/condemned/<id>``; writers then
    stop deduplicating against it and re-store clusters they had matched to it before
    committing), a run once the marker is older than ``grace`` deletes it. Objects younger
    than ``grace`` are never touched: they may belong to a commit in progress. Marking
    that cannot complete (a page missing or corrupt) deletes nothing."""
    bucket, _name = parse_url(url, need_name=False)
    client = S3Client(bucket)
    now = time.time()
    rep = GCReport()
    manifests: dict[str, list[tuple[int, float]]] = {}
    for o in client.list("images/"):
        mm = _MANIFEST_KEY.match(o.key)
        if mm:
            manifests.setdefault(mm.group(1), []).append((int(mm.group(2)), o.mtime))
    live_pages: set[str] = set()
    live: set[tuple[str, int]] = set()
    todo: list[tuple[str, int]] = []
    for image, nums in manifests.items():
        rep.images += 1
        nums.sort()
        todo.append((image, nums[-1][0]))  # unreadable latest: stop below, delete nothing
        todo.extend((image, n) for n, t in nums if now - t < grace)
    while todo:  # the live set: latest, snapshots, pinned bases of overlays, young ones
        image, n = todo.pop()
        if (image, n) in live:
            continue
        if not any(n == x for x, _t in manifests.get(image, [])):
            raise CorruptImage(
                f"{client.where(manifest_key(image, n))}: a live manifest is missing "
                "(named by a snapshot or an overlay); nothing deleted"
            )
        m = load_manifest(client, image, n)
        live.add((image, n))
        todo.extend((image, sn["manifest"]) for sn in m["snapshots"])
        b = m.get("backing")
        if b and is_url(b["path"]):
            bb, bname = parse_url(b["path"])
            pin = split_pin(b["path"])[1]
            if bb == bucket and pin is not None:
                todo.append((bname, pin))
        for ref in m["pages"]:
            if ref is not None:
                live_pages.add(ref[0] + ref[1])
    deletable = [
        manifest_key(image, n)
        for image, nums in manifests.items()
        for n, _t in nums
        if (image, n) not in live
    ]
    rep.live_manifests = len(live)
    live_packs: set[str] = set()
    for ref in live_pages:
        pid, want = ref[:32], ref[32:]
        data = client.get(f"pages/{pid}", limit=MAX_PAGE_OBJECT)
        if data is None:
            raise CorruptImage(
                f"{client.where('pages/' + pid)}: a live map page is missing; nothing deleted"
            )
        page = decode_page(data, bytes.fromhex(want), client.where(f"pages/{pid}"))
        for i in range(PAGE_ENTRIES):
            e = ENTRY.unpack_from(page, i * ENTRY.size)
            if e[4] & FLAG_DATA:
                live_packs.add(e[0].hex())
    rep.live_packs = len(live_packs)
    live_page_ids = {r[:32] for r in live_pages}
    condemned = {o.key.rsplit("/", 1)[1]: o.mtime for o in client.list("gc/condemned/")}
    indexes = {o.key.rsplit("/", 1)[1] for o in client.list("index/")}

    def delete(key: str, size: int = 0) -> None:
        if not dry_run:
            client.delete(key)
        rep.deleted_bytes += size

    for o in client.list("packs/"):
        pid = o.key.rsplit("/", 1)[1]
        if pid in live_packs:
            if pid in condemned:  # referenced again (a commit raced the condemnation)
                delete(f"gc/condemned/{pid}")
            continue
        if now - o.mtime < grace:
            rep.kept_young += 1
            continue
        if pid in condemned:
            if now - condemned[pid] >= grace:
                delete(o.key, o.size)
                delete(f"gc/condemned/{pid}")
                if pid in indexes:
                    delete(f"index/{pid}")
                rep.deleted_packs += 1
            continue
        if not dry_run:
            client.delete(f"index/{pid}")
            client.put(f"gc/condemned/{pid}", b"", if_none_match=True)
        rep.condemned += 1
    for o in client.list("pages/"):
        pid = o.key.rsplit("/", 1)[1]
        if pid not in live_page_ids and now - o.mtime >= grace:
            delete(o.key, o.size)
            rep.deleted_pages += 1
    for key in deletable:
        delete(key)
        rep.deleted_manifests += 1
    return rep
