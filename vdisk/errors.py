"""The one error hierarchy of vdisk.

Every error a layer raises on purpose is a :class:`VdiskError`. Front ends map the
classes in one place each: the CLI to exit codes (``exit_code`` below), FUSE and NBD
to errno values (``errno`` below). A message names the file and the offset, cluster
or field, and what was expected, so that one line on stderr is enough to act on.
"""

from __future__ import annotations

import errno as _errno


class VdiskError(Exception):
    """Base class of every error vdisk raises on purpose."""

    exit_code = 1
    errno = _errno.EIO


class UsageError(VdiskError):
    """A bad argument: an unknown option, a malformed size, a wrong format name."""

    exit_code = 2
    errno = _errno.EINVAL


class InvalidArgument(UsageError):
    """A request outside what the disk allows (offset past the end, negative length)."""


class ImageNotFound(VdiskError):
    """The image (or a backing image it names) does not exist."""

    errno = _errno.ENOENT


class CorruptImage(VdiskError):
    """The image's structures are inconsistent: a bad magic, an offset past the end, a loop."""


class ChecksumMismatch(CorruptImage):
    """Stored bytes do not match the checksum their parent recorded."""


class UnsupportedFeature(VdiskError):
    """The image uses something vdisk cannot (or refuses to) handle, e.g. encryption."""

    errno = _errno.ENOTSUP


class UnknownFormat(VdiskError):
    """No driver recognises the image and no format was given."""


class ImageLocked(VdiskError):
    """Another process holds the image open for writing."""

    errno = _errno.EBUSY


class ReadOnlyImage(VdiskError):
    """A write was attempted on an image (or view) opened read-only."""

    errno = _errno.EROFS


class NoSpace(VdiskError):
    """The storage under the image is full."""

    errno = _errno.ENOSPC


class BackingMismatch(CorruptImage):
    """A backing image is missing, changed since the overlay was made, or loops."""


class StorageError(VdiskError):
    """The storage layer failed (an I/O error of the host, an object store that is down)."""


class Interrupted(VdiskError):
    """A long operation was interrupted; every image involved is still consistent."""

    exit_code = 130


def describe(exc: BaseException) -> str:
    """One line for a user: the message of a vdisk error, or the class and text of an OSError."""
    if isinstance(exc, VdiskError):
        return str(exc) or (exc.__doc__ or type(exc).__name__).strip().splitlines()[0]
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
