"""One conformance suite for every format vdisk can create, through the public API.

A new driver registered in vdisk.formats gets all of this for free: random I/O against a
model (with the cache off, one cluster big, and large), reopen, zeroes and discards,
block status agreeing with content, overlays with copy-up, bounds and read-only errors,
concurrent threads.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

import vdisk
from tests.conftest import local_formats, pattern
from vdisk.errors import InvalidArgument, ReadOnlyImage, UnsupportedFeature, UsageError
from vdisk.formats.base import Kind

FORMATS = local_formats()
SIZE = (8 << 20) + 3 * 512  # not a multiple of any cluster size: the last cluster is short


def _new(tmp_path, fmt: str, size: int = SIZE, **kw) -> str:
    path = str(tmp_path / f"img.{fmt}")
    try:
        vdisk.create(path, size, format=fmt, **kw)
    except UsageError as e:
        if "object store" in str(e):
            pytest.skip(f"{fmt} lives in an object store (tests/test_s3.py covers it)")
        raise
    return path


def _assert_same(disk: vdisk.Disk, model: bytearray) -> None:
    step = 1 << 20
    for off in range(0, len(model), step):
        n = min(step, len(model) - off)
        got = disk.read(off, n)
        if got != model[off : off + n]:
            i = next(k for k in range(n) if got[k] != model[off + k])
            raise AssertionError(f"first difference at guest offset {off + i}")


@pytest.fixture(params=FORMATS)
def fmt(request) -> str:
    return request.param


@pytest.mark.parametrize("cache_mb", [0, 0.0625, 64], ids=["nocache", "onecluster", "64M"])
def test_random_io_against_model(tmp_path, fmt, cache_mb):
    path = _new(tmp_path, fmt)
    rng = random.Random(f"{fmt}-{cache_mb}")
    model = bytearray(SIZE)
    disk = vdisk.open(path, cache_mb=cache_mb)
    try:
        assert disk.size == SIZE
        for step in range(160):
            op = rng.random()
            off = rng.randrange(0, SIZE - 1)
            n = min(rng.choice([1, 512, 4096, 65536, 70000, 200000, 1 << 20]), SIZE - off)
            if op < 0.55:
                data = pattern(off, n, seed=step)
                disk.write(off, data)
                model[off : off + n] = data
            elif op < 0.65:
                disk.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            elif op < 0.72:
                disk.discard(off, n)
                model[off : off + n] = bytes(n)
            elif op < 0.78:
                disk.flush()
            elif op < 0.82:
                disk.close()
                disk = vdisk.open(path, cache_mb=cache_mb)
            else:
                assert disk.read(off, n) == model[off : off + n], f"step {step}: read {off}+{n}"
        _assert_same(disk, model)
        for e in disk.block_status():
            if e.kind != Kind.DATA:
                assert model[e.offset : e.end] == bytes(e.length), f"{e} is not zero in the model"
        disk.close()
        disk = vdisk.open(path, readonly=True)
        _assert_same(disk, model)
    finally:
        disk.close()


def test_boundaries_and_errors(tmp_path, fmt):
    path = _new(tmp_path, fmt)
    with vdisk.open(path) as d:
        cs = d.cluster_size
        # a write straddling two clusters, and one ending exactly at the end of the disk
        d.write(cs - 100, b"\x11" * 200)
        d.write(SIZE - 700, b"\x22" * 700)
        assert d.read(cs - 101, 202) == b"\0" + b"\x11" * 200 + b"\0"
        assert d.read(SIZE - 701, 701) == b"\0" + b"\x22" * 700
        with pytest.raises(InvalidArgument):
            d.read(SIZE - 10, 11)
        with pytest.raises(InvalidArgument):
            d.write(SIZE, b"x")
        with pytest.raises(InvalidArgument):
            d.read(-1, 5)
    with vdisk.open(path, readonly=True) as d:
        with pytest.raises(ReadOnlyImage):
            d.write(0, b"x")
        assert d.read(cs - 100, 200) == b"\x11" * 200


def test_file_object(tmp_path, fmt):
    path = _new(tmp_path, fmt)
    with vdisk.open(path) as d:
        f = d.as_file()
        f.seek(1000)
        f.write(b"hello world")
        f.seek(-SIZE + 1000, 2)
        assert f.read(11) == b"hello world"
        assert f.tell() == 1011


def test_overlay_copy_up(tmp_path, fmt):
    base = _new(tmp_path, fmt)
    base_data = bytearray(SIZE)
    with vdisk.open(base) as d:
        for off in range(0, SIZE - 300000, 1 << 20):
            data = pattern(off, 300000, seed=7)
            d.write(off, data)
            base_data[off : off + 300000] = data
    before = Path(base).read_bytes()
    top = str(tmp_path / f"top.{fmt}")
    try:
        vdisk.create(top, None, format=fmt, backing=base)
    except (UnsupportedFeature, UsageError) as e:
        pytest.skip(f"{fmt} overlays: {e}")
    model = bytearray(base_data)
    rng = random.Random(fmt)
    with vdisk.open(top, cache_mb=0.0625) as d:
        assert d.size == SIZE
        _assert_same(d, model)
        for i in range(40):
            off = rng.randrange(0, SIZE - 1)
            n = min(rng.choice([100, 4096, 70000]), SIZE - off)
            data = bytes([i + 1]) * n
            d.write(off, data)
            model[off : off + n] = data
        d.write_zeroes(4096, 200000)
        model[4096:204096] = bytes(200000)
        d.flush()
        _assert_same(d, model)
    with vdisk.open(top, readonly=True) as d:
        _assert_same(d, model)
        info = d.info()
        assert info["backing-chain"][0]["format"] == fmt
    assert Path(base).read_bytes() == before, "writing to an overlay changed its base"


def test_threads(tmp_path, fmt):
    path = _new(tmp_path, fmt)
    errors: list[BaseException] = []
    chunk = SIZE // 4 - (SIZE // 4) % 4096
    with vdisk.open(path, cache_mb=1) as d:

        def worker(k: int) -> None:
            try:
                rng = random.Random(k)
                for _ in range(60):
                    off = k * chunk + rng.randrange(0, chunk - 9000)
                    data = pattern(off, rng.choice([512, 4096, 9000]), seed=k)
                    d.write(off, data)
                    assert d.read(off, len(data)) == data
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_lock(tmp_path, fmt):
    path = _new(tmp_path, fmt)
    with vdisk.open(path):
        with pytest.raises(vdisk.ImageLocked):
            vdisk.open(path)
        with pytest.raises(vdisk.ImageLocked):
            vdisk.open(path, readonly=True)
        with vdisk.open(path, readonly=True, force_share=True) as r:
            assert r.size == SIZE
    with (
        vdisk.open(path, readonly=True),
        vdisk.open(path, readonly=True),
        pytest.raises(vdisk.ImageLocked),
    ):
        vdisk.open(path)


def test_throwaway_overlay_leaves_image_untouched(tmp_path, fmt):
    path = _new(tmp_path, fmt)
    with vdisk.open(path) as d:
        d.write(12345, pattern(12345, 200000))
    before = Path(path).read_bytes()
    with vdisk.open(path, snapshot=True, cache_mb=0.0625) as d:
        d.write(100, b"\x77" * 150000)
        d.write_zeroes(200000, 70000)
        d.flush()
        assert d.read(100, 150000) == b"\x77" * 150000
        assert d.read(200000, 70000) == bytes(70000)
        assert d.read(150100, 49900) == pattern(150100, 49900)
    assert Path(path).read_bytes() == before
    with vdisk.open(path, readonly=True) as d:
        assert d.read(12345, 200000) == pattern(12345, 200000)
