"""Shared fixtures: real tools, known patterns, and clean-up that runs even on failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import pytest

VDISK = [sys.executable, "-m", "vdisk"]


class Stoppable(Protocol):
    def stop(self) -> Any: ...


S = TypeVar("S", bound=Stoppable)


@pytest.fixture
def started() -> Iterator[Callable[[S], S]]:
    """``started(server)`` hands back a server process a test started, and stops it at the
    end of the test, even when the test fails (``stop`` must be safe to call twice)."""
    servers: list[Stoppable] = []

    def keep(server: S) -> S:
        servers.append(server)
        return server

    yield keep
    for s in servers:
        s.stop()


def run(
    cmd: list[str], *, check: bool = True, timeout: float = 120, **kw
) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; on failure the output is in the assertion."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def vdisk_cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([*VDISK, *args], check=check, timeout=timeout)


def pattern(offset: int, length: int, seed: int = 0) -> bytes:
    """Deterministic, position-dependent, compressible-ish bytes: every 8-byte word holds
    its own guest offset, so misplaced data is visible."""
    import struct

    start = offset - offset % 8
    words = (offset + length - start + 7) // 8
    raw = b"".join(
        struct.pack("<Q", (start + 8 * i) ^ (seed * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF))
        for i in range(words)
    )
    return raw[offset - start : offset - start + length]


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (make setup installs it)")


@pytest.fixture
def qemu_img():
    need("qemu-img")
    return lambda *a, check=True: run(["qemu-img", *a], check=check)


@pytest.fixture
def qemu_io():
    need("qemu-io")
    return lambda *a, check=True: run(["qemu-io", *a], check=check)


def is_root() -> bool:
    return os.geteuid() == 0


def local_formats() -> list[str]:
    """Formats vdisk can create in a local file (object-store formats have their own tests)."""
    from vdisk import formats

    return [
        d.name for d in formats.drivers() if d.can_create and not d.remote and d.name != "vdisk-s3"
    ]
