"""An S3-compatible object store as vdisk storage: a small client and a local cache tier.

Images in an object store are not byte arrays: their driver (``vdisk.formats.remote``)
speaks in whole immutable objects (packs, pages, manifests) read with range GETs. This
module gives it what it needs and nothing more:

- :class:`S3Client`: get (whole or a byte range), put (optionally ``If-None-Match: *``,
  the commit primitive), head, list, delete; every call retried with exponential back-off
  and full jitter on errors that may pass (connection errors, timeouts, 5xx, throttling),
  then a :class:`~vdisk.errors.StorageError` naming the bucket, key and cause.
- :class:`S3Storage`: the :class:`~vdisk.storage.Storage` an ``s3://BUCKET/NAME`` URL opens
  to, so the generic layer can hold a path, resolve backing names and take (no) lock. It
  is not a byte store: pread/pwrite refuse.
- :class:`LocalCache`: the persistent cache tier for stored clusters, a directory bounded
  in bytes (one sparse file per pack, LRU by file), every piece verified with the
  cluster's checksum on fill and on read.

The endpoint comes from ``VDISK_S3_ENDPOINT`` (the CLI's ``--endpoint`` sets it), else
``AWS_ENDPOINT_URL``, else AWS itself; credentials from the usual AWS environment
variables or profile (boto3's chain).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from vdisk.cache import codec
from vdisk.errors import CorruptImage, ImageNotFound, StorageError, UsageError
from vdisk.storage import Storage

log = logging.getLogger("vdisk.s3")

SCHEME = "s3://"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,7}$")

#: Retry policy: attempts, first delay and cap (seconds); overridable for tests and slow stores.
DEFAULT_ATTEMPTS = 6
DEFAULT_BASE_DELAY = 0.1
DEFAULT_MAX_DELAY = 3.0
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20.0
#: A single GET is refused above this many bytes (memory bound against a hostile store).
MAX_GET = 256 << 20

_RETRY_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "500",
    "502",
    "503",
    "504",
}

T = TypeVar("T")


class TooLarge(Exception):
    """An object is larger than its kind may be (raised inside the retry loop, not retried)."""


def is_url(path: str) -> bool:
    return path.startswith(SCHEME)


def parse_url(url: str, *, need_name: bool = True) -> tuple[str, str]:
    """``s3://BUCKET/NAME[@N]`` -> (bucket, name), both validated (name may be empty if
    allowed; a version suffix is validated and dropped: see :func:`split_pin`)."""
    if not is_url(url):
        raise UsageError(f"{url}: not an s3:// URL")
    rest = url[len(SCHEME) :]
    bucket, _, name = rest.partition("/")
    name, _pin = split_pin(name.strip("/"))
    if not _BUCKET_RE.match(bucket):
        raise UsageError(
            f"{url}: bad bucket name {bucket!r} (3 to 63 lower-case letters, digits, '.' or '-')"
        )
    if not name:
        if need_name:
            raise UsageError(f"{url}: no image name (expected s3://BUCKET/NAME)")
        return bucket, ""
    if not _NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"{url}: bad image name {name!r} (letters, digits, '.', '_', '-', '/' separated)"
        )
    return bucket, name


def split_pin(name: str) -> tuple[str, int | None]:
    """``NAME@N`` names manifest N of image NAME (a pinned, read-only version)."""
    base, at, num = name.rpartition("@")
    if not at:
        return name, None
    if not num.isdigit() or not 0 < int(num) < 10**10:
        raise UsageError(f"{name}: bad version {num!r} after '@' (a manifest number)")
    return base, int(num)


def endpoint() -> str | None:
    return os.environ.get("VDISK_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # Unix time of the last modification, as the store reports it


_clients: dict[tuple[str | None, float], Any] = {}
_clients_lock = threading.Lock()


def _boto_client(url: str | None, read_timeout: float) -> Any:
    """One boto3 client per endpoint and process (clients are thread-safe, and slow to make)."""
    key = (url, read_timeout)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise UsageError("s3:// images need boto3: pip install 'vdisk[s3]'") from None
            cfg = Config(
                retries={"max_attempts": 1, "mode": "standard"},  # we retry ourselves
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=read_timeout,
                max_pool_connections=32,
                s3={"addressing_style": "path"},
            )
            region = (
                os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            )
            c = boto3.session.Session().client(
                "s3", endpoint_url=url, region_name=region, config=cfg
            )
            _clients[key] = c
        return c


class S3Client:
    """One bucket of one endpoint, with retries. Thread-safe."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        attempts: int | None = None,
        base_delay: float | None = None,
        max_delay: float | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint_url if endpoint_url is not None else endpoint()
        env = os.environ.get
        self.attempts = max(1, attempts or int(env("VDISK_S3_RETRIES", DEFAULT_ATTEMPTS)))
        self.base_delay = base_delay if base_delay is not None else DEFAULT_BASE_DELAY
        self.max_delay = max_delay if max_delay is not None else DEFAULT_MAX_DELAY
        timeout = read_timeout or float(env("VDISK_S3_TIMEOUT", READ_TIMEOUT))
        self._c = _boto_client(self.endpoint, timeout)
        self.counters = {"gets": 0, "puts": 0, "bytes_in": 0, "bytes_out": 0, "retries": 0}

    def where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}" + (
            f" (endpoint {self.endpoint})" if self.endpoint else ""
        )

    # -- the retry loop --------------------------------------------------------------

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on errors that may pass; ``fn`` itself turns answers that
        are not failures (404, 412) into return values."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        delay = self.base_delay
        last = ""
        for attempt in range(self.attempts):
            try:
                return fn()
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code == "NoSuchBucket":
                    raise ImageNotFound(f"{self.where()}: no such bucket") from None
                if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise StorageError(
                        f"{self.where(key)}: {what} refused: {code} (check the credentials)"
                    ) from None
                if code not in _RETRY_CODES and not (status >= 500 or status == 429):
                    raise StorageError(f"{self.where(key)}: {what} failed: {code} {e}") from None
                last = f"{code or status}"
            except TooLarge as e:
                raise CorruptImage(str(e)) from None
            except (NoCredentialsError, PartialCredentialsError) as e:
                raise StorageError(
                    f"{self.where(key)}: {what}: {e} (set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
                ) from None
            except BotoCoreError as e:  # connection refused, timeouts, incomplete reads
                last = f"{type(e).__name__}: {e}"
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            if attempt + 1 < self.attempts:
                self.counters["retries"] += 1
                time.sleep(random.uniform(0, delay))  # full jitter
                delay = min(delay * 2, self.max_delay)
        raise StorageError(
            f"{self.where(key)}: {what} failed after {self.attempts} attempts: {last}"
        )

    # -- operations ------------------------------------------------------------------

    def get(
        self,
        key: str,
        start: int | None = None,
        length: int | None = None,
        *,
        limit: int = MAX_GET,
    ) -> bytes | None:
        """The object's bytes (or ``length`` bytes from ``start``); None if it does not exist.
        An object larger than ``limit`` is refused before its body is read (memory bound);
        a short answer to a range GET is a StorageError: callers rely on exact lengths."""
        if length is not None and length > MAX_GET:
            raise StorageError(f"{self.where(key)}: refusing a {length}-byte GET (limit {MAX_GET})")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start is not None and length is not None:
            if length <= 0:
                return b""
            kwargs["Range"] = f"bytes={start}-{start + length - 1}"

        def run() -> bytes | None:
            try:
                r = self._c.get_object(**kwargs)
            except Exception as e:
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404"):
                    return None
                raise
            size = r.get("ContentLength", 0)
            if size > limit:
                r["Body"].close()
                raise TooLarge(f"{self.where(key)}: object of {size} bytes exceeds {limit}")
            return r["Body"].read()

        data = self._call("GET", key, run)
        self.counters["gets"] += 1
        if data is not None:
            self.counters["bytes_in"] += len(data)
            if length is not None and len(data) != length:
                raise StorageError(
                    f"{self.where(key)}: range GET of {length} bytes at {start} returned {len(data)}"
                )
        return data

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, adopt: bool = True
    ) -> bool:
        """Store an object. With ``if_none_match``, create it only if no object has the key:
        False means another writer got there first (HTTP 412). With ``adopt``, a 412 after a
        retry whose object holds exactly ``data`` is our own lost answer: True."""
        from botocore.exceptions import ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        tries = [0]

        def run() -> bool:
            tries[0] += 1
            try:
                self._c.put_object(**kwargs)
                return True
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if if_none_match and status == 412:
                    # after a retry, the object may be our own earlier attempt whose answer
                    # was lost: that is a success, not a lost race
                    return adopt and tries[0] > 1 and self.get(key) == data
                raise

        ok = self._call("PUT", key, run)
        self.counters["puts"] += 1
        self.counters["bytes_out"] += len(data)
        return ok

    def head(self, key: str) -> ObjectInfo | None:
        def run() -> ObjectInfo | None:
            try:
                r = self._c.head_object(Bucket=self.bucket, Key=key)
            except Exception as e:
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            return ObjectInfo(key, int(r.get("ContentLength", 0)), r["LastModified"].timestamp())

        return self._call("HEAD", key, run)

    def list(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order, after ``start_after``."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after:
                kwargs["StartAfter"] = start_after
            r: dict[str, Any] = self._call(
                "LIST", prefix, functools.partial(self._c.list_objects_v2, **kwargs)
            )
            for o in r.get("Contents", []):
                yield ObjectInfo(o["Key"], int(o["Size"]), o["LastModified"].timestamp())
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")
            if not token:
                return

    def delete(self, key: str) -> None:
        self._call("DELETE", key, lambda: self._c.delete_object(Bucket=self.bucket, Key=key))

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (``vdisk create`` into a new bucket)."""
        from botocore.exceptions import ClientError

        def run() -> None:
            try:
                self._c.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status != 404:
                    raise
            try:
                self._c.create_bucket(Bucket=self.bucket)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise

        self._call("create bucket", "", run)


class S3Storage(Storage):
    """What an ``s3://BUCKET/NAME`` URL opens to: the image's address and its client.

    The remote driver reads and writes whole objects through ``client``; the generic layer
    only needs the path, name resolution and the lock (the commit protocol is the lock, so
    :meth:`lock` does nothing). It is not a byte store: as bytes it shows only the
    image's identity (uuid and manifest number, set by the driver), which is what an
    overlay of another format records to notice that its base has changed."""

    native_format = "vdisk-s3"  # what the generic layer opens an s3:// URL as by default

    def __init__(self, url: str, *, readonly: bool, create: bool = False) -> None:
        self.bucket, self.name = parse_url(url)
        self.pin = split_pin(url.rstrip("/"))[1]  # NAME@N: manifest N, read-only
        self.path = f"{SCHEME}{self.bucket}/{self.name}" + (f"@{self.pin}" if self.pin else "")
        self.readonly = readonly
        self.client = S3Client(self.bucket)
        self.measure: Callable[[], int] | None = None  # set by the driver: stored bytes
        self.identity = b""  # set by the driver: uuid and manifest number

    def _refuse(self) -> StorageError:
        return StorageError(f"{self.path}: an object-store image is not a byte store")

    def pread(self, offset: int, length: int) -> bytes:
        return self.identity[offset : offset + length]

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise self._refuse()

    def size(self) -> int:
        return len(self.identity)

    def allocated_bytes(self) -> int:
        """Stored (compressed) bytes of the clusters the image references (for `info`)."""
        return self.measure() if self.measure is not None else 0

    def truncate(self, size: int) -> None:
        raise self._refuse()

    def sync(self) -> None:
        pass  # the driver's flush is the commit

    def resolve(self, name: str) -> str:
        """URLs stay as they are; a bare name is an image in the same bucket."""
        if "://" in name:
            return name
        return f"{SCHEME}{self.bucket}/{name.strip('/')}"

    def sibling(self, name: str, *, readonly: bool, create: bool = False) -> Storage:
        from vdisk.storage import open_storage

        return open_storage(self.resolve(name), readonly=readonly, create=create)


# -- the local cache tier ---------------------------------------------------------------


def default_cache_dir() -> str:
    return os.environ.get("VDISK_S3_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "vdisk"
    )


DEFAULT_CACHE_BYTES = 1 << 30


class LocalCache:
    """Stored clusters of remote packs in a directory, bounded in bytes, LRU by file.

    One sparse file per pack (``packs/<id>``) holds the clusters fetched from it at their
    offsets in the pack: creating a file per cluster costs more than fetching it. A piece
    is verified against the cluster's checksum when it is filled (bytes that do not match
    are not cached) and again on every read, so a hole, a torn fill or a bit flip of the
    cache is a miss, never data. Several processes may share the directory: fills write
    verified bytes only, and a file evicted under a reader is a miss. ``max_bytes`` 0
    disables the tier."""

    MAX_FDS = 64

    def __init__(self, directory: str | None = None, max_bytes: int | None = None) -> None:
        self.dir = os.path.join(directory or default_cache_dir(), "packs")
        env = os.environ.get("VDISK_S3_CACHE_BYTES")
        self.max_bytes = max_bytes if max_bytes is not None else int(env or DEFAULT_CACHE_BYTES)
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # pack -> bytes, oldest first
        self._fds: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self.counters = {"hits": 0, "misses": 0, "fills": 0, "evictions": 0, "bad": 0}
        if self.max_bytes <= 0:
            return
        try:
            os.makedirs(self.dir, exist_ok=True)
            found = []
            with os.scandir(self.dir) as it:
                for e in it:
                    if e.is_file() and not e.name.startswith("."):
                        st = e.stat()
                        found.append((st.st_mtime, e.name, st.st_blocks * 512))
        except OSError as e:  # a cache that cannot be used costs speed, not the open
            log.warning("%s: cannot use as cache directory (%s): caching off", self.dir, e.strerror)
            self.max_bytes = 0
            return
        for _, name, size in sorted(found):
            self._files[name] = size
            self.used += size
        with self._lock:
            self._shrink()

    def _fd(self, name: str, create: bool) -> int | None:
        """An open descriptor of a pack's cache file (kept in a small LRU); lock held."""
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        try:
            fd = os.open(
                os.path.join(self.dir, name),
                os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0),
                0o600,
            )
        except OSError:
            return None
        self._fds[name] = fd
        while len(self._fds) > self.MAX_FDS:
            _n, old = self._fds.popitem(last=False)
            os.close(old)
        if name not in self._files:
            try:
                size = os.fstat(fd).st_blocks * 512
            except OSError:
                size = 0
            self._files[name] = size
            self.used += size
        else:
            try:
                os.utime(fd)  # LRU order survives a restart
            except OSError:
                pass
        return fd

    def get(self, pack: bytes, offset: int, length: int, cks: int) -> bytes | None:
        if self.max_bytes <= 0:
            return None
        name = pack.hex()
        with self._lock:
            fd = self._fd(name, False)  # also finds files other processes filled
            if fd is None:
                self.counters["misses"] += 1
                return None
            self._files.move_to_end(name)
            try:
                data = os.pread(fd, length, offset)
            except OSError:
                data = b""
            if len(data) == length and codec.checksum(data) == cks:
                self.counters["hits"] += 1
                return data
            self.counters["misses"] += 1
            if data.strip(b"\0"):
                self.counters["bad"] += 1  # not a hole: a damaged entry, refilled on fetch
            return None

    def put(self, pack: bytes, offset: int, stored: bytes, cks: int) -> bool:
        """Add one stored cluster at its offset in the pack, if it matches ``cks``."""
        if self.max_bytes <= 0:
            return False
        if codec.checksum(stored) != cks:
            with self._lock:
                self.counters["bad"] += 1
            return False
        name = pack.hex()
        with self._lock:
            fd = self._fd(name, True)
            if fd is None:
                return False  # a full or read-only cache directory only costs speed
            try:
                os.pwrite(fd, stored, offset)
            except OSError:
                return False
            self.counters["fills"] += 1
            self._files[name] = self._files.get(name, 0) + len(stored)
            self._files.move_to_end(name)
            self.used += len(stored)
            self._shrink()
        return True

    def put_range(
        self, pack: bytes, start: int, data: bytes, pieces: list[tuple[int, int, int]]
    ) -> None:
        """Add a fetched or written range of a pack in one write: ``pieces`` are the
        (offset, length, checksum) of the clusters in it; one that does not verify is
        left out (and the others written one by one)."""
        if self.max_bytes <= 0 or not pieces:
            return
        mv = memoryview(data)
        good = [
            (off, ln, cks)
            for off, ln, cks in pieces
            if off - start >= 0
            and off - start + ln <= len(data)
            and codec.checksum(mv[off - start : off - start + ln]) == cks
        ]
        name = pack.hex()
        with self._lock:
            self.counters["bad"] += len(pieces) - len(good)
            fd = self._fd(name, True)
            if fd is None:
                return
            try:
                if len(good) == len(pieces):
                    lo = min(off for off, _l, _c in good)
                    hi = max(off + ln for off, ln, _c in good)
                    os.pwrite(fd, mv[lo - start : hi - start], lo)
                else:
                    for off, ln, _c in good:
                        os.pwrite(fd, mv[off - start : off - start + ln], off)
            except OSError:
                return
            added = sum(ln for _o, ln, _c in good)
            self.counters["fills"] += len(good)
            self._files[name] = self._files.get(name, 0) + added
            self._files.move_to_end(name)
            self.used += added
            self._shrink()

    def _shrink(self) -> None:
        while self.used > self.max_bytes and len(self._files) > 1:
            name, size = self._files.popitem(last=False)
            self.used -= size
            self.counters["evictions"] += 1
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass

    def get_blob(self, name: str) -> bytes | None:
        """A small immutable object kept beside the packs (pack indexes); the caller
        verifies it (indexes carry their own checksum)."""
        if self.max_bytes <= 0:
            return None
        try:
            with open(os.path.join(os.path.dirname(self.dir), "index", name), "rb") as f:
                return f.read()
        except OSError:
            return None

    def put_blob(self, name: str, data: bytes) -> None:
        if self.max_bytes <= 0:
            return
        d = os.path.join(os.path.dirname(self.dir), "index")
        try:
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{name}.{os.getpid()}.{threading.get_ident()}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(d, name))
        except OSError:
            pass

    def drop_blob(self, name: str) -> None:
        try:
            os.unlink(os.path.join(os.path.dirname(self.dir), "index", name))
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.counters, bytes=self.used, capacity=self.max_bytes, dir=self.dir)
