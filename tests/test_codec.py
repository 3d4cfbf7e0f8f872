"""The cluster codec: lz4 only when it pays, xxh3 of the stored bytes, strict decode."""

from __future__ import annotations

import os

import pytest

from vdisk.cache import codec
from vdisk.errors import ChecksumMismatch, CorruptImage, UnsupportedFeature


def test_compressible_is_lz4_random_is_raw() -> None:
    text = b"the quick brown fox " * 3277
    cdc, stored, cks = codec.encode(text)
    assert cdc == codec.LZ4 and len(stored) < len(text) * 7 // 8
    assert codec.decode(cdc, stored, cks, len(text), "x") == text
    rnd = os.urandom(65536)
    cdc, stored, cks = codec.encode(rnd)
    assert cdc == codec.RAW and stored == rnd
    assert codec.decode(cdc, stored, cks, len(rnd), "x") == rnd
    cdc, stored, _ = codec.encode(text, compress=False)
    assert cdc == codec.RAW and stored == text


def test_compression_must_save_an_eighth() -> None:
    # half random, half compressible: ~50% -> lz4; 90% random -> raw
    half = os.urandom(32768) + bytes(32768)
    assert codec.encode(half)[0] == codec.LZ4
    mostly = os.urandom(61440) + bytes(4096)
    assert codec.encode(mostly)[0] == codec.RAW


def test_every_bit_flip_of_stored_bytes_is_caught() -> None:
    data = (b"abcdefgh" * 64) + os.urandom(256)
    cdc, stored, cks = codec.encode(data)
    for bit in range(len(stored) * 8):
        bad = bytearray(stored)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ChecksumMismatch, match="guest offset 4096"):
            codec.decode(cdc, bytes(bad), cks, len(data), "img: cluster at guest offset 4096")


def test_truncated_and_wrong_size_are_errors() -> None:
    data = b"x" * 4096
    cdc, stored, cks = codec.encode(data)
    with pytest.raises(ChecksumMismatch):
        codec.decode(cdc, stored[:-1], cks, 4096, "w")
    with pytest.raises(CorruptImage):
        codec.decode(cdc, stored, cks, 8192, "w")  # lz4 data of another size
    raw = os.urandom(100)
    with pytest.raises(CorruptImage):
        codec.decode(codec.RAW, raw, codec.checksum(raw), 200, "w")
    with pytest.raises(UnsupportedFeature, match="codec id 9"):
        codec.decode(9, raw, codec.checksum(raw), 100, "w")


def test_garbage_that_passes_the_checksum_is_not_decompressed_into_data() -> None:
    junk = b"\xff" * 100
    with pytest.raises(CorruptImage):
        codec.decode(codec.LZ4, junk, codec.checksum(junk), 4096, "w")


def test_is_zero() -> None:
    assert codec.is_zero(bytes(65536))
    assert codec.is_zero(memoryview(bytes(4096)))
    assert codec.is_zero(b"")
    for pos in (0, 1, 4095, 30000, 65535):
        b = bytearray(65536)
        b[pos] = 1
        assert not codec.is_zero(b)


def test_decode_range_stops_early_and_still_verifies():
    data = os.urandom(1000) * 66  # ~64 KiB, compressible, no two 4 KiB blocks alike
    data = data[:65536]
    cdc, stored, cks = codec.encode(data)
    assert cdc == codec.LZ4
    for lo, hi in ((0, 1), (0, 4096), (8192, 12288), (36864, 40000), (61440, 65536), (0, 65536)):
        assert codec.decode_range(cdc, stored, cks, len(data), lo, hi, "x") == data[lo:hi]
    bad = bytearray(stored)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(ChecksumMismatch):
        codec.decode_range(cdc, bytes(bad), cks, len(data), 0, 4096, "x")
    with pytest.raises(CorruptImage):  # a checksum that matches bytes that do not decode
        junk = b"\xff" * 64
        codec.decode_range(cdc, junk, codec.checksum(junk), len(data), 0, 4096, "x")
    raw = os.urandom(65536)
    cdc, stored, cks = codec.encode(raw)
    assert cdc == codec.RAW
    assert codec.decode_range(cdc, stored, cks, len(raw), 4096, 8192, "x") == raw[4096:8192]
