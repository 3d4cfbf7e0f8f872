"""Where an image's bytes live.

A :class:`Storage` is a flat, growable byte store with positioned reads and writes and a
durability barrier (``sync``). Format drivers only ever talk to one; the local file is
the default, an object store and a fault-injecting wrapper (for crash tests) are others.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from abc import ABC, abstractmethod

from vdisk.errors import ImageLocked, ImageNotFound, NoSpace, StorageError, VdiskError
from vdisk.libc import libc

# struct flock for F_OFD_SETLK: l_type, l_whence, l_start, l_len, l_pid (x86_64 / aarch64 layout)
_FLOCK = struct.Struct("hhqqi4x")
F_OFD_SETLK = 37
_LOCK_BYTE = 0x7FFF_FFFF_FFFF_0000  # far beyond any data: locking it never blocks I/O
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE = 0x01, 0x02


class Storage(ABC):
    """A flat byte store. Not thread-safe by itself: the generic layer serialises calls."""

    path: str
    readonly: bool

    @abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short only at the end of the store."""

    @abstractmethod
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def truncate(self, size: int) -> None: ...

    @abstractmethod
    def sync(self) -> None:
        """Barrier: everything written before is durable when this returns."""

    def punch_hole(self, offset: int, length: int) -> None:
        """Give the range back to the host (best effort); it then reads as zeros."""
        self.pwrite(offset, bytes(length))

    def sibling(self, name: str, *, readonly: bool, create: bool = False) -> Storage:
        """Open another store named relative to this one (extents, parents, descriptors)."""
        raise StorageError(f"{self.path}: cannot open {name!r} beside this storage")

    def resolve(self, name: str) -> str:
        """The absolute name of a store named relative to this one."""
        return name

    def lock(self, *, exclusive: bool) -> None:
        """Take the image lock; raise ImageLocked if another holder conflicts."""

    def close(self) -> None:
        pass

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        """pread that treats a short read as corruption, naming ``what`` was read."""
        data = self.pread(offset, length)
        if len(data) != length:
            from vdisk.errors import CorruptImage

            raise CorruptImage(
                f"{self.path}: {what} at offset {offset} is cut short "
                f"(file ends at {self.size()}, needed {offset + length})"
            )
        return data


class FileStorage(Storage):
    """A local file, accessed with pread/pwrite and made durable with fdatasync.

    ``durable=False`` makes ``sync`` a no-op (qemu's cache=unsafe): everything is still
    written, in the same order, but a host crash may lose or tear it. Only for images
    that can be made again, such as the output of ``convert -t unsafe``."""

    def __init__(
        self, path: str, *, readonly: bool, create: bool = False, durable: bool = True
    ) -> None:
        self.path = path
        self.readonly = readonly
        self.durable = durable
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            # O_NONBLOCK: a FIFO (say, a hostile image's backing file name) must not hang
            # the open; anything but a regular file or a block device is refused below
            self.fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                os.close(self.fd)
                kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or character device"
                raise VdiskError(
                    f"{path}: is {kind}, not an image (a regular file or block device)"
                )
            os.set_blocking(self.fd, True)
        except FileNotFoundError:
            raise ImageNotFound(f"{path}: no such file") from None
        except FileExistsError:
            raise VdiskError(f"{path}: already exists (refusing to overwrite)") from None
        except IsADirectoryError:
            raise VdiskError(f"{path}: is a directory, not an image") from None
        except PermissionError:
            raise VdiskError(f"{path}: permission denied") from None
        except OSError as e:
            raise StorageError(f"{path}: cannot open: {e.strerror}") from None

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise StorageError(
                f"{self.path}: read of {length} bytes at {offset} failed: {e.strerror}"
            ) from None
        except OverflowError:  # a driver passed on an unchecked offset or length
            raise StorageError(
                f"{self.path}: read of {length} bytes at {offset}: out of the file's range"
            ) from None

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"{self.path}: no space left writing at {offset}") from None
            raise StorageError(f"{self.path}: write at {offset} failed: {e.strerror}") from None

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise StorageError(f"{self.path}: cannot resize to {size}: {e.strerror}") from None

    def sync(self) -> None:
        if self.readonly or not self.durable:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise StorageError(f"{self.path}: fdatasync failed: {e.strerror}") from None

    def punch_hole(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        lib = libc()
        if lib is not None:
            rc = lib.fallocate(
                self.fd,
                _FALLOC_KEEP_SIZE | _FALLOC_PUNCH_HOLE,
                ctypes.c_longlong(offset),
                ctypes.c_longlong(length),
            )
            if rc == 0:
                return
        super().punch_hole(offset, length)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def resolve(self, name: str) -> str:
        if os.path.isabs(name) or "://" in name:  # URLs (s3://...) are absolute too
            return name
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(self.path)), name))

    def sibling(self, name: str, *, readonly: bool, create: bool = False) -> Storage:
        return FileStorage(
            self.resolve(name), readonly=readonly, create=create, durable=self.durable
        )

    def lock(self, *, exclusive: bool) -> None:
        """An OFD lock on one byte far past the data: writers exclusive, readers shared.

        OFD locks belong to this open file description, so two opens in one process
        conflict as two processes would, and the lock goes away with the last close."""
        ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        arg = _FLOCK.pack(ltype, os.SEEK_SET, _LOCK_BYTE, 1, 0)
        try:
            fcntl.fcntl(self.fd, F_OFD_SETLK, arg)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                if exclusive:
                    raise ImageLocked(
                        f"{self.path}: image is in use by another process "
                        "(opened for writing or reading elsewhere)"
                    ) from None
                raise ImageLocked(
                    f"{self.path}: image is locked for writing by another process "
                    "(open it read-only with --force-share to read it anyway)"
                ) from None
            if e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
                return  # file system without OFD locks: run unlocked, as qemu does
            raise StorageError(f"{self.path}: cannot lock: {e.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MemoryStorage(Storage):
    """A store in memory, for tests and for throw-away overlays."""

    def __init__(self, path: str = "<memory>", data: bytes = b"") -> None:
        self.path = path
        self.readonly = False
        self.buf = bytearray(data)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    def size(self) -> int:
        return len(self.buf)

    def truncate(self, size: int) -> None:
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))

    def sync(self) -> None:
        pass


def open_storage(
    path: str, *, readonly: bool, create: bool = False, durable: bool = True
) -> Storage:
    """The storage a path names: a local file today; URLs (s3://...) name other backends.
    ``durable=False`` skips fdatasync on local files; an object store ignores it (its
    sync is what uploads the data)."""
    if path.startswith("s3://"):
        from vdisk.storage.s3 import S3Storage

        return S3Storage(path, readonly=readonly, create=create)
    if "://" in path:
        scheme = path.split("://", 1)[0]
        raise VdiskError(f"{path}: unsupported storage scheme {scheme!r}")
    return FileStorage(path, readonly=readonly, create=create, durable=durable)
