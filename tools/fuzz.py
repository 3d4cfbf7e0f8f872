#!/usr/bin/env python3
"""Mutation fuzzer for vdisk's image readers (run by hand; tests/test_hostile.py reuses it).

Seed images of every format are made at start-up with qemu-img and with vdisk itself,
from a known pattern. Each mutant (a truncation, a flipped bit, a byte set at random, a
header or table field set to an extreme, one table entry copied over another so that two
name the same block, or a handful of these at once; for VHD, VHDX and vdisk most get
their header checksums recomputed, so the change reaches the validation behind them) is
opened read-only in a worker subprocess that runs under a memory limit and a per-image
time limit; the worker reads the whole disk, asks block_status, info, the snapshots and
check. A mutant that opens is then written to (a copy: across cluster boundaries, then
read back); one refused at open is also opened for writing, and must stay unchanged.

The standard (DESIGN.md, "Bad input"): an image either works or fails with a
vdisk.errors.VdiskError. Anything else is a finding: another exception (a traceback in
the CLI), a MemoryError, a hang, a crash of the interpreter, a broken contract
(block_status that does not cover the range, a short read, written data that reads back
wrong) or a change to an image that was only read or was refused. Findings are printed
and saved under fuzz-out/ (the mutant and a .txt with the traceback);
``python tools/fuzz.py --replay fuzz-out/X.img --format F`` runs one again.

If atheris is installed, ``--atheris SEED`` runs it over that seed (a name from
``--formats``) instead of the plain random mutator (coverage-guided, in-process, reads
only).

Usage::

    python tools/fuzz.py                       # every format, 300 s
    python tools/fuzz.py --formats qcow2,vdi --seconds 60 --jobs 2
    python tools/fuzz.py --sweep --seconds 3600    # every header word set to extremes
    python tools/fuzz.py --replay fuzz-out/qcow2v3-....img --format qcow2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

K, M = 1 << 10, 1 << 20
#: Virtual size of the seeds: small, so that a whole-disk read takes milliseconds.
SEED_SIZE = 4 * M
#: Data written to every seed: across cluster and grain boundaries, and at the very end.
SEED_WRITES = [(0, 5 * K), (60 * K, 8 * K), (1 * M - 3 * K, 70 * K + 5), (SEED_SIZE - 6 * K, 6 * K)]
#: Address space of a worker: a driver that trusts a huge table length hits this limit.
MEMORY_LIMIT = 1536 * M
#: Reading more than this of a mutant's disk is pointless: read samples beyond it.
READ_CAP = 16 * M
#: Extreme values for header and table fields (written big- and little-endian).
EXTREMES = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    0xFFFFFFFE,
    1 << 32,
    1 << 40,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
]


@dataclasses.dataclass(frozen=True)
class Seed:
    """One seed image: ``fmt`` is the format vdisk is told to open it as."""

    name: str
    fmt: str
    path: str

    @property
    def byteorder(self) -> str:
        """The byte order of the format's integers (for the field sweep)."""
        return "big" if self.fmt in ("qcow2", "vhd") else "little"


# -- seeds ---------------------------------------------------------------------------


def _pattern(offset: int, length: int, seed: int) -> bytes:
    """Position-dependent bytes (each 8-byte word holds its offset, xored with the seed)."""
    start = offset - offset % 8
    words = (offset + length - start + 7) // 8
    mask = seed * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
    raw = b"".join(struct.pack("<Q", (start + 8 * i) ^ mask) for i in range(words))
    return raw[offset - start : offset - start + length]


def _raw_source(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(SEED_SIZE)
        for i, (off, n) in enumerate(SEED_WRITES):
            f.seek(off)
            f.write(_pattern(off, n, i + 1))


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


#: name -> (format vdisk opens it as, qemu-img convert arguments after -O)
QEMU_SEEDS: dict[str, tuple[str, list[str]]] = {
    # small clusters: several L2 tables in a small disk, and a cheap refcount check
    "qcow2v2": ("qcow2", ["qcow2", "-o", "compat=0.10,cluster_size=16k"]),
    "qcow2v3": ("qcow2", ["qcow2", "-o", "compat=1.1,cluster_size=4k"]),
    "qcow2z": ("qcow2", ["qcow2", "-c", "-o", "compat=1.1,cluster_size=4k"]),
    "vmdk": ("vmdk", ["vmdk", "-o", "subformat=monolithicSparse"]),
    "vmdkstream": ("vmdk", ["vmdk", "-o", "subformat=streamOptimized"]),
    "vpc": ("vhd", ["vpc", "-o", "subformat=dynamic"]),
    "vhdx": ("vhdx", ["vhdx", "-o", "block_size=1M"]),
    "vdi": ("vdi", ["vdi"]),
    "parallels": ("parallels", ["parallels"]),
}


def seed_names() -> list[str]:
    return [*QEMU_SEEDS, "vdisk"]


def make_seed(name: str, directory: str) -> Seed:
    """Make one seed image in ``directory`` (qemu-img for the vendors' formats, vdisk for
    its own, with a snapshot so the snapshot table is fuzzed too)."""
    os.makedirs(directory, exist_ok=True)
    src = os.path.join(directory, "source.raw")
    if not os.path.exists(src):
        _raw_source(src)
    if name == "vdisk":
        import vdisk

        path = os.path.join(directory, "seed.vdisk")
        vdisk.create(path, SEED_SIZE, cluster_size=16 * K)
        with vdisk.open(path) as d:
            for i, (off, n) in enumerate(SEED_WRITES[:2]):
                d.write(off, _pattern(off, n, i + 1))
            d.flush()
            d.snapshots.create("s1")
            for i, (off, n) in enumerate(SEED_WRITES[2:], 2):
                d.write(off, _pattern(off, n, i + 1))
            d.write_zeroes(2 * M, 64 * K)
        return Seed(name, "vdisk", path)
    fmt, args = QEMU_SEEDS[name]
    path = os.path.join(directory, f"{name}.img")
    _qemu_img("convert", "-f", "raw", "-O", *args, src, path)
    if name == "qcow2v3":
        _qemu_img("snapshot", "-c", "s1", path)
    return Seed(name, fmt, path)


def make_seeds(directory: str, names: list[str] | None = None) -> list[Seed]:
    return [make_seed(n, directory) for n in names or seed_names()]


# -- mutations -----------------------------------------------------------------------


def _is_pattern(sector: bytes) -> bool:
    """A sector of guest data as _pattern wrote it: word i is (start + 8 i) ^ mask, so
    word i ^ word 0 is 8 i in a sector-aligned run."""
    w = struct.unpack("<64Q", sector)
    return all(w[i] ^ w[0] == 8 * i for i in range(1, 64))


def metadata_sectors(data: bytes) -> list[int]:
    """Offsets of the 512-byte sectors that are neither all zero nor guest data: headers,
    tables, descriptors, compressed streams. Mutations aim there."""
    out = []
    zero = bytes(512)
    for off in range(0, len(data) - len(data) % 512, 512):
        s = data[off : off + 512]
        if s != zero and not _is_pattern(s):
            out.append(off)
    if len(data) % 512:
        out.append(len(data) - len(data) % 512)
    return out or [0]


def fix_checksums(fmt: str | None, buf: bytearray) -> None:
    """Recompute the header checksums of ``fmt`` that a mutation broke, so that the
    mutation gets past them to the field validation behind (VHD footer and dynamic
    header, VHDX headers and region tables, vdisk header copies)."""
    n = len(buf)
    if fmt == "vhd":
        from vdisk.formats.vhd import DYN_CSUM_AT, FOOTER_CSUM_AT, checksum

        for foot in {0, n - 512}:
            if foot >= 0 and buf[foot : foot + 8] == b"conectix":
                at = foot + FOOTER_CSUM_AT
                struct.pack_into(">I", buf, at, checksum(buf[foot : foot + 512], FOOTER_CSUM_AT))
        dyn = int.from_bytes(buf[16:24], "big") if n >= 512 else 0
        if dyn > 0 and dyn + 1024 <= n and buf[dyn : dyn + 8] == b"cxsparse":
            struct.pack_into(
                ">I", buf, dyn + DYN_CSUM_AT, checksum(buf[dyn : dyn + 1024], DYN_CSUM_AT)
            )
    elif fmt == "vhdx":
        from vdisk.formats.vhdx import crc32c

        for off, length in (
            (64 * K, 4 * K),
            (128 * K, 4 * K),
            (192 * K, 64 * K),
            (256 * K, 64 * K),
        ):
            if off + length <= n:
                struct.pack_into("<I", buf, off + 4, 0)
                struct.pack_into("<I", buf, off + 4, crc32c(buf[off : off + length]))
    elif fmt == "vdisk":
        from vdisk.cache import codec

        for off in (0, 4096):
            if off + 16 > n:
                continue
            length = int.from_bytes(buf[off + 12 : off + 16], "little")
            if 16 <= length <= 4096 and off + length <= n:
                digest = codec.checksum(bytes(buf[off : off + length - 8]))
                struct.pack_into("<Q", buf, off + length - 8, digest)


class Mutator:
    """Structured random mutations of one seed, biased to its header and metadata.
    With ``fmt``, most mutants get their header checksums recomputed (fix_checksums)."""

    def __init__(self, data: bytes, rng: random.Random, fmt: str | None = None) -> None:
        self.data = data
        self.rng = rng
        self.fmt = fmt
        self.meta = metadata_sectors(data)

    def _pos(self) -> int:
        r = self.rng.random()
        n = len(self.data)
        if r < 0.35:  # the header region, where the fields that size everything live
            return self.rng.randrange(min(n, 1024))
        if r < 0.9:
            off = self.rng.choice(self.meta)
            return min(n - 1, off + self.rng.randrange(512))
        return self.rng.randrange(n)

    def truncate(self) -> tuple[str, bytes]:
        n = len(self.data)
        cut = self.rng.choice(
            [
                self.rng.randrange(min(n, 600)),
                self.rng.choice(self.meta),
                self.rng.choice(self.meta) + self.rng.randrange(1, 512),
                self.rng.randrange(n),
                n - 1,
                max(0, n - 512),
            ]
        )
        return f"truncate@{cut}", self.data[:cut]

    def _alias(self, buf: bytearray) -> str:
        """Copy a non-zero aligned word of a metadata sector over another one in it: two
        table entries (BAT, L2, grain table, block map) then name the same host block."""
        sector = self.rng.choice(self.meta)
        width = self.rng.choice((4, 8))
        words = [
            p
            for p in range(sector, min(len(buf), sector + 512) - width + 1, width)
            if any(buf[p : p + width])
        ]
        if not words:
            return "noop"
        src = self.rng.choice(words)
        dst = sector + width * self.rng.randrange(512 // width)
        if dst + width > len(buf):
            return "noop"
        buf[dst : dst + width] = buf[src : src + width]
        return f"alias{8 * width}@{src}->{dst}"

    def _set(self, buf: bytearray) -> str:
        pos = self._pos()
        kind = self.rng.randrange(4)
        if kind == 3:
            return self._alias(buf)
        if kind == 0:
            bit = self.rng.randrange(8)
            buf[pos] ^= 1 << bit
            return f"bit{bit}@{pos}"
        if kind == 1:
            v = self.rng.randrange(256)
            buf[pos] = v
            return f"byte{v:#x}@{pos}"
        width = self.rng.choice((2, 4, 8))
        pos -= pos % width
        pos = min(pos, len(buf) - width)
        if pos < 0:
            return "noop"
        value = self.rng.choice(EXTREMES)
        if self.rng.random() < 0.2:  # offsets just past the end of the file
            value = len(buf) + self.rng.choice((0, 1, 512, 65536))
        value &= (1 << (8 * width)) - 1
        order = self.rng.choice(("little", "big"))
        buf[pos : pos + width] = value.to_bytes(width, order)
        return f"u{8 * width}{order[0]}e={value:#x}@{pos}"

    def mutate(self) -> tuple[str, bytes]:
        r = self.rng.random()
        if r < 0.15 or len(self.data) < 16:
            return self.truncate()
        buf = bytearray(self.data)
        count = 1 if r < 0.75 else self.rng.randint(2, 8)
        desc = [self._set(buf) for _ in range(count)]
        if self.fmt in ("vhd", "vhdx", "vdisk") and self.rng.random() < 0.7:
            fix_checksums(self.fmt, buf)
            desc.append("+checksums")
        if self.rng.random() < 0.05:
            desc.append("+truncate")
            del buf[self.rng.randrange(len(buf)) :]
        return ",".join(desc), bytes(buf)

    def mutants(self, count: int | None = None) -> Iterator[tuple[str, bytes]]:
        """``count`` distinct random mutants (endless when None)."""
        seen: set[bytes] = set()
        while count is None or count > 0:
            desc, data = self.mutate()
            h = hashlib.blake2b(data, digest_size=16).digest()
            if h in seen or data == self.data:
                continue
            seen.add(h)
            if count is not None:
                count -= 1
            yield desc, data

    def truncations(self) -> Iterator[tuple[str, bytes]]:
        """Cuts inside the header and at, and just past, every metadata sector's start."""
        n = len(self.data)
        cuts = {0, 1, 4, 8, 16, 32, 64, 100, 256, 511, 512, n // 2, n - 1}
        for off in self.meta:
            cuts.update((off, off + 1, off + 8))
        for cut in sorted(c for c in cuts if 0 <= c < n):
            yield f"truncate@{cut}", self.data[:cut]

    def sweep_points(self, order: str, span: int = 512) -> list[tuple[int, bytes]]:
        """(offset, bytes) for every aligned 32- and 64-bit word of the first ``span``
        bytes of each metadata sector, set to the values that break size arithmetic (in
        the format's byte order)."""
        n = len(self.data)
        v32 = [0, 0xFFFFFFFF, 0x80000000, n & 0xFFFFFFFF]
        v64 = [(1 << 64) - 1, 1 << 63, n, 1 << 40]
        out = []
        for sector in self.meta:
            for pos in range(sector, min(n, sector + span), 4):
                for width, values in ((4, v32), (8, v64)):
                    if pos % width or pos + width > n:
                        continue
                    for v in values:
                        raw = v.to_bytes(width, order)  # type: ignore[arg-type]
                        if self.data[pos : pos + width] != raw:
                            out.append((pos, raw))
        return out

    def apply(self, pos: int, raw: bytes) -> tuple[str, bytes]:
        """One sweep point as a mutant (header checksums recomputed)."""
        buf = bytearray(self.data)
        buf[pos : pos + len(raw)] = raw
        fix_checksums(self.fmt, buf)
        return f"set {raw.hex()}@{pos}", bytes(buf)

    def sweep(self, order: str) -> Iterator[tuple[str, bytes]]:
        for pos, raw in self.sweep_points(order):
            yield self.apply(pos, raw)


# -- the worker: open a mutant the way a user would ----------------------------------


class Hang(BaseException):
    """The per-image time limit passed (BaseException: no driver's except catches it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def exercise(path: str, fmt: str | None, state: dict[str, Any] | None = None) -> str:
    """Open read-only, read the whole disk (samples past READ_CAP), block_status, info,
    snapshots, check. Returns "ok"; a VdiskError propagates; a broken contract is an
    AssertionError. ``state`` gets the step reached ("phase") and, for a disk read whole,
    a digest of its content ("content")."""
    import vdisk

    st: dict[str, Any] = {} if state is None else state
    st["phase"] = "open"
    with vdisk.open(
        path, format=fmt, readonly=True, force_share=True, cache_mb=4, commit_interval=None
    ) as d:
        st["phase"] = "info"
        size = d.size
        assert isinstance(size, int) and size >= 0, f"size {size!r}"
        d.info()
        st["phase"] = "block_status"
        ext = d.block_status(0, size) if size else []
        pos = 0
        for e in ext:
            assert e.offset == pos and e.length > 0, f"block_status gap/overlap at {pos}: {e}"
            pos = e.end
        assert pos == size, f"block_status covers {pos} of {size}"
        ranges = []
        if size <= READ_CAP:
            ranges = [(o, min(M, size - o)) for o in range(0, size, M)]
        else:
            ranges = [(0, 4 * M), (size - M, M)]
            ranges += [(size // 16 * i, 64 * K) for i in range(1, 16)]
            budget = READ_CAP
            for e in ext:
                if e.kind == 0 and budget > 0:
                    n = min(e.length, budget, M)
                    ranges.append((e.offset, n))
                    budget -= n
        st["phase"] = "read"
        h = hashlib.blake2b(digest_size=16)
        for off, n in ranges:
            got = d.read(off, n)
            assert len(got) == n, f"read({off}, {n}) returned {len(got)} bytes"
            h.update(got)
        if size <= READ_CAP:
            st["content"] = h.hexdigest()
        # a read across a cluster boundary, which a driver may serve differently
        if size > 2 * d.cluster_size:
            off = d.cluster_size - 100
            assert len(d.read(off, 200)) == 200
        st["phase"] = "snapshots"
        for s in d.snapshots.list():
            with d.snapshots.open(s.name) as view:
                view.read(0, min(view.size, M))
                view.block_status(0, min(view.size, 64 * M))
        st["phase"] = "check"
        d.check()
    st["phase"] = "done"
    return "ok"


def _digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    except OSError:
        return "missing"


def exercise_writes(path: str, fmt: str | None) -> str:
    """Write across cluster boundaries (start, middle, end of the disk), flush, close,
    reopen read-only: what was written must read back, or a VdiskError say why not.
    A hostile table that makes an allocation land on live metadata shows up here."""
    import vdisk

    with vdisk.open(path, format=fmt, cache_mb=4, commit_interval=None) as d:
        size, cs = d.size, max(512, d.cluster_size)
        spots = [cs - 100, size // 2 - cs // 3, size - cs - 700]
        writes = []
        for off in spots:
            n = min(cs + 200, size - off) if off >= 0 else 0
            if n > 0 and all(off >= o + len(b) or off + n <= o for o, b in writes):
                writes.append((off, _pattern(off, n, 99)))
        for off, data in writes:
            d.write(off, data)
        d.flush()
    with vdisk.open(path, format=fmt, readonly=True, cache_mb=4) as d:
        for off, data in writes:
            assert d.read(off, len(data)) == data, f"write at {off}+{len(data)} reads back wrong"
    return "ok"


def _guarded(fn: Any, timeout: float) -> dict[str, Any]:
    """Run fn() under the time limit and classify how it ended."""
    from vdisk.errors import VdiskError

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    t0 = time.monotonic()
    res: dict[str, Any]
    try:
        fn()
        res = {"outcome": "ok"}
    except Hang:
        res = {"outcome": "hang", "detail": traceback.format_exc(limit=-8)}
    except VdiskError as e:
        res = {"outcome": "error", "detail": f"{type(e).__name__}: {e}"}
    except MemoryError:
        res = {"outcome": "memory", "detail": traceback.format_exc(limit=-8)}
    except AssertionError:
        res = {"outcome": "contract", "detail": traceback.format_exc()}
    except Exception:
        res = {"outcome": "exception", "detail": traceback.format_exc()}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    res["seconds"] = round(time.monotonic() - t0, 3)
    return res


def _open_writable(path: str, fmt: str | None) -> None:
    import vdisk

    vdisk.open(path, format=fmt, commit_interval=None).close()


def run_one(path: str, fmt: str | None, timeout: float, writes: bool = False) -> dict[str, Any]:
    """Exercise one image read-only under the time limit and classify the outcome. An
    image refused at open is also opened for writing: refused again, it must be
    unchanged. With ``writes``, a copy of an image that reads cleanly is written to."""
    before = _digest(path)
    state: dict[str, Any] = {}
    res = _guarded(lambda: exercise(path, fmt, state), timeout)
    res.update(state)
    if res["outcome"] in ("ok", "error") and _digest(path) != before:
        return {"outcome": "modified", "detail": "a read-only open changed the image file"}
    if res["outcome"] == "error" and state.get("phase") == "open":
        rw = _guarded(lambda: _open_writable(path, fmt), timeout)
        if rw["outcome"] not in ("ok", "error"):
            return {**rw, "phase": "open for writing"}
        if rw["outcome"] == "error" and _digest(path) != before:
            return {"outcome": "modified", "detail": f"a refused writable open changed it: {rw}"}
    if writes and res["outcome"] == "ok":
        copy = path + ".w"
        shutil.copyfile(path, copy)
        try:
            wr = _guarded(lambda: exercise_writes(copy, fmt), timeout)
        finally:
            for leftover in (copy, copy + ".lock"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
        res["writes"] = wr["outcome"]
        if wr["outcome"] not in ("ok", "error"):
            return {**wr, "phase": "writes"}
    return res


def worker_main() -> None:
    """Worker process: one JSON job list on stdin, one JSON line per result on stdout
    ("start" lines first, so the parent knows which image killed or hung the worker)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import logging

    logging.getLogger("vdisk").setLevel(logging.CRITICAL)  # probing warnings are expected
    jobs = json.load(sys.stdin)
    for i, job in enumerate(jobs["items"]):
        print(json.dumps({"start": i}), flush=True)
        res = run_one(job["path"], job["fmt"], jobs["timeout"], job.get("writes", False))
        res["i"] = i
        print(json.dumps(res), flush=True)


def cli_worker_main() -> None:
    """Run many `vdisk` command lines in one process (JSON list of argv on stdin), each
    through the real entry point with its own stderr; prints one JSON list of results.
    Saves a Python start-up per command where a test runs dozens of them."""
    import io
    import logging

    from vdisk.cli import main as vdisk_main

    out = []
    for argv in json.load(sys.stdin):
        err, std = io.StringIO(), io.StringIO()
        logging.getLogger("vdisk").handlers.clear()
        code: Any = 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            try:
                vdisk_main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = "traceback"
        out.append({"argv": argv, "exit": code, "stderr": err.getvalue(), "stdout": std.getvalue()})
    logging.getLogger("vdisk").handlers.clear()
    print(json.dumps(out))


def run_cli_batch(argvs: list[list[str]], *, timeout: float = 300) -> list[dict[str, Any]]:
    """Results ({"argv", "exit", "stderr", "stdout"}) of ``vdisk ARGV...`` for each argv."""
    here = os.path.abspath(__file__)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(here)), env.get("PYTHONPATH", "")]
    )
    p = subprocess.run(
        [sys.executable, here, "--cli-worker"],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if p.returncode != 0:
        raise RuntimeError(f"CLI worker failed ({p.returncode}): {p.stderr[-3000:]}")
    return json.loads(p.stdout)


BAD = ("exception", "memory", "hang", "crash", "contract", "modified")


def run_batch(
    items: list[dict[str, Any]], *, timeout: float = 10.0, cwd: str | None = None
) -> list[dict[str, Any]]:
    """Run jobs ({"path", "fmt"}) in worker subprocesses; one result per job, in order.
    A worker that dies or overruns is restarted after the job that killed it."""
    results: list[dict[str, Any]] = []
    pending = list(items)
    here = os.path.abspath(__file__)
    while pending:
        payload = json.dumps({"items": pending, "timeout": timeout})
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(here)), env.get("PYTHONPATH", "")]
        )
        proc = subprocess.Popen(
            [sys.executable, here, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        try:
            out, err = proc.communicate(payload, timeout=timeout * 2 + 5 * len(pending) + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = "worker overran its time budget\n" + err
        done: dict[int, dict[str, Any]] = {}
        started = -1
        for line in out.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "start" in msg:
                started = msg["start"]
            elif "i" in msg:
                done[msg["i"]] = msg
        n = len(done)
        results.extend(done[i] for i in range(n))
        if n == len(pending):
            break
        # the job at index n started but never reported: it crashed or hung the worker
        why = "hang" if "overran" in err else "crash"
        detail = f"worker exit {proc.returncode}, started job {started}: {err.strip()[-2000:]}"
        results.append({"outcome": why, "detail": detail})
        pending = pending[n + 1 :]
    return results


# -- the driver loop -----------------------------------------------------------------


def save_finding(
    out_dir: str, seed: Seed, desc: str, data: bytes, res: dict[str, Any], probe: bool
) -> str:
    os.makedirs(out_dir, exist_ok=True)
    h = hashlib.blake2b(data, digest_size=6).hexdigest()
    base = os.path.join(out_dir, f"{seed.name}-{res['outcome']}-{h}")
    with open(base + ".img", "wb") as f:
        f.write(data)
    fmt = "(probe)" if probe else seed.fmt
    with open(base + ".txt", "w") as f:
        f.write(f"seed: {seed.name}\nformat: {fmt}\nmutation: {desc}\n")
        f.write(f"outcome: {res['outcome']}\n\n{res.get('detail', '')}\n")
    return base + ".img"


def fuzz(
    seeds: list[Seed],
    *,
    seconds: float,
    batch: int,
    jobs: int,
    out_dir: str,
    rng_seed: int,
    timeout: float,
    sweep: bool = False,
) -> int:
    """Random mutants of every seed, round robin, until the time is up (with ``sweep``:
    the truncations and the header field sweep of every seed, then stop). Returns the
    number of findings."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(rng_seed)
    work = tempfile.mkdtemp(prefix="vdisk-fuzz-")
    sources: dict[str, Iterator[tuple[str, bytes]]] = {}
    for s in seeds:
        with open(s.path, "rb") as f:
            m = Mutator(f.read(), random.Random(rng.random()), s.fmt)
        sources[s.name] = (
            itertools.chain(m.truncations(), m.sweep(s.byteorder)) if sweep else m.mutants()
        )
    deadline = time.monotonic() + seconds
    stats: dict[str, dict[str, int]] = {s.name: {} for s in seeds}
    findings = 0
    round_no = 0

    def one_batch(seed: Seed, k: int) -> list[tuple[str, bytes, bool, dict[str, Any]]]:
        d = os.path.join(work, f"{seed.name}-{k}")
        os.makedirs(d, exist_ok=True)
        cases = []
        for j, (desc, data) in enumerate(itertools.islice(sources[seed.name], batch)):
            p = os.path.join(d, f"m{j}{os.path.splitext(seed.path)[1]}")
            with open(p, "wb") as f:
                f.write(data)
            probe = rng.random() < 0.2
            job = {"path": p, "fmt": None if probe else seed.fmt, "writes": not probe}
            cases.append((desc, data, probe, job))
        res = run_batch([c[3] for c in cases], timeout=timeout, cwd=d) if cases else []
        shutil.rmtree(d, ignore_errors=True)
        return [(c[0], c[1], c[2], r) for c, r in zip(cases, res)]

    try:
        with ThreadPoolExecutor(jobs) as pool:
            while time.monotonic() < deadline:
                round_no += 1
                futs = [(s, pool.submit(one_batch, s, round_no)) for s in seeds]
                ran = 0
                for seed, fut in futs:
                    for desc, data, probe, res in fut.result():
                        ran += 1
                        o = res["outcome"]
                        stats[seed.name][o] = stats[seed.name].get(o, 0) + 1
                        if o in BAD:
                            findings += 1
                            saved = save_finding(out_dir, seed, desc, data, res, probe)
                            last = res.get("detail", "").strip().splitlines()[-1:] or [""]
                            print(f"FINDING {seed.name} {o} [{desc}] -> {saved}\n    {last[0]}")
                left = max(0, int(deadline - time.monotonic()))
                print(f"round {round_no}: {findings} findings, {left} s left", file=sys.stderr)
                if not ran:
                    break
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, st in stats.items():
        print(f"{name:12} " + " ".join(f"{k}={v}" for k, v in sorted(st.items())))
    return findings


def run_atheris(seed: Seed, out_dir: str) -> None:
    """Coverage-guided fuzzing of one format, in-process (atheris must be installed)."""
    import atheris  # type: ignore[import-not-found]

    from vdisk.errors import VdiskError

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    fd, path = tempfile.mkstemp(suffix=os.path.splitext(seed.path)[1])
    os.close(fd)
    corpus = tempfile.mkdtemp(prefix="vdisk-atheris-")
    shutil.copy(seed.path, os.path.join(corpus, "seed"))

    def one(data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
        try:
            exercise(path, seed.fmt)
        except VdiskError:
            pass
        except BaseException:
            save_finding(out_dir, seed, "atheris", data, {"outcome": "exception"}, False)
            raise

    with atheris.instrument_imports():
        import vdisk.api
        import vdisk.formats

        vdisk.formats.drivers()
    atheris.Setup([sys.argv[0], corpus, f"-max_len={8 * M}", "-timeout=10"], one)
    atheris.Fuzz()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cli-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--formats", default="", help="seed names, comma-separated: " + ",".join(seed_names())
    )
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--batch", type=int, default=40, help="mutants per worker process")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes at a time")
    ap.add_argument("--timeout", type=float, default=10, help="seconds per image")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    ap.add_argument("--out", default="fuzz-out")
    ap.add_argument(
        "--sweep", action="store_true", help="truncations and the header field sweep, then stop"
    )
    ap.add_argument("--replay", help="run one saved image in the foreground")
    ap.add_argument("--format", default=None, help="format for --replay (default: probe)")
    ap.add_argument(
        "--atheris", metavar="SEED", help="coverage-guided run over one seed (needs atheris)"
    )
    a = ap.parse_args()
    if a.worker:
        worker_main()
        return 0
    if a.cli_worker:
        cli_worker_main()
        return 0
    if a.replay:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        res = run_one(a.replay, a.format, a.timeout, writes=True)
        print(res.pop("detail", "").rstrip())
        print(json.dumps(res))
        return 0 if res["outcome"] in ("ok", "error") else 1
    if shutil.which("qemu-img") is None:
        print("fuzz.py: qemu-img is needed to make the seed images", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    names = [n for n in a.formats.split(",") if n] or seed_names()
    unknown = set(names) - set(seed_names())
    if unknown:
        print(f"fuzz.py: unknown seed(s) {sorted(unknown)}; known: {seed_names()}", file=sys.stderr)
        return 2
    seed_dir = tempfile.mkdtemp(prefix="vdisk-seeds-")
    try:
        seeds = make_seeds(seed_dir, names)
        if a.atheris:
            run_atheris(next(s for s in seeds if s.name == a.atheris), a.out)
            return 0
        rng_seed = a.seed if a.seed is not None else int(time.time())
        print(f"fuzz.py: random seed {rng_seed}, seeds {names}", file=sys.stderr)
        n = fuzz(
            seeds,
            seconds=a.seconds,
            batch=a.batch,
            jobs=a.jobs,
            out_dir=a.out,
            rng_seed=rng_seed,
            timeout=a.timeout,
            sweep=a.sweep,
        )
    finally:
        shutil.rmtree(seed_dir, ignore_errors=True)
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
