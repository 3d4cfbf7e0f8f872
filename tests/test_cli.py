"""The `vdisk` command: outputs, exit codes, and bad input as one clear line."""

from __future__ import annotations

import json
import os

import pytest

import vdisk
from tests.conftest import local_formats, vdisk_cli
from vdisk.cache import codec


def _one_line_error(p) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,expect",
    [
        (["create", "{d}/a.img", "1Q"], "invalid size"),
        (["create", "{d}/a.img", "-f", "nosuchformat", "1M"], "unknown format"),
        (["create", "{d}/a.img"], "SIZE is needed"),
        (["info", "{d}/missing.img"], "no such file"),
        (["info", "{d}"], "directory"),
        (["info", "--bogus", "{d}/x"], "no such option"),
        (["nosuchcommand"], "No such command"),
        (["resize", "{d}/missing.img", "1G"], "no such file"),
        (["convert", "{d}/missing.img", "{d}/out.vdisk"], "no such file"),
        (["create", "-f", "raw", "-o", "bogus=1", "{d}/b.img", "1M"], "unknown option"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, expect):
    p = vdisk_cli(*[a.format(d=tmp_path) for a in args], check=False)
    line = _one_line_error(p)
    assert expect.lower() in line.lower(), line


def test_create_refuses_to_overwrite(tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(b"precious")
    p = vdisk_cli("create", "-f", "raw", str(img), "1M", check=False)
    assert "already exists" in _one_line_error(p)
    assert img.read_bytes() == b"precious"


def test_info_json_and_map(tmp_path):
    img = str(tmp_path / "a.img")
    vdisk_cli("create", "-f", "raw", img, "4M")
    with open(img, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"x" * 8192)
    info = json.loads(vdisk_cli("info", "--output", "json", img).stdout)
    assert info["virtual-size"] == 4 << 20
    assert info["format"] == "raw"
    runs = json.loads(vdisk_cli("map", "--output", "json", img).stdout)
    data = [r for r in runs if r["data"]]
    assert data and data[0]["start"] <= 1 << 20 < data[0]["start"] + data[0]["length"]


def test_convert_compare_verify(tmp_path):
    src = str(tmp_path / "a.img")
    vdisk_cli("create", "-f", "raw", src, "3M")
    with open(src, "r+b") as f:
        f.seek(70000)
        f.write(os.urandom(300000))
    for fmt in local_formats():
        dst = str(tmp_path / f"b.{fmt}")
        out = vdisk_cli("convert", "-O", fmt, "--verify", src, dst).stdout
        assert "verified" in out
        assert vdisk_cli("compare", src, dst).returncode == 0
    with open(src, "r+b") as f:
        f.seek(123457)
        f.write(b"!")
    p = vdisk_cli("compare", src, str(tmp_path / "b.raw"), check=False)
    assert p.returncode == 1
    assert "123457" in p.stdout


def _text_like(n: int) -> bytes:
    """Compressible bytes that are not trivially so (lz4 and zstd differ on them)."""
    words = [os.urandom(3).hex().encode() for _ in range(400)]
    rng = __import__("random").Random(7)
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def test_convert_compressed(tmp_path, qemu_img):
    """-c: vdisk writes zstd clusters (smaller than lz4, flagged so older readers refuse),
    vmdk writes streamOptimized, qcow2 compressed clusters (deflate or zstd); a format
    that cannot compress is refused before any file is made; --verify accepts VMDK's
    size rounded up to 512 bytes."""
    src = str(tmp_path / "a.img")
    with open(src, "wb") as f:
        f.write(_text_like(3 << 20) + b"tail")  # not a multiple of 512
    plain, packed = str(tmp_path / "p.vdisk"), str(tmp_path / "z.vdisk")
    vdisk_cli("convert", "--verify", src, plain)
    vdisk_cli("convert", "-c", "--verify", src, packed)
    info = json.loads(vdisk_cli("info", "--output", "json", packed).stdout)["format-specific"]
    assert info["features"]["incompatible"] == 1
    lz4 = json.loads(vdisk_cli("info", "--output", "json", plain).stdout)["format-specific"]
    assert info["stored_bytes"] < lz4["stored_bytes"] * 0.9
    assert vdisk_cli("check", packed).returncode == 0
    assert vdisk_cli("compare", src, packed).returncode == 0
    with vdisk.open(packed, readonly=True) as d:
        e = d.driver._entry(1)
        assert e is not None and e.codec == codec.ZSTD
    with open(packed, "r+b") as f:
        f.seek(e.host + 100)
        f.write(b"\xff" * 16)
    p = vdisk_cli("compare", src, packed, check=False)
    assert "checksum" in _one_line_error(p)
    vm = str(tmp_path / "s.vmdk")
    vdisk_cli("convert", "-c", "--verify", src, vm)
    assert "streamOptimized" in qemu_img("info", vm).stdout
    assert qemu_img("compare", src, vm, check=False).returncode == 0
    for ctype in ("zlib", "zstd"):  # qcow2: compressed clusters qemu-img reads and checks
        q = str(tmp_path / f"q-{ctype}.qcow2")
        vdisk_cli("convert", "-c", "-o", f"compression_type={ctype}", "--verify", src, q)
        assert qemu_img("check", q).returncode == 0
        assert qemu_img("compare", src, q).returncode == 0
        assert os.stat(q).st_blocks * 512 < (3 << 20) * 0.6
    p = vdisk_cli(
        "convert", "-c", "-o", "extended_l2=on", src, str(tmp_path / "e.qcow2"), check=False
    )
    assert "extended L2" in _one_line_error(p)
    assert not (tmp_path / "e.qcow2").exists()
    v = tmp_path / "v.vhd"
    p = vdisk_cli("convert", "-c", src, str(v), check=False)
    assert "cannot store compressed data" in _one_line_error(p)
    assert not v.exists()
    p = vdisk_cli(
        "convert",
        "-c",
        "-o",
        "subformat=monolithicFlat",
        src,
        str(tmp_path / "s2.vmdk"),
        check=False,
    )
    assert "streamOptimized" in _one_line_error(p)


def test_convert_cache_mode(tmp_path, monkeypatch):
    """-t as qemu-img's: writeback (the default) syncs the new image, unsafe never does;
    anything else is one line. Both give the same image."""
    from vdisk import ops

    src = str(tmp_path / "a.img")
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20))
    p = vdisk_cli("convert", "-t", "none", src, str(tmp_path / "x.qcow2"), check=False)
    assert "'none' is not one of 'writeback', 'unsafe'" in _one_line_error(p)
    assert not (tmp_path / "x.qcow2").exists()
    vdisk_cli("convert", "-t", "unsafe", "-O", "qcow2", "--verify", src, str(tmp_path / "u.qcow2"))
    assert vdisk_cli("compare", src, str(tmp_path / "u.qcow2")).returncode == 0
    with pytest.raises(vdisk.UsageError, match="cache mode 'directsync'"):
        ops.convert(src, str(tmp_path / "y.qcow2"), out_format="qcow2", cache_mode="directsync")

    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd) or real(fd))
    for fmt in local_formats():
        synced.clear()
        ops.convert(src, str(tmp_path / f"u2.{fmt}"), out_format=fmt, cache_mode="unsafe")
        assert synced == [], fmt
        ops.convert(src, str(tmp_path / f"w2.{fmt}"), out_format=fmt)
        assert synced, fmt
        assert vdisk_cli("compare", str(tmp_path / f"u2.{fmt}"), src).returncode == 0


def test_convert_skips_zero_clusters_inside_data(tmp_path):
    """All-zero clusters inside the source's data are not stored (as qemu-img convert),
    including ones that a chunk boundary or an unaligned extent start cuts."""
    src = str(tmp_path / "a.img")
    cs = 65536
    data = bytearray(os.urandom(12 * cs))
    for c in (1, 2, 7, 11):
        data[c * cs : (c + 1) * cs] = bytes(cs)
    with open(src, "wb") as f:
        f.seek(4096)  # a hole first: the data extent starts 4 KiB into the first cluster
        f.write(data)
    dst = str(tmp_path / "b.qcow2")
    vdisk_cli("convert", "-O", "qcow2", "--verify", src, dst)
    runs = json.loads(vdisk_cli("map", "--output", "json", dst).stdout)
    stored = sum(r["length"] for r in runs if r["data"])
    # shifted by 4 KiB, the zero clusters of the data cover guest clusters 2 and 12 (the
    # short last one) wholly, and 1, 3, 7, 8 and 11 only partly
    assert stored == 11 * cs, runs
