#!/usr/bin/env python3
"""FUSE benchmark: `vdisk mount` beside a minimal pyfuse3 pass-through, in the same run.

    tools/bench_fuse.py [--size 1G] [--out bench-out]
    tools/bench_fuse.py --passthrough FILE DIR      (the anchor, started by the benchmark)

Workloads through the mount's `disk` file: sequential read and write with dd (1 MiB
blocks, writes with fdatasync) and random 4 KiB reads (pread in a loop, queue depth 1).
"Cached" means the data is already in memory below the FUSE daemon: the host page cache
for the pass-through and for a raw image, the cluster cache as well for vdisk. The cold
figure drops the page cache and starts a fresh mount of an lz4-compressed .vdisk image.
The machine is noisy: the ratios to the anchor are what counts. Nothing here asserts.
Needs root (drop_caches, mounts).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MiB = 1 << 20


# -- the anchor: a minimal pass-through of one file ---------------------------------------


def passthrough(path: str, mountpoint: str) -> None:
    """Serve ``path`` as DIR/disk: pread/pwrite inline in the handler, direct_io, nothing
    else. The smallest thing pyfuse3 + trio can do, so its speed is the ceiling."""
    import pyfuse3
    import trio

    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size

    class Passthrough(pyfuse3.Operations):
        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            if inode == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_size = stat.S_IFDIR | 0o755, 0
            else:
                a.st_mode, a.st_size = stat.S_IFREG | 0o644, size
            a.attr_timeout = a.entry_timeout = 300
            return a

        async def getattr(self, inode, ctx=None):
            return self._attr(inode)

        async def lookup(self, parent, name, ctx=None):
            if name != b"disk":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(2)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start, token):
            if start == 0:
                pyfuse3.readdir_reply(token, b"disk", self._attr(2), 1)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh, off, n):
            return os.pread(fd, n, off)

        async def write(self, fh, off, buf):
            return os.pwrite(fd, buf, off)

        async def setattr(self, inode, attr, fields, fh, ctx):
            return self._attr(inode)

        async def fsync(self, fh, datasync):
            os.fdatasync(fd)

    pyfuse3.init(Passthrough(), mountpoint, set(pyfuse3.default_options) | {"fsname=pt"})

    async def main() -> None:
        async with trio.open_nursery() as n:

            async def stop() -> None:
                import signal

                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        pyfuse3.terminate()
                        return

            n.start_soon(stop)
            await pyfuse3.main()
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)


# -- helpers ------------------------------------------------------------------------------


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


@contextlib.contextmanager
def mount(kind: str, image: str, where: str, *extra: str) -> Iterator[str]:
    """A mount of ``kind`` ("pt" or "vdisk"); always unmounted and its process gone."""
    os.makedirs(where, exist_ok=True)
    if kind == "pt":
        cmd = [sys.executable, __file__, "--passthrough", image, where]
    else:
        cmd = [sys.executable, "-m", "vdisk", "mount", image, where, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(where, "disk")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} mount failed: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.05)
        yield os.path.join(where, "disk")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if mounted(where):
            subprocess.run(["fusermount3", "-u", "-z", where], capture_output=True)


def dd(src: str, dst: str, size: int, *flags: str) -> float:
    """MB/s of one dd of ``size`` bytes in 1 MiB blocks."""
    out = subprocess.run(
        ["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={size // MiB}", *flags],
        check=True,
        capture_output=True,
        text=True,
    ).stderr
    m = re.search(r"copied, ([0-9.]+) s", out)
    assert m, out
    return size / float(m.group(1)) / 1e6


def rand_read(path: str, size: int, seconds: float = 1.5) -> float:
    """IOPS of 4 KiB preads at random aligned offsets, queue depth 1."""
    fd = os.open(path, os.O_RDONLY)
    try:
        rng = random.Random(1)
        slots = size // 4096
        n, t0 = 0, time.perf_counter()
        while True:
            for _ in range(256):
                os.pread(fd, 4096, rng.randrange(slots) * 4096)
            n += 256
            dt = time.perf_counter() - t0
            if dt >= seconds:
                return n / dt
    finally:
        os.close(fd)


def best(measure, anchor: str, ours: str, reps: int = 3) -> tuple[float, float]:
    """Best of ``reps`` alternating runs of each: noise from other load only slows."""
    a = o = 0.0
    for _ in range(reps):
        a = max(a, measure(anchor))
        o = max(o, measure(ours))
    return a, o


def source_image(out: str, size: int) -> str:
    """The realistic ext4 image of tools/bench (made once, kept in ``out``)."""
    import importlib.util
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader("vdisk_bench", os.path.join(HERE, "bench"))
    spec = importlib.util.spec_from_loader("vdisk_bench", loader)
    assert spec is not None
    bench = importlib.util.module_from_spec(spec)
    loader.exec_module(bench)
    return bench.realistic_image(out, size)


# -- the benchmark ------------------------------------------------------------------------


def run(size: int, out: str) -> None:
    from vdisk import ops

    src = source_image(out, size)
    work = tempfile.mkdtemp(prefix="bench-fuse-", dir=out)
    raw = os.path.join(work, "pt.raw")
    raw2 = os.path.join(work, "v.raw")
    native = os.path.join(work, "v.vdisk")
    sh("cp", "--sparse=always", src, raw)
    sh("cp", "--sparse=always", src, raw2)
    t = time.perf_counter()
    ops.convert(src, native, out_format="vdisk")
    print(f"(lz4 .vdisk made in {time.perf_counter() - t:.1f} s)")
    cache_mb = str(size // MiB + 64)
    rows: list[tuple[str, float, float, str]] = []

    def row(name: str, anchor: float, ours: float, unit: str) -> None:
        rows.append((name, anchor, ours, unit))
        print(f"  {name:<44} pass-through {anchor:>9.0f}  vdisk {ours:>9.0f} {unit}"
              f"  ratio {ours / anchor:.2f}", flush=True)  # fmt: skip

    try:
        with (
            mount("pt", raw, os.path.join(work, "m-pt")) as pt,
            mount("vdisk", raw2, os.path.join(work, "m-raw"), "--cache-mb", cache_mb) as vr,
            mount("vdisk", native, os.path.join(work, "m-native"), "--cache-mb", cache_mb) as vn,
        ):
            for f in (pt, vr, vn):  # warm: page cache and cluster cache
                dd(f, "/dev/null", size)
            wsize = min(size, 256 * MiB)
            for label, f in (("raw", vr), (".vdisk lz4", vn)):
                row(
                    f"seq read 1 MiB, cached, {label} (MB/s)",
                    *best(lambda p: dd(p, "/dev/null", size), pt, f),
                    "MB/s",
                )
                row(
                    f"rand read 4 KiB QD1, cached, {label} (IOPS)",
                    *best(lambda p: rand_read(p, size), pt, f),
                    "IOPS",
                )
                row(
                    f"seq write 1 MiB + fdatasync, {label} (MB/s)",
                    *best(lambda p: dd(src, p, wsize, "conv=notrunc,fdatasync"), pt, f),
                    "MB/s",
                )
        # cold: nothing cached anywhere, fresh daemons
        anchor = ours = 0.0
        for _ in range(2):
            drop_caches()
            with mount("pt", raw, os.path.join(work, "m-pt")) as pt:
                anchor = max(anchor, dd(pt, "/dev/null", size))
            drop_caches()
            with mount("vdisk", native, os.path.join(work, "m-native")) as vn:
                ours = max(ours, dd(vn, "/dev/null", size))
        row("seq read 1 MiB, cold, .vdisk lz4 vs raw (MB/s)", anchor, ours, "MB/s")
    finally:
        for name in ("m-pt", "m-raw", "m-native"):
            p = os.path.join(work, name)
            if os.path.isdir(p) and mounted(p):
                subprocess.run(["fusermount3", "-u", "-z", p], capture_output=True)
        sh("rm", "-rf", work)
    print()
    print(
        "goals: >= 0.70 of the pass-through on cached data; cold lz4 sequential read >= 1000 MB/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1G")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    ap.add_argument("--passthrough", nargs=2, metavar=("FILE", "DIR"))
    a = ap.parse_args()
    if a.passthrough:
        passthrough(*a.passthrough)
        return
    from vdisk.api import parse_size

    if os.geteuid() != 0:
        print("fuse: needs root (drop_caches and mounts); skipped")
        return
    os.makedirs(a.out, exist_ok=True)
    print(f"FUSE, {a.size} realistic ext4 image, 1 MiB dd and 4 KiB random reads")
    run(parse_size(a.size), a.out)


if __name__ == "__main__":
    main()
