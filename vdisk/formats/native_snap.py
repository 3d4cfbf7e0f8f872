"""Internal snapshots of native images: a snapshot is a saved mapping root.

Taking one costs one refcount increment (the root table is then shared; the first write
copies the path it changes, see native_tree.py). Revert makes a snapshot's root the live
one; delete drops its root, which frees every table and cluster no other root shares.
Each operation is one ordinary commit, so a crash leaves the state before or after it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vdisk.errors import UsageError
from vdisk.formats.base import SnapshotInfo
from vdisk.formats.native_layout import MAX_SNAPSHOTS, Header, Snapshot

if TYPE_CHECKING:
    from vdisk.formats.native import NativeDriver

MAX_NAME = 1024  # bytes of UTF-8


def info(s: Snapshot) -> SnapshotInfo:
    return SnapshotInfo(str(s.id), s.name, s.created, s.size)


def find(drv: NativeDriver, name: str) -> Snapshot:
    """The snapshot called ``name`` (or, qemu-img style, whose id is ``name``)."""
    for s in drv.snapshots:
        if s.name == name:
            return s
    for s in drv.snapshots:
        if str(s.id) == name:
            return s
    raise UsageError(f"{drv.storage.path}: no snapshot named {name!r}")


def create(drv: NativeDriver, name: str) -> SnapshotInfo:
    drv._check_writable()
    if not name or len(name.encode()) > MAX_NAME:
        raise UsageError(f"{drv.storage.path}: snapshot name must be 1..{MAX_NAME} bytes")
    if any(s.name == name for s in drv.snapshots):
        raise UsageError(f"{drv.storage.path}: snapshot {name!r} already exists")
    if len(drv.snapshots) >= MAX_SNAPSHOTS:
        raise UsageError(f"{drv.storage.path}: too many snapshots ({MAX_SNAPSHOTS})")
    drv.flush()  # the snapshot saves the committed root
    root = drv.map.root
    if root.host:
        drv._incref(root.host >> drv.cluster_bits)
    sid = max((s.id for s in drv.snapshots), default=0) + 1
    snap = Snapshot(sid, name, time.time(), drv.size, drv.map.depth, root)
    drv.snapshots.append(snap)
    drv.snaps_dirty = True
    drv.changed = True
    drv.flush()
    return info(snap)


def revert(drv: NativeDriver, name: str) -> None:
    drv._check_writable()
    snap = find(drv, name)
    drv.flush()
    if snap.root.host:  # take the new reference before dropping the old root: they may share
        drv._incref(snap.root.host >> drv.cluster_bits)
    old, old_depth = drv.map.root, drv.map.depth
    drv.map.root, drv.map.depth = snap.root, snap.depth
    drv._drop(old, old_depth - 1)
    drv.size = snap.size
    drv.changed = True
    drv.flush()


def delete(drv: NativeDriver, name: str) -> None:
    drv._check_writable()
    snap = find(drv, name)
    drv.flush()
    drv.snapshots.remove(snap)
    drv._drop(snap.root, snap.depth - 1)
    drv.snaps_dirty = True
    drv.changed = True
    drv.flush()


def open_view(drv: NativeDriver, name: str) -> NativeDriver:
    """A read-only driver over the snapshot's root, sharing the image's storage."""
    from vdisk.formats.native import NativeDriver

    snap = find(drv, name)
    h = Header(**{f: getattr(drv.hdr, f) for f in drv.hdr.__dataclass_fields__})
    h.root, h.depth, h.size = snap.root, snap.depth, snap.size
    h.host_slots = drv.host_slots
    return NativeDriver(
        drv.storage,
        readonly=True,
        options={
            "commit_interval": 0,
            "workers": drv.workers,
            "metadata_cache_mb": drv.cache_bytes / (1 << 20) / 4,
        },
        header=h,
        view_of=drv,
    )
