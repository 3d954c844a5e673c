"""Deadlines without a clock: the core's one timer structure.

The core never sleeps; it tells its adapter *when* it next needs to run (:meth:`Deadlines.next`) and does what
fell due when the adapter calls back with the current time (:meth:`Deadlines.pop_due`). Many things in the
core have a deadline (a connection's keepalive, a session's retry queue, an auth throttle, a client's
publish retry), and each re-arms often, so this is a heap with lazy deletion: re-arming a key pushes a new
entry and the stale one is skipped when it surfaces. That keeps re-arming O(log n) with no search.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """At most one pending deadline per key; the earliest is found in O(1) amortised."""

    __slots__ = ("_armed", "_heap", "_sequence")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._armed: dict[K, float] = {}
        self._sequence = itertools.count()  # ties break by arming order, never by comparing keys

    def __len__(self) -> int:
        return len(self._armed)

    def __contains__(self, key: object) -> bool:
        return key in self._armed

    def arm(self, key: K, when: float) -> None:
        """Set (or move) ``key``'s deadline to ``when``."""
        if self._armed.get(key) == when:
            return
        self._armed[key] = when
        heapq.heappush(self._heap, (when, next(self._sequence), key))
        if len(self._heap) > 2 * len(self._armed) + 64:
            self._compact()

    def arm_earlier(self, key: K, when: float) -> None:
        """Set ``key``'s deadline to ``when`` unless it is already armed earlier."""
        current = self._armed.get(key)
        if current is None or when < current:
            self.arm(key, when)

    def cancel(self, key: K) -> None:
        self._armed.pop(key, None)

    def get(self, key: K) -> float | None:
        return self._armed.get(key)

    def next(self) -> float | None:
        """The earliest armed deadline, or ``None`` when nothing is armed."""
        heap = self._heap
        while heap:
            when, _, key = heap[0]
            if self._armed.get(key) == when:
                return when
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[K]:
        """Disarm and return every key whose deadline is at or before ``now``, earliest first."""
        due: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if self._armed.get(key) == when:
                del self._armed[key]
                due.append(key)
        return due

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if self._armed.get(entry[2]) == entry[0]]
        heapq.heapify(self._heap)
