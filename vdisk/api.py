"""The Python API: open, create and clone images; the :class:`Disk` every front end holds.

This is the generic layer of DESIGN.md. What is common to all formats lives here once:
bounds checks, the backing chain (fall-through reads, recorded formats, identity checks,
loop detection), the cluster cache in front of the driver, the image lock, thread safety,
the periodic commit, snapshots as read-only views.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from vdisk import formats
from vdisk.cache.cluster import ClusterCache
from vdisk.errors import (
    BackingMismatch,
    ImageNotFound,
    InvalidArgument,
    ReadOnlyImage,
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
    merge_extents,
)
from vdisk.storage import Storage, open_storage

log = logging.getLogger("vdisk")

DEFAULT_CACHE_MB = 64
DEFAULT_COMMIT_INTERVAL = 5.0
MAX_CHAIN_DEPTH = 256
PROBE_BYTES = 65536

Progress = Callable[[int, int], None]  # (done, total)


def parse_size(text: str | int) -> int:
    """'20G', '512M', '4k', '1T', '1048576' -> bytes (binary units, as qemu-img)."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"invalid size {text}: must not be negative")
        return text
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
    if s and s[-1] in units:
        mult = units[s[-1]]
        s = s[:-1]
    try:
        value = float(s) if "." in s else int(s)
    except ValueError:
        raise UsageError(f"invalid size {text!r} (expected e.g. 20G, 512M, 4096)") from None
    n = int(value * mult)
    if n < 0 or value != value:
        raise UsageError(f"invalid size {text!r}: must not be negative")
    return n


def format_size(n: int) -> str:
    for unit, div in (
        ("EiB", 1 << 60),
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ):
        if n >= div:
            v = n / div
            return f"{v:.3g} {unit}" if v != int(v) else f"{int(v)} {unit}"
    return f"{n} B"


# -- opening layers and chains ---------------------------------------------------------


def _probe_format(storage: Storage) -> type[Driver]:
    head = storage.pread(0, PROBE_BYTES)
    size = storage.size()
    tail = storage.pread(size - 512, 512) if size >= 1024 else b""
    return formats.probe(head, size, storage.path, tail)


def _is_url(path: str) -> bool:
    return "://" in path


def _real(path: str) -> str:
    """A path's identity for loop detection; URLs are their own identity."""
    return path if _is_url(path) else os.path.realpath(path)


def _format_for(st: Storage, format: str | None) -> type[Driver]:
    """The driver: as named, else probed; a store that is not a byte array (s3://) says
    which format it holds, and "vdisk" there means the native format's object-store layout."""
    native = getattr(st, "native_format", None)
    if native and (format is None or format == "vdisk"):
        return formats.get(native)
    return formats.get(format) if format else _probe_format(st)


def _open_driver(
    path: str,
    *,
    format: str | None,
    readonly: bool,
    force_share: bool,
    options: dict[str, Any] | None,
    storage: Storage | None = None,
) -> Driver:
    st = storage or open_storage(path, readonly=readonly)
    try:
        if not (readonly and force_share):
            st.lock(exclusive=not readonly)
        cls = _format_for(st, format)
        if cls.name == "raw" and format is not None:
            _warn_if_header(st)
        return cls.open(st, readonly=readonly, options=dict(options or {}))
    except BaseException:
        st.close()
        raise


def _warn_if_header(st: Storage) -> None:
    """A disk opened as raw (as asked or recorded) whose content starts like another
    format's header is never reinterpreted, but the user hears about it: it is either a
    guest that stores an image on its raw disk, or a wrong --format."""
    try:
        looks = _probe_format(st)
    except VdiskError:
        return
    if looks.name != "raw":
        log.warning(
            "%s: opened as raw as requested, but its content looks like a %s image header",
            st.path,
            looks.name,
        )


class Layer:
    """One driver and the chain below it: reads fall through HOLE extents to the backing.

    Backing layers are read-only and may be shared by several disks (snapshot views), so
    every layer has its own small lock."""

    def __init__(self, driver: Driver, backing: Layer | None) -> None:
        self.driver = driver
        self.backing = backing
        self.lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.driver.size

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            if self.backing is None:
                return self.driver.read(offset, length)
            out = bytearray()
            for e in self.driver.block_status(offset, length):
                if e.kind == Kind.DATA:
                    out += self.driver.read(e.offset, e.length)
                elif e.kind == Kind.ZERO:
                    out += bytes(e.length)
                else:
                    out += self._read_backing(e.offset, e.length)
            return bytes(out)

    def read_clusters(self, first: int, count: int, cs: int) -> list[bytes]:
        """Clusters of ``cs`` bytes, for the cache; without a backing image the driver
        hands over its own per-cluster buffers (no join and split)."""
        if self.backing is None and cs == self.driver.cluster_size:
            with self.lock:
                return self.driver.read_clusters(first, count)
        start = first * cs
        data = self.read(start, min(count * cs, self.size - start))
        return [data[i : i + cs] for i in range(0, len(data), cs)]

    def _read_backing(self, offset: int, length: int) -> bytes:
        assert self.backing is not None
        bsize = self.backing.size
        if offset >= bsize:
            return bytes(length)
        n = min(length, bsize - offset)
        data = self.backing.read(offset, n)
        return data + bytes(length - n) if n < length else data

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents of the whole chain: DATA, ZERO, or HOLE (unallocated anywhere: zeros)."""
        with self.lock:
            own = self.driver.block_status(offset, length)
        if self.backing is None:
            return own
        out: list[Extent] = []
        for e in own:
            if e.kind != Kind.HOLE:
                out.append(e)
                continue
            bsize = self.backing.size
            if e.offset < bsize:
                n = min(e.length, bsize - e.offset)
                out.extend(self.backing.block_status(e.offset, n))
                if n < e.length:
                    out.append(Extent(Kind.HOLE, e.offset + n, e.length - n))
            else:
                out.append(e)
        return merge_extents(out)

    def depth_of(self, offset: int, length: int) -> int:
        """For `map`: how deep in the chain the first byte of the range is stored."""
        depth = 0
        layer: Layer | None = self
        while layer is not None:
            with layer.lock:
                kind = layer.driver.block_status(offset, length)[0].kind
            if kind != Kind.HOLE:
                return depth
            layer, depth = layer.backing, depth + 1
        return depth

    def chain(self) -> Iterator[Layer]:
        layer: Layer | None = self
        while layer is not None:
            yield layer
            layer = layer.backing

    def close(self) -> None:
        for layer in self.chain():
            layer.driver.close()


def _backing_path(driver: Driver) -> str:
    assert driver.backing is not None
    return driver.storage.resolve(driver.backing.path)


def _open_chain(
    driver: Driver,
    *,
    force_share: bool,
    seen: set[str] | None = None,
    depth: int = 0,
) -> Layer:
    """Open the backing chain below ``driver`` (read-only, formats as recorded)."""
    seen = set(seen or ())
    seen.add(_real(driver.storage.path))
    if driver.backing is None:
        return Layer(driver, None)
    if depth >= MAX_CHAIN_DEPTH:
        raise BackingMismatch(
            f"{driver.storage.path}: backing chain deeper than {MAX_CHAIN_DEPTH} images"
        )
    path = _backing_path(driver)
    if _real(path) in seen:
        raise BackingMismatch(f"{driver.storage.path}: backing chain loops back to {path}")
    fmt = driver.backing.format
    if fmt is None:
        log.warning(
            "%s: backing file %s has no recorded format; probing it", driver.storage.path, path
        )
    try:
        base = _open_driver(path, format=fmt, readonly=True, force_share=force_share, options=None)
    except ImageNotFound:
        raise BackingMismatch(
            f"{driver.storage.path}: backing file {path} does not exist"
        ) from None
    try:
        driver.verify_backing(base)
        below = _open_chain(base, force_share=force_share, seen=seen, depth=depth + 1)
    except BaseException:
        base.close()
        raise
    return Layer(driver, below)


# -- the Disk ------------------------------------------------------------------------


class Snapshots:
    """``disk.snapshots``: internal snapshots of the image (formats that have them)."""

    def __init__(self, disk: Disk) -> None:
        self._disk = disk

    def list(self) -> list[SnapshotInfo]:
        with self._disk._lock:
            return self._disk._driver.list_snapshots()

    def create(self, name: str) -> SnapshotInfo:
        d = self._disk
        with d._lock:
            d._check_writable()
            d._cache.write_back()
            return d._driver.create_snapshot(name)

    def revert(self, name: str) -> None:
        d = self._disk
        with d._lock:
            d._check_writable()
            d._cache.write_back()
            d._driver.revert_snapshot(name)
            d._cache.resize(d._driver.size)

    def delete(self, name: str) -> None:
        d = self._disk
        with d._lock:
            d._check_writable()
            d._cache.write_back()
            d._driver.delete_snapshot(name)

    def open(self, name: str) -> Disk:
        """A read-only Disk of the snapshot's content (it shares this disk's backing chain)."""
        d = self._disk
        with d._lock:
            view = d._driver.open_snapshot(name)
        return Disk(
            Layer(view, d._layer.backing),
            cache_bytes=d._cache.capacity // 4,
            owns_backing=False,
            name=f"{d.path}@{name}",
        )


class Disk:
    """An open image: the object every front end holds. Thread-safe, blocking calls.

    Reads and writes from several threads give what some serial order would: one lock
    orders every call; the codec work inside a flush runs on the driver's worker threads.
    """

    def __init__(
        self,
        layer: Layer,
        *,
        cache_bytes: int = DEFAULT_CACHE_MB << 20,
        commit_interval: float | None = DEFAULT_COMMIT_INTERVAL,
        owns_backing: bool = True,
        name: str | None = None,
    ) -> None:
        self._layer = layer
        self._driver = layer.driver
        self._owns_backing = owns_backing
        self._lock = threading.RLock()
        self._closed = False
        self.path = name or layer.driver.storage.path
        self.readonly = layer.driver.readonly
        self.commit_interval = commit_interval
        self._last_commit = time.monotonic()
        self._cache = ClusterCache(
            layer.driver,
            layer,
            layer.driver.size,
            max(512, layer.driver.cluster_size),
            cache_bytes,
            copy_up=layer.backing is not None,
        )
        self.snapshots = Snapshots(self)
        self._remote = any(layer.driver.remote for layer in layer.chain())

    # -- properties ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._driver.size

    @property
    def format(self) -> str:
        return self._driver.name

    @property
    def cluster_size(self) -> int:
        return self._driver.cluster_size

    @property
    def driver(self) -> Driver:
        return self._driver

    @property
    def backing(self) -> _ChainView | None:
        """The backing chain below as read-only facts (path, format, size; None without one)."""
        return None if self._layer.backing is None else _ChainView(self._layer.backing)

    # -- checks --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise VdiskError(f"{self.path}: disk is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyImage(f"{self.path}: opened read-only")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"{self.path}: negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            raise InvalidArgument(
                f"{self.path}: range {offset}+{length} ends past the end of the disk ({self.size} bytes)"
            )

    # -- I/O -----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._check_open()
            self._check_range(offset, length)
            if length == 0:
                return b""
            return self._cache.read(offset, length)

    def read_pieces(self, offset: int, length: int) -> list[bytes | memoryview]:
        """:meth:`read` as consecutive immutable pieces whose lengths add up to ``length``:
        a front end that sends them with one gathering write saves joining a big read."""
        with self._lock:
            self._check_open()
            self._check_range(offset, length)
            if length == 0:
                return []
            return self._cache.read_pieces(offset, length)

    def prefetch(self, offset: int, length: int) -> int:
        """Read a range into the cache ahead of use, checking it (NBD_CMD_CACHE), as far as
        half the cache holds; the number of clusters loaded (0 with the cache off)."""
        with self._lock:
            self._check_open()
            self._check_range(offset, length)
            return self._cache.prefetch(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self._check_writable()
            self._check_range(offset, len(data))
            if len(data):
                self._cache.write(offset, data)
            self._maybe_commit()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        with self._lock:
            self._check_writable()
            self._check_range(offset, length)
            if length:
                self._cache.zero(
                    offset, length, lambda o, n: self._driver.write_zeroes(o, n, unmap=unmap)
                )
            self._maybe_commit()

    def discard(self, offset: int, length: int) -> None:
        """Free the range; afterwards it reads as zeros (partial clusters are zeroed)."""
        with self._lock:
            self._check_writable()
            self._check_range(offset, length)
            if length:
                below = (
                    self._driver.discard
                    if self._layer.backing is None
                    else (lambda o, n: self._driver.write_zeroes(o, n, unmap=True))
                )
                self._cache.zero(offset, length, below)
            self._maybe_commit()

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Extents of the guest range through the whole chain: DATA, ZERO or HOLE."""
        with self._lock:
            self._check_open()
            if length is None:
                length = self.size - offset
            self._check_range(offset, length)
            if length == 0:
                return []
            self._cache.write_back(offset, length)
            return self._layer.block_status(offset, length)

    def flush(self) -> None:
        """Commit: everything written before this call survives any crash after it."""
        with self._lock:
            self._check_open()
            if self.readonly:
                return
            self._cache.write_back()
            self._driver.flush()
            self._last_commit = time.monotonic()

    def _maybe_commit(self) -> None:
        if (
            self.commit_interval is not None
            and time.monotonic() - self._last_commit >= self.commit_interval
        ):
            self.flush()

    def flush_if_due(self) -> None:
        """For front ends' timers: commit if the periodic interval has passed."""
        with self._lock:
            if not self._closed and not self.readonly:
                self._maybe_commit()

    # -- for async front ends: what may run on the event loop -----------------------

    def commit_due(self, slack: float = 0.0) -> bool:
        """Whether the periodic commit falls due within ``slack`` seconds (a write then
        would also write back and sync)."""
        if self.commit_interval is None or self.readonly:
            return False
        return time.monotonic() - self._last_commit >= self.commit_interval - slack

    def is_cheap(self, offset: int, length: int, *, write: bool = False) -> bool:
        """Whether the call would be served from the cluster cache with no storage I/O:
        every cluster cached and, for a write, no eviction (which writes back) and no
        periodic commit due. A hint read without the lock: async front ends use it to run
        a call inline instead of paying for a thread hop."""
        c = self._cache
        if c.capacity == 0 or length <= 0:
            return False
        if write and (self.commit_due() or c.used + length > c.capacity):
            return False
        first, last = offset // c.cs, (offset + length - 1) // c.cs
        entries = c.entries
        if all(i in entries for i in range(first, last + 1)):
            return True
        # a small miss of a local image costs one pread and one decode, less than a thread
        # hop; unless it reads ahead, or the room it needs evicts dirty clusters (a write)
        return (
            first == last
            and not self._remote
            and offset != c._next_seq
            and not (c.dirty and c.used + c.cs > c.capacity)
        )

    def try_call(self, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """Run ``fn(*args)`` only if the disk's lock is free right now: (True, result), or
        (False, None) when another thread holds it (a flush may take seconds, and an
        event loop must never wait for it)."""
        if not self._lock.acquire(blocking=False):
            return False, None
        try:
            return True, fn(*args)
        finally:
            self._lock.release()

    def resize(self, new_size: int) -> None:
        with self._lock:
            self._check_writable()
            if new_size < 0:
                raise InvalidArgument(f"{self.path}: negative size {new_size}")
            self._cache.write_back()
            old = self._driver.size
            self._driver.truncate(new_size)
            self._cache.resize(self._driver.size)
            backing = self._layer.backing
            if backing is not None and self._driver.size > old and backing.size > old:
                # the grown range must read as zeros, not as the backing image's bytes
                # (which an earlier shrink hid): as qemu does since 5.0
                end = min(self._driver.size, backing.size)
                self.write_zeroes(old, end - old, unmap=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if not self.readonly:
                    self._cache.write_back()
                    self._driver.flush()
            finally:
                self._closed = True
                self._driver.close()
                if self._owns_backing and self._layer.backing is not None:
                    self._layer.backing.close()

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- information ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"cache": self._cache.stats(), "format": self._driver.stats()}

    def info(self) -> dict[str, Any]:
        with self._lock:
            st = self._driver.storage
            out: dict[str, Any] = {
                "filename": self.path,
                "format": self.format,
                "virtual-size": self.size,
                "cluster-size": self.cluster_size,
                "read-only": self.readonly,
            }
            try:
                out["actual-size"] = st.allocated_bytes()  # type: ignore[attr-defined]
            except AttributeError:
                out["actual-size"] = st.size()
            out["format-specific"] = self._driver.info()
            snaps = self._driver.list_snapshots()
            out["snapshots"] = [s.as_dict() for s in snaps]
            chain = []
            for layer in list(self._layer.chain())[1:]:
                chain.append(
                    {
                        "filename": layer.driver.storage.path,
                        "format": layer.driver.name,
                        "virtual-size": layer.size,
                    }
                )
            if self._driver.backing is not None:
                out["backing-filename"] = self._driver.backing.path
                out["backing-filename-format"] = self._driver.backing.format
            out["backing-chain"] = chain
            return out

    def map(self, offset: int = 0, length: int | None = None) -> list[dict[str, Any]]:
        """The guest range as runs with their depth in the chain, for `vdisk map`."""
        out = []
        for e in self.block_status(offset, length):
            depth = self._layer.depth_of(e.offset, e.length) if e.kind != Kind.HOLE else None
            out.append(
                {
                    "start": e.offset,
                    "length": e.length,
                    "data": e.kind == Kind.DATA,
                    "zero": e.kind != Kind.DATA,
                    "depth": depth,
                }
            )
        return out

    def check(self, *, repair: bool = False) -> CheckReport:
        with self._lock:
            self._cache.write_back()
            return self._driver.check(repair=repair)

    def as_file(self) -> DiskFile:
        """A seekable binary file object over the guest disk."""
        return DiskFile(self)


class _ChainView:
    """Read-only facts of a backing layer, for callers that want to walk the chain."""

    def __init__(self, layer: Layer) -> None:
        self._layer = layer
        self.path = layer.driver.storage.path
        self.format = layer.driver.name
        self.size = layer.size

    @property
    def backing(self) -> _ChainView | None:
        return None if self._layer.backing is None else _ChainView(self._layer.backing)


class DiskFile(io.RawIOBase):
    """A file object over a Disk: for libraries that take files (tarfile, shutil, ...)."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self.disk.readonly

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.disk.size}[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self.disk.size - self.pos))
        if n == 0:
            return 0
        data = self.disk.read(self.pos, n)
        memoryview(buf).cast("B")[:n] = data
        self.pos += n
        return n

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        if self.pos + len(mv) > self.disk.size:
            raise OSError(28, f"write past the end of the disk ({self.disk.size} bytes)")
        self.disk.write(self.pos, mv)
        self.pos += len(mv)
        return len(mv)

    def flush(self) -> None:
        if not self.closed and not self.disk.readonly:
            self.disk.flush()


# -- module-level API ----------------------------------------------------------------


def open(
    path: str,
    *,
    format: str | None = None,
    readonly: bool = False,
    force_share: bool = False,
    cache_mb: float | None = None,
    commit_interval: float | None = DEFAULT_COMMIT_INTERVAL,
    options: dict[str, Any] | None = None,
    snapshot: bool = False,
    durable: bool = True,
) -> Disk:
    """Open an image and its backing chain. ``format`` overrides probing; a writable open
    takes an exclusive lock (ImageLocked if another process has the image open), a
    read-only one a shared lock unless ``force_share``. ``snapshot`` gives a writable
    view whose writes go to a throw-away overlay: the image itself never changes.
    ``durable=False`` (qemu's cache=unsafe) writes as usual but never syncs the image's
    local files: a host crash may lose or tear it (for images that can be made again)."""
    if force_share and not readonly:
        raise UsageError("force_share needs a read-only open")
    if snapshot and readonly:
        raise UsageError(
            "snapshot=True is a writable throw-away view: do not combine it with readonly"
        )
    if cache_mb is not None and cache_mb < 0:
        raise UsageError(f"cache size must not be negative (got {cache_mb})")
    driver = _open_driver(
        path,
        format=format,
        readonly=readonly or snapshot,
        force_share=force_share,
        options=options,
        storage=None if durable or readonly else open_storage(path, readonly=False, durable=False),
    )
    try:
        layer = _open_chain(driver, force_share=force_share)
    except BaseException:
        driver.close()
        raise
    if snapshot:
        from vdisk.overlay import ScratchDriver

        try:
            scratch = ScratchDriver(
                driver.size, max(4096, driver.cluster_size), driver.storage.path
            )
        except BaseException:
            layer.close()
            raise
        layer = Layer(scratch, layer)
    if cache_mb is None:
        # formats that store plain bytes (raw) are cached by the host's page cache already:
        # a cluster cache would only turn 4 KiB writes into 64 KiB ones
        wants = any(lyr.driver.wants_cache for lyr in layer.chain())
        cache_mb = DEFAULT_CACHE_MB if wants else 0
    return Disk(
        layer, cache_bytes=int(cache_mb * (1 << 20)), commit_interval=commit_interval, name=path
    )


def create(
    path: str,
    size: int | str,
    *,
    format: str = "vdisk",
    cluster_size: int | str | None = None,
    backing: str | None = None,
    backing_format: str | None = None,
    options: dict[str, Any] | None = None,
    durable: bool = True,
) -> None:
    """Create an image. With ``backing``, the new image is an overlay of it; the backing
    format is recorded (probed once now if not given) and the size defaults to its size.
    ``durable=False``: no sync of the new file (as in :func:`open`)."""
    if _is_url(path) and format == "vdisk":
        format = open_storage(path, readonly=True).native_format  # type: ignore[attr-defined]
    cls = formats.get(format)
    if not cls.can_create:
        raise UsageError(f"vdisk cannot create {cls.name} images")
    opts: dict[str, Any] = dict(options or {})
    if cluster_size is not None:
        opts["cluster_size"] = parse_size(cluster_size)
    if backing is not None:
        bpath = (
            backing
            if os.path.isabs(backing) or _is_url(backing)
            else os.path.join(os.path.dirname(os.path.abspath(path)), backing)
        )
        if not _is_url(bpath) and not os.path.exists(bpath) and os.path.exists(backing):
            bpath = os.path.abspath(backing)
        base = _open_driver(
            bpath, format=backing_format, readonly=True, force_share=True, options=None
        )
        try:
            stored = (
                getattr(base, "pinned_url", None) or bpath  # s3://B/NAME@N: that version
                if _is_url(bpath) or _is_url(path)
                else os.path.relpath(os.path.abspath(bpath), os.path.dirname(os.path.abspath(path)))
            )
            opts["backing"] = BackingRef(stored, base.name)
            opts["backing_driver"] = base
            if size is None or size == "":
                size = base.size
            size = parse_size(size)
            _create_file(cls, path, size, opts, durable)
        finally:
            base.close()
        return
    if size is None:
        raise UsageError("a size is needed (or a backing image to take it from)")
    _create_file(cls, path, parse_size(size), opts, durable)


def _create_file(
    cls: type[Driver], path: str, size: int, opts: dict[str, Any], durable: bool = True
) -> None:
    st = open_storage(path, readonly=False, create=True, durable=durable)
    ok = False
    try:
        cls.create(st, size, opts)
        st.sync()
        ok = True
    finally:
        st.close()
        if not ok and not _is_url(path):
            try:
                os.unlink(path)
            except OSError:
                pass


def clone(
    base: str,
    new: str,
    *,
    format: str = "vdisk",
    base_format: str | None = None,
    options: dict[str, Any] | None = None,
) -> None:
    """A linked clone: ``new`` reads through to ``base`` and copies up on write."""
    create(new, None, format=format, backing=base, backing_format=base_format, options=options)  # type: ignore[arg-type]
