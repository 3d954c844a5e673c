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
    since: float = 0.0
    """It holds the messages stored from then on (its subscriber's arrival that created it)."""
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
        self.stored_at: dict[tuple[str, str], float] = {}
        """When each message was stored (a new consumer holds those stored from its subscriber's arrival)."""
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
                self.stored_at[record.session, record.message_id] = now
                for (session, _), consumer in self.consumers.items():
                    if session == record.session:
                        consumer.pending[record.message_id] = (stored, 0)
                for each in self.nodes:
                    each.engine_messages([(stored, conn if each is node else 0)], now)
            for key in batch.subscribers_dropped:
                self.consumers.pop(key, None)
            kept: dict[tuple[str, str], tuple[str, ...]] = {}
            for session, client_id, arrived in batch.presence:
                key = (session, client_id)
                if arrived is None or key in kept:
                    continue
                if key not in self.consumers:  # new: every message stored since it arrived
                    self.consumers[key] = Consumer(since=arrived, pending={
                        m.message_id: (m, 0) for m in self.streams.get(session, [])
                        if self.stored_at[session, m.message_id] >= arrived
                    })  # fmt: skip
                kept[key] = self.consumers[key].topics
                node.engine_subscriptions(session, client_id, list(kept[key]), now)
            for sub in batch.subscribers:
                key = (sub.session, sub.client_id)
                topics = tuple(sorted({*sub.topics, *kept.get(key, ())}))
                self.consumers.setdefault(key, Consumer()).topics = topics
            final = {(session, client_id): arrived for session, client_id, arrived in batch.presence}
            for key, arrived in final.items():  # one that came and went in this batch is gone
                consumer = self.consumers.get(key)
                if consumer is None:
                    continue
                if arrived is not None:
                    consumer.node = node
                    consumer.outstanding.clear()
                elif consumer.node is node:
                    consumer.node = None
                    consumer.outstanding.clear()
            for session, message_id, client_id in batch.deliveries_dropped:
                consumer = self.consumers.get((session, client_id))
                if consumer is not None and consumer.pending.pop(message_id, None) is not None:
                    consumer.outstanding.discard(message_id)
                    self.acked.append((session, client_id, message_id))
            node.store_committed(batch.seq, now)

    def lost(self, node: ServerCore) -> None:
        """``node`` died (``kill -9``): it reads nothing more, and what it was handed and had not ACKed is
        due to whoever serves its subscribers next (JetStream's ``ack_wait``)."""
        self.nodes.remove(node)
        for consumer in self.consumers.values():
            if consumer.node is node:
                consumer.node = None
                consumer.outstanding.clear()

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
