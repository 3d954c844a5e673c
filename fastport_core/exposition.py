"""Prometheus exposition of the core's counters and the broker's gauges, through prometheus-client.

The core counts in a plain :class:`~fastport_core.metrics.Metrics` bag, because the per-message path must
not pay for prometheus-client's locks and child lookups. At scrape time, :class:`CoreCollector` turns that
bag (the ``COUNTERS`` table gives each counter its help text and label names) and the broker's
:class:`~fastport_core.broker.BrokerStats` into metric families, and prometheus-client writes the text
format, so label values (session names are chosen by tenants) are escaped by the library that defines the
format rather than by hand.

Exposed names: ``fastport_<counter>_total`` for the counters, ``fastport_<field>`` for the broker-wide
gauges of :data:`GAUGES`, and ``fastport_session_<field>{session}`` for the per-session gauges of
:data:`SESSION_GAUGES`. The gauge tables are keyed by the stats' field names (a test holds them to every
field), so a new statistic of the broker cannot go unexposed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .broker import BrokerStats
from .metrics import COUNTERS, Metrics

__all__ = ["GAUGES", "PREFIX", "SESSION_GAUGES", "CoreCollector"]

PREFIX: Final = "fastport_"
"""Namespace of every exposed metric, so fastport's series never collide with other exporters'."""

#: BrokerStats field → help text of the gauge ``fastport_<field>``.
GAUGES: Final[dict[str, str]] = {
    "sessions": "Sessions that exist now (suspended ones included).",
    "connections": "WebSocket connections the broker holds now, initialised or not.",
    "subscribers": "Connected subscribers plus detached resumable ones.",
    "stored_messages": "Messages stored until every subscriber ACKed them or they expire.",
    "inflight_deliveries": "Deliveries sent and not yet ACKed.",
    "pending_bytes": "Payload bytes of the stored messages.",
    "throttled_peers": "Peer addresses the failed-auth throttle remembers.",
    "backlogged_deliveries": "Deliveries waiting beyond their resumable subscriber's window, not sent yet.",
}

#: SessionStats field → help text of the gauge ``fastport_session_<field>``, labelled ``session``.
SESSION_GAUGES: Final[dict[str, str]] = {
    "connections": "WebSocket connections initialised into the session.",
    "subscribers": "Connected subscribers plus detached resumable ones, per session.",
    "detached_subscribers": "Resumable subscribers (clientId) waiting for a connection, per session.",
    "stored_messages": "Messages stored until every subscriber ACKed them or they expire, per session.",
    "inflight_deliveries": "Deliveries sent and not yet ACKed, per session.",
    "backlogged_deliveries": "Deliveries waiting beyond their resumable subscriber's window, per session.",
    "pending_bytes": "Payload bytes of the stored messages, per session (bounded by max_pending_bytes).",
    "suspended": "1 while the session is suspended, else 0.",
}


class CoreCollector:
    """A prometheus-client collector over the core's counters and the broker's statistics.

    It holds no values of its own: every ``collect()`` reads ``metrics`` and calls ``stats`` afresh, so a
    scrape always sees the current numbers and nothing has to be kept in sync.
    """

    __slots__ = ("_metrics", "_stats")

    def __init__(self, metrics: Metrics, stats: Callable[[], BrokerStats]) -> None:
        self._metrics = metrics
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """One family per declared counter (label-less ones start at 0, so they exist before the first
        event, as Prometheus advises), then the broker-wide and the per-session gauges."""
        series: defaultdict[str, list[tuple[tuple[str, ...], int]]] = defaultdict(list)
        for name, labels, value in self._metrics.items():
            series[name].append((labels, value))
        for name, (help_text, label_names) in COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, help_text, labels=label_names)
            for labels, value in series.get(name) or ([] if label_names else [((), 0)]):
                family.add_metric(labels, value)
            yield family
        stats = self._stats()
        for name, help_text in GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, help_text, value=getattr(stats, name))
        for name, help_text in SESSION_GAUGES.items():
            gauge = GaugeMetricFamily(f"{PREFIX}session_{name}", help_text, labels=("session",))
            for session, session_stats in stats.per_session.items():
                gauge.add_metric((session,), float(getattr(session_stats, name)))
            yield gauge
