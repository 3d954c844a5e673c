"""Metrics: keyed ``inc`` and per-series cells are one set of counters to every reader."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fastport_core.errors import CloseCode
from fastport_core.metrics import Metrics, close_code_label

SESSIONS = st.sampled_from(["a", "b"])
NAMES = st.sampled_from(["acks", "publishes", "publishes_refused"])


@given(st.lists(st.tuples(st.booleans(), NAMES, SESSIONS, st.integers(1, 100))))
def test_cells_and_inc_add_up_in_every_reader(bumps: list[tuple[bool, str, str, int]]) -> None:
    metrics = Metrics()
    expected: dict[tuple[str, tuple[str, ...]], int] = {}
    for use_cell, name, session, amount in bumps:
        if use_cell:
            metrics.cell(name, session).value += amount
        else:
            metrics.inc(name, session, amount=amount)
        expected[name, (session,)] = expected.get((name, (session,)), 0) + amount
    items = metrics.items()
    assert sorted(items) == sorted((name, labels, n) for (name, labels), n in expected.items())
    assert len(items) == len({(name, labels) for name, labels, _ in items})
    for (name, labels), n in expected.items():
        assert metrics.value(name, *labels) == n
    for name in ("acks", "publishes", "publishes_refused"):
        assert metrics.total(name) == sum(n for (key, _), n in expected.items() if key == name)


def test_a_cell_is_one_per_series_and_absent_until_bumped() -> None:
    metrics = Metrics()
    cell = metrics.cell("acks", "a")
    assert metrics.cell("acks", "a") is cell
    assert metrics.items() == []
    assert metrics.value("acks", "a") == 0
    cell.value += 2
    assert metrics.items() == [("acks", ("a",), 2)]


def test_forget_session_drops_its_cells_and_keeps_the_others() -> None:
    metrics = Metrics()
    metrics.cell("acks", "a").value += 1
    metrics.cell("acks", "b").value += 2
    metrics.inc("publishes", "a")
    metrics.inc("sessions_dropped", "a")  # "a" is a reason here, not a session
    metrics.forget_session("a")
    assert sorted(metrics.items()) == [("acks", ("b",), 2), ("sessions_dropped", ("a",), 1)]
    assert metrics.cell("acks", "a").value == 0  # a new session of the same name starts afresh


def test_close_code_labels_are_bounded() -> None:
    assert {close_code_label(code) for code in range(65536)} == {
        *(str(int(code)) for code in CloseCode),
        "1005",
        "1006",
        "other",
    }
