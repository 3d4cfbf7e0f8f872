"""docs/format.md is enough to read an image: a tiny independent reader written from the
spec alone (it imports nothing of vdisk.formats) must read what the driver wrote."""

from __future__ import annotations

import random
import struct

import lz4.block
import pytest
import xxhash

from vdisk.formats.native import NativeDriver
from vdisk.storage import MemoryStorage


def spec_read(img: bytes) -> tuple[int, bytes]:
    """(guest size, guest content) of a .vdisk image, following docs/format.md."""
    copies = []
    for off in (0, 4096):
        raw = img[off : off + 4096]
        if raw[:8] != b"VDISK\r\n\x1a":
            continue
        (length,) = struct.unpack_from("<I", raw, 12)
        if not 296 <= length <= 4096:
            continue
        if (
            xxhash.xxh3_64_intdigest(raw[: length - 8])
            != struct.unpack_from("<Q", raw, length - 8)[0]
        ):
            continue
        copies.append((struct.unpack_from("<Q", raw, 40)[0], raw))
    _gen, h = max(copies)
    cbits, depth = h[48], h[49]
    cs = 1 << cbits
    (size,) = struct.unpack_from("<Q", h, 56)
    root = h[104:136]
    fan_bits = cbits - 5

    def load(entry: bytes) -> bytes:
        host, length, codec, _flags, _r, cks, _birth = struct.unpack("<QIBBHQQ", entry)
        stored = img[host : host + length]
        assert xxhash.xxh3_64_intdigest(stored) == cks
        return stored if codec == 0 else lz4.block.decompress(stored, uncompressed_size=cs)

    out = bytearray()
    for c in range(-(-size // cs)):
        entry, level = root, depth - 1
        while True:
            host, _l, _c, _flags = struct.unpack_from("<QIBB", entry)
            if host == 0:  # hole or zero: both read as zeros without a backing file
                data = bytes(cs)
                break
            if level < 0:
                data = load(entry)
                break
            table = load(entry)
            j = (c >> (fan_bits * level)) & ((1 << fan_bits) - 1)
            entry, level = table[32 * j : 32 * j + 32], level - 1
        out += data
    return size, bytes(out[:size])


@pytest.mark.parametrize("cs", [4096, 65536])
def test_independent_reader(cs: int) -> None:
    rng = random.Random(cs)
    st = MemoryStorage()
    size = 3 * 1024 * 1024 + 777
    NativeDriver.create(st, size, {"cluster_size": cs})
    d = NativeDriver.open(st, readonly=False, options={})
    for _ in range(40):
        off = rng.randrange(size)
        n = min(rng.randrange(1, 200000), size - off)
        d.write(off, rng.choice([rng.randbytes(n), b"text!" * (n // 5) + b"x" * (n % 5)]))
    d.write_zeroes(cs * 3, cs * 5)
    d.discard(cs * 20, cs * 2)
    d.create_snapshot("s")
    d.write(0, b"after the snapshot")
    d.close()
    d = NativeDriver.open(st, readonly=True, options={})
    assert spec_read(bytes(st.buf)) == (size, d.read(0, size))
