"""The local file store: blocks reserved ahead of appends never show up as used space."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from vdisk.storage import FileStorage

M = 1 << 20


def _blocks(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_appends_reserve_ahead_and_close_gives_it_back(tmp_path):
    p = str(tmp_path / "f")
    st = FileStorage(p, readonly=False, create=True)
    for i in range(64):
        st.pwrite(i * 65536, b"x" * 65536)
    assert _blocks(p) > 4 * M  # reserved past the end (KEEP_SIZE)
    assert st.size() == 4 * M
    st.close()
    assert os.path.getsize(p) == 4 * M
    assert _blocks(p) <= 4 * M + 64 * 1024


def test_sparse_writes_and_growing_truncates_stay_sparse(tmp_path):
    """A write that jumps past the end, or a truncate that grows the file, must not turn
    reserved blocks into allocated space inside the file."""
    p = str(tmp_path / "f")
    st = FileStorage(p, readonly=False, create=True)
    st.pwrite(0, b"a" * M)
    st.pwrite(100 * M, b"b" * 4096)
    st.pwrite(100 * M + 4096, b"c" * 4096)
    st.truncate(300 * M)
    st.pwrite(300 * M, b"d" * 4096)
    st.close()
    assert _blocks(p) <= M + 64 * 1024 + 2 * 4096 + 64 * 1024
    with open(p, "rb") as f:
        f.seek(100 * M)
        assert f.read(8192) == b"b" * 4096 + b"c" * 4096


def test_a_crashed_writers_reservation_is_freed_on_the_next_open(tmp_path):
    p = str(tmp_path / "f")
    with open(p, "wb") as f:
        f.write(b"z" * M)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(p, os.O_RDWR)
    assert libc.fallocate(fd, 1, ctypes.c_longlong(M), ctypes.c_longlong(32 * M)) == 0
    os.close(fd)
    assert _blocks(p) >= 32 * M
    FileStorage(p, readonly=True).close()  # a reader changes nothing
    assert _blocks(p) >= 32 * M
    FileStorage(p, readonly=False).close()
    assert _blocks(p) <= M + 64 * 1024
    with open(p, "rb") as f:
        assert f.read() == b"z" * M
