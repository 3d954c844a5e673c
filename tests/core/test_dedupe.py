"""The bounded dedupe window forgets by count and by age, never grows past its capacity."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastport_core.dedupe import DedupeWindow


def test_remembers_until_capacity_then_forgets_oldest() -> None:
    w: DedupeWindow[str, int] = DedupeWindow(2)
    w.add("a", 1, 0.0)
    w.add("b", 2, 0.0)
    assert w.get("a", 0.0) == 1
    w.add("c", 3, 0.0)
    assert w.get("a", 0.0) is None
    assert w.get("b", 0.0) == 2
    assert len(w) == 2


def test_ttl_expires_old_entries() -> None:
    w: DedupeWindow[str, int] = DedupeWindow(10, ttl=5.0)
    w.add("a", 1, 0.0)
    w.add("b", 2, 3.0)
    assert w.get("a", 5.0) == 1
    assert w.get("a", 5.1) is None
    assert w.get("b", 5.1) == 2
    w.add("c", 3, 9.0)
    assert len(w) == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        DedupeWindow(0)


@given(st.lists(st.integers(0, 50), max_size=300), st.integers(1, 20))
def test_never_exceeds_capacity_and_keeps_the_most_recent(keys: list[int], capacity: int) -> None:
    w: DedupeWindow[int, int] = DedupeWindow(capacity)
    for i, key in enumerate(keys):
        w.add(key, i, float(i))
        assert len(w) <= capacity
        assert w.get(key, float(i)) == i
