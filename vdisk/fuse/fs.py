"""The pyfuse3 Operations of a vdisk mount: a small fixed tree of files over one Disk.

::

    DIR/disk              the whole guest disk (read-write unless the mount is read-only)
    DIR/p1, p2, ... p5    one file per partition of an MBR or GPT table, numbered as it is
    DIR/snapshots/NAME    a read-only file per internal snapshot
    DIR/stats             the cache counters as JSON (fresh at every open)
    DIR/fs                (only with --fs at the default place) where the guest fs appears

Front ends translate and hold no format logic (DESIGN.md): a FUSE read is ``disk.read``,
fsync is ``disk.flush``. Errors become ``FUSEError`` in one place, :func:`_to_fuse_error`:
anything else leaving a handler would end the whole mount loop.

Concurrency (PERFORMANCE.md): a request costs ~42 us and a thread hop ~80 us more, so a
request the cluster cache can answer runs inline in the handler task; a large or cold one
goes to a worker thread (one hop per request, under a limiter). A request also goes to a
thread whenever another thread holds the disk's lock (a commit in progress), so the event
loop never waits on a lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from vdisk.api import Disk
from vdisk.errors import VdiskError
from vdisk.formats.base import Kind
from vdisk.fuse.partitions import Partition, scan

log = logging.getLogger("vdisk.fuse")

T = TypeVar("T")

#: Requests up to this size run inline even when the cache might miss (one cluster's
#: pread + decompress costs less than a thread hop).
#: Attribute and entry cache time of the kernel: the tree never changes under it.
ATTR_TIMEOUT = 300.0
#: Worker threads for large or cold requests (the machine has 2 cores; lz4 drops the GIL).
THREADS = 4

ROOT = pyfuse3.ROOT_INODE


@dataclass(slots=True)
class Node:
    """One entry of the tree. A file node is a window [base, base+length) of a disk."""

    inode: int
    name: str
    parent: int
    kind: str  # "dir", "disk", "part", "snap", "stats"
    length: int = 0
    base: int = 0
    writable: bool = False
    disk: Disk | None = None  # the Disk behind a file; opened lazily for snapshots
    snapshot: str | None = None
    children: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Handle:
    node: Node
    data: bytes | None = None  # the stats file's content, frozen at open
    wrote: bool = False
    sync: bool = False  # opened O_SYNC / O_DSYNC: every write is a commit point

    @property
    def disk(self) -> Disk:
        if self.node.disk is None:  # only a stats handle has none, and it has data
            raise pyfuse3.FUSEError(errno.EBADF)
        return self.node.disk


def _to_fuse_error(e: Exception) -> pyfuse3.FUSEError:
    """The one error mapping: only FUSEError may leave a handler (anything else would
    end the whole mount loop). vdisk errors carry their errno."""
    if isinstance(e, pyfuse3.FUSEError):
        return e
    if isinstance(e, VdiskError):
        log.error("%s", e)
        return pyfuse3.FUSEError(e.errno)
    if isinstance(e, OSError):
        log.error("%s", e)
        return pyfuse3.FUSEError(e.errno or errno.EIO)
    log.error("unexpected error in a disk call", exc_info=e)
    return pyfuse3.FUSEError(errno.EIO)


class DiskFS(pyfuse3.Operations):
    """Operations over a disk, its partitions and its snapshots."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        disk: Disk,
        partitions: list[Partition],
        *,
        image: str,
        readonly: bool,
        fs_dir: bool = False,
        threads: int = THREADS,
        snapshots_of: Disk | None = None,
    ) -> None:
        """``snapshots_of`` is the Disk whose internal snapshots to show, when it is not
        ``disk`` itself (a --snapshot mount shows those of the image below its overlay)."""
        super().__init__()
        self.disk = disk
        self.snap_disk = snapshots_of or disk
        self.image = image
        self.readonly = readonly
        self._stats_len = 0
        self.limiter = trio.CapacityLimiter(threads)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mtime_ns = time.time_ns()
        self.nodes: dict[int, Node] = {}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        root = self._add("", ROOT, "dir")
        root.parent = ROOT
        self._add("disk", ROOT, "disk", length=disk.size, disk=disk, writable=not readonly)
        self._add_partitions(partitions)
        snapdir = self._add("snapshots", ROOT, "dir")
        for s in self._list_snapshots():
            if "/" in s.name or s.name in ("", ".", "..") or s.name in snapdir.children:
                log.warning("snapshot %r cannot be shown as a file name; skipped", s.name)
                continue
            self._add(s.name, snapdir.inode, "snap", length=s.size, snapshot=s.name)
        self._add("stats", ROOT, "stats")
        if fs_dir:
            self._add("fs", ROOT, "dir")

    def _add_partitions(self, partitions: list[Partition]) -> None:
        for p in partitions:
            self._add(
                f"p{p.number}",
                ROOT,
                "part",
                length=p.length,
                base=p.offset,
                disk=self.disk,
                writable=not self.readonly,
            )

    def _partitions(self) -> list[tuple[str, int, int]]:
        parts = (self.nodes[i] for i in self.nodes[ROOT].children.values())
        return sorted((n.name, n.base, n.length) for n in parts if n.kind == "part")

    async def _rescan(self) -> None:
        """Re-read the partition table after the whole disk was written (sfdisk, dd of an
        image), so p1, p2, ... follow it without a remount. Files still open on a
        partition that went away keep their old window until closed."""
        found = await self._slow(scan, self.disk.read, self.disk.size, self.image)
        new = sorted((f"p{p.number}", p.offset, p.length) for p in found)
        if new == self._partitions():
            return
        root = self.nodes[ROOT]
        for name in [n for n, i in root.children.items() if self.nodes[i].kind == "part"]:
            del root.children[name]
            pyfuse3.invalidate_entry_async(ROOT, name.encode(), ignore_enoent=True)
        self._add_partitions(found)
        log.info("partition table changed: %s", ", ".join(n for n, _, _ in new) or "none")

    def _list_snapshots(self) -> list[Any]:
        try:
            return list(self.snap_disk.snapshots.list())
        except VdiskError as e:  # UnsupportedFeature and friends: no snapshots to show
            log.debug("no snapshots: %s", e)
            return []

    def _add(self, name: str, parent: int, kind: str, **kw: Any) -> Node:
        inode = ROOT if not self.nodes else max(self.nodes) + 1
        node = Node(inode, name, parent, kind, **kw)
        self.nodes[inode] = node
        if inode != ROOT:
            self.nodes[parent].children[name] = inode
        return node

    def close(self) -> None:
        """Close the snapshot views this mount opened (the main disk belongs to the caller)."""
        for node in self.nodes.values():
            if node.kind == "snap" and node.disk is not None:
                try:
                    node.disk.close()
                except VdiskError as e:
                    log.warning("closing snapshot %s: %s", node.name, e)
                node.disk = None

    # -- the one error boundary ----------------------------------------------------------

    async def _call(
        self, disk: Any, offset: int, length: int, write: bool, fn: Callable[..., T], *args: Any
    ) -> T:
        """Run a disk I/O call inline when it is cheap and the disk is free, else in a
        thread; turn every error into FUSEError. (The hot path of every read and write:
        the inline case avoids even the context manager of :meth:`_slow`.)"""
        if disk.is_cheap(offset, length, write=write):
            try:
                done, result = disk.try_call(fn, *args)
            except Exception as e:
                raise _to_fuse_error(e) from None
            if done:
                return result
        return await self._slow(fn, *args)

    async def _slow(self, fn: Callable[..., T], *args: Any) -> T:
        """A call that may sync or wait for the disk's lock (flush, open a snapshot):
        always in a thread; errors turned into FUSEError."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except Exception as e:
            raise _to_fuse_error(e) from None

    # -- attributes and the tree ---------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    def _stats_bytes(self) -> bytes:
        try:
            stats = self.disk.stats()
        except VdiskError as e:
            stats = {"error": str(e)}
        except Exception as e:  # a bug in a counter must not end the mount (getattr calls this)
            log.exception("disk.stats() failed")
            stats = {"error": f"{type(e).__name__}: {e}"}
        data = (json.dumps(stats, indent=2, default=str) + "\n").encode()
        self._stats_len = len(data)
        return data

    def _stats_size(self) -> int:
        """The stats file's size for getattr, without waiting for the disk's lock (the
        content is read with direct_io, so the kernel does not cut reads at this size)."""
        self.disk.try_call(self._stats_bytes)
        return self._stats_len

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        if node.kind == "dir":
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2 + sum(1 for c in node.children.values() if self.nodes[c].kind == "dir")
            a.st_size = 0
        else:
            a.st_mode = stat.S_IFREG | (0o644 if node.writable else 0o444)
            a.st_nlink = 1
            a.st_size = self._stats_size() if node.kind == "stats" else node.length
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 1 << 20
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        # stats changes all the time: never let the kernel keep its size
        timeout = 0.0 if node.kind == "stats" else ATTR_TIMEOUT
        a.attr_timeout = a.entry_timeout = timeout
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            return self._attr(parent)
        if text == "..":
            return self._attr(self._node(parent.parent))
        inode = parent.children.get(text)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.nodes[inode])

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        """Like a block device: O_TRUNC and truncate change nothing (`vdisk resize` does);
        times and modes are fixed."""
        return self._attr(self._node(inode))

    async def opendir(self, inode: int, ctx: Any) -> int:
        if self._node(inode).kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        node = self._node(fh)
        names = sorted(node.children)
        for i, name in enumerate(names[start_id:], start=start_id + 1):
            child = self.nodes[node.children[name]]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(child), i):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(n.length for n in self.nodes.values() if n.kind in ("disk", "snap"))
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- files ---------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.kind == "dir":
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY and not node.writable:
            raise pyfuse3.FUSEError(errno.EACCES if node.kind == "stats" else errno.EROFS)
        handle = Handle(node, sync=bool(flags & os.O_DSYNC))  # O_SYNC includes O_DSYNC
        if node.kind == "stats":
            handle.data = await self._slow(self._stats_bytes)
        elif node.kind == "snap" and node.disk is None:
            assert node.snapshot is not None
            view = await self._slow(self.snap_disk.snapshots.open, node.snapshot)
            if node.disk is None:
                node.disk = view
            else:  # another open of the same snapshot won the race while we waited
                await self._slow(view.close)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        # direct_io: requests of up to 1 MiB straight to us, no page cache to go stale
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        node = handle.node
        if handle.data is not None:
            return handle.data[off : off + size]
        if off >= node.length or size <= 0:
            return b""
        n = min(size, node.length - off)
        pos = node.base + off
        disk = handle.disk
        return await self._call(disk, pos, n, False, disk.read, pos, n)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        node = handle.node
        if not node.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off >= node.length:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # a disk cannot grow by writing past its end
        n = min(len(buf), node.length - off)
        pos = node.base + off
        data = buf if n == len(buf) else memoryview(buf)[:n]
        disk = handle.disk
        await self._call(disk, pos, n, True, disk.write, pos, data)
        handle.wrote = True
        if handle.sync:  # the kernel does not fsync direct_io writes of O_DSYNC files
            await self._slow(disk.flush)
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        if handle.node.writable:
            await self._slow(handle.disk.flush)

    async def flush(self, fh: int) -> None:
        """close(2) is not a commit point (fsync is; the periodic commit bounds the rest)."""
        return None

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None and handle.wrote and handle.node.kind == "disk":
            await self._rescan()

    # -- not reached with pyfuse3 3.5: it has no fallocate or lseek handler ---------------
    #
    # The kernel then answers fallocate(2) with EOPNOTSUPP and SEEK_DATA/SEEK_HOLE as if
    # the whole file were data. These are the translations a pyfuse3 with the handlers
    # would call; tests call them directly.

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        handle = self._handle(fh)
        node = handle.node
        punch, zero, keep = 0x02, 0x10, 0x01  # FALLOC_FL_PUNCH_HOLE, _ZERO_RANGE, _KEEP_SIZE
        if not node.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        end = min(off + length, node.length)
        if off >= end:
            return
        pos, n = node.base + off, end - off
        if mode & punch and mode & keep:
            await self._call(handle.disk, pos, n, True, handle.disk.discard, pos, n)
        elif mode & zero:
            await self._call(handle.disk, pos, n, True, handle.disk.write_zeroes, pos, n)
        elif mode & ~keep == 0:
            return  # preallocation of a fixed-size disk: nothing to do
        else:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the disk's block status (HOLE and ZERO are holes)."""
        handle = self._handle(fh)
        node = handle.node
        if off < 0 or off >= node.length:
            raise pyfuse3.FUSEError(errno.ENXIO)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        pos = node.base + off
        n = node.length - off
        disk = handle.disk
        extents = await self._slow(disk.block_status, pos, n)
        want_data = whence == os.SEEK_DATA
        for e in extents:
            if (e.kind == Kind.DATA) == want_data:
                return max(e.offset, pos) - node.base
        if want_data:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return node.length
