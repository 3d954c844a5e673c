"""Counters for everything the core drops, refuses, retries or gives up (docs/protocol.md, "Metrics").

The core only counts; exposition (Prometheus text) is the admin API's business. Counters are keyed by
name and a small tuple of label values, with the session name as the first label wherever a session is
known, so one tenant's numbers never mix with another's. Every label value comes from a bounded set
(error codes, routes, sessions, which are forgotten when dropped); a value the peer chooses freely, such
as its close code, is mapped to a known one or to ``other`` (:func:`close_code_label`), so no peer can grow
the number of series. The set of names is fixed and documented here, so
``docs/operations.md`` and the Prometheus collector can list them without reading the code that bumps them.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

from .errors import CloseCode

__all__ = ["COUNTERS", "OTHER", "CounterCell", "Metrics", "close_code_label"]

OTHER: Final = "other"
"""The label value of anything outside a label's known set."""

_CLOSE_CODE_LABELS: Final = frozenset({str(int(code)) for code in CloseCode} | {"1005", "1006"})
"""Close codes worth their own series: the ones the core sends, "no status" and "abnormal closure"."""


def close_code_label(code: int) -> str:
    """The ``code`` label of ``connections_closed``: a code the peer chose (any of 1000-4999 is valid on
    the wire) would grow a series per value, so anything but the known codes counts as ``other``."""
    label = str(code)
    return label if label in _CLOSE_CODE_LABELS else OTHER


#: name → (help text, label names). Every counter the core bumps must be declared here.
COUNTERS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "connections_opened": ("Transport connections accepted.", ()),
    "connections_closed": (
        "Transport connections closed, by close code (codes the core does not know: other).",
        ("code",),
    ),
    "connections_refused": ("Connections closed at accept, by the limit they hit.", ("reason",)),
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
    "token_key_rotations": ("Token keys replaced through rotateTokenKey.", ("session",)),
    "output_overflows": ("Connections dropped because their unsent output passed max_output_buffer.", ()),
    "write_timeouts": ("Connections dropped because a write stayed blocked past write_timeout.", ()),
    "handshake_timeouts": ("Connections closed for no successful init within handshake_timeout.", ()),
    "internal_errors": ("Server bugs caught (logged with a traceback; the connection closed with 1011).", ()),
    "integrity_failures": ("Received messages that failed verification (client side).", ()),
}


class CounterCell:
    """One counter series as a mutable integer: ``cell.value += 1`` on the per-message path.

    :meth:`Metrics.cell` hands these out for the counters a session bumps on every message (publishes,
    deliveries, ACKs), where :meth:`Metrics.inc`'s keyed lookup costs ~0.4 µs per bump and a cell ~0.05.
    A cell is part of its :class:`Metrics`: ``value``, ``total`` and ``items`` include it.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class Metrics:
    """A bag of monotonically increasing counters; cheap enough for the per-message path.

    Two stores behind one face: a :class:`~collections.Counter` for :meth:`inc`, and the
    :class:`CounterCell` objects handed out by :meth:`cell`. Readers (``value``, ``total``, ``items``)
    add the two up and never tell them apart.
    """

    __slots__ = ("_cells", "_counts")

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self._cells: dict[tuple[str, tuple[str, ...]], CounterCell] = {}

    def inc(self, name: str, *labels: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name`` with the given label values (in :data:`COUNTERS` order)."""
        self._counts[name, labels] += amount

    def cell(self, name: str, *labels: str) -> CounterCell:
        """The cell of series ``(name, labels)`` (created at 0, which ``items`` leaves out until bumped).

        Asking again for the same series returns the same cell.
        """
        key = (name, labels)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = CounterCell()
        return cell

    def value(self, name: str, *labels: str) -> int:
        key = (name, labels)
        cell = self._cells.get(key)
        return self._counts[key] + (cell.value if cell is not None else 0)

    def total(self, name: str) -> int:
        """Sum of ``name`` over all label values."""
        return sum(count for (key, _), count in self._counts.items() if key == name) + sum(
            cell.value for (key, _), cell in self._cells.items() if key == name
        )

    def items(self) -> list[tuple[str, tuple[str, ...], int]]:
        """Every non-zero counter as ``(name, labels, value)``, for exposition and tests."""
        merged = dict(self._counts)
        for key, cell in self._cells.items():
            if cell.value:
                merged[key] = merged.get(key, 0) + cell.value
        return [(name, labels, count) for (name, labels), count in merged.items()]

    def forget_session(self, session: str) -> None:
        """Drop a dropped session's per-session series so metrics stay bounded by live sessions.

        Its cells are forgotten too: bumping one afterwards counts nowhere.
        """
        per_session = {name for name, (_, labels) in COUNTERS.items() if labels[:1] == ("session",)}
        for store in (self._counts, self._cells):
            for key in [key for key in store if key[0] in per_session and key[1][:1] == (session,)]:
                del store[key]
