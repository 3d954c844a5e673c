"""A bounded window of recently seen message ids.

Both ends drop duplicates (docs/clients.md, "Delivery guarantees"): the server must not fan out a
publisher's retry twice, and a client must not hand a redelivery to its application twice. Both need
"have I seen this id recently?" with memory that cannot grow without bound, so the window forgets the
oldest id once it holds ``capacity`` ids, and (when given a ``ttl``) any id older than that.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["DedupeWindow"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class DedupeWindow(Generic[K, V]):
    """Remembers up to ``capacity`` keys (each with a value), oldest evicted first.

    A dict holds the entries and a deque their arrival order; re-adding a key leaves a stale entry in the
    deque that is skipped when it reaches the front (its sequence number no longer matches). This costs
    half of an ``OrderedDict``'s move-and-evict on the server's per-publish path.
    """

    __slots__ = ("_capacity", "_entries", "_order", "_sequence", "_ttl")

    def __init__(self, capacity: int, ttl: float | None = None) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._capacity = capacity
        self._ttl = ttl
        self._entries: dict[K, tuple[int, float, V]] = {}
        self._order: deque[tuple[int, float, K]] = deque()
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> V | None:
        """The value remembered for ``key``, or ``None`` if unseen, evicted or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._ttl is not None and now - entry[1] > self._ttl:
            return None
        return entry[2]

    def add(self, key: K, value: V, now: float) -> None:
        """Remember ``key`` (refreshing its age if it was already there); forget what falls out."""
        sequence = next(self._sequence)
        entries = self._entries
        order = self._order
        entries[key] = (sequence, now, value)
        order.append((sequence, now, key))
        horizon = now - self._ttl if self._ttl is not None else None
        while order and (len(entries) > self._capacity or (horizon is not None and order[0][1] < horizon)):
            old_sequence, _, old_key = order.popleft()
            current = entries.get(old_key)
            if current is not None and current[0] == old_sequence:
                del entries[old_key]
        if len(order) > 2 * self._capacity:
            # Many refreshes of the same keys: drop the stale arrivals so the deque stays bounded too.
            live = [entry for entry in order if entries.get(entry[2], (None,))[0] == entry[0]]
            self._order = deque(live)
