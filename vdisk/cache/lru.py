"""A small bounded LRU map with counters, for mapping tables (L2 tables and their kin).

Every format driver that has tables keeps them in one of these, so that memory is bounded
by configuration whatever the image size, and ``disk.stats()`` can report hits and misses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Maps keys to values, evicting the least recently used past ``capacity`` bytes.

    ``weigh`` gives a value's size in bytes; ``on_evict`` is called with (key, value) for
    each eviction, e.g. to write back a dirty table before it is forgotten."""

    def __init__(
        self,
        capacity: int,
        weigh: Callable[[V], int] = lambda v: len(v),  # type: ignore[arg-type]
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        self.capacity = max(0, capacity)
        self.weigh = weigh
        self.on_evict = on_evict
        self._d: OrderedDict[K, V] = OrderedDict()
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return v

    def put(self, key: K, value: V) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.used -= self.weigh(old)
        self._d[key] = value
        self.used += self.weigh(value)
        self._shrink()

    def pop(self, key: K) -> V | None:
        v = self._d.pop(key, None)
        if v is not None:
            self.used -= self.weigh(v)
        return v

    def _shrink(self) -> None:
        while self.used > self.capacity and len(self._d) > 1:
            k, v = self._d.popitem(last=False)
            self.used -= self.weigh(v)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(k, v)

    def clear(self) -> None:
        self._d.clear()
        self.used = 0

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def items(self) -> list[tuple[K, V]]:
        return list(self._d.items())

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._d),
            "bytes": self.used,
            "capacity": self.capacity,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
