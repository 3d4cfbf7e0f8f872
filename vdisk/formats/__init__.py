"""The format registry: one driver module per format, found by name, alias or probe."""

from __future__ import annotations

import importlib

from vdisk.errors import UnknownFormat, UsageError
from vdisk.formats.base import Driver

# Module names under vdisk.formats, in probe order (the most specific magic first; raw last).
_MODULES = ("native", "qcow2", "vmdk", "vhdx", "vhd", "vdi", "parallels", "remote", "raw")

_drivers: list[type[Driver]] | None = None


def drivers() -> list[type[Driver]]:
    """Every driver class, loaded on first use."""
    global _drivers
    if _drivers is None:
        found = []
        for mod in _MODULES:
            try:
                module = importlib.import_module(f"vdisk.formats.{mod}")
            except ModuleNotFoundError as e:
                if e.name == f"vdisk.formats.{mod}":
                    continue  # not written yet
                raise
            found.append(module.DRIVER)
        _drivers = found
    return _drivers


def names() -> list[str]:
    return [d.name for d in drivers()]


def get(name: str) -> type[Driver]:
    """The driver for a format name as vdisk or qemu-img spells it ("vpc" is VHD)."""
    key = name.strip().lower()
    for d in drivers():
        if key == d.name or key in d.aliases:
            return d
    known = ", ".join(sorted({n for d in drivers() for n in (d.name, *d.aliases)}))
    raise UsageError(f"unknown format {name!r} (known: {known})")


def probe(head: bytes, size: int, path: str, tail: bytes = b"") -> type[Driver]:
    """The driver most sure of ``head`` (or, for footer-only formats, of ``tail``); raw
    only when nothing else claims it."""
    best: tuple[int, type[Driver]] | None = None
    for d in drivers():
        score = max(d.probe(head, size), d.probe_tail(tail, size) if tail else 0)
        if score > 0 and (best is None or score > best[0]):
            best = (score, d)
    if best is None:
        raise UnknownFormat(f"{path}: unknown image format (use --format to name it)")
    return best[1]
