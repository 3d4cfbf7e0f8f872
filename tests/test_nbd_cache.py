"""NBD_CMD_CACHE: the server advertises it and loads the range into its cluster cache,
checked, so that the reads after it are hits (no real client here sends it on demand:
qemu does for prefetching copy-on-read jobs, so the raw socket client of test_nbd.py)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from tests.conftest import pattern, vdisk_cli
from tests.test_nbd import EINVAL, READ, RawClient, patterned, serve  # noqa: F401 (the fixture)

CACHE = 5
MiB = 1 << 20
SIZE = 8 * MiB
FLAG_SEND_CACHE = 1 << 10


def _flags(c: RawClient) -> int:
    """Negotiate structured replies, choose the default export: its transmission flags."""
    assert c.option(8)[-1][0] == 1  # NBD_OPT_STRUCTURED_REPLY: ACK
    replies = c.option(7, struct.pack(">I", 0) + struct.pack(">H", 0))  # GO, default export
    for rep, data in replies:
        if rep == 3 and struct.unpack(">H", data[:2])[0] == 0:
            return int(struct.unpack(">H", data[10:12])[0])
    raise AssertionError(replies)


def _live_cache(img: Path, ok: Any) -> dict[str, Any]:
    """The server's cache counters as `vdisk info --stats` shows them, once ``ok`` holds
    (the server publishes them about every second)."""
    deadline = time.monotonic() + 20
    while True:
        info = json.loads(vdisk_cli("info", "--stats", "--output", "json", str(img)).stdout)
        cache = info.get("stats", {}).get("cache", {})
        if "nbd" in info.get("stats-source", "") and ok(cache):
            return dict(cache)
        assert time.monotonic() < deadline, info
        time.sleep(0.3)


def test_cache_command_fills_the_cluster_cache(serve, tmp_path: Path) -> None:  # noqa: F811
    img = patterned(tmp_path / "c.vdisk", SIZE)
    s = serve(img, args=("--cache-mb", "16"))
    with RawClient(s.port) as c:
        assert _flags(c) & FLAG_SEND_CACHE
        c.send_request(CACHE, 1, MiB, 2 * MiB)
        err, cookie, _typ, _ = c.reply()
        assert (err, cookie) == (0, 1)
        c.send_request(CACHE, 2, SIZE - 4096, 8192)  # past the end
        err, cookie, _typ, _ = c.reply()
        assert (err, cookie) == (EINVAL, 2)
        cache = _live_cache(img, lambda c: c.get("readahead_clusters", 0) >= 32)
        assert cache["cached_clusters"] >= 32, cache
        hits = cache["hits"]
        for k in range(8):  # random 4 KiB reads inside the prefetched range: all hits
            off = MiB + k * 200_000 // 4096 * 4096
            c.send_request(READ, 10 + k, off, 4096)
            err, cookie, _typ, data = c.reply()
            assert (err, cookie) == (0, 10 + k) and data[8:] == pattern(off, 4096)
        _live_cache(img, lambda c: c["hits"] == hits + 8)
