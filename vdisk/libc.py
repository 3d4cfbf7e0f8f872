"""The C library, loaded on first use.

``ctypes.util.find_library`` runs ``ldconfig -p`` in a subprocess (several ms of every
command's start-up), so the usual soname is tried first."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library with errno kept for ctypes.get_errno(), or None without one."""
    for name in ("libc.so.6", None):
        try:
            if name is None:
                from ctypes.util import find_library

                name = find_library("c")
                if name is None:
                    return None
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    return None
