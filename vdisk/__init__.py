"""vdisk: block storage virtualization.

A compressed, checksummed copy-on-write image format of its own, readers and writers for
every vendor's images, and three ways in: this Python API, a FUSE mount and an NBD server.
"""

from vdisk.api import Disk, DiskFile, clone, create, open, parse_size
from vdisk.errors import (
    BackingMismatch,
    ChecksumMismatch,
    CorruptImage,
    ImageLocked,
    ImageNotFound,
    ReadOnlyImage,
    UnsupportedFeature,
    UsageError,
    VdiskError,
)
from vdisk.formats.base import Extent, Kind

__all__ = [
    "BackingMismatch",
    "ChecksumMismatch",
    "CorruptImage",
    "Disk",
    "DiskFile",
    "Extent",
    "ImageLocked",
    "ImageNotFound",
    "Kind",
    "ReadOnlyImage",
    "UnsupportedFeature",
    "UsageError",
    "VdiskError",
    "clone",
    "create",
    "open",
    "parse_size",
]
__version__ = "0.1.0"
