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


def test_refreshing_the_same_keys_keeps_the_order_queue_bounded() -> None:
    w: DedupeWindow[int, int] = DedupeWindow(4)
    for i in range(1000):
        w.add(i % 3, i, float(i))
    assert len(w) == 3
    assert len(w._order) <= 2 * 4 + 1
    assert [w.get(k, 1000.0) for k in range(3)] == [999, 997, 998]


@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 5)), max_size=200), st.integers(1, 8))
def test_matches_a_reference_model(ops: list[tuple[int, float]], capacity: int) -> None:
    """A plain list model: most recent ``capacity`` distinct keys, younger than the ttl."""
    w: DedupeWindow[int, int] = DedupeWindow(capacity, ttl=10.0)
    model: list[tuple[int, float, int]] = []  # (key, added at, value), oldest first
    now = 0.0
    for i, (key, step) in enumerate(ops):
        now += step
        w.add(key, i, now)
        model = [entry for entry in model if entry[0] != key] + [(key, now, i)]
        model = [entry for entry in model if entry[1] >= now - 10.0][-capacity:]
        for k in range(21):
            expected = next((v for mk, _, v in model if mk == k), None)
            assert w.get(k, now) == expected
