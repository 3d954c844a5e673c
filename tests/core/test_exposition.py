"""Tests of ``fastport_core.exposition``: every counter and every broker statistic is exposed, as declared.

The output is produced by prometheus-client's formatter and read back with its parser, so these tests
check our families (names, types, help, labels, values), not the text format itself.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from fastport_core.broker import BrokerStats, SessionStats
from fastport_core.exposition import GAUGES, PREFIX, SESSION_GAUGES, CoreCollector
from fastport_core.metrics import COUNTERS, Metrics

Samples = list[tuple[str, dict[str, str], float]]
IDLE = BrokerStats(0, 0, 0, 0, 0, 0, 0, {})


def scrape(metrics: Metrics, stats: BrokerStats) -> dict[str, Samples]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoreCollector(metrics, lambda: stats))
    text = generate_latest(registry).decode()
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)
    }


def test_every_counter_is_exposed_and_label_less_ones_start_at_zero() -> None:
    families = scrape(Metrics(), IDLE)
    for name, (_, labels) in COUNTERS.items():
        expected: Samples = [] if labels else [(f"{PREFIX}{name}_total", {}, 0.0)]
        assert families[PREFIX + name] == expected


@given(st.lists(st.tuples(st.sampled_from(sorted(COUNTERS)), st.text(), st.text(), st.integers(1, 10**6))))
def test_counted_values_come_back_with_their_label_names(increments: list[tuple[str, str, str, int]]) -> None:
    metrics = Metrics()
    for name, first, second, amount in increments:
        metrics.inc(name, *(first, second)[: len(COUNTERS[name][1])], amount=amount)
    families = scrape(metrics, IDLE)
    for name, labels, value in metrics.items():
        sample = (f"{PREFIX}{name}_total", dict(zip(COUNTERS[name][1], labels, strict=True)), float(value))
        assert sample in families[PREFIX + name]


def test_every_broker_statistic_is_a_gauge() -> None:
    assert set(GAUGES) == {f.name for f in dataclasses.fields(BrokerStats)} - {"per_session"}
    assert set(SESSION_GAUGES) == {f.name for f in dataclasses.fields(SessionStats)}


def test_gauges_carry_the_broker_statistics() -> None:
    per_session = {
        "a": SessionStats(1, 2, 3, 4, 5, 6, suspended=False, backlogged_deliveries=7),
        'b"\n': SessionStats(10, 20, 30, 40, 50, 60, suspended=True),
    }
    families = scrape(Metrics(), BrokerStats(2, 11, 22, 44, 55, 66, 7, per_session, backlogged_deliveries=8))
    assert {name: families[PREFIX + name] for name in GAUGES} == {
        name: [(PREFIX + name, {}, value)]
        for name, value in zip(GAUGES, (2.0, 11.0, 22.0, 44.0, 55.0, 66.0, 7.0, 8.0), strict=True)
    }
    for name in SESSION_GAUGES:
        family = f"{PREFIX}session_{name}"
        assert families[family] == [
            (family, {"session": session}, float(getattr(stats, name)))
            for session, stats in per_session.items()
        ]
