"""Consistency check, refcount repair and compaction of native ``.vdisk`` images.

``check`` walks every root (the live tree and every snapshot), verifies the checksum of
every table and every stored cluster, counts the references to every slot, and compares
them with the refcount tree: a stored count above the computed one is a leak (space that
is never reused), below it is corruption (a slot that could be handed out twice).
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import TYPE_CHECKING

from vdisk.errors import VdiskError
from vdisk.formats.base import CheckReport
from vdisk.formats.native_layout import ENTRY, ENTRY_BITS, FLAG_ZERO, NULL_ENTRY, Entry

if TYPE_CHECKING:
    from vdisk.formats.native import NativeDriver

MAX_REPORTED = 1000  # bound the report of a badly damaged image


def _add(lst: list[str], msg: str) -> None:
    if len(lst) < MAX_REPORTED:
        lst.append(msg)
    elif len(lst) == MAX_REPORTED:
        lst.append("... (more not shown)")


class _Walker:
    def __init__(self, drv: NativeDriver, rep: CheckReport) -> None:
        self.drv = drv
        self.rep = rep
        self.refs: Counter[int] = Counter()
        self.tables: set[int] = set()
        self.data: set[int] = set()
        self.lengths: dict[int, int] = {}  # slot -> stored length (for compact)
        self.table_errors = 0
        self.clusters = 0
        self.corrupt_clusters = 0

    def entry_ok(self, e: Entry, what: str) -> bool:
        try:
            self.drv.map.check_entry(e, what)
        except VdiskError as err:
            _add(self.rep.corruptions, str(err))
            self.table_errors += 1
            return False
        return True

    def map_node(self, e: Entry, level: int, first: int, label: str, verify: bool) -> None:
        d = self.drv
        cs = d.cluster_size
        what = f"{d.storage.path}: {label}: mapping table (level {level}) for guest offset {first * cs}"
        if not self.entry_ok(e, what):
            return
        slot = e.host >> d.cluster_bits
        self.refs[slot] += 1
        if slot in self.tables:
            return
        if slot in self.data:
            _add(self.rep.corruptions, f"{what}: host offset {e.host} is also a data cluster")
        self.tables.add(slot)
        self.lengths[slot] = e.length
        try:
            node = d.map.load(e, level)
        except VdiskError as err:
            _add(self.rep.corruptions, f"{label}: {err}")
            self.table_errors += 1
            return
        self.walk_node(node, level, first, label, verify)

    def walk_node(self, node: bytes, level: int, first: int, label: str, verify: bool) -> None:
        d = self.drv
        t = d.map
        cs = d.cluster_size
        cspan = t.span(level - 1) if level > 0 else 0
        for j in range(1 << t.fan_bits):
            off = j << ENTRY_BITS
            if node[off : off + ENTRY.size] == NULL_ENTRY:
                continue
            e = Entry.unpack(node, off)
            c = first + (j << cspan)
            what = f"{d.storage.path}: {label}: entry for guest offset {c * cs}"
            if not self.entry_ok(e, what):
                continue
            if e.host == 0:
                continue
            if level > 0:
                self.map_node(e, level - 1, c, label, verify)
                continue
            slot = e.host >> d.cluster_bits
            self.refs[slot] += 1
            if slot in self.data:
                continue  # shared with another root: verified once
            if slot in self.tables:
                _add(self.rep.corruptions, f"{what}: host offset {e.host} is also a table")
            self.data.add(slot)
            self.lengths[slot] = e.length
            self.clusters += 1
            if verify:
                try:
                    d._read_cluster(c, e)
                except VdiskError as err:
                    self.corrupt_clusters += 1
                    _add(self.rep.corruptions, f"{label}: {err}")

    def root(self, root: Entry, depth: int, label: str, verify: bool) -> None:
        if root.host:
            self.map_node(root, depth - 1, 0, label, verify)

    def refcounts(self) -> dict[int, int]:
        """Walk the refcount tree: count its own nodes, return the nonzero stored counts."""
        d = self.drv
        rt = d.rtree
        stored: dict[int, int] = {}

        def node_at(level: int, key: int, node: bytes | bytearray) -> None:
            if level == 0:
                arr = array("H")
                arr.frombytes(bytes(node))
                base = key << rt.leaf_bits
                for i, v in enumerate(arr):
                    if v:
                        stored[base + i] = v
                return
            for j in range(1 << rt.fan_bits):
                ckey = (key << rt.fan_bits) | j
                child: bytes | bytearray | None = rt.dirty.get((level - 1, ckey))
                if child is None:
                    off = j << ENTRY_BITS
                    if node[off : off + ENTRY.size] == NULL_ENTRY:
                        continue
                    e = Entry.unpack(node, off)
                    what = f"{d.storage.path}: refcount table (level {level - 1}) #{ckey}"
                    if not self.entry_ok(e, what) or not e.host:
                        continue
                    self.refs[e.host >> d.cluster_bits] += 1
                    self.lengths[e.host >> d.cluster_bits] = e.length
                    try:
                        child = rt.load(e, level - 1)
                    except VdiskError as err:
                        _add(self.rep.corruptions, str(err))
                        self.table_errors += 1
                        continue
                node_at(level - 1, ckey, child)

        root: bytes | bytearray | None = rt.dirty.get((rt.depth - 1, 0))
        if (
            root is None
            and rt.root.host
            and self.entry_ok(rt.root, f"{d.storage.path}: refcount root")
        ):
            self.refs[rt.root.host >> d.cluster_bits] += 1
            self.lengths[rt.root.host >> d.cluster_bits] = rt.root.length
            try:
                root = rt.load(rt.root, rt.depth - 1)
            except VdiskError as err:
                _add(self.rep.corruptions, str(err))
                self.table_errors += 1
        if root is not None:
            node_at(rt.depth - 1, 0, root)
        return stored


def usage(drv: NativeDriver) -> tuple[int, int, int]:
    """(stored clusters, zero clusters, stored bytes) of the live tree, for ``info``.

    Each table is visited once, so a hostile image whose tables alias each other costs
    the number of distinct tables, not the number of paths to them."""
    t = drv.map
    seen: set[int] = set()
    limit = -(-drv.size // drv.cluster_size)
    clusters = zero = stored = 0

    def walk(node: bytes | bytearray, level: int, key: int) -> None:
        nonlocal clusters, zero, stored
        cspan = t.span(level - 1) if level > 0 else 0
        for j in range(1 << t.fan_bits):
            first = ((key << t.fan_bits) | j) << cspan
            if first >= limit:
                break
            child = t.dirty.get((level - 1, (key << t.fan_bits) | j)) if level else None
            if child is not None:
                walk(child, level - 1, (key << t.fan_bits) | j)
                continue
            off = j << ENTRY_BITS
            if node[off : off + ENTRY.size] == NULL_ENTRY:
                continue
            e = Entry.unpack(node, off)
            if e.host == 0:
                if e.flags & FLAG_ZERO:
                    zero += min(1 << cspan, limit - first)
            elif level == 0:
                clusters += 1
                stored += e.length
            elif e.host not in seen:
                seen.add(e.host)
                walk(t.load(e, level - 1), level - 1, (key << t.fan_bits) | j)

    root, flags = t._root_node()
    if root is not None:
        walk(root, t.depth - 1, 0)
    elif flags & FLAG_ZERO:
        zero = limit
    return clusters, zero, stored


def check(drv: NativeDriver, *, repair: bool) -> CheckReport:
    rep = CheckReport()
    if repair and drv.readonly:
        from vdisk.errors import ReadOnlyImage

        raise ReadOnlyImage(f"{drv.storage.path}: opened read-only; cannot repair")
    if not drv.readonly and drv.view_of is None and drv._broken is None:
        drv.flush()
    w = _Walker(drv, rep)
    for label, root, depth in drv._roots():
        w.root(root, depth, label, verify=True)
    if drv.view_of is not None:
        rep.info = {"clusters": w.clusters, "corrupt_clusters": w.corrupt_clusters}
        return rep
    for s in range(drv.first_slot):
        w.refs[s] += 1
    for e in (drv.hdr.snap_table, drv.hdr.deferred):
        for s in drv._blob_slot_list(e):
            w.refs[s] += 1
    for first, n in drv.prev_deferred:
        for s in range(first, first + n):
            w.refs[s] += 1
    stored = w.refcounts()
    fixes: dict[int, int] = {}
    cs = drv.cluster_size
    found_leaks: list[str] = []
    undercounts: list[str] = []
    for slot in sorted(set(stored) | set(w.refs)):
        have, want = stored.get(slot, 0), w.refs.get(slot, 0)
        if have == want:
            continue
        where = f"{drv.storage.path}: slot {slot} (host offset {slot * cs})"
        if slot >= drv.host_slots:
            _add(rep.corruptions, f"{where}: in use past the end of the allocated area")
            continue
        if have > want:
            _add(found_leaks, f"{where}: refcount {have} but {want} references (leaked)")
        else:
            _add(undercounts, f"{where}: refcount {have} but {want} references")
        fixes[slot] = want
    rep.info = {
        "clusters": w.clusters,
        "corrupt_clusters": w.corrupt_clusters,
        "tables": len(w.tables),
        "host_slots": drv.host_slots,
        "generation": drv.generation,
        "refcount_fixes_needed": len(fixes),
    }
    if repair and fixes and not w.table_errors:
        for slot, want in fixes.items():
            drv._rc_set(slot, want)
            _add(rep.repaired, f"slot {slot} (host offset {slot * cs}): refcount set to {want}")
        drv.changed = True
        drv.flush()
        return rep
    rep.leaks.extend(found_leaks)
    for msg in undercounts:
        _add(rep.corruptions, msg)
    if repair and fixes:
        _add(rep.corruptions, f"{drv.storage.path}: unreadable tables; refcounts not repaired")
    return rep


def compact(drv: NativeDriver) -> int:
    """Release free slots to the host: drain deferred frees, cut the free tail of the file,
    punch holes in free slots and in the unused tails of compressed slots."""
    drv._check_writable()
    st = drv.storage

    def used_bytes() -> int:
        try:
            return int(st.allocated_bytes())  # type: ignore[attr-defined]
        except AttributeError:
            return st.size()

    before = used_bytes()
    # Each commit frees what the one before released, and allocates lowest-first, so a
    # few commits drain the deferred frees and move the newest metadata down.
    for _ in range(4):
        drv.changed = True
        drv.flush()
        last = drv.host_slots - 1
        while last >= drv.first_slot and drv._rc_get(last) == 0:
            last -= 1
        if last + 1 < drv.host_slots:
            drv.host_slots = last + 1
            drv.free_hint = drv.first_slot
    # Both header copies must fit in the file after truncation (the older copy is the
    # fallback if the newest is ever damaged): commit twice more, cut at the larger end.
    ends = []
    for _ in range(2):
        drv.changed = True
        drv.flush()
        ends.append(drv.host_slots)
    cs, cbits = drv.cluster_size, drv.cluster_bits
    if st.size() > max(ends) << cbits:
        st.truncate(max(ends) << cbits)
    punched = 0
    run_start = None
    for s in range(drv.first_slot, drv.host_slots + 1):
        free = s < drv.host_slots and drv._rc_get(s) == 0
        if free and run_start is None:
            run_start = s
        elif not free and run_start is not None:
            st.punch_hole(run_start << cbits, (s - run_start) << cbits)
            punched += (s - run_start) << cbits
            run_start = None
    if cs > 4096:
        rep = CheckReport()
        w = _Walker(drv, rep)
        for label, root, depth in drv._roots():
            w.root(root, depth, label, verify=False)
        for slot, length in w.lengths.items():
            tail = -(-length // 4096) * 4096
            if tail < cs:
                st.punch_hole((slot << cbits) + tail, cs - tail)
    st.sync()
    return max(0, before - used_bytes()) if before != used_bytes() else punched
