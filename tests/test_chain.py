"""Backing chains on every format that can make overlays: deep chains, loops, missing
bases, commit, rebase and flatten keeping the guest content, and the CLI over them."""

from __future__ import annotations

import os
import random

import pytest

import vdisk
from tests.conftest import pattern, vdisk_cli
from vdisk import formats, ops
from vdisk.api import _open_driver
from vdisk.errors import BackingMismatch, UnsupportedFeature, UsageError
from vdisk.formats.base import BackingRef

OVERLAY_FORMATS = [
    f for f in ("vdisk", "qcow2", "vmdk", "vhd", "vhdx", "vdi", "parallels") if f in formats.names()
]
SIZE = 4 << 20

pytestmark = pytest.mark.skipif(not OVERLAY_FORMATS, reason="no format with overlays yet")


@pytest.fixture(params=OVERLAY_FORMATS)
def fmt(request) -> str:
    return request.param


def _chain(tmp_path, fmt: str, depth: int, seed: int = 0) -> tuple[list[str], bytearray]:
    """base + depth-1 overlays, each writing a few ranges; returns paths and the model."""
    rng = random.Random(seed)
    model = bytearray(SIZE)
    paths = []
    for i in range(depth):
        p = str(tmp_path / f"l{i}.{fmt}")
        if i == 0:
            vdisk.create(p, SIZE, format=fmt)
        else:
            vdisk.create(p, None, format=fmt, backing=paths[-1])
        with vdisk.open(p) as d:
            for _ in range(3):
                off = rng.randrange(0, SIZE - 70000)
                n = rng.choice([512, 4096, 70000])
                data = pattern(off, n, seed=i + 1)
                d.write(off, data)
                model[off : off + n] = data
        paths.append(p)
    return paths, model


def _read_all(path: str) -> bytes:
    with vdisk.open(path, readonly=True) as d:
        return d.read(0, d.size)


def test_deep_chain_reads(tmp_path, fmt):
    paths, model = _chain(tmp_path, fmt, 50)
    assert _read_all(paths[-1]) == model
    with vdisk.open(paths[-1], readonly=True) as d:
        assert len(d.info()["backing-chain"]) == 49


def test_missing_backing_is_a_clear_error(tmp_path, fmt):
    paths, _ = _chain(tmp_path, fmt, 2)
    os.rename(paths[0], paths[0] + ".gone")
    with pytest.raises(BackingMismatch, match="does not exist"):
        vdisk.open(paths[1])
    p = vdisk_cli("check", paths[1], check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr + p.stdout


def test_backing_loop_is_a_clear_error(tmp_path, fmt):
    paths, _ = _chain(tmp_path, fmt, 2)
    with pytest.raises(UsageError, match="loop"):
        ops.rebase(paths[0], paths[1], unsafe=True)
    # force the loop behind vdisk's back: a -> b -> a
    drv = _open_driver(paths[0], format=fmt, readonly=False, force_share=False, options=None)
    try:
        drv.set_backing(BackingRef(os.path.basename(paths[1]), fmt), None)
        drv.flush()
    except UnsupportedFeature:
        pytest.skip(f"{fmt} cannot rewrite its backing reference")
    finally:
        drv.close()
    with pytest.raises(BackingMismatch, match="loop"):
        vdisk.open(paths[1], readonly=True)


def test_commit_keeps_content(tmp_path, fmt):
    paths, model = _chain(tmp_path, fmt, 3)
    n = ops.commit(paths[2])
    assert n > 0
    assert _read_all(paths[2]) == model
    assert _read_all(paths[1]) == model, "the base must now hold the overlay's data"


def test_rebase_safe_and_flatten(tmp_path, fmt):
    paths, model = _chain(tmp_path, fmt, 3)
    ops.rebase(paths[2], paths[0])  # skip the middle layer, keep content
    assert _read_all(paths[2]) == model
    with vdisk.open(paths[2], readonly=True) as d:
        assert [b["filename"] for b in d.info()["backing-chain"]] == [paths[0]]
    ops.flatten(paths[2])
    os.unlink(paths[1])
    os.unlink(paths[0])
    assert _read_all(paths[2]) == model


def test_rebase_unsafe_only_rewrites(tmp_path, fmt):
    paths, _ = _chain(tmp_path, fmt, 3)
    other = str(tmp_path / f"other.{fmt}")
    vdisk.create(other, SIZE, format=fmt)
    ops.rebase(paths[2], other, unsafe=True)
    with vdisk.open(paths[2], readonly=True) as d:
        assert d.info()["backing-chain"][0]["filename"] == other


def test_clone_cli_and_info(tmp_path, fmt):
    base = str(tmp_path / f"base.{fmt}")
    vdisk_cli("create", "-f", fmt, base, "2M")
    clone = str(tmp_path / "clone.vdisk")
    if "vdisk" not in formats.names():
        pytest.skip("native format missing")
    vdisk_cli("clone", base, clone)
    out = vdisk_cli("info", clone).stdout
    assert "backing chain 1:" in out and base in out


def test_open_clone_holds_its_base_read_only(tmp_path, fmt):
    """A clone opens its base under a shared lock: nobody can write the base meanwhile."""
    paths, _ = _chain(tmp_path, fmt, 2)
    with vdisk.open(paths[1]):
        with pytest.raises(vdisk.ImageLocked):
            vdisk.open(paths[0])
        with vdisk.open(paths[0], readonly=True) as base:  # readers may share it
            assert base.size == SIZE
    with vdisk.open(paths[0]):  # and once the clone is closed the base is free again
        pass


def test_shrink_then_grow_hides_the_backing_image(tmp_path, fmt):
    """What a shrink cut off must read as zeros when the overlay grows again, not as the
    backing image's bytes (partial last cluster and whole clusters alike)."""
    base, top = str(tmp_path / f"b.{fmt}"), str(tmp_path / f"t.{fmt}")
    vdisk.create(base, SIZE, format=fmt)
    with vdisk.open(base) as d:
        d.write(0, pattern(0, SIZE))
    vdisk.create(top, None, format=fmt, backing=base)
    cut = SIZE // 4 + 512
    with vdisk.open(top) as d:
        d.write(4096, b"top" * 100)
        try:
            d.resize(cut)
        except (UnsupportedFeature, UsageError):
            pytest.skip(f"{fmt} overlays cannot shrink")
        d.resize(SIZE)
    want = bytearray(pattern(0, SIZE))
    want[4096 : 4096 + 300] = b"top" * 100
    assert _read_all(top) == want[:cut] + bytes(SIZE - cut)
