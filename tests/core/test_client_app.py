"""The application-level client (``client_app``) in memory: a scripted wsproto server and a fake clock.

Everything both adapters decide is tested here once: tickets and their timeouts, the refusal rule,
reference-counted consumers, flow control, the state projection, the first-connect policy and the error
wording. The adapters' contract suite (tests/contract) then checks that both follow it over real sockets.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastport_core.client_api import ConnectionState, StateChange
from fastport_core.client_app import ClientApp, Consumer, Ended, Ticket
from fastport_core.config import ClientConfig
from fastport_core.errors import (
    AuthenticationError,
    ClientClosedError,
    ConnectError,
    LocalProtocolError,
    PublishRefusedError,
    PublishTimeoutError,
    SubscribeRefusedError,
    SubscribeTimeoutError,
)

from .test_client import KEY, PASSWORD, SESSION, T0, FakeServer, sealed_message

CONFIG = ClientConfig(reconnect_initial_delay=1.0, reconnect_max_delay=1.0, connect_timeout=10.0)


class Harness:
    """A :class:`ClientApp` wired to one :class:`FakeServer` at a time, on a clock the test moves."""

    def __init__(self, server: FakeServer | None = None, **config: Any) -> None:
        self.now = T0
        self.app = ClientApp("ws://broker.example:8080/ws", session=SESSION, password=PASSWORD, key=KEY,
                             config=ClientConfig(**({"reconnect_initial_delay": 1.0, "reconnect_max_delay": 1.0}
                                                    | config)))  # fmt: skip
        self.changes: list[StateChange] = []
        self.app.on_state_change(self.changes.append)
        self.woken = 0
        self.app.wake_io = self._woken
        self.server = server if server is not None else FakeServer()

    def _woken(self) -> None:
        self.woken += 1

    def pump(self) -> None:
        while out := self.app.data_to_send():
            if answer := self.server.feed(out):
                self.app.receive_data(answer, self.now)
        for callback, argument in self.app.jobs():
            callback(argument)

    def dial(self, server: FakeServer | None = None) -> None:
        if server is not None:
            self.server = server
        assert self.app.wants_dial
        self.app.start_connection(self.now)
        self.pump()

    def deliver(self, frame: dict[str, Any]) -> None:
        self.app.receive_data(self.server.send(**frame), self.now)
        self.pump()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.app.handle_timeout(self.now)
        self.pump()

    def lose(self) -> None:
        self.app.connection_lost(self.now, "reset")
        self.pump()


def ready(**config: Any) -> Harness:
    harness = Harness(**config)
    harness.dial()
    assert harness.app.connected.done and harness.app.connected.error is None
    return harness


def quiet_server() -> FakeServer:
    """A server that never answers subscribes or publishes (init only)."""
    server = FakeServer(confirm_publishes=False)
    server._answers = lambda frame: (  # type: ignore[method-assign]
        [{"type": "init_response", "success": True}] if frame["type"] == "init" else []
    )
    return server


def test_the_connect_ticket_and_the_state_settle_on_the_first_init() -> None:
    harness = ready()
    assert harness.app.state is ConnectionState.CONNECTED
    harness.lose()
    harness.advance(1.0)  # the reconnect time (the delay is at most 1 s)
    harness.dial(FakeServer())
    states = [change.state for change in harness.changes]
    assert states == [ConnectionState.CONNECTED, ConnectionState.RECONNECTING, ConnectionState.CONNECTED]
    assert harness.changes[1].reason.startswith("connection lost")


def test_a_failed_first_connection_fails_fast_with_a_connect_error_and_a_tls_hint() -> None:
    harness = Harness()
    harness.app.start_connection(harness.now)
    harness.app.data_to_send()
    harness.app.connection_lost(harness.now, "connection reset")
    connected = harness.app.connected
    assert connected.done and isinstance(connected.error, ConnectError)
    assert "connection reset" in str(connected.error) and "wss://" in str(connected.error)
    assert harness.app.state is ConnectionState.CLOSED and harness.app.finished
    with pytest.raises(ClientClosedError, match="cannot publish"):
        harness.app.publish("t", "x", now=harness.now, timestamp=1, timeout=None)


def test_retry_first_connect_keeps_dialling_until_it_succeeds() -> None:
    harness = Harness(retry_first_connect=True)
    harness.app.start_connection(harness.now)
    harness.app.connection_lost(harness.now, "refused")
    assert not harness.app.connected.done and harness.app.state is ConnectionState.CONNECTING
    harness.advance(1.0)
    harness.dial()
    assert harness.app.connected.done and harness.app.connected.error is None


def test_a_refused_login_raises_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = FakeServer(init_answer={"success": False, "error": "wrong password", "code": "auth_failed"})
    harness = Harness(server)
    harness.dial()
    assert isinstance(harness.app.connected.error, AuthenticationError)
    assert "credentials" in str(harness.app.connected.error)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_suspended_session_says_so() -> None:
    server = FakeServer(init_answer={"success": False, "error": "suspended", "code": "session_suspended"})
    harness = Harness(server)
    harness.dial()
    error = harness.app.connected.error
    assert isinstance(error, AuthenticationError) and "suspended" in str(error)
    assert "credentials" not in str(error) and "wss://" not in str(error)


def test_a_publish_ticket_settles_with_the_confirmation_or_the_refusal() -> None:
    harness = ready()
    ticket = harness.app.publish("t", "x", now=harness.now, timestamp=1, timeout=5.0)
    harness.pump()
    assert ticket.done and ticket.outcome() == ticket.message_id
    harness.server.confirm_publishes = False
    refused = harness.app.publish("t", "y", now=harness.now, timestamp=1, timeout=5.0)
    harness.pump()
    harness.deliver(FakeServer.publish_response(refused.message_id, success=False, error="no", code="nope"))
    with pytest.raises(PublishRefusedError):
        refused.outcome()
    assert harness.app.next_deadline() != T0 + 5.0  # a settled ticket's deadline is gone


def test_a_publish_timeout_is_a_deadline_of_the_core_and_stops_the_retries() -> None:
    harness = Harness(quiet_server())
    harness.dial()
    woken: list[Ticket[str]] = []
    ticket = harness.app.publish("t", "x", now=harness.now, timestamp=1, timeout=2.0)
    ticket.waker = lambda: woken.append(ticket)
    harness.pump()
    assert harness.app.next_deadline() == T0 + 2.0
    harness.advance(1.999)
    assert not ticket.done
    harness.advance(0.001)
    assert woken == [ticket] and isinstance(ticket.error, PublishTimeoutError)
    assert harness.app.pending_publishes == 0


def test_cancelling_a_publish_stops_it() -> None:
    harness = Harness(quiet_server())
    harness.dial()
    ticket = harness.app.publish("t", "x", now=harness.now, timestamp=1, timeout=None)
    harness.app.cancel(ticket)
    assert ticket.done and harness.app.pending_publishes == 0


def test_subscribe_confirms_and_hands_each_message_to_every_consumer_once() -> None:
    harness = ready()
    first = harness.app.subscribe("t", now=harness.now, timeout=5.0)
    second = harness.app.subscribe("t", now=harness.now, timeout=5.0)
    harness.pump()
    assert first.confirm.done and second.confirm.done and first.confirm.error is None
    harness.deliver(sealed_message("t", "hello", "m1"))
    harness.deliver(sealed_message("t", "hello", "m1"))  # a redelivery
    for consumer in (first, second):
        message = harness.app.take(consumer)
        assert message is not None and message.payload == "hello"
        assert harness.app.take(consumer) is None


def test_a_subscribe_timeout_withdraws_the_consumer_and_unsubscribes() -> None:
    harness = Harness(quiet_server())
    harness.dial()
    consumer = harness.app.subscribe("t", now=harness.now, timeout=3.0)
    harness.pump()
    harness.advance(3.0)
    assert isinstance(consumer.confirm.error, SubscribeTimeoutError)
    assert harness.app.core.topics == () and consumer.ended
    assert harness.server.of_type("unsubscribe") == [{"type": "unsubscribe", "topic": "t"}]


def refuse(harness: Harness, topic: str) -> None:
    harness.deliver(
        {"type": "subscribe_response", "success": False, "topic": topic, "error": "no", "code": "x"}
    )


def test_the_refusal_rule_only_the_answer_to_the_latest_request_decides() -> None:
    harness = Harness(quiet_server())
    harness.dial()
    first = harness.app.subscribe("t", now=harness.now, timeout=None)
    second = harness.app.subscribe("t", now=harness.now, timeout=None)
    harness.pump()
    refuse(harness, "t")  # answers the first request: the second is pending, nothing changes yet
    assert not first.confirm.done and not second.confirm.done and harness.app.core.topics == ("t",)
    harness.deliver({"type": "subscribe_response", "success": True, "topic": "t"})
    assert first.confirm.error is None and second.confirm.error is None


def test_the_refusal_rule_a_refused_latest_request_ends_every_consumer_of_the_topic() -> None:
    harness = Harness(quiet_server())
    harness.dial()
    old = harness.app.subscribe("t", now=harness.now, timeout=None)
    harness.pump()
    harness.deliver({"type": "subscribe_response", "success": True, "topic": "t"})
    assert old.confirm.error is None
    new = harness.app.subscribe("t", now=harness.now, timeout=None)
    harness.pump()
    refuse(harness, "t")  # the answer to the latest request: the topic is gone, for every consumer
    assert isinstance(new.confirm.error, SubscribeRefusedError)
    with pytest.raises(SubscribeRefusedError):
        harness.app.take(old)
    with pytest.raises(Ended):
        harness.app.take(old)  # the error is raised once, then a plain end
    assert harness.app.core.topics == ()


def test_consumers_are_reference_counted() -> None:
    harness = ready()
    first = harness.app.subscribe("t", now=harness.now, timeout=None)
    second = harness.app.subscribe("t", now=harness.now, timeout=None)
    harness.pump()
    harness.app.remove(first)
    harness.pump()
    assert harness.server.of_type("unsubscribe") == [] and harness.app.core.topics == ("t",)
    harness.app.remove(second)
    harness.pump()
    assert harness.server.of_type("unsubscribe") == [{"type": "unsubscribe", "topic": "t"}]
    with pytest.raises(Ended):
        harness.app.take(second)


def test_unsubscribe_ends_every_consumer_quietly_at_once() -> None:
    harness = ready()
    consumer = harness.app.subscribe("t", now=harness.now, timeout=None)
    harness.pump()
    harness.deliver(sealed_message("t", "x"))
    harness.app.unsubscribe("t")
    with pytest.raises(Ended):
        harness.app.take(consumer)


def test_a_full_queue_pauses_reading_until_the_consumer_takes_one() -> None:
    harness = ready()
    consumer = harness.app.subscribe("t", now=harness.now, timeout=None, max_buffer=2)
    harness.pump()
    harness.deliver(sealed_message("t", "a", "m1"))
    assert not harness.app.paused
    harness.deliver(sealed_message("t", "b", "m2"))
    assert harness.app.paused and harness.woken == 0
    assert harness.app.take(consumer) is not None
    assert not harness.app.paused and harness.woken == 1
    with pytest.raises(LocalProtocolError):
        harness.app.subscribe("t", now=harness.now, timeout=None, max_buffer=0)


def test_close_fails_waiters_ends_consumers_quietly_and_sends_a_close_frame() -> None:
    harness = Harness(quiet_server())
    harness.dial()
    consumer = harness.app.subscribe("t", now=harness.now, timeout=None)
    ticket = harness.app.publish("t", "x", now=harness.now, timestamp=1, timeout=None)
    harness.pump()
    harness.app.close(harness.now)
    assert isinstance(ticket.error, ClientClosedError) and isinstance(
        consumer.confirm.error, ClientClosedError
    )
    with pytest.raises(Ended):
        harness.app.take(consumer)
    harness.pump()
    assert harness.server.close_code == 1000
    assert harness.app.state is ConnectionState.CLOSED and harness.changes[-1].state is ConnectionState.CLOSED
    harness.app.close(harness.now)  # idempotent


def test_giving_up_after_a_connection_ends_consumers_with_the_error(caplog: pytest.LogCaptureFixture) -> None:
    harness = ready(reconnect_give_up_after=2.0)
    consumer = harness.app.subscribe("t", now=harness.now, timeout=None)
    harness.pump()
    harness.lose()
    for _ in range(5):
        harness.advance(1.0)
        if harness.app.wants_dial:
            harness.app.start_connection(harness.now)
            harness.app.connection_lost(harness.now, "refused")
    with pytest.raises(ClientClosedError, match="gave up"):
        harness.app.take(consumer)
    assert harness.app.failure is not None
    assert any(
        "gave up" in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING
    )


def test_integrity_failures_are_counted_and_reported() -> None:
    harness = ready()
    failures: list[object] = []
    harness.app.on_integrity_failure(failures.append)
    consumer = harness.app.subscribe("t", now=harness.now, timeout=None)
    harness.pump()
    harness.deliver(sealed_message("t", "x") | {"hash": "v1:" + "0" * 64})
    assert harness.app.integrity_failures == 1 and len(failures) == 1
    assert harness.app.take(consumer) is None


def test_repeated_states_are_reported_once() -> None:
    harness = ready()
    harness.app.close(harness.now)
    harness.app.close(harness.now)
    harness.pump()
    assert [change.state for change in harness.changes] == [ConnectionState.CONNECTED, ConnectionState.CLOSED]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["add", "remove", "unsubscribe"]), st.sampled_from("ab")), max_size=30)
)
def test_the_core_subscribes_exactly_the_topics_with_live_consumers(ops: list[tuple[str, str]]) -> None:
    harness = ready()
    live: list[Consumer] = []
    for op, topic in ops:
        if op == "add":
            live.append(harness.app.subscribe(topic, now=harness.now, timeout=None))
        elif op == "remove" and (mine := [c for c in live if c.topic == topic]):
            harness.app.remove(mine[0])
            live.remove(mine[0])
        elif op == "unsubscribe":
            harness.app.unsubscribe(topic)
            live = [c for c in live if c.topic != topic]
        harness.pump()
        assert set(harness.app.core.topics) == {c.topic for c in live}
        assert all(c.confirm.done and c.confirm.error is None for c in live)
