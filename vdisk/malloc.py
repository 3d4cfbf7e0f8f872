"""glibc allocator settings for the long-running vdisk processes (CLI, mount, serve).

By default glibc serves every allocation above 128 KiB with a fresh mmap and returns it
with munmap when freed, so each 1-4 MiB read buffer page-faults all over again: measured
here, `vdisk convert` of a qcow2 to raw ran at 359 MB/s that way and at 2299 MB/s with the
settings below (PERFORMANCE.md saw the same for lz4 frames). Big buffers then come from the
heap and up to 128 MiB of freed memory is kept for reuse. A library must not change its
host process's allocator, so only the entry points call :func:`tune`.
"""

from __future__ import annotations

from vdisk.libc import libc

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Apply the settings; False where the C library has no mallopt (not glibc)."""
    lib = libc()
    try:
        mallopt = lib.mallopt if lib is not None else None
    except AttributeError:
        mallopt = None
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, 64 << 20) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 128 << 20) == 1
    ok &= mallopt(M_TOP_PAD, 16 << 20) == 1
    return bool(ok)
