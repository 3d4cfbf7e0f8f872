"""Single-bit flips anywhere in a small native image are detected, never returned as data.

Every stored cluster and table is covered by a checksum in its parent, up to the header
(a Merkle tree). A flip in live bytes must surface as an error on read or from check();
a flip in the newest header copy falls back to the older copy (an older, intact commit);
a flip in unused space changes nothing.
"""

from __future__ import annotations

import random

from vdisk.errors import VdiskError
from vdisk.formats.base import CheckReport
from vdisk.formats.native import NativeDriver
from vdisk.formats.native_check import _Walker
from vdisk.formats.native_layout import HEADER_OFFSETS, HEADER_SLOT
from vdisk.storage import MemoryStorage

SIZE = 256 * 1024
CS = 4096


def _build() -> tuple[bytes, bytes, bytes, bytes, list[tuple[int, int]]]:
    """(image, live content, content of the previous commit, snapshot content, live ranges)."""
    rng = random.Random(5)
    st = MemoryStorage("flip.vdisk")
    NativeDriver.create(st, SIZE, {"cluster_size": CS})
    d = NativeDriver.open(st, readonly=False, options={"commit_interval": 0})
    d.write(0, b"compressible text " * 3000)
    d.write(100_000, rng.randbytes(40_000))
    d.write_zeroes(150_000, 20_000)
    d.create_snapshot("before")
    snap = d.read(0, SIZE)
    d.write(60_000, rng.randbytes(10_000))
    d.discard(200_000, 30_000)
    d.flush()
    prev = d.read(0, SIZE)
    d.write(5_000, b"last words " * 100)
    d.flush()
    live = d.read(0, SIZE)
    w = _Walker(d, CheckReport())
    for _label, root, depth in d._roots():
        w.root(root, depth, _label, verify=False)
    w.refcounts()
    ranges = [(s * CS, s * CS + n) for s, n in w.lengths.items()]
    for e in (d.hdr.snap_table, d.hdr.deferred):
        if e.host:
            ranges.append((e.host, e.host + e.length))
    d.close()
    return bytes(st.buf), live, prev, snap, sorted(ranges)


def _outcome(img: bytes) -> tuple[str, bytes | None, CheckReport | None]:
    try:
        d = NativeDriver.open(MemoryStorage("flip.vdisk", img), readonly=True, options={})
    except VdiskError:
        return "open", None, None
    try:
        content = d.read(0, SIZE)
    except VdiskError:
        content = None
    return "ok", content, d.check()


def test_bit_flips_are_detected() -> None:
    img, live, prev, _snap, ranges = _build()
    rng = random.Random(1)
    live_bits = [
        rng.randrange(a * 8, b * 8) for a, b in ranges for _ in range(max(2, (b - a) // 64))
    ]
    hdr_bits = [rng.randrange(o * 8, (o + 400) * 8) for o in HEADER_OFFSETS for _ in range(60)]
    other = [rng.randrange(len(img) * 8) for _ in range(300)]
    assert len(live_bits) > 300
    undetected_live = []
    for bit in live_bits + hdr_bits + other:
        bad = bytearray(img)
        bad[bit // 8] ^= 1 << (bit % 8)
        stage, content, rep = _outcome(bytes(bad))
        if stage == "open":
            continue  # refused at open with a clear error: detected
        byte = bit // 8
        if byte < 2 * HEADER_SLOT:
            # a header copy: the newest is damaged -> the older, intact commit is used
            assert content in (live, prev), f"bit {bit}: header flip gave wrong data"
            assert rep is not None and not rep.corruptions, f"bit {bit}: {rep.corruptions[:2]}"
            continue
        if content is not None:
            assert content == live, f"bit {bit}: corrupt data returned as good data"
        in_live = any(a <= byte < b for a, b in ranges)
        detected = content is None or bool(rep and rep.corruptions)
        if in_live and not detected:
            undetected_live.append(bit)
        if not in_live:
            assert not rep or not rep.corruptions, f"bit {bit}: unused byte flagged"
    assert not undetected_live, f"flips in live bytes not detected: {undetected_live[:10]}"


def test_corrupt_cluster_error_names_file_and_offsets() -> None:
    img, _live, _prev, _snap, _ranges = _build()
    d = NativeDriver.open(MemoryStorage("flip.vdisk", img), readonly=True, options={})
    e = d._entry(100_000 // CS)
    assert e is not None and e.host
    bad = bytearray(img)
    bad[e.host + 10] ^= 0x40
    d = NativeDriver.open(MemoryStorage("flip.vdisk", bytes(bad)), readonly=True, options={})
    try:
        d.read(100_000, 100)
    except VdiskError as err:
        msg = str(err)
        assert "flip.vdisk" in msg and f"guest offset {100_000 // CS * CS}" in msg
        assert f"host offset {e.host}" in msg and "checksum" in msg
    else:
        raise AssertionError("corrupt cluster read as data")
    rep = d.check()
    assert rep.exit_code == 2
    assert any(f"guest offset {100_000 // CS * CS}" in c for c in rep.corruptions)


def test_corrupt_table_error_names_the_guest_range() -> None:
    img, _live, _prev, _snap, _ranges = _build()
    d = NativeDriver.open(MemoryStorage("flip.vdisk", img), readonly=True, options={})
    root = d.map.root
    assert root.host
    bad = bytearray(img)
    bad[root.host + 3] ^= 1
    d = NativeDriver.open(MemoryStorage("flip.vdisk", bytes(bad)), readonly=True, options={})
    try:
        d.read(8192, 100)
    except VdiskError as err:
        assert "mapping table" in str(err) and "guest offset 8192" in str(err)
    else:
        raise AssertionError("corrupt root table not detected")
