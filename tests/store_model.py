"""A store in plain dicts, for tests: applies :class:`StoreBatch` exactly as the batch's docstring says.

It is the reference the SQLite store is compared with, and the store the core's crash tests "restart"
from: what it holds is exactly what was committed, so dropping a core object and restoring a new one
from :meth:`ModelStore.load` is a ``kill -9`` after the last commit.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from fastport_core.storage import (
    BacklogRecord,
    DeliveryRecord,
    MessageRecord,
    PublishRecord,
    SessionRecord,
    Snapshot,
    StoreBatch,
    SubscriberRecord,
)


class ModelStore:
    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.subscribers: dict[tuple[str, str], SubscriberRecord] = {}
        self.messages: dict[tuple[str, str], MessageRecord] = {}
        self.deliveries: dict[tuple[str, str, str], DeliveryRecord] = {}
        self.publishes: dict[tuple[str, str], PublishRecord] = {}
        self.fail = False
        """Make :meth:`commit` raise (a full disk) until cleared."""
        self.failures = 0
        self.retried = threading.Event()
        """Set at the second failed commit: the first failure has been reported to the core by then (the
        writer reports a failure before it retries)."""

    def load(self) -> Snapshot:
        backlogs: dict[tuple[str, str], list[int]] = {}
        for (session, message_id, client_id), _delivery in self.deliveries.items():
            counts = backlogs.setdefault((session, client_id), [0, 0])
            counts[0] += 1
            counts[1] += self.messages[session, message_id].size
        return Snapshot(
            sessions=list(self.sessions.values()),
            subscribers=list(self.subscribers.values()),
            backlogs=[BacklogRecord(s, c, n, size) for (s, c), (n, size) in backlogs.items()],
            publishes=sorted(self.publishes.values(), key=lambda p: p.at),
            last_seq=max((m.seq for m in self.messages.values()), default=0),
        )

    def load_backlog(
        self, session: str, client_id: str, after_seq: int, limit: int
    ) -> list[tuple[MessageRecord, int]]:
        rows = [
            (self.messages[s, m], d.retries)
            for (s, m, c), d in self.deliveries.items()
            if s == session and c == client_id and d.seq > after_seq
        ]
        rows.sort(key=lambda row: row[0].seq)
        return rows[:limit]

    def commit(self, batches: Sequence[StoreBatch]) -> None:
        if self.fail:
            self.failures += 1
            if self.failures >= 2:
                self.retried.set()
            raise OSError("database or disk is full")
        seqs = [batch.seq for batch in batches]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "batches commit in order"
        for batch in batches:
            self._apply(batch)

    def close(self) -> None:
        pass

    def _apply(self, batch: StoreBatch) -> None:
        for name in batch.sessions_dropped:
            self.sessions.pop(name, None)
            for table in (self.subscribers, self.messages, self.deliveries, self.publishes):
                for key in [k for k in table if k[0] == name]:
                    del table[key]
        for session in batch.sessions:
            self.sessions[session.name] = session
        touched = set()
        for key in batch.subscribers_dropped:
            self.subscribers.pop(key, None)
            for delivery in [k for k in self.deliveries if (k[0], k[2]) == key]:
                del self.deliveries[delivery]
                touched.add(delivery[:2])
        for subscriber in batch.subscribers:
            self.subscribers[subscriber.session, subscriber.client_id] = subscriber
        for message in batch.messages:
            self.messages[message.session, message.message_id] = message
        for key in batch.deliveries_dropped:
            self.deliveries.pop(key, None)
            touched.add(key[:2])
        for delivery in batch.deliveries:
            self.deliveries[delivery.session, delivery.message_id, delivery.client_id] = delivery
        for publish in batch.publishes:
            self.publishes[publish.session, publish.message_id] = publish
        referred = {key[:2] for key in self.deliveries}
        for key in touched - referred:
            self.messages.pop(key, None)

    @property
    def message_ids(self) -> set[str]:
        return {message_id for _, message_id in self.messages}
