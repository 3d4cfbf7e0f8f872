"""Raw images: guest offset == host offset. Holes of the host file are holes of the disk."""

from __future__ import annotations

import errno
import os
from typing import Any

from vdisk.errors import UnsupportedFeature
from vdisk.formats.base import Driver, Extent, Kind, merge_extents, reject_unknown_options
from vdisk.storage import FileStorage, Storage

SEEK_DATA, SEEK_HOLE = 3, 4


class RawDriver(Driver):
    name = "raw"
    aliases = ("img", "iso")
    extensions = (".raw", ".img", ".iso")
    can_create = True
    wants_cache = False

    def __init__(self, storage: Storage, readonly: bool) -> None:
        self.storage = storage
        self.readonly = readonly
        self.size = storage.size()

    @classmethod
    def probe(cls, head: bytes, size: int) -> int:
        return 1  # anything is a raw image; every other driver outranks this

    @classmethod
    def open(cls, storage: Storage, *, readonly: bool, options: dict[str, Any]) -> RawDriver:
        reject_unknown_options(cls.name, options, ())
        return cls(storage, readonly)

    @classmethod
    def create(cls, storage: Storage, size: int, options: dict[str, Any]) -> None:
        if options.get("backing"):
            raise UnsupportedFeature(
                "raw images cannot have a backing file (use -f vdisk or qcow2)"
            )
        reject_unknown_options(cls.name, options, ("cluster_size", "preallocation"))
        storage.truncate(size)

    def read(self, offset: int, length: int) -> bytes:
        data = self.storage.pread(offset, length)
        if len(data) < length:  # the file shrank under us, or a block device: pad
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.storage.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self.storage.punch_hole(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.storage.punch_hole(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        if not isinstance(self.storage, FileStorage):
            return [Extent(Kind.DATA, offset, length, offset)]
        fd = self.storage.fd
        out: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    out.append(Extent(Kind.ZERO, pos, end - pos))
                    break
                return [Extent(Kind.DATA, offset, length, offset)]
            if data > pos:
                out.append(Extent(Kind.ZERO, pos, min(data, end) - pos))
                pos = min(data, end)
                if pos >= end:
                    break
            hole = os.lseek(fd, pos, SEEK_HOLE)
            stop = min(hole, end)
            out.append(Extent(Kind.DATA, pos, stop - pos, pos))
            pos = stop
        return merge_extents(out)

    def truncate(self, size: int) -> None:
        self.storage.truncate(size)
        self.size = size

    def info(self) -> dict[str, Any]:
        return {}


DRIVER = RawDriver
