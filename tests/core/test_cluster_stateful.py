"""Kill any node anywhere: a hypothesis state machine over two cluster nodes and their shared engine.

Two ``ServerCore(cluster=True)`` nodes share a :class:`ModelEngine`. The machine publishes on either node,
commits either node's batches, lets the engine deliver, ACKs, moves the resumable subscriber from node to
node (its connection lost, then resumed elsewhere), lets time pass, and kills a node at any point (what
it had not committed is lost; what the engine had handed it comes back to whoever serves the subscriber
next, as JetStream redelivers after ``ack_wait``). The publisher reconnects and re-sends what it never saw
confirmed, as a client does. Whatever the order:

- every publish the publisher saw confirmed reaches the resumable subscriber, if JetStream stored it once
  the subscriber had arrived at a node that recorded it (the engine creates its consumer when the first
  node commits its arrival, and the consumer holds the messages stored from that arrival on);
- at the end, with everything ACKed, the engine owes the subscriber nothing.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from fastport_core.config import ServerConfig, SessionSettings
from fastport_core.server import ServerCore
from tests.engine_model import ModelEngine

from .publisher_machine import ConfirmingPublisher
from .test_cluster_core import of_type
from .wire import RawPeer


class KillAnyNode(ConfirmingPublisher):
    @initialize()
    def start(self) -> None:
        self.engine = ModelEngine()
        self.now = 0.0
        self.nodes = [self._node(), self._node()]
        self.received: set[str] = set()
        self.publisher = self._connect(self.nodes[0])
        self.subscriber: RawPeer | None = self._connect(self.nodes[1], clientId="dev")
        self.subscriber.send({"type": "subscribe", "topic": "t"}, self.now)

    def _node(self) -> ServerCore:
        config = ServerConfig(password_hash_cost=2, ping_interval=None)
        core = self.engine.join(ServerCore(config, cluster=True), self.now)
        core.broker.configure_session("demo", "pw", self.now, SessionSettings(retry_interval=5.0))
        self.engine.commit(core, self.now)
        return core

    def _connect(self, core: ServerCore, **init: Any) -> RawPeer:
        peer = RawPeer(core, self.now)
        peer.init("demo", "pw", self.now, **init)
        assert of_type(peer.received, "init_response")[0]["success"] is True
        return peer

    # -- traffic ---------------------------------------------------------------------------------------------

    @rule(node=st.integers(0, 1))
    def commit(self, node: int) -> None:
        self.engine.commit(self.nodes[node], self.now)
        self._pump()

    @precondition(lambda self: self.subscriber is not None)
    @rule(acks=st.integers(0, 5))
    def deliver(self, acks: int) -> None:
        assert self.subscriber is not None
        self.engine.deliver(self.now)
        messages = of_type(self.subscriber.pump(self.now), "message")
        self.subscriber.received.clear()
        self.received.update(m["messageId"] for m in messages)
        for message in messages[:acks]:
            self.subscriber.send({"type": "ack", "topic": "t", "messageId": message["messageId"]}, self.now)

    @precondition(lambda self: self.subscriber is not None)
    @rule()
    def lose_subscriber(self) -> None:
        assert self.subscriber is not None
        self.subscriber.core.connection_lost(self.subscriber.conn, self.now)
        self.subscriber = None

    @precondition(lambda self: self.subscriber is None)
    @rule(node=st.integers(0, 1))
    def resume_subscriber(self, node: int) -> None:
        self.subscriber = self._connect(self.nodes[node], clientId="dev")
        self.subscriber.send({"type": "subscribe", "topic": "t"}, self.now)  # as clients do on reconnect

    @rule()
    def tick(self) -> None:
        """Time passes: the nodes' retries, and the publisher re-sends what was not confirmed."""
        self.now += 5.0
        for core in self.nodes:
            core.handle_timeout(self.now)
        for message_id in self.unconfirmed:
            self.publisher.publish("t", message_id, now=self.now)
        self._pump()

    @rule(node=st.integers(0, 1))
    def kill(self, node: int) -> None:
        """``kill -9`` of a node: what it had not committed is lost; its clients reconnect elsewhere."""
        dead = self.nodes[node]
        self.engine.lost(dead)
        self.nodes[node] = self._node()
        if self.publisher.core is dead:
            self.publisher = self._connect(self.nodes[1 - node])
            for message_id in list(self.unconfirmed):  # the client re-sends what it never saw confirmed
                self.publisher.publish("t", message_id, now=self.now)
        if self.subscriber is not None and self.subscriber.core is dead:
            self.subscriber = None
        self._pump()

    def _owed(self) -> set[str]:
        consumer = self.engine.consumers.get(("demo", "dev"))
        since = consumer.since if consumer is not None else 0.0
        stored = self.engine.stored_at
        return {m for m in self.confirmed if stored["demo", m] >= since}

    def teardown(self) -> None:
        if not hasattr(self, "engine"):
            return
        if self.subscriber is None:
            self.resume_subscriber(0)
        for _ in range(50):  # drain: commit, deliver, ACK everything
            for node in (0, 1):
                self.commit(node)
            self.deliver(acks=1000)
            for node in (0, 1):
                self.commit(node)
            consumer = self.engine.consumers.get(("demo", "dev"))
            pending = consumer.pending if consumer is not None else {}
            if not self.unconfirmed and self._owed() <= self.received and not pending:
                break
            self.tick()
        owed = self._owed()
        assert owed <= self.received, sorted(owed - self.received)
        assert not self.unconfirmed, self.unconfirmed
        assert not pending


TestKillAnyNode = KillAnyNode.TestCase
TestKillAnyNode.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
