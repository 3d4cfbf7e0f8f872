"""Helpers shared by the per-format driver tests (qcow2, vmdk, vhd, vhdx, vdi, parallels).

Each of those files used to carry its own copy of these: opening a driver directly on a
file, qemu's raw view of an image, patching bytes of an image in place, expecting a clear
error from a damaged image, seeded random header damage, and the power-loss walk. Kept in
one place so that every format is held to the same checks.
"""

from __future__ import annotations

import os
import random
import struct
import time
from pathlib import Path
from typing import Any

import pytest

import vdisk
from tests.conftest import pattern
from vdisk.errors import VdiskError
from vdisk.formats.base import BackingRef, Driver, Kind
from vdisk.storage import FileStorage, MemoryStorage

MiB = 1 << 20


def open_driver(
    cls: type[Driver], path: str | os.PathLike, readonly: bool = True, **options: Any
) -> Any:
    """The driver itself on a local file, without the generic layer."""
    return cls.open(FileStorage(str(path), readonly=readonly), readonly=readonly, options=options)


def qemu_raw(qemu_img, fmt: str, path: str, tmp_path: Path) -> bytes:
    """The guest content as qemu-img reads it (``convert -O raw``)."""
    raw = tmp_path / "ref.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", path, str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data


def read_file(path: str) -> bytes:
    return Path(path).read_bytes()


def write_file(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def patch(path: str, offset: int, data: bytes) -> None:
    """Overwrite ``data`` at ``offset`` of the file (a hostile edit)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def driver_read_fails(
    cls: type[Driver], path: str, exc: type[Exception] = VdiskError, match: str | None = None
) -> None:
    """Opening the image with the driver itself and reading it all raises ``exc``."""
    with pytest.raises(exc, match=match):
        d = open_driver(cls, path)
        try:
            d.read(0, d.size)
        finally:
            d.close()


def api_read_fails(path: str, fmt: str, exc: type[Exception], match: str | None = None) -> None:
    """Opening the image through ``vdisk.open`` and reading it all raises ``exc``."""
    with pytest.raises(exc, match=match), vdisk.open(path, readonly=True, format=fmt) as d:
        d.read(0, d.size)


def mutated_headers_give_clear_errors(cls: type[Driver], path: str, hot_offsets: list[int]) -> None:
    """Seeded random damage near ``hot_offsets`` (headers and tables): opening, reading,
    checking and writing raise only vdisk errors, each attempt in bounded time."""
    orig = Path(path).read_bytes()
    rng = random.Random(1)
    for _ in range(60):
        buf = bytearray(orig)
        for _ in range(rng.randint(1, 6)):
            at = rng.choice(hot_offsets) + rng.randrange(96)
            if at < len(buf):
                buf[at] = rng.randrange(256)
        for readonly in (True, False):
            t = time.monotonic()
            try:
                d = cls.open(MemoryStorage(path, bytes(buf)), readonly=readonly, options={})
                d.read(0, min(d.size, 8 * MiB))
                d.check()
                if not readonly:
                    d.write(0, b"x" * 4096)
            except VdiskError:
                pass
            assert time.monotonic() - t < 5


def crash_walk(
    cls: type[Driver],
    size: int,
    opts: dict,
    seed: int,
    *,
    parent: tuple[Driver, bytes] | None = None,
    open_opts: dict | None = None,
) -> int:
    """Run a random workload on a recording FaultyStorage, then cut the power after every
    operation (unsynced writes dropped, or a random subset reordered). Each crash image
    must open, check without corruption, and every 4 KiB page must hold a version that
    was current at the last completed flush or written after it: never older, never
    garbage. ``parent`` is (driver, bytes) for a differencing image. Returns the number
    of crash images checked."""
    from vdisk.storage.faulty import FaultyStorage

    page = 4096
    npages = size // page
    fs = FaultyStorage()
    if parent is not None:
        opts = {**opts, "backing": BackingRef("parent", cls.name)}
        opts["backing_driver"] = parent[0]
    cls.create(fs, size, opts)
    fs.sync()  # as vdisk.create does
    start = len(fs.log)
    d = cls.open(fs, readonly=False, options=dict(open_opts or {}))
    base = parent[1] if parent is not None else bytes(size)
    cur = [base[i * page : (i + 1) * page] for i in range(npages)]
    unit = d.cluster_size if parent is not None else page
    rng = random.Random(seed)
    flushes: list[tuple[int, list[bytes]]] = [(start, list(cur))]
    writes: list[tuple[int, int, bytes]] = []  # (start op, page, value)
    for step in range(30):
        r = rng.random()
        first = rng.randrange(size // unit) * unit
        n = min(unit * rng.randint(1, 3), size - first)
        at = len(fs.log)
        if r < 0.6:
            data = b"".join(
                struct.pack("<HI", step, p).ljust(page, bytes([step + 1]))
                for p in range(first // page, (first + n) // page)
            )
            d.write(first, data)
        elif r < 0.75:
            d.write_zeroes(first, n)
            data = bytes(n)
        else:
            d.flush()
            flushes.append((len(fs.log), list(cur)))
            continue
        for p in range(first // page, (first + n) // page):
            cur[p] = data[(p - first // page) * page : (p - first // page + 1) * page]
            writes.append((at, p, cur[p]))
    d.flush()
    flushes.append((len(fs.log), list(cur)))
    checked = 0
    for k in range(start, len(fs.log) + 1):
        done = max((f for f in flushes if f[0] <= k), key=lambda f: f[0])
        allowed = [{v} for v in done[1]]
        for at, p, v in writes:
            if done[0] <= at < k:
                allowed[p].add(v)
        for policy in ("drop", "reorder"):
            img = fs.crash_image(k, unsynced=policy, rng=random.Random(k))
            c = cls.open(MemoryStorage("crash", img), readonly=True, options=dict(open_opts or {}))
            rep = c.check()
            assert not rep.corruptions, f"op {k} {policy}: {rep.corruptions[:3]}"
            content = bytearray(c.read(0, size))
            for e in c.block_status(0, size):
                if e.kind == Kind.HOLE:
                    content[e.offset : e.end] = base[e.offset : e.end]
            for p in range(npages):
                got = bytes(content[p * page : (p + 1) * page])
                assert got in allowed[p], f"op {k} {policy}: page {p} holds no allowed version"
            checked += 1
    return checked


def random_model_io(
    path: str, size: int, seed: str, *, fmt: str | None, discard: bool
) -> bytearray:
    """120 random writes, zeroings (and discards), reopens and reads through ``vdisk.open``
    with a tiny cache, every read checked against a model; returns the model."""
    rng = random.Random(seed)
    model = bytearray(size)
    zeroes_below, discard_below = (0.7, 0.78) if discard else (0.75, 0.75)
    disk = vdisk.open(path, format=fmt, cache_mb=0.0625)
    try:
        for step in range(120):
            op, off = rng.random(), rng.randrange(0, size - 1)
            n = min(rng.choice([1, 512, 4096, 65536, 70000, 1 << 20]), size - off)
            if op < 0.6:
                data = pattern(off, n, seed=step)
                disk.write(off, data)
                model[off : off + n] = data
            elif op < zeroes_below:
                disk.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            elif op < discard_below:
                disk.discard(off, n)
                model[off : off + n] = bytes(n)
            elif op < 0.85:
                disk.close()
                disk = vdisk.open(path, format=fmt, cache_mb=0.0625)
            else:
                assert disk.read(off, n) == model[off : off + n], f"step {step}"
    finally:
        disk.close()
    return model


def crash_images_hold_old_or_new(
    cls: type[Driver], fs: Any, start: int, writes: list[tuple[int, bytes]]
) -> None:
    """Cut the power at every operation of ``fs`` (a FaultyStorage) from ``start`` on,
    with unsynced writes dropped, kept or reordered: each crash image opens and every
    4 KiB write reads as all old (zeros) or all new, never garbage."""
    for n in range(start, len(fs.log) + 1):
        for policy in ("drop", "keep", "reorder"):
            img = fs.crash_image(n, unsynced=policy, rng=random.Random(n))
            c = cls.open(MemoryStorage(fs.path, img), readonly=True, options={})
            for off, data in writes:
                assert c.read(off, 4096) in (bytes(4096), data), f"op {n} {policy} at {off}"


def grow_and_compare(
    qemu_img, tmp_path: Path, path: str, fmt: str, old: int, new: int, options: dict | None = None
) -> None:
    """Fill an ``old``-byte image, grow it to ``new`` bytes and write its last 4 KiB:
    qemu-img checks it clean and reads the grown middle as zeros."""
    vdisk.create(path, old, format=fmt, options=options)
    with vdisk.open(path) as d:
        d.write(0, b"a" * old)
        d.resize(new)
        d.write(new - 4096, b"b" * 4096)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(b"a" * old + bytes(new - 4096 - old) + b"b" * 4096)
    qemu_img("check", path)
    qemu_img("compare", "-f", fmt, "-F", "raw", path, str(ref))
