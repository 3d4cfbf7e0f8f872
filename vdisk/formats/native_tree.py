"""The copy-on-write radix tree used by the native format for mapping and refcounts.

Every node is one cluster-sized table; interior nodes are arrays of 32-byte ENTRY
pointers (docs/format.md "Tables"), leaves are whatever the tree holds (mapping entries,
or 16-bit refcounts). A node at ``level`` covers the items ``i`` with
``i >> span(level) == key``; the root is ``(depth - 1, 0)``.

Nodes changed since the last commit live in ``dirty`` keyed by ``(level, key)``; the parent
entry of a dirty node is nulled, so the dirty map is always consulted first. Committed
nodes are never modified: the first change copies them (copy-on-write), and a hook on the
owner decides what happens to the old slot (shared with a snapshot or released).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vdisk.cache import codec
from vdisk.cache.lru import LRU
from vdisk.errors import CorruptImage
from vdisk.formats.native_layout import (
    ENTRY,
    ENTRY_BITS,
    FLAG_ZERO,
    KNOWN_FLAGS,
    NULL_ENTRY,
    ZERO_ENTRY,
    Entry,
)

if TYPE_CHECKING:
    from vdisk.formats.native import NativeDriver

Node = bytes | bytearray


class Tree:
    """One radix tree (mapping or refcount) of a NativeDriver."""

    def __init__(
        self,
        owner: NativeDriver,
        name: str,
        depth: int,
        root: Entry,
        leaf_bits: int,
        cache: LRU[tuple[int, int], bytes],
        on_cow: Callable[[Entry, int, bytearray], None],
    ) -> None:
        self.owner = owner
        self.name = name
        self.depth = depth
        self.root = root
        self.cbits = owner.cluster_bits
        self.node_size = 1 << self.cbits
        self.fan_bits = self.cbits - ENTRY_BITS
        self.fan_mask = (1 << self.fan_bits) - 1
        self.leaf_bits = leaf_bits
        self.leaf_mask = (1 << leaf_bits) - 1
        self.cache = cache
        self.on_cow = on_cow
        self.dirty: dict[tuple[int, int], bytearray] = {}
        self.zero_node = ZERO_ENTRY * (self.node_size // ENTRY.size)

    # -- geometry ----------------------------------------------------------------------

    def span(self, level: int) -> int:
        """log2 of the number of items a node at ``level`` covers."""
        return self.leaf_bits + self.fan_bits * level

    @property
    def capacity(self) -> int:
        return 1 << self.span(self.depth - 1)

    def grow(self, items: int) -> None:
        """Add levels on top until ``items`` items fit (the old root becomes entry 0)."""
        while items > self.capacity:
            old_root = self.root
            new = bytearray(self.node_size)
            if (self.depth - 1, 0) not in self.dirty:
                new[0 : ENTRY.size] = old_root.pack()
            self.dirty[(self.depth, 0)] = new
            self.root = Entry()
            self.depth += 1
            self.owner.changed = True

    # -- loading -------------------------------------------------------------------------

    def check_entry(self, e: Entry, what: str) -> None:
        """Validate a pointer before following it (alignment, bounds, codec, flags)."""
        own = self.owner
        if e.flags & ~KNOWN_FLAGS:
            raise CorruptImage(f"{what}: unknown entry flags {e.flags:#x}")
        if e.host == 0:
            if e.length or (e.flags & FLAG_ZERO and e.codec):
                raise CorruptImage(f"{what}: empty entry with length {e.length}")
            return
        if e.flags & FLAG_ZERO:
            raise CorruptImage(f"{what}: zero entry with host offset {e.host}")
        if e.host & (self.node_size - 1):
            raise CorruptImage(
                f"{what}: host offset {e.host} is not aligned to the cluster size {self.node_size}"
            )
        slot = e.host >> self.cbits
        if not own.first_slot <= slot < own.host_slots:
            raise CorruptImage(
                f"{what}: host offset {e.host} outside the allocated area "
                f"[{own.first_slot << self.cbits}, {own.host_slots << self.cbits})"
            )
        if not 0 < e.length <= self.node_size:
            raise CorruptImage(f"{what}: stored length {e.length} outside [1, {self.node_size}]")
        if e.codec not in codec.CODEC_NAMES:
            raise CorruptImage(f"{what}: unknown codec id {e.codec}")

    def load(self, e: Entry, level: int) -> bytes:
        """The verified, decompressed node an entry points to (through the LRU)."""
        key = (e.host, e.checksum)
        node = self.cache.get(key)
        if node is not None:
            return node
        what = (
            f"{self.owner.storage.path}: {self.name} table (level {level}) at host offset {e.host}"
        )
        self.check_entry(e, what)
        stored = self.owner.storage.pread_exact(e.host, e.length, what)
        node = codec.decode(e.codec, stored, e.checksum, self.node_size, what)
        self.cache.put(key, node)
        return node

    def _root_node(self) -> tuple[Node | None, int]:
        level = self.depth - 1
        node = self.dirty.get((level, 0))
        if node is not None:
            return node, 0
        if self.root.host == 0:
            return None, self.root.flags & FLAG_ZERO
        return self.load(self.root, level), 0

    # -- lookups ---------------------------------------------------------------------------

    def get_leaf(self, i: int) -> tuple[Node | None, int]:
        """The leaf holding item ``i``, or (None, flags) for an empty (0) or zero subtree."""
        if i >= self.capacity:
            return None, 0
        root, flags = self._root_node()
        if root is None:
            return None, flags
        node: Node = root
        level = self.depth - 1
        while level > 0:
            ckey = i >> self.span(level - 1)
            child: Node | None = self.dirty.get((level - 1, ckey))
            if child is None:
                e = Entry.unpack(node, (ckey & self.fan_mask) << ENTRY_BITS)
                if e.host == 0:
                    return None, e.flags & FLAG_ZERO
                child = self.load(e, level - 1)
            node = child
            level -= 1
        return node, 0

    def cow(self, level: int, key: int, e: Entry) -> bytearray:
        """Make node (level, key), currently pointed to by ``e``, dirty and return it."""
        if e.host:
            node = bytearray(self.load(e, level))
            self.on_cow(e, level, node)
        elif e.flags & FLAG_ZERO:
            node = bytearray(self.zero_node)
        else:
            node = bytearray(self.node_size)
        self.dirty[(level, key)] = node
        self.owner.changed = True
        return node

    def writable_root(self) -> bytearray:
        level = self.depth - 1
        node = self.dirty.get((level, 0))
        if node is None:
            node = self.cow(level, 0, self.root)
            self.root = Entry()
        return node

    def writable_child(self, level: int, key: int, parent: bytearray) -> bytearray:
        """Dirty child (level, key) of the dirty ``parent`` at level+1."""
        child = self.dirty.get((level, key))
        if child is None:
            off = (key & self.fan_mask) << ENTRY_BITS
            child = self.cow(level, key, Entry.unpack(parent, off))
            parent[off : off + ENTRY.size] = NULL_ENTRY
        return child

    def leaf_for_write(self, i: int) -> bytearray:
        """The dirty leaf holding item ``i`` (copying the path from the root)."""
        if i >= self.capacity:
            self.grow(i + 1)
        node = self.writable_root()
        level = self.depth - 1
        while level > 0:
            node = self.writable_child(level - 1, i >> self.span(level - 1), node)
            level -= 1
        return node

    # -- commit ----------------------------------------------------------------------------

    def set_child_entry(self, level: int, key: int, packed: bytes) -> None:
        """Store the entry of committed node (level, key) in its dirty parent or the root."""
        if level == self.depth - 1:
            self.root = Entry.unpack(packed)
            return
        parent = self.dirty[(level + 1, key >> self.fan_bits)]
        off = (key & self.fan_mask) << ENTRY_BITS
        parent[off : off + ENTRY.size] = packed

    def dirty_by_level(self) -> list[tuple[int, int]]:
        return sorted(self.dirty)

    def write_node(self, slot: int, node: bytearray, generation: int) -> bytes:
        """Encode and write a node at ``slot``; return its packed entry."""
        cdc, stored, cks = codec.encode(node, compress=True)
        host = slot << self.cbits
        self.owner.storage.pwrite(host, stored)
        self.cache.put((host, cks), bytes(node))
        return Entry(host, len(stored), cdc, 0, cks, generation).pack()
