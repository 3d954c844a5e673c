"""A bounded window of recently seen message ids.

Both ends drop duplicates (DESIGN §3.3 and §3.4): the server must not fan out a publisher's retry twice,
and a client must not hand a redelivery to its application twice. Both need "have I seen this id
recently?" with memory that cannot grow without bound, so the window forgets the oldest id once it holds
``capacity`` ids, and (when given a ``ttl``) any id older than that.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["DedupeWindow"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class DedupeWindow(Generic[K, V]):
    """Remembers up to ``capacity`` keys (each with a value), oldest evicted first."""

    __slots__ = ("_capacity", "_entries", "_ttl")

    def __init__(self, capacity: int, ttl: float | None = None) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._capacity = capacity
        self._ttl = ttl
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> V | None:
        """The value remembered for ``key``, or ``None`` if unseen, evicted or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._ttl is not None and now - entry[0] > self._ttl:
            self._expire(now)
            return None
        return entry[1]

    def add(self, key: K, value: V, now: float) -> None:
        """Remember ``key`` (refreshing its position if it was already there)."""
        entries = self._entries
        entries[key] = (now, value)
        entries.move_to_end(key)
        if len(entries) > self._capacity:
            entries.popitem(last=False)
        if self._ttl is not None:
            self._expire(now)

    def _expire(self, now: float) -> None:
        assert self._ttl is not None
        entries = self._entries
        horizon = now - self._ttl
        while entries:
            first = next(iter(entries.values()))
            if first[0] >= horizon:
                break
            entries.popitem(last=False)
