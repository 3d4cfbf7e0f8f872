"""Whole-image operations on any format: convert, compare, commit, rebase, flatten, scrub.

They are format-agnostic: everything goes through Disk and the driver protocol, so a new
format gets them for free. Each chain operation is ordered so that an interruption at any
point leaves every image readable with the same guest content (see docs/crash-safety.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from vdisk import api, formats
from vdisk.api import Disk, Layer, Progress, _open_chain, _open_driver
from vdisk.cache import codec
from vdisk.errors import ChecksumMismatch, CorruptImage, InvalidArgument, UsageError, VdiskError
from vdisk.formats.base import BackingRef, Extent, Kind

CHUNK = 4 << 20  # bytes per read/write of a copy loop
STATUS_WINDOW = 1 << 30  # block status is asked for this much at a time (bounded lists)


def _extents(disk: Disk | Layer, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
    size = disk.size
    end = size if length is None else offset + length
    pos = offset
    while pos < end:
        n = min(STATUS_WINDOW, end - pos)
        yield from disk.block_status(pos, n)
        pos += n


def _chunks(offset: int, length: int, align: int) -> Iterator[tuple[int, int]]:
    """Pieces of at most CHUNK bytes, cut at multiples of ``align`` where possible."""
    end = offset + length
    step = max(align, CHUNK - CHUNK % align) if align else CHUNK
    pos = offset
    while pos < end:
        nxt = min(end, (pos // step + 1) * step)
        yield pos, nxt - pos
        pos = nxt


def _is_zero(data: bytes) -> bool:
    return data == codec.zeros(len(data))  # a memcmp against a shared zero buffer


def _nonzero_runs(data: bytes, offset: int, grain: int) -> Iterator[tuple[int, int]]:
    """(start, end) in ``data`` of what is left after dropping its all-zero grains (pieces
    of ``grain`` bytes aligned in the guest; ``data`` starts at guest ``offset``): what
    convert has to write. startswith compares in place, without copying each piece."""
    zero = codec.zeros(grain)
    n = len(data)
    start = -1
    a = 0
    while a < n:
        b = min(a + grain - (offset + a) % grain, n)
        if data.startswith(zero if b - a == grain else codec.zeros(b - a), a, b):
            if start >= 0:
                yield start, a
                start = -1
        elif start < 0:
            start = a
        a = b
    if start >= 0:
        yield start, n


# -- convert and compare --------------------------------------------------------------


#: ``convert -t``: what a convert does to make its output durable, with qemu-img's names
#: (writeback: sync at the end, the default; unsafe: never sync, as qemu-img's default)
CACHE_MODES = ("writeback", "unsafe")


@dataclass
class ConvertResult:
    bytes_copied: int = 0
    bytes_skipped: int = 0
    verified: bool | None = None
    checksum: str | None = None


def _compressed_options(fmt: str, options: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """What ``convert -c`` adds to the create and open options of ``fmt``; a usage error
    for formats that cannot compress or a create option that contradicts it."""
    cls = formats.get(fmt)
    if cls.compressed_options is None:
        can = sorted(d.name for d in formats.drivers() if d.compressed_options is not None)
        raise UsageError(
            f"convert -c: {cls.name} images cannot store compressed data "
            f"(formats that can: {', '.join(can)})"
        )
    create_extra, open_extra = cls.compressed_options
    for k, v in create_extra.items():
        if k in options and str(options[k]) != v:
            raise UsageError(
                f"convert -c: {cls.name} compresses only with {k}={v}, not {options[k]}"
            )
    return dict(create_extra), dict(open_extra)


def convert(
    src: str,
    dst: str,
    *,
    out_format: str = "vdisk",
    src_format: str | None = None,
    options: dict[str, Any] | None = None,
    cluster_size: int | None = None,
    backing: str | None = None,
    backing_format: str | None = None,
    verify: bool = False,
    progress: Progress | None = None,
    cache_mb: float | None = None,
    compress: bool = False,
    cache_mode: str = "writeback",
) -> ConvertResult:
    """Copy the guest content of ``src`` into a new image ``dst``.

    Holes and zero ranges of the source are skipped (block status), as are all-zero
    clusters of data. With ``backing``, ``dst`` is an overlay that stores only what
    differs from the backing image. With ``verify``, both images are read back and their
    guest content compared by checksum. ``compress`` asks the output format for its
    compressed form (the driver's ``compressed_options``). ``cache_mode`` "writeback"
    makes ``dst`` durable before returning; "unsafe" never syncs it (qemu-img convert's
    default): faster, but a host crash soon after may leave it torn.

    The output is written without the cluster cache unless ``cache_mb`` asks for one:
    every chunk covers whole clusters and is written once, so a cache would only copy."""
    if cache_mode not in CACHE_MODES:
        raise UsageError(
            f"convert: cache mode {cache_mode!r} is not one of {', '.join(CACHE_MODES)}"
        )
    durable = cache_mode != "unsafe"
    if os.path.exists(dst):
        raise UsageError(f"{dst}: already exists (refusing to overwrite)")
    options = dict(options or {})
    open_options: dict[str, Any] = {}
    if compress:
        create_extra, open_options = _compressed_options(out_format, options)
        options.update(create_extra)
    res = ConvertResult()
    with api.open(src, format=src_format, readonly=True, cache_mb=0) as s:
        src_size = s.size
        api.create(
            dst,
            s.size,
            format=out_format,
            cluster_size=cluster_size,
            backing=backing,
            backing_format=backing_format,
            options=options,
            durable=durable,
        )
        try:
            with api.open(
                dst,
                format=out_format,
                cache_mb=0 if cache_mb is None and backing is None else cache_mb,
                commit_interval=None,
                options=open_options or None,
                durable=durable,
            ) as d:
                grain = max(4096, d.cluster_size)
                pieces = _copy_pieces(s, d.cluster_size, holes=backing is not None)
                for off, n, data in _read_ahead(s, pieces):
                    if data is None:
                        res.bytes_skipped += n
                    elif backing is not None:
                        if d.read(off, n) != data:
                            d.write(off, data)
                            res.bytes_copied += n
                        else:
                            res.bytes_skipped += n
                    elif _is_zero(data):
                        res.bytes_skipped += n
                    else:
                        _write_nonzero(d, off, data, grain, res)
                    if progress:
                        progress(off + n, s.size)
                d.flush()
        except BaseException:
            try:
                os.unlink(dst)
            except OSError:
                pass
            raise
    if verify:
        a = checksum(src, fmt=src_format)
        b = checksum(dst, fmt=out_format, limit=src_size)
        res.verified = a == b
        res.checksum = a
        if a != b:
            raise CorruptImage(
                f"{dst}: verification failed: guest content differs from {src} (xxh3 {b} != {a})"
            )
    return res


def _copy_pieces(s: Disk, align: int, *, holes: bool) -> Iterator[tuple[int, int, int]]:
    """What convert visits, in order: (offset, length, what) with what 0 = read the
    source, 1 = zeros (ranges that are not data, when ``holes`` asks to compare them),
    2 = skip (the new image reads zeros there already)."""
    for e in _extents(s):
        if e.kind != Kind.DATA and not holes:
            yield e.offset, e.length, 2
            continue
        what = 0 if e.kind == Kind.DATA else 1
        for off, n in _chunks(e.offset, e.length, align):
            yield off, n, what


def _read_ahead(
    s: Disk, pieces: Iterator[tuple[int, int, int]]
) -> Iterator[tuple[int, int, bytes | None]]:
    """(offset, length, data or None to skip) of each piece, the source read one piece
    ahead on a worker thread: pread releases the GIL, so reading the next chunk overlaps
    writing this one (a Disk is thread-safe; the thread ends with the iteration)."""
    with ThreadPoolExecutor(1, thread_name_prefix="vdisk-convert") as pool:
        pending: tuple[int, int, int, Future[bytes] | None] | None = None
        for off, n, what in pieces:
            fut = pool.submit(s.read, off, n) if what == 0 else None
            if pending is not None:
                yield _resolved(*pending)
            pending = (off, n, what, fut)
        if pending is not None:
            yield _resolved(*pending)


def _resolved(
    off: int, n: int, what: int, fut: Future[bytes] | None
) -> tuple[int, int, bytes | None]:
    if fut is not None:
        return off, n, fut.result()
    return off, n, bytes(n) if what == 1 else None


def _write_nonzero(d: Disk, off: int, data: bytes, grain: int, res: ConvertResult) -> None:
    """Write a chunk of a new image (no backing) except its all-zero grains, which a new
    image already reads as zeros."""
    n = len(data)
    written = 0
    for a, b in _nonzero_runs(data, off, grain):
        d.write(off + a, data if b - a == n else memoryview(data)[a:b])
        written += b - a
    res.bytes_copied += written
    res.bytes_skipped += n - written


def checksum(
    path: str,
    *,
    fmt: str | None = None,
    progress: Progress | None = None,
    limit: int | None = None,
) -> str:
    """xxh3-128 of the guest content (holes hashed as zeros, without reading them): the
    first ``limit`` bytes, where the rest must read as zeros (a format that rounds the
    size up, as VMDK to 512 bytes, pads with zeros), else all of it."""
    h = xxhash.xxh3_128()
    zero = bytes(CHUNK)
    with api.open(path, format=fmt, readonly=True, cache_mb=0) as d:
        end = d.size if limit is None else min(limit, d.size)
        for e in _extents(d):
            for off, n in _chunks(e.offset, e.length, 0):
                data = d.read(off, n) if e.kind == Kind.DATA else zero[:n]
                if off + n > end:
                    if not _is_zero(data[max(0, end - off) :]):
                        return "nonzero-tail"
                    data = data[: max(0, end - off)]
                h.update(data)
                if progress:
                    progress(off + n, d.size)
    return h.hexdigest()


@dataclass
class CompareResult:
    identical: bool
    first_difference: int | None = None
    size_a: int = 0
    size_b: int = 0
    messages: list[str] = field(default_factory=list)


def compare(
    a: str,
    b: str,
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    progress: Progress | None = None,
) -> CompareResult:
    """Compare guest content. As qemu-img: the extra part of the larger image must read as
    zeros, unless ``strict`` (then differing sizes are a difference)."""
    with (
        api.open(a, format=fmt_a, readonly=True, cache_mb=0) as da,
        api.open(b, format=fmt_b, readonly=True, cache_mb=0) as db,
    ):
        res = CompareResult(True, None, da.size, db.size)
        if strict and da.size != db.size:
            res.identical = False
            res.first_difference = min(da.size, db.size)
            res.messages.append(f"image sizes differ: {da.size} and {db.size}")
            return res
        common = min(da.size, db.size)
        for e in _extents(da, 0, common):
            for off, n in _chunks(e.offset, e.length, 0):
                x = da.read(off, n) if e.kind == Kind.DATA else None
                if x is None:
                    # a hole in A: B must read zeros there; ask B's block status first
                    if all(f.kind != Kind.DATA for f in db.block_status(off, n)):
                        continue
                    x = bytes(n)
                y = db.read(off, n)
                if x != y:
                    i = next(k for k in range(n) if x[k] != y[k])
                    res.identical = False
                    res.first_difference = off + i
                    return res
                if progress:
                    progress(off + n, common)
        bigger, size = (da, da.size) if da.size > db.size else (db, db.size)
        for e in _extents(bigger, common, size - common):
            if e.kind == Kind.DATA:
                for off, n in _chunks(e.offset, e.length, 0):
                    data = bigger.read(off, n)
                    if not _is_zero(data):
                        i = next(k for k in range(n) if data[k])
                        res.identical = False
                        res.first_difference = off + i
                        return res
        return res


# -- chain operations -----------------------------------------------------------------


def _rel(path: str, overlay: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(overlay)))


def commit(overlay: str, *, progress: Progress | None = None, cache_mb: float | None = None) -> int:
    """Merge an overlay's own data into its backing image. Returns bytes copied.

    Order: the overlay first stops pinning the base's identity (so a crash while the base
    changes leaves the overlay openable; its own data still covers everything it wrote),
    then the base gets the data and is committed, then the overlay records the base's new
    identity. The guest content of the overlay is the same at every step."""
    ov = _open_driver(overlay, format=None, readonly=False, force_share=False, options=None)
    try:
        if ov.backing is None:
            raise UsageError(f"{overlay}: has no backing image to commit into")
        ref = ov.backing
        base_path = ov.storage.resolve(ref.path)
        with api.open(
            base_path, format=ref.format, cache_mb=cache_mb, commit_interval=None
        ) as base:
            ov.verify_backing(base.driver)
            ov.set_backing(ref, None)
            ov.flush()
            copied = 0
            total = ov.size
            for e in _extents(Layer(ov, None)):
                if e.kind == Kind.HOLE:
                    continue
                end = min(e.end, base.size)
                if e.offset >= end:
                    continue
                if e.kind == Kind.ZERO:
                    base.write_zeroes(e.offset, end - e.offset)
                else:
                    for off, n in _chunks(e.offset, end - e.offset, base.cluster_size):
                        base.write(off, ov.read(off, n))
                        copied += n
                        if progress:
                            progress(off + n, total)
            base.flush()
            ov.set_backing(ref, base.driver)
            ov.flush()
        if progress:
            progress(total, total)
        return copied
    finally:
        ov.close()


def rebase(
    image: str,
    new_base: str | None,
    *,
    new_format: str | None = None,
    unsafe: bool = False,
    progress: Progress | None = None,
    cache_mb: float | None = None,
) -> int:
    """Make ``new_base`` the backing image of ``image`` (None: no backing, i.e. flatten).

    Safe mode keeps the guest content: wherever the image's own layer has a hole and the
    old chain reads differently from the new one, the old content is copied into the
    image first; only then is the reference switched, in one commit. ``unsafe`` only
    rewrites the reference."""
    disk = api.open(image, cache_mb=cache_mb, commit_interval=None)
    new_layer: Layer | None = None
    try:
        if new_base is not None:
            nb = _open_driver(
                new_base, format=new_format, readonly=True, force_share=True, options=None
            )
            try:
                new_layer = _open_chain(nb, force_share=True)
            except BaseException:
                nb.close()
                raise
            if os.path.realpath(new_base) == os.path.realpath(image):
                raise UsageError(f"{image}: cannot be its own backing image")
            for layer in new_layer.chain():
                if os.path.realpath(layer.driver.storage.path) == os.path.realpath(image):
                    raise UsageError(
                        f"{image}: {new_base} is backed by {image}: that would be a loop"
                    )
        copied = 0
        own = Layer(disk.driver, None)
        if not unsafe and (disk._layer.backing is not None or new_layer is not None):
            total = disk.size
            for e in list(_extents(own)):
                if e.kind != Kind.HOLE:
                    continue
                for off, n in _chunks(e.offset, e.length, disk.cluster_size):
                    old = disk.read(off, n)
                    if new_layer is None:
                        new = bytes(n)
                    else:
                        m = max(0, min(n, new_layer.size - off))
                        new = (new_layer.read(off, m) if m else b"") + bytes(n - m)
                    if old != new:
                        disk.write(off, old)
                        copied += n
                    if progress:
                        progress(off + n, total)
            disk.flush()
        ref = (
            None
            if new_base is None
            else BackingRef(
                _rel(new_base, image), new_layer.driver.name if new_layer else new_format
            )
        )
        disk.driver.set_backing(ref, new_layer.driver if new_layer else None)
        disk.driver.flush()
        return copied
    finally:
        disk.close()
        if new_layer is not None:
            new_layer.close()


def flatten(image: str, *, progress: Progress | None = None, cache_mb: float | None = None) -> int:
    """Copy everything the image reads from its chain into it and drop the backing reference."""
    return rebase(image, None, progress=progress, cache_mb=cache_mb)


# -- scrub ----------------------------------------------------------------------------


@dataclass
class ScrubResult:
    bytes_read: int = 0
    errors: list[str] = field(default_factory=list)


def scrub(path: str, *, fmt: str | None = None, progress: Progress | None = None) -> ScrubResult:
    """Read and verify every stored cluster of the image (not its backing chain)."""
    res = ScrubResult()
    with api.open(path, format=fmt, readonly=True, cache_mb=0) as d:
        own = Layer(d.driver, None)
        cs = max(d.cluster_size, 4096)
        for e in _extents(own):
            if e.kind != Kind.DATA:
                continue
            for off, n in _chunks(e.offset, e.length, cs):
                try:
                    d.driver.read(off, n)
                except (ChecksumMismatch, CorruptImage):
                    # narrow the failure down to single clusters so each is named
                    for c in range(off, off + n, cs):
                        try:
                            d.driver.read(c, min(cs, off + n - c))
                        except VdiskError as err:
                            res.errors.append(str(err))
                res.bytes_read += n
                if progress:
                    progress(off + n, d.size)
    return res


def resize(path: str, size: int, *, fmt: str | None = None, shrink: bool = False) -> int:
    with api.open(path, format=fmt) as d:
        if size < d.size and not shrink:
            raise InvalidArgument(
                f"{path}: shrinking from {d.size} to {size} loses data: pass --shrink to confirm"
            )
        d.resize(size)
        return d.size
