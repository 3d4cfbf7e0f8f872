"""A damaged cluster served over NBD: real clients get an I/O error for its bytes, never
the damaged bytes as data, and everything else keeps working.

The partial-decode path (a random 4 KiB read decodes only up to its end) and the cached
path (whole clusters) are both covered: the checksum covers the whole stored cluster, so
a flip after the bytes asked for must fail the read as well."""

from __future__ import annotations

from pathlib import Path

import pytest

import vdisk
from tests.conftest import need, pattern, run
from tests.test_nbd import patterned
from tests.test_nbd_unix import UnixServed

MiB = 1 << 20
CS = 65536


def _damaged(tmp: Path) -> tuple[Path, int]:
    """An 8 MiB .vdisk of pattern() data whose cluster 5 has one stored byte flipped near
    the end of its stored bytes (past what a read of its first 4 KiB decodes)."""
    p = patterned(tmp / "d.vdisk", 8 * MiB)
    with vdisk.open(str(p), readonly=True) as d:
        e = d._driver._entry(5)  # type: ignore[attr-defined]
        assert e is not None and e.host and e.length > 100
        host, length = e.host, e.length
    with open(p, "r+b") as f:
        f.seek(host + length - 7)
        b = f.read(1)
        f.seek(host + length - 7)
        f.write(bytes([b[0] ^ 0x10]))
    return p, 5 * CS


@pytest.mark.parametrize("cache", ["64", "0"])
def test_a_damaged_cluster_is_an_io_error_over_nbd(tmp_path, started, cache):
    need("qemu-io")
    img, bad = _damaged(tmp_path)
    s = started(UnixServed(img, tmp_path / "s.sock", "--cache-mb", cache, "-vv"))
    for off, n in ((bad, 4096), (bad + 8192, 512), (bad - 4096, 8192), (bad, CS)):
        p = run(["qemu-io", "-f", "raw", "-c", f"read {off} {n}", s.url], check=False)
        assert "Input/output error" in p.stdout + p.stderr, (off, n, p.stdout, p.stderr)
    # the neighbours and the rest of the disk still read, with the right bytes
    for off in (bad - CS, bad + CS, 0, 8 * MiB - CS):
        want = pattern(off, CS)[:8]
        p = run(["qemu-io", "-f", "raw", "-c", f"read -v {off} 8", s.url])
        got = bytes(int(x, 16) for x in p.stdout.split(":", 1)[1].split()[:8])
        assert got == want, (off, p.stdout)
    code = s.stop()
    assert code == 0, s.err
    assert "checksum mismatch" in s.err and f"guest offset {bad}" in s.err, s.err
    assert "Traceback" not in s.err and "internal error" not in s.err, s.err
