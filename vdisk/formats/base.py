"""The driver protocol every image format implements.

A driver knows one on-disk layout and nothing else: it maps guest offsets of *its own
layer* to stored bytes. What is common to all formats lives once, in the generic layer
(``vdisk.api`` and ``vdisk.cache``): bounds checks and clamping at the end of the disk,
falling through to a backing image, copy-up of partial clusters, the cluster cache,
locking, thread safety. So a driver may assume:

- every request is inside ``[0, size)`` and has a positive length;
- in an image with a backing file, writes cover whole clusters of ``cluster_size``
  (the cache reads the rest of the cluster from the backing chain first), except the
  last cluster of a disk whose size is not a multiple of it;
- calls come one at a time (the generic layer holds a lock), so a driver needs no lock
  of its own unless it starts threads itself.

A driver answers ``block_status`` for its own layer only: ``HOLE`` means "not in this
layer", which the generic layer resolves through the backing chain (or as zeros).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NewType

from vdisk.errors import ReadOnlyImage, UnsupportedFeature, UsageError
from vdisk.storage import Storage

GuestOffset = NewType("GuestOffset", int)
HostOffset = NewType("HostOffset", int)


class Kind(enum.IntEnum):
    """What a guest range is in one layer."""

    DATA = 0  # stored in this layer
    ZERO = 1  # reads as zeros in this layer (does not fall through to a backing image)
    HOLE = 2  # not allocated in this layer: backing image's content, or zeros without one


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes of one kind; ``host`` is the stored offset when it is known."""

    kind: Kind
    offset: int
    length: int
    host: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class BackingRef:
    """A backing image as an overlay records it.

    ``path`` is as stored (relative paths are relative to the overlay's directory);
    ``format`` is the recorded format name, or None where the format records none
    (then the generic layer probes, but never reinterprets raw content as a header).
    """

    path: str
    format: str | None = None


@dataclass(slots=True)
class SnapshotInfo:
    """One internal snapshot, as listed by ``vdisk snapshot list``."""

    id: str
    name: str
    created: float  # Unix time
    size: int  # guest size of the disk in the snapshot
    vm_state_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of `info` and `snapshot list` (qemu-img's key names)."""
        return {
            "id": self.id,
            "name": self.name,
            "date": self.created,
            "virtual-size": self.size,
            "vm-state-size": self.vm_state_size,
            **self.extra,
        }


@dataclass(slots=True)
class CheckReport:
    """What ``check`` found. Exit codes follow qemu-img: 0 clean, 2 corrupt, 3 leaks only."""

    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    checked: bool = True  # False: the format has no consistency check

    @property
    def exit_code(self) -> int:
        if not self.checked:
            return 63
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


def zero_extents(offset: int, length: int, kind: Kind = Kind.HOLE) -> list[Extent]:
    return [Extent(kind, offset, length)]


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Join neighbouring extents of the same kind (host offsets are dropped when joined
    runs are not contiguous on the host)."""
    out: list[Extent] = []
    for e in extents:
        if e.length <= 0:
            continue
        if out and out[-1].kind == e.kind and out[-1].end == e.offset:
            prev = out[-1]
            host = None
            if prev.host is not None and e.host is not None and prev.host + prev.length == e.host:
                host = prev.host
            out[-1] = Extent(e.kind, prev.offset, prev.length + e.length, host)
        else:
            out.append(e)
    return out


def cluster_spans(offset: int, length: int, cluster_size: int) -> Iterator[tuple[int, int, int]]:
    """Split a guest range at cluster boundaries: yields (cluster index, offset in cluster, n)."""
    end = offset + length
    while offset < end:
        idx, within = divmod(offset, cluster_size)
        n = min(cluster_size - within, end - offset)
        yield idx, within, n
        offset += n


class Driver(ABC):
    """One open image layer of one format. See the module docstring for the contract."""

    #: vdisk's name of the format ("vdisk", "qcow2", "vmdk", "vhd", ...)
    name: ClassVar[str]
    #: other names accepted by --format / -O, e.g. qemu-img's ("vpc" for VHD)
    aliases: ClassVar[tuple[str, ...]] = ()
    #: file name extensions, for messages and for guessing an output format
    extensions: ClassVar[tuple[str, ...]] = ()
    #: whether ``create`` is implemented
    can_create: ClassVar[bool] = False
    #: whether the format has internal snapshots
    has_snapshots: ClassVar[bool] = False
    #: whether images live in an object store (s3://) rather than in a local file
    remote: ClassVar[bool] = False
    #: whether the cluster cache helps by default (False for plain bytes that the host's
    #: page cache already caches: raw)
    wants_cache: ClassVar[bool] = True
    #: what ``convert -c`` asks of the format, as (create options, open options); None
    #: when it cannot store compressed data
    compressed_options: ClassVar[tuple[dict[str, str], dict[str, str]] | None] = None

    storage: Storage
    size: int
    cluster_size: int = 65536
    readonly: bool = True
    backing: BackingRef | None = None

    # -- discovery and creation ---------------------------------------------------

    @classmethod
    @abstractmethod
    def probe(cls, head: bytes, size: int) -> int:
        """How sure this driver is that ``head`` (the first 64 KiB, or less if the file
        is smaller) starts an image of its format: 0 not at all, 100 certain."""

    @classmethod
    def probe_tail(cls, tail: bytes, size: int) -> int:
        """Like ``probe``, for formats whose only signature is at the end of the file
        (a fixed VHD's footer): ``tail`` is the last 512 bytes."""
        return 0

    @classmethod
    @abstractmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> Driver:
        """Validate the headers (before trusting any of them) and return an open layer.
        Unknown keys in ``options`` are a UsageError."""

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        """Write an empty image of ``size`` guest bytes to empty ``storage``.

        ``options`` may hold ``cluster_size``, ``backing`` (a BackingRef to record),
        ``backing_driver`` (the base, open read-only, to record its identity and size)
        and format-specific keys; unknown keys are a UsageError. Drivers must accept
        ``cluster_size``, ``backing`` and ``backing_driver`` (ignore or refuse clearly)."""
        raise UnsupportedFeature(f"vdisk cannot create {cls.name} images")

    # -- I/O of this layer ---------------------------------------------------------

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Bytes of this layer; HOLE ranges read as zeros."""

    def read_clusters(self, first: int, count: int) -> list[bytes]:
        """Whole clusters [first, first+count) of this layer as separate buffers (the last
        one of the disk may be short). The cache calls this on a miss; drivers that
        decode per cluster override it to hand their buffers over without joining them."""
        cs = self.cluster_size
        start = first * cs
        data = self.read(start, min(count * cs, self.size - start))
        return [data[i : i + cs] for i in range(0, len(data), cs)]

    def write(self, offset: int, data: bytes) -> None:
        raise ReadOnlyImage(f"{self.storage.path}: {self.name} images are read-only in vdisk")

    def write_many(self, writes: list[tuple[int, bytes]]) -> None:
        """Write several (offset, data) pieces; drivers that compress override this to
        do the work of many clusters in parallel."""
        for offset, data in writes:
            self.write(offset, data)

    def patch_many(
        self, items: list[tuple[int, list[tuple[int, bytes]]]], *, holes_read_zero: bool
    ) -> list[int]:
        """Apply pieces ``(offset in cluster, bytes)`` to whole clusters ``(cluster index,
        pieces)``, doing the read-modify-write inside the driver: a driver that compresses
        can then decode, patch and encode on its worker threads. Returns the clusters it
        left to the caller: by default all of them; always those that are holes here
        unless ``holes_read_zero`` (else the backing image's bytes are needed)."""
        return [c for c, _pieces in items]

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeros in this layer (not falling through)."""
        chunk = 1 << 20
        while length > 0:
            n = min(chunk, length)
            self.write(offset, bytes(n))
            offset += n
            length -= n

    def discard(self, offset: int, length: int) -> None:
        """Free whole clusters inside the range; afterwards the range reads as zeros
        (the generic layer passes cluster-aligned ranges only). The default zeroes."""
        self.write_zeroes(offset, length, unmap=True)

    @abstractmethod
    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering exactly ``[offset, offset+length)``, for this layer only."""

    def flush(self) -> None:
        """Make everything written so far durable (the commit point)."""
        self.storage.sync()

    def truncate(self, size: int) -> None:
        raise UnsupportedFeature(
            f"{self.storage.path}: resizing {self.name} images is not supported"
        )

    def close(self) -> None:
        self.storage.close()

    # -- metadata, snapshots, checks -----------------------------------------------

    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``vdisk info`` (JSON-serialisable)."""
        return {}

    def stats(self) -> dict[str, Any]:
        """Counters of the driver's own caches (mapping tables), for ``disk.stats()``."""
        return {}

    def check(self, *, repair: bool = False) -> CheckReport:
        return CheckReport(checked=False)

    def verify_backing(self, backing: Driver) -> None:
        """Raise BackingMismatch if ``backing`` is not the image this overlay was made on."""

    def set_backing(self, ref: BackingRef | None, backing: Driver | None = None) -> None:
        """Rewrite the backing reference (used by rebase, commit and flatten)."""
        raise UnsupportedFeature(f"{self.storage.path}: {self.name} cannot change its backing file")

    def list_snapshots(self) -> list[SnapshotInfo]:
        return []

    def open_snapshot(self, name: str) -> Driver:
        raise UnsupportedFeature(
            f"{self.storage.path}: {self.name} images have no internal snapshots"
        )

    def create_snapshot(self, name: str) -> SnapshotInfo:
        raise UnsupportedFeature(
            f"{self.storage.path}: {self.name} images have no internal snapshots"
        )

    def revert_snapshot(self, name: str) -> None:
        raise UnsupportedFeature(
            f"{self.storage.path}: {self.name} images have no internal snapshots"
        )

    def delete_snapshot(self, name: str) -> None:
        raise UnsupportedFeature(
            f"{self.storage.path}: {self.name} images have no internal snapshots"
        )

    def compact(self) -> int:
        """Give freed space back to the host; returns bytes released (0 if unsupported)."""
        return 0


def reject_unknown_options(driver: str, options: dict[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UsageError(f"{driver}: unknown option(s): {', '.join(unknown)}")
