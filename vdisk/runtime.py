"""Live counters of images held open by a mount or a server, for `vdisk info --stats`.

A front end that holds a Disk for a long time publishes its counters every few seconds
to a small JSON file named after the image's real path; `vdisk info --stats IMAGE` reads
it when the publishing process is still alive (the image is locked by that process, so
opening it again would fail anyway). No sockets, no threads: the front end's own timer
task calls :func:`publish`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import xxhash

RUN_DIR = os.environ.get("VDISK_RUN_DIR") or (
    "/run/vdisk" if os.geteuid() == 0 else f"/tmp/vdisk-{os.geteuid()}"
)


def _path_for(image: str) -> str:
    key = xxhash.xxh64_hexdigest(os.path.realpath(image).encode())
    return os.path.join(RUN_DIR, f"stats-{key}.json")


def publish(image: str, stats: dict[str, Any], front_end: str) -> None:
    """Atomically replace the published counters of ``image`` (best effort)."""
    try:
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        path = _path_for(image)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "pid": os.getpid(),
                    "image": os.path.realpath(image),
                    "front_end": front_end,
                    "time": time.time(),
                    "stats": stats,
                },
                f,
            )
        os.replace(tmp, path)
    except OSError:
        pass


def unpublish(image: str) -> None:
    try:
        os.unlink(_path_for(image))
    except OSError:
        pass


def read_published(image: str) -> dict[str, Any] | None:
    """The counters a live process published for ``image``, or None."""
    try:
        with open(_path_for(image)) as f:
            data = json.load(f)
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data
