"""A cluster's shared engine in plain dicts, for sans-IO tests of ``ServerCore(cluster=True)`` nodes.

It does with the nodes' store batches what :class:`~fastport_anyio.cluster.NatsCluster` does with NATS
JetStream, in the same terms: a bucket of session records that every node watches, a stream per session
with a duplicate window on ``messageId`` that every node reads (its feed), and a durable consumer per
resumable subscriber that keeps what it has not ACKed and delivers it to the node it is attached to.
Deliveries happen when the test says so (:meth:`ModelEngine.deliver`), so a test chooses every
interleaving.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastport_core.server import ServerCore
from fastport_core.storage import MessageRecord, SessionRecord, Snapshot


@dataclass
class Consumer:
    """A resumable subscriber's durable consumer: every message of its session from its creation on."""

    topics: tuple[str, ...] = ()
    pending: dict[str, tuple[MessageRecord, int]] = field(default_factory=dict)
    """Not ACKed yet: message id -> (message, times delivered)."""
    node: ServerCore | None = None
    """The node it is attached to (its pump runs there)."""
    outstanding: set[str] = field(default_factory=set)
    """Delivered to ``node`` and not handed back."""


class ModelEngine:
    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.streams: dict[str, list[MessageRecord]] = {}
        self.consumers: dict[tuple[str, str], Consumer] = {}
        self.nodes: list[ServerCore] = []
        self.acked: list[tuple[str, str, str]] = []

    def join(self, node: ServerCore, now: float = 0.0) -> ServerCore:
        node.restore(Snapshot(sessions=list(self.sessions.values())), now)
        self.nodes.append(node)
        return node

    def commit(self, node: ServerCore, now: float = 0.0) -> None:
        """What the node's writer does: take its batches, apply them, report them done."""
        while (batch := node.take_store_batch()) is not None:
            for name in batch.sessions_dropped:
                self.sessions.pop(name, None)
                self.streams.pop(name, None)
                for key in [key for key in self.consumers if key[0] == name]:
                    del self.consumers[key]
                for each in self.nodes:
                    each.engine_session_dropped(name, now)
            for record in batch.sessions:
                self.sessions[record.name] = record
                self.streams.setdefault(record.name, [])
                for each in self.nodes:
                    each.engine_session(record, now)
            for record, conn in batch.outgoing:
                stream = self.streams[record.session]
                if any(m.message_id == record.message_id for m in stream):
                    continue  # the duplicate window
                stored = record._replace(seq=len(stream) + 1)
                stream.append(stored)
                for (session, _), consumer in self.consumers.items():
                    if session == record.session:
                        consumer.pending[record.message_id] = (stored, 0)
                for each in self.nodes:
                    each.engine_messages([(stored, conn if each is node else 0)], now)
            for key in batch.detached:
                consumer = self.consumers.get(key)
                if consumer is not None and consumer.node is node:
                    consumer.node = None
                    consumer.outstanding.clear()
            for key in batch.subscribers_dropped:
                self.consumers.pop(key, None)
            for sub in batch.subscribers:
                self.consumers.setdefault((sub.session, sub.client_id), Consumer()).topics = sub.topics
            for key in batch.attached:
                consumer = self.consumers.setdefault(key, Consumer())
                consumer.node = node
                consumer.outstanding.clear()
                node.engine_subscriptions(*key, list(consumer.topics), now)
            for session, message_id, client_id in batch.deliveries_dropped:
                consumer = self.consumers.get((session, client_id))
                if consumer is not None and consumer.pending.pop(message_id, None) is not None:
                    consumer.outstanding.discard(message_id)
                    self.acked.append((session, client_id, message_id))
            node.store_committed(batch.seq, now)

    def deliver(self, now: float = 0.0) -> None:
        """Every attached consumer's pump hands its node what it has not handed it yet."""
        for key, consumer in self.consumers.items():
            node = consumer.node
            if node is None:
                continue
            rows = []
            for message_id, (record, delivered) in consumer.pending.items():
                if message_id not in consumer.outstanding:
                    consumer.outstanding.add(message_id)
                    consumer.pending[message_id] = (record, delivered + 1)
                    rows.append((record, delivered))
            if rows:
                refused = node.engine_deliveries(*key, rows, now)
                if refused is None:  # not served there any more: handed back
                    consumer.outstanding.difference_update(r.message_id for r, _ in rows)
                    continue
                for message_id in refused:
                    if consumer.pending.pop(message_id, None) is not None:
                        self.acked.append((*key, message_id))
