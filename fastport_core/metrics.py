"""Counters for everything the core drops, refuses, retries or gives up (DESIGN §3.5, §3.6).

The core only counts; exposition (Prometheus text) is the admin API's business. Counters are keyed by
name and a small tuple of label values, with the session name as the first label wherever a session is
known, so one tenant's numbers never mix with another's. The set of names is fixed and documented here, so
``docs/operations.md`` and the Prometheus collector can list them without reading the code that bumps them.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

__all__ = ["COUNTERS", "Metrics"]

#: name → (help text, label names). Every counter the core bumps must be declared here.
COUNTERS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "connections_opened": ("Transport connections accepted.", ()),
    "connections_closed": ("Transport connections closed, by close code.", ("code",)),
    "protocol_errors": ("Frames answered with an error frame or close, by error code.", ("code",)),
    "binary_frames": ("WebSocket binary frames received (not part of protocol v1).", ()),
    "http_requests": ("Admin/HTTP requests answered, by path and status.", ("path", "status")),
    "auth_failures": ("Failed init attempts, by reason.", ("reason",)),
    "sessions_created": ("Sessions created (API or config).", ()),
    "sessions_dropped": ("Sessions dropped, by reason.", ("reason",)),
    "inits": ("Successful init, per session.", ("session",)),
    "publishes": ("Publishes accepted, per session.", ("session",)),
    "publishes_refused": ("Publishes refused, per session and code.", ("session", "code")),
    "publish_duplicates": ("Retried publishes confirmed again without fan-out.", ("session",)),
    "deliveries": ("Message frames sent to subscribers (first sends).", ("session",)),
    "retries": ("Message frames re-sent to subscribers that had not ACKed.", ("session",)),
    "acks": ("ACKs that completed a delivery.", ("session",)),
    "acks_unknown": ("ACKs for no pending delivery (late, duplicate or foreign).", ("session",)),
    "deliveries_given_up": ("Deliveries abandoned, per session and reason.", ("session", "reason")),
    "slow_consumers": ("Subscribers that hit a slow-consumer bound, by action.", ("session", "action")),
    "subscribers_resumed": ("Resumable subscribers (clientId) taken over by a new connection.", ("session",)),
    "output_overflows": ("Connections dropped because their unsent output passed max_output_buffer.", ()),
    "internal_errors": ("Inputs that hit a server bug (logged with a traceback; connection closed).", ()),
    "integrity_failures": ("Received messages that failed verification (client side).", ()),
}


class Metrics:
    """A bag of monotonically increasing counters; cheap enough for the per-message path."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, tuple[str, ...]]] = Counter()

    def inc(self, name: str, *labels: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name`` with the given label values (in :data:`COUNTERS` order)."""
        self._counts[name, labels] += amount

    def value(self, name: str, *labels: str) -> int:
        return self._counts[name, labels]

    def total(self, name: str) -> int:
        """Sum of ``name`` over all label values."""
        return sum(count for (key, _), count in self._counts.items() if key == name)

    def items(self) -> list[tuple[str, tuple[str, ...], int]]:
        """Every non-zero counter as ``(name, labels, value)``, for exposition and tests."""
        return [(name, labels, count) for (name, labels), count in self._counts.items()]

    def forget_session(self, session: str) -> None:
        """Drop a dropped session's per-session series so metrics stay bounded by live sessions."""
        per_session = {name for name, (_, labels) in COUNTERS.items() if labels[:1] == ("session",)}
        for key in [key for key in self._counts if key[0] in per_session and key[1][:1] == (session,)]:
            del self._counts[key]
