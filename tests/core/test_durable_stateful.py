"""Crash anywhere: a hypothesis state machine over the durable core, its store and "the process dies here".

The machine publishes, delivers and ACKs, takes store batches, commits them (or fails to), cuts and
resumes the subscriber's connection, lets time pass, and kills the process at any point: between a
journal entry and its batch, between a batch and its commit, or during a commit (which then happened or
not). A restart restores a fresh core from what the store committed; the publisher re-sends what it had
not seen confirmed, as a client does. Whatever the order:

- every publish the publisher saw confirmed reaches the resumable subscriber's application;
- a delivery whose ACK was committed never comes back after a restart;
- at the end, with everything ACKed and committed, the store holds no message.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from fastport_core.server import ServerCore
from fastport_core.storage import StoreBatch
from tests.store_model import ModelStore

from .publisher_machine import ConfirmingPublisher
from .test_durable import ack, durable_core, of_type
from .wire import RawPeer


class CrashAnywhere(ConfirmingPublisher):
    @initialize()
    def start(self) -> None:
        self.store = ModelStore()
        self.now = 0.0
        self.core: ServerCore = durable_core(self.store, self.now, ping_interval=None)
        self.in_flight: list[StoreBatch] = []
        self.received: set[str] = set()
        self.acked_unsaved: set[str] = set()
        """ACKed, and the ACK is not in a taken batch yet."""
        self.acks_by_batch: dict[int, set[str]] = {}
        self.acked_durable: set[str] = set()
        self.since_restart: list[str] = []
        self.durable_at_restart: set[str] = set()
        self.publisher = self._connect()
        self.subscriber: RawPeer | None = self._connect(clientId="dev", persistent=True)
        assert self.subscriber is not None
        self.subscriber.send({"type": "subscribe", "topic": "t"}, self.now)
        self._pump()

    def _connect(self, **init: Any) -> RawPeer:
        peer = RawPeer(self.core, self.now)
        peer.init("demo", "pw", self.now, **init)
        assert of_type(peer.received, "init_response")[0]["success"] is True
        return peer

    # -- traffic ---------------------------------------------------------------------------------------------

    @precondition(lambda self: self.subscriber is not None)
    @rule(acks=st.integers(0, 5))
    def deliver(self, acks: int) -> None:
        assert self.subscriber is not None
        messages = of_type(self.subscriber.pump(self.now), "message")
        self.subscriber.received.clear()
        for message in messages:
            message_id = message["messageId"]
            self.received.add(message_id)
            self.since_restart.append(message_id)
        for message in messages[:acks]:
            ack(self.subscriber, message, self.now)
            self.acked_unsaved.add(message["messageId"])
        self._pump()

    @precondition(lambda self: self.subscriber is not None)
    @rule()
    def lose_subscriber(self) -> None:
        assert self.subscriber is not None
        self.core.connection_lost(self.subscriber.conn, self.now)
        self.subscriber = None
        self._pump()

    @precondition(lambda self: self.subscriber is None)
    @rule()
    def resume_subscriber(self) -> None:
        self.subscriber = self._connect(clientId="dev", persistent=True)
        self.subscriber.received = of_type(self.subscriber.received, "message")
        self.subscriber.send({"type": "subscribe", "topic": "t"}, self.now)  # as clients do on reconnect
        self.deliver(0)

    @rule()
    def tick(self) -> None:
        """Time passes: the server's retries, and the publisher re-sends what was not confirmed (a refused
        ``store_unavailable`` publish included), as its retry timer would."""
        self.now += 5.0
        self.core.handle_timeout(self.now)
        for message_id in self.unconfirmed:
            self.publisher.publish("t", message_id, now=self.now)
        self._pump()

    # -- the store ---------------------------------------------------------------------------------------------

    @rule()
    def take(self) -> None:
        batch = self.core.take_store_batch()
        if batch is not None:
            self.in_flight.append(batch)
            self.acks_by_batch[batch.seq] = self.acked_unsaved
            self.acked_unsaved = set()

    @precondition(lambda self: self.in_flight)
    @rule()
    def commit(self) -> None:
        self.take()
        self.store.commit(self.in_flight)
        for batch in self.in_flight:
            self.acked_durable |= self.acks_by_batch.pop(batch.seq)
        self.core.store_committed(self.in_flight[-1].seq, self.now)
        self.in_flight = []
        self._pump()

    @precondition(lambda self: self.core.store_work())
    @rule()
    def write_and_read_back(self) -> None:
        """The writer's turn: the pages asked for are read once what was journalled before them commits."""
        requests = self.core.take_backlog_requests()
        self.take()
        if self.in_flight:
            self.commit()
        for request in requests:
            self.core.backlog_loaded(request, self.store.load_backlog(*request), self.now)
        self._pump()

    @precondition(lambda self: self.in_flight)
    @rule()
    def commit_fails(self) -> None:
        self.core.store_failed(self.now)
        self._pump()

    @rule(committed=st.booleans())
    def crash(self, committed: bool) -> None:
        """``kill -9``: during a commit of what was taken (it made it to disk, or not), or between commits."""
        if committed and self.in_flight:
            self.commit()
        self.in_flight = []
        self.acks_by_batch = {}
        self.acked_unsaved = set()
        self.now += 1.0
        self.core = durable_core(self.store, self.now, ping_interval=None)
        self.durable_at_restart = set(self.acked_durable)
        self.since_restart = []
        self.publisher = self._connect()
        self.subscriber = None
        self.resume_subscriber()
        for message_id in list(self.unconfirmed):  # the client re-sends what it never saw confirmed
            self.publisher.publish("t", message_id, now=self.now)
        self._pump()

    @invariant()
    def acked_deliveries_never_come_back(self) -> None:
        assert not self.durable_at_restart & set(self.since_restart)

    def teardown(self) -> None:
        if not hasattr(self, "core"):
            return
        if self.subscriber is None:
            self.resume_subscriber()
        for _ in range(50):  # drain: commit, deliver, ACK everything
            self.take()
            if self.in_flight:
                self.commit()
            while self.core.store_work():
                self.write_and_read_back()
            assert self.subscriber is not None
            self.deliver(acks=1000)
            settled = not (self.unconfirmed or self.core.broker.store_pending() or self.in_flight)
            if settled and self.confirmed <= self.received and not self.store.messages:
                break
            self.tick()
        assert self.confirmed <= self.received, sorted(self.confirmed - self.received)
        assert not self.unconfirmed, self.unconfirmed
        assert self.store.messages == {}


TestCrashAnywhere = CrashAnywhere.TestCase
TestCrashAnywhere.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
