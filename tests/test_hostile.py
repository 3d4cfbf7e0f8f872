"""Hostile images of every format: bounded failure, never a traceback or a wrong answer.

The standard (DESIGN.md): a truncated or hostile image gets a clear error, a non-zero
exit and no damage; never a traceback, a hang, unbounded memory or corrupt data returned
as good. Seeds of every format are made at test time (qemu-img for the vendors' formats,
vdisk for its own); the mutants are tools/fuzz.py's, with fixed random seeds so a failure
reproduces. Each batch runs in a worker subprocess under RLIMIT_AS and a per-image time
limit, and opens, reads the whole disk, asks block_status, info, snapshots and check.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import vdisk
from tests.conftest import VDISK, need

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("vdisk_fuzz", ROOT / "tools" / "fuzz.py")
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["vdisk_fuzz"] = fuzz
_spec.loader.exec_module(fuzz)

SEEDS = fuzz.seed_names()
#: per seed: random mutants, header-sweep points, truncation points
N_RANDOM, N_SWEEP, N_TRUNC = 24, 12, 8
#: seconds one image may take (the machine is shared: generous, a real hang is endless)
IMAGE_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("qemu-img")
    return tmp_path_factory.mktemp("seeds")


@functools.cache
def _seed(name: str, directory: str) -> Any:
    return fuzz.make_seed(name, os.path.join(directory, name))


def _mutants(seed: Any) -> list[tuple[str, bytes]]:
    """A fixed selection: truncations, extreme values in header fields, random mutants."""
    data = Path(seed.path).read_bytes()
    rng = random.Random(f"hostile-{seed.name}")
    m = fuzz.Mutator(data, rng, seed.fmt)
    truncs = list(m.truncations())
    cases = rng.sample(truncs, min(N_TRUNC, len(truncs)))
    points = m.sweep_points(seed.byteorder)
    cases += [m.apply(pos, raw) for pos, raw in rng.sample(points, min(N_SWEEP, len(points)))]
    cases += list(m.mutants(N_RANDOM))
    return cases


@functools.cache
def _outcomes(name: str, directory: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(mutation, mutant path, result) for every mutant of one seed, in two workers."""
    seed = _seed(name, directory)
    out_dir = os.path.join(directory, name, "mutants")
    os.makedirs(out_dir, exist_ok=True)
    ext = os.path.splitext(seed.path)[1]
    cases = []
    for i, (desc, data) in enumerate(_mutants(seed)):
        path = os.path.join(out_dir, f"m{i:03d}{ext}")
        Path(path).write_bytes(data)
        # every fifth one is probed rather than named: the probe must cope too
        probe = i % 5 == 4
        cases.append(
            (desc, path, {"path": path, "fmt": None if probe else seed.fmt, "writes": not probe})
        )
    half = len(cases) // 2
    with ThreadPoolExecutor(2) as pool:
        parts = [
            pool.submit(fuzz.run_batch, [c[2] for c in part], timeout=IMAGE_TIMEOUT, cwd=out_dir)
            for part in (cases[:half], cases[half:])
        ]
        results = [r for p in parts for r in p.result()]
    return [(c[0], c[1], r) for c, r in zip(cases, results, strict=True)]


@pytest.mark.parametrize("name", SEEDS)
def test_mutants_fail_cleanly(seed_dir: Path, name: str) -> None:
    """Every mutant opens and reads, or fails with a VdiskError; nothing else."""
    outcomes = _outcomes(name, str(seed_dir))
    bad = [
        f"{desc} ({os.path.basename(path)}): {r['outcome']}\n{r.get('detail', '')}"
        for desc, path, r in outcomes
        if r["outcome"] not in ("ok", "error")
    ]
    assert not bad, f"{name}: {len(bad)} of {len(outcomes)} mutants misbehaved:\n" + "\n".join(
        bad[:5]
    )
    errors = sum(r["outcome"] == "error" for _, _, r in outcomes)
    assert errors >= 5, f"{name}: only {errors} of {len(outcomes)} mutants were refused"
    if name == "vdisk":
        # Everything is checksummed: a mutant read whole without an error reads a state
        # that was committed (the final one, or the one before when the newest header
        # copy is damaged: it is skipped as if torn, as the crash protocol says).
        states = {_content_digest(fuzz.SEED_WRITES), _content_digest(fuzz.SEED_WRITES[:2])}
        wrong = [
            desc
            for desc, _, r in outcomes
            if r["outcome"] == "ok" and r.get("content") not in (None, *states)
        ]
        assert not wrong, f"vdisk mutants read as good but with other content: {wrong}"


def _content_digest(writes: list[tuple[int, int]]) -> str:
    """The worker's digest of the seed disk's content after the given pattern writes."""
    disk = bytearray(fuzz.SEED_SIZE)
    for i, (off, n) in enumerate(writes):
        disk[off : off + n] = fuzz._pattern(off, n, i + 1)
    return hashlib.blake2b(bytes(disk), digest_size=16).hexdigest()


def test_seeds_are_clean(seed_dir: Path) -> None:
    """The harness itself: every unmutated seed opens, reads and checks without error."""
    seeds = [_seed(n, str(seed_dir)) for n in SEEDS]
    res = fuzz.run_batch([{"path": s.path, "fmt": s.fmt} for s in seeds], timeout=IMAGE_TIMEOUT)
    assert [r["outcome"] for r in res] == ["ok"] * len(seeds), res


def test_harness_tells_vdisk_errors_from_bugs(tmp_path: Path) -> None:
    """The harness's classification: a missing image is a VdiskError (allowed); a format
    argument of the wrong type makes a TypeError/AttributeError (a bug), and is reported."""
    img = tmp_path / "x.img"
    img.write_bytes(bytes(4096))
    res = fuzz.run_batch(
        [
            {"path": str(tmp_path / "missing.img"), "fmt": "qcow2"},
            {"path": str(img), "fmt": 123},
        ],
        timeout=IMAGE_TIMEOUT,
    )
    assert [r["outcome"] for r in res] == ["error", "exception"], res


# -- the CLI on hostile images -------------------------------------------------------


def _refused(name: str, directory: str) -> list[tuple[str, str, str]]:
    """Images of a seed's format that cannot even be opened, as (mutation, path, format):
    its header cut at 300 bytes, and the first other mutant that failed at open."""
    seed = _seed(name, directory)
    cut = os.path.join(directory, name, "cut300" + os.path.splitext(seed.path)[1])
    Path(cut).write_bytes(Path(seed.path).read_bytes()[:300])
    picked = [("truncate@300", cut, seed.fmt)]
    for desc, path, r in _outcomes(name, directory):
        if r["outcome"] == "error" and r["phase"] == "open" and not desc.startswith("trunc"):
            picked.append((desc, path, seed.fmt))
            break
    return picked


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


CLI_COMMANDS = ("info", "check", "map", "convert")


def _cli_argv(command: str, fmt: str, path: str, out: str) -> list[str]:
    if command == "convert":
        return ["convert", "-f", fmt, "-O", "raw", path, out]
    return [command, "-f", fmt, path]


@functools.cache
def _cli_results(directory: str) -> dict[str, list[tuple[str, str, str, dict[str, Any]]]]:
    """Every CLI command on refused mutants of every seed, in one process through the real
    entry point (vdisk.cli.main): {seed: [(mutation, path, digest before, result)]}."""
    jobs = []
    for name in SEEDS:
        for desc, path, fmt in _refused(name, directory):
            before = _digest(path)
            for command in CLI_COMMANDS:
                out = os.path.join(directory, f"cli-{name}-{command}.raw")
                jobs.append((name, desc, path, before, _cli_argv(command, fmt, path, out)))
    results = fuzz.run_cli_batch([j[4] for j in jobs])
    by_seed: dict[str, list[tuple[str, str, str, dict[str, Any]]]] = {n: [] for n in SEEDS}
    for (name, desc, path, before, _), r in zip(jobs, results, strict=True):
        by_seed[name].append((desc, path, before, r))
    return by_seed


def _assert_one_clean_line(what: str, code: object, stderr: str, stdout: str) -> None:
    assert code in (1, 2), f"{what}: exit {code}, stderr {stderr!r}"
    assert "Traceback" not in stderr + stdout, f"{what}: {stderr}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0]) < 1000, f"{what}: stderr {stderr!r}"


@pytest.mark.parametrize("name", SEEDS)
def test_cli_on_hostile_image(seed_dir: Path, name: str) -> None:
    """info, check, map, convert: one line on stderr, exit 1 or 2, the image unchanged."""
    runs = _cli_results(str(seed_dir))[name]
    assert runs, f"{name}: no mutant that fails to open, to try the CLI on"
    for desc, path, before, r in runs:
        what = f"{name} [{desc}] vdisk {' '.join(r['argv'][:1])}"
        _assert_one_clean_line(what, r["exit"], r["stderr"], r["stdout"])
        assert _digest(path) == before, f"{what}: the image changed"


def test_cli_subprocess_on_truncated_qcow2(seed_dir: Path, tmp_path: Path) -> None:
    """The same through `python -m vdisk` as a user runs it: exit code and stderr of the
    real process."""
    seed = _seed("qcow2v3", str(seed_dir))
    img = tmp_path / "t.qcow2"
    img.write_bytes(Path(seed.path).read_bytes()[:300])
    for command in CLI_COMMANDS:
        argv = _cli_argv(command, "qcow2", str(img), str(tmp_path / "out.raw"))
        p = subprocess.run([*VDISK, *argv], capture_output=True, text=True, timeout=60)
        _assert_one_clean_line(f"vdisk {command}", p.returncode, p.stderr, p.stdout)
    assert len(img.read_bytes()) == 300


# -- corrupt data is never returned as good (native format) --------------------------


def test_native_data_bit_flips_raise_checksum_mismatch(tmp_path: Path) -> None:
    """Flip one bit in each stored data cluster of a .vdisk (incompressible data, so the
    clusters are stored raw and can be found by content): every read of the cluster
    raises ChecksumMismatch, check reports it, and the CLI's check exits 2."""
    cs = 16 * 1024
    img = str(tmp_path / "d.vdisk")
    vdisk.create(img, 1 << 20, cluster_size=cs)
    rng = random.Random(5)
    clusters = {i: rng.randbytes(cs) for i in (0, 3, 4, 40)}
    with vdisk.open(img) as d:
        for i, data in clusters.items():
            d.write(i * cs, data)
    pristine = Path(img).read_bytes()
    for i, data in clusters.items():
        host = pristine.find(data)
        assert host >= 0, f"cluster {i} is not stored raw"
        flipped = bytearray(pristine)
        flipped[host + rng.randrange(cs)] ^= 1 << rng.randrange(8)
        Path(img).write_bytes(bytes(flipped))
        with vdisk.open(img, readonly=True) as d:
            # a read of the cluster, and one across its boundary with the next
            for off, n in ((i * cs + 10, 100), (i * cs + cs - 512, 1024)):
                with pytest.raises(vdisk.ChecksumMismatch):
                    d.read(off, n)
            other = next(j for j in clusters if j != i)
            assert d.read(other * cs, cs) == clusters[other]
            report = d.check()
            assert report.corruptions, f"check missed the flipped bit in cluster {i}"
        p = subprocess.run([*VDISK, "check", img], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p
    Path(img).write_bytes(pristine)
    with vdisk.open(img, readonly=True) as d:
        assert all(d.read(i * cs, cs) == data for i, data in clusters.items())


# -- aliased blocks: a write must never silently change a second guest block ----------


def _table(name: str, data: bytes) -> tuple[int, str, int]:
    """(offset, struct format of one entry, number of entries) of the table that maps a
    seed's guest blocks: VDI block map, Parallels BAT, VHD BAT, VHDX BAT, VMDK grain table."""
    u32le = lambda at: int.from_bytes(data[at : at + 4], "little")  # noqa: E731
    if name == "vdi":
        return u32le(0x154), "<I", 4
    if name == "parallels":
        return 64, "<I", u32le(32)
    if name == "vpc":
        dyn = int.from_bytes(data[16:24], "big")
        bat = int.from_bytes(data[dyn + 16 : dyn + 24], "big")
        return bat, ">I", int.from_bytes(data[dyn + 28 : dyn + 32], "big")
    if name == "vhdx":
        rt = 192 * 1024
        for i in range(u32le(rt + 8)):
            guid, off = data[rt + 16 + 32 * i : rt + 32 + 32 * i], rt + 32 + 32 * i
            if guid.hex().startswith("6677c22d"):  # the BAT region's GUID
                return int.from_bytes(data[off : off + 8], "little"), "<Q", 8
    if name == "vmdk":
        gd = int.from_bytes(data[56:64], "little") * 512
        return u32le(gd) * 512, "<I", u32le(44)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["vdi", "parallels", "vpc", "vhdx", "vmdk"])
def test_aliased_blocks_refuse_writes(seed_dir: Path, name: str) -> None:
    """Two table entries naming the same host block: reads work (the image says so), check
    reports it, and the first write is refused (CorruptImage) with the image unchanged.
    Before the fix an in-place write into one guest block silently changed the other."""
    import struct

    seed = _seed(name, str(seed_dir))
    data = bytearray(Path(seed.path).read_bytes())
    off, fmt, count = _table(name, bytes(data))
    size = struct.calcsize(fmt)
    entries = [struct.unpack_from(fmt, data, off + size * i)[0] for i in range(count)]
    if name == "vhdx":
        allocated = [i for i, e in enumerate(entries) if e & 7 == 6]  # FULLY_PRESENT
    else:
        free = {"vdi": (0xFFFFFFFF, 0xFFFFFFFE), "vmdk": (0, 1)}.get(name, (0, 0xFFFFFFFF))
        allocated = [i for i, e in enumerate(entries) if e not in free]
    assert len(allocated) >= 2, (name, entries[:8])
    first, second = allocated[:2]
    struct.pack_into(fmt, data, off + size * second, entries[first])
    fuzz.fix_checksums(seed.fmt, data)
    img = str(seed_dir / name / f"aliased{os.path.splitext(seed.path)[1]}")
    Path(img).write_bytes(bytes(data))
    with vdisk.open(img, format=seed.fmt, readonly=True) as d:
        d.read(0, d.size)
        assert d.check().corruptions, f"{name}: check missed two entries naming one block"
    d = vdisk.open(img, format=seed.fmt)
    with pytest.raises(vdisk.CorruptImage):
        d.write(0, b"\xa5" * 512)
        d.flush()
    with pytest.raises(vdisk.CorruptImage):  # the write stays pending: close says so too
        d.close()
    assert Path(img).read_bytes() == bytes(data), f"{name}: a refused write changed the image"


def _qcow2_tables(data: bytes) -> tuple[int, int, int]:
    """(cluster size, L2 table offset of L1 entry 0, first refcount block) of a qcow2."""
    cs = 1 << int.from_bytes(data[20:24], "big")
    l1 = int.from_bytes(data[40:48], "big")
    rt = int.from_bytes(data[48:56], "big")
    mask = 0x00FF_FFFF_FFFF_FE00
    return (
        cs,
        int.from_bytes(data[l1 : l1 + 8], "big") & mask,
        int.from_bytes(data[rt : rt + 8], "big"),
    )


@pytest.mark.parametrize("case", ["l2-refcount-0", "data-entry-on-l2"])
def test_qcow2_writes_never_land_on_an_l2_table(seed_dir: Path, case: str) -> None:
    """An L2 table whose refcount says free, or an L2 entry that names the L2 table itself
    as a data cluster: the write is refused (before the fix it overwrote the mapping and
    the written data read back wrong)."""
    seed = _seed("qcow2v2", str(seed_dir))
    data = bytearray(Path(seed.path).read_bytes())
    cs, l2, rb = _qcow2_tables(bytes(data))
    if case == "l2-refcount-0":
        data[rb + 2 * (l2 // cs) : rb + 2 * (l2 // cs) + 2] = bytes(2)
    else:
        data[l2 : l2 + 8] = ((1 << 63) | l2).to_bytes(8, "big")
    img = seed_dir / f"{case}.qcow2"
    img.write_bytes(bytes(data))
    d = vdisk.open(str(img), format="qcow2")
    with pytest.raises(vdisk.CorruptImage) as e:
        for off in (0, 3 * cs, d.size // 2, d.size - cs):  # allocations and in-place writes
            d.write(off, b"\x5a" * cs)
        d.flush()
    assert "L2 table" in str(e.value)
    with pytest.raises(vdisk.CorruptImage):  # what could not be written is still pending
        d.close()


@pytest.mark.parametrize("backing", ["fifo", "self", "dir", "missing"])
def test_hostile_backing_file_names(tmp_path: Path, qemu_img, backing: str) -> None:
    """A backing file name that is a FIFO (opening it would block forever), the image
    itself, a directory or nothing: one line on stderr, exit 1 or 2, no hang."""
    top = tmp_path / "top.qcow2"
    target = {
        "fifo": tmp_path / "fifo",
        "self": top,
        "dir": tmp_path,
        "missing": tmp_path / "missing.raw",
    }[backing]
    if backing == "fifo":
        os.mkfifo(target)
    if backing == "self":  # qemu-img create refuses this; rebase -u does not
        qemu_img("create", "-q", "-f", "qcow2", str(top), "1M")
        qemu_img("rebase", "-u", "-b", str(top), "-F", "qcow2", str(top))
    else:
        qemu_img(
            "create", "-q", "-f", "qcow2", "-u", "-b", str(target), "-F", "raw", str(top), "1M"
        )
    before = _digest(str(top))
    for command in ("info", "map"):
        p = subprocess.run([*VDISK, command, str(top)], capture_output=True, text=True, timeout=30)
        _assert_one_clean_line(f"vdisk {command} ({backing})", p.returncode, p.stderr, p.stdout)
    assert _digest(str(top)) == before
