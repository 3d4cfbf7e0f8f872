"""`vdisk bench`: I/O speed of one image through the API, as `qemu-img bench` measures it."""

from __future__ import annotations

import os
import random
import threading
import time

import click

from vdisk import api
from vdisk.cli.common import SIZE, cache_option, echo_json, format_option, output_option
from vdisk.errors import UsageError


@click.command()
@click.argument("image")
@format_option
@cache_option
@output_option
@click.option("-c", "--count", type=int, default=20000, show_default=True, help="Requests to run.")
@click.option(
    "-d", "--depth", type=int, default=1, show_default=True, help="Requests in flight (threads)."
)
@click.option("-s", "--buffer-size", type=SIZE, default=4096, show_default=True)
@click.option("-w", "--write", is_flag=True, help="Write instead of read (the image is changed).")
@click.option("--sequential", is_flag=True, help="Sequential offsets instead of random ones.")
@click.option(
    "--flush-interval", type=int, default=0, help="Flush after every N writes (0: only at the end)."
)
def bench(
    image: str,
    fmt: str | None,
    cache_mb: float | None,
    output: str,
    count: int,
    depth: int,
    buffer_size: int,
    write: bool,
    sequential: bool,
    flush_interval: int,
) -> None:
    """Run COUNT requests of BUFFER_SIZE against IMAGE and print requests/s and MB/s."""
    if count <= 0 or depth <= 0 or buffer_size <= 0:
        raise UsageError("bench: count, depth and buffer size must be positive")
    buf = os.urandom(buffer_size)
    with api.open(
        image, format=fmt, readonly=not write, cache_mb=cache_mb, commit_interval=None
    ) as d:
        slots = d.size // buffer_size
        if slots == 0:
            raise UsageError(f"bench: {image} is smaller than one buffer ({buffer_size} bytes)")
        done = [0]
        lock = threading.Lock()

        def worker(k: int, n: int) -> None:
            rng = random.Random(k)
            pos = k * (slots // depth)
            for i in range(n):
                slot = (pos + i) % slots if sequential else rng.randrange(slots)
                if write:
                    d.write(slot * buffer_size, buf)
                    if flush_interval:
                        with lock:
                            done[0] += 1
                            due = done[0] % flush_interval == 0
                        if due:
                            d.flush()
                else:
                    d.read(slot * buffer_size, buffer_size)

        t = time.perf_counter()
        threads = [
            threading.Thread(target=worker, args=(k, count // depth + (k < count % depth)))
            for k in range(depth)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if write:
            d.flush()
        dt = time.perf_counter() - t
        stats = d.stats()
    result = {
        "requests": count,
        "seconds": round(dt, 3),
        "iops": round(count / dt),
        "mbps": round(count * buffer_size / dt / 1e6, 1),
        "stats": stats,
    }
    if output == "json":
        echo_json(result)
    else:
        kind = "write" if write else "read"
        click.echo(
            f"{count} {kind}s of {buffer_size} bytes, depth {depth}: {dt:.3f} s, {result['iops']} requests/s, {result['mbps']} MB/s"
        )
        c = stats["cache"]
        click.echo(
            f"cache: {c['hits']} hits, {c['misses']} misses, {c['evictions']} evictions, hit ratio {c['hit_ratio']}"
        )
