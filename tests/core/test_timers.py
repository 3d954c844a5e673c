"""Deadlines: one per key, earliest first, re-arming and cancelling without a search."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fastport_core.timers import Deadlines


def test_earliest_deadline_and_pop_due() -> None:
    d: Deadlines[str] = Deadlines()
    assert d.next() is None
    d.arm("a", 5.0)
    d.arm("b", 3.0)
    assert d.next() == 3.0
    assert d.pop_due(2.9) == []
    assert d.pop_due(5.0) == ["b", "a"]
    assert d.next() is None
    assert len(d) == 0


def test_rearm_moves_and_cancel_removes() -> None:
    d: Deadlines[str] = Deadlines()
    d.arm("a", 1.0)
    d.arm("a", 10.0)
    assert d.next() == 10.0
    assert d.pop_due(5.0) == []
    d.arm_earlier("a", 20.0)
    assert d.get("a") == 10.0
    d.arm_earlier("a", 2.0)
    assert d.get("a") == 2.0
    d.cancel("a")
    assert "a" not in d
    assert d.next() is None


@given(
    st.lists(st.tuples(st.integers(0, 9), st.one_of(st.none(), st.floats(0, 100))), max_size=200),
    st.floats(0, 100),
)
def test_matches_a_plain_dict_model(ops: list[tuple[int, float | None]], now: float) -> None:
    d: Deadlines[int] = Deadlines()
    model: dict[int, float] = {}
    for key, when in ops:
        if when is None:
            d.cancel(key)
            model.pop(key, None)
        else:
            d.arm(key, when)
            model[key] = when
    assert d.next() == (min(model.values()) if model else None)
    due = d.pop_due(now)
    assert sorted(due) == sorted(k for k, w in model.items() if w <= now)
    assert [model[k] for k in due] == sorted(model[k] for k in due)
    assert len(d) == len(model) - len(due)


def test_heap_stays_bounded_under_constant_rearming() -> None:
    d: Deadlines[int] = Deadlines()
    for i in range(10_000):
        d.arm(i % 3, float(i))
    assert len(d._heap) <= 2 * 3 + 64 + 1
