"""Delivery options of the client core, in memory on a fake clock: ``ack_when_consumed`` (ACK only once the
application is done with a message) and ``publish_give_up_after`` (never re-send a publish past the server's
dedupe horizon). The contract suite (tests/contract) checks that both adapters carry them out."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastport_core.client import ClientState, MessageReceived, PublishExpired
from fastport_core.client_api import Message
from fastport_core.config import DEFAULT_DEDUPE_TTL, ClientConfig, ServerConfig
from fastport_core.errors import LocalProtocolError, PublishTimeoutError

from .test_client import (
    CONFIG,
    T0,
    FakeServer,
    connect,
    deliver,
    make_client,
    pump,
    ready,
    sealed_message,
    subscribe,
    wait_for_reconnect,
)
from .test_client_app import Harness

MANUAL = dataclasses.replace(CONFIG, ack_when_consumed=True)
FRAME = sealed_message("t", "hello", "m1")


def acks(server: FakeServer) -> list[str]:
    return [frame["messageId"] for frame in server.of_type("ack")]


# --------------------------------------------------------------------------------------------------------
# ack_when_consumed in the protocol core.


def test_by_default_a_message_is_acked_on_receipt_and_finish_message_changes_nothing() -> None:
    client, server = ready()
    subscribe(client, server, "t")
    assert deliver(client, server, FRAME) == [MessageReceived("t", "hello", "m1", FRAME["timestamp"])]
    assert acks(server) == ["m1"]
    client.finish_message("t", "m1", handled=True, now=T0)
    pump(client, server, T0)
    assert acks(server) == ["m1"]


def test_ack_when_consumed_acks_when_finished_and_a_redelivery_meanwhile_is_neither_acked_nor_handed_over() -> (
    None
):
    client, server = ready(config=MANUAL)
    subscribe(client, server, "t")
    assert deliver(client, server, FRAME) == [MessageReceived("t", "hello", "m1", FRAME["timestamp"])]
    assert acks(server) == []
    assert deliver(client, server, FRAME | {"retry": 1}) == []  # the server's retry, while it is handled
    assert acks(server) == []
    client.finish_message("t", "m1", handled=True, now=T0)
    pump(client, server, T0)
    assert acks(server) == ["m1"]
    client.finish_message("t", "m1", handled=True, now=T0)  # twice: ignored
    assert deliver(client, server, FRAME | {"retry": 2}) == []  # crossed our ACK: ACKed again, not handed
    assert acks(server) == ["m1", "m1"]


def test_ack_when_consumed_a_message_not_handled_is_forgotten_unacked_and_handed_over_again() -> None:
    client, server = ready(config=MANUAL)
    subscribe(client, server, "t")
    deliver(client, server, FRAME)
    client.finish_message("t", "m1", handled=False, now=T0)
    pump(client, server, T0)
    assert acks(server) == []
    assert deliver(client, server, FRAME | {"retry": 1}) == [
        MessageReceived("t", "hello", "m1", FRAME["timestamp"])
    ]
    assert acks(server) == []


def test_ack_when_consumed_finished_while_disconnected_the_redelivery_after_resuming_is_acked() -> None:
    client, first = ready(config=MANUAL)
    subscribe(client, first, "t")
    deliver(client, first, FRAME)
    client.connection_lost(T0, "reset")
    client.finish_message("t", "m1", handled=True, now=T0)
    assert client.data_to_send() == b""  # nothing to send it on
    when = wait_for_reconnect(client)
    second = FakeServer()
    connect(client, second, when)
    assert deliver(client, second, FRAME | {"retry": 1}, when) == []  # the resumed subscriber's re-send
    assert acks(second) == ["m1"]


def test_ack_when_consumed_a_message_for_no_subscription_is_left_to_the_servers_next_resend() -> None:
    default, default_server = ready()
    manual, manual_server = ready(config=MANUAL)
    for client, server in ((default, default_server), (manual, manual_server)):
        assert deliver(client, server, FRAME) == []  # e.g. a resumed subscriber, before it re-subscribed
    assert acks(default_server) == ["m1"] and acks(manual_server) == []
    subscribe(manual, manual_server, "t")
    assert deliver(manual, manual_server, FRAME | {"retry": 1}) == [
        MessageReceived("t", "hello", "m1", FRAME["timestamp"])
    ]


def test_ack_when_consumed_a_forged_message_is_still_acked_at_once() -> None:
    client, server = ready(config=MANUAL)
    subscribe(client, server, "t")
    [event] = deliver(client, server, FRAME | {"hash": "v1:" + "0" * 64})
    assert type(event).__name__ == "IntegrityFailure" and acks(server) == ["m1"]


# --------------------------------------------------------------------------------------------------------
# ack_when_consumed in the application layer: who is "done".


def manual_harness() -> Harness:
    harness = Harness(ack_when_consumed=True)
    harness.dial()
    return harness


def test_an_iterator_acks_on_take_and_a_message_of_two_consumers_once_both_are_done() -> None:
    harness = manual_harness()
    stream = harness.app.subscribe("t", now=harness.now, timeout=5.0)
    handler = harness.app.subscribe("t/#", now=harness.now, timeout=5.0, handler=print)  # a filter too
    harness.pump()
    harness.deliver(FRAME)
    assert acks(harness.server) == []
    taken = harness.app.take(stream)
    assert taken is not None
    harness.pump()
    assert acks(harness.server) == []  # the handler has not finished it
    given = harness.app.take(handler)
    assert given == taken
    harness.pump()
    assert acks(harness.server) == []  # taken by a handler is not done
    woken = harness.woken
    harness.app.done(given)
    harness.pump()
    assert acks(harness.server) == ["m1"] and harness.woken > woken  # the adapter is told to write it


def test_a_handler_that_raised_leaves_the_message_unacked_and_it_is_handed_to_every_consumer_again() -> None:
    harness = manual_harness()
    stream = harness.app.subscribe("t", now=harness.now, timeout=5.0)
    handler = harness.app.subscribe("t", now=harness.now, timeout=5.0, handler=print)
    harness.pump()
    harness.deliver(FRAME)
    message = harness.app.take(handler)
    assert message is not None
    harness.app.done(message, handled=False)  # the handler raised
    harness.app.take(stream)  # the last one done: the message is settled, un-ACKed
    harness.pump()
    assert acks(harness.server) == []
    harness.deliver(FRAME | {"retry": 1})  # the server's retry is handed over again
    assert harness.app.take(handler) == message and harness.app.take(stream) == message
    harness.app.done(message)
    harness.pump()
    assert acks(harness.server) == ["m1"]


def test_a_withdrawn_consumer_is_done_with_its_buffered_messages_but_close_acks_nothing() -> None:
    harness = manual_harness()
    withdrawn = harness.app.subscribe("a", now=harness.now, timeout=5.0)
    kept = harness.app.subscribe("b", now=harness.now, timeout=5.0)
    harness.pump()
    harness.deliver(sealed_message("a", "x", "m1"))
    harness.deliver(sealed_message("b", "y", "m2"))
    harness.app.remove(withdrawn)  # the application no longer wants what it buffered
    harness.pump()
    assert acks(harness.server) == ["m1"]
    assert kept.items and harness.app.paused is False
    harness.app.close(harness.now)
    harness.pump()
    assert acks(harness.server) == ["m1"]  # m2 was never taken: the server keeps it for a resumed subscriber


def test_a_message_for_a_subscription_without_consumers_is_acked_at_once() -> None:
    harness = manual_harness()
    harness.app.core.subscribe("raw")  # the core alone: no consumer holds what arrives
    harness.pump()
    harness.deliver(sealed_message("raw", "x", "m1"))
    assert acks(harness.server) == ["m1"]


# --------------------------------------------------------------------------------------------------------
# publish_give_up_after: never re-send past the server's dedupe horizon.


def test_the_give_up_horizon_is_below_the_servers_dedupe_ttl() -> None:
    assert ServerConfig().dedupe_ttl == DEFAULT_DEDUPE_TTL
    assert ClientConfig().publish_give_up_after < DEFAULT_DEDUPE_TTL
    with pytest.raises(LocalProtocolError, match="dedupe_ttl"):
        ClientConfig(publish_give_up_after=DEFAULT_DEDUPE_TTL)
    with pytest.raises(LocalProtocolError, match="positive"):
        ClientConfig(publish_give_up_after=0)


def sent_at(server: FakeServer) -> int:
    return len(server.of_type("publish"))


def test_a_publish_is_not_resent_past_publish_give_up_after_of_its_first_send() -> None:
    config = dataclasses.replace(CONFIG, publish_give_up_after=30.0)  # retries every 5 s
    client = make_client(config=config)
    message_id = client.publish("t", "x", now=T0, timestamp=1)
    start = T0 + 100.0  # queued while disconnected: the horizon counts from the first send
    first = FakeServer(confirm_publishes=False)
    connect(client, first, start)
    assert sent_at(first) == 1 and client.next_deadline() == start + 5.0
    for step in range(1, 4):
        client.handle_timeout(start + 5.0 * step)
        pump(client, first, start + 5.0 * step)
    assert sent_at(first) == 4
    client.connection_lost(start + 16.0, "reset")  # the horizon survives reconnections
    client.events()
    when = wait_for_reconnect(client)
    second = FakeServer(confirm_publishes=False)
    connect(client, second, when)
    assert sent_at(second) == 1
    now = when
    while (deadline := client.next_deadline()) is not None and deadline < start + 30.0:
        now = deadline
        client.handle_timeout(now)
        pump(client, second, now)
    resent = sent_at(second)
    client.handle_timeout(start + 30.0)
    pump(client, second, start + 30.0)
    assert client.events() == [PublishExpired(message_id)]
    assert client.pending_publishes == () and sent_at(second) == resent  # not re-sent at the horizon
    client.handle_timeout(start + 1000.0)
    pump(client, second, start + 1000.0)
    assert sent_at(second) == resent and client.state is ClientState.READY


def test_a_confirmed_or_cancelled_publish_has_no_horizon_left() -> None:
    client, server = ready(config=dataclasses.replace(CONFIG, publish_give_up_after=30.0))
    client.publish("t", "x", now=T0, timestamp=1)
    pump(client, server, T0)
    client.events()
    assert client.next_deadline() != T0 + 30.0
    server.confirm_publishes = False
    cancelled = client.publish("t", "y", now=T0, timestamp=1)
    pump(client, server, T0)
    client.cancel_publish(cancelled)
    client.handle_timeout(T0 + 30.0)
    assert client.events() == []


def test_an_expired_publish_fails_its_caller_with_a_publish_timeout_even_without_a_timeout() -> None:
    harness = Harness(FakeServer(confirm_publishes=False), publish_give_up_after=30.0)
    harness.dial()
    ticket = harness.app.publish("t", "x", now=harness.now, timestamp=1, timeout=None)
    harness.pump()
    harness.advance(29.0)
    assert not ticket.done
    harness.advance(1.0)
    assert isinstance(ticket.error, PublishTimeoutError) and ticket.error.message_id == ticket.message_id
    assert "publish_give_up_after (30 s)" in str(ticket.error) and harness.app.pending_publishes == 0


def test_closing_abandons_the_horizons_of_unconfirmed_publishes() -> None:
    client, server = ready(config=dataclasses.replace(CONFIG, publish_give_up_after=30.0, ping_interval=None))
    server.confirm_publishes = False
    client.publish("t", "x", now=T0, timestamp=1)
    pump(client, server, T0)
    client.close(T0)
    pump(client, server, T0)
    assert client.state is ClientState.CLOSED and client.next_deadline() is None


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["deliver", "take", "done", "fail", "remove"]), st.integers(0, 2)),
        max_size=40,
    )
)
def test_a_message_is_acked_once_exactly_when_every_consumer_it_reached_is_done_and_none_failed(
    ops: list[tuple[str, int]],
) -> None:
    harness = manual_harness()
    specs = [("t", None), ("t", print), ("t/#", print)]  # an iterator, a handler, a filter's handler
    consumers = [harness.app.subscribe(t, now=harness.now, timeout=5.0, handler=h) for t, h in specs]
    harness.pump()
    alive = [True, True, True]
    queues: list[list[str]] = [[], [], []]
    running: list[list[str]] = [[], [], []]  # taken by a handler, not yet done
    waiting: dict[str, int] = {}  # message id -> consumers not done yet
    failed: set[str] = set()
    expected: set[str] = set()

    def finish(message_id: str, ok: bool) -> None:
        if not ok:
            failed.add(message_id)
        waiting[message_id] -= 1
        if not waiting[message_id] and message_id not in failed:
            expected.add(message_id)

    for number, (op, index) in enumerate(ops):
        consumer = consumers[index]
        if op == "deliver":
            message_id = f"m{number}"
            harness.deliver(sealed_message("t", "x", message_id))
            reached = [i for i in range(3) if alive[i]]
            waiting[message_id] = len(reached)
            for i in reached:
                queues[i].append(message_id)
        elif op == "take" and alive[index] and queues[index]:
            message = harness.app.take(consumer)
            assert message is not None and message.message_id == queues[index].pop(0)
            if consumer.handler is None:
                finish(message.message_id, True)
            else:
                running[index].append(message.message_id)
        elif op in ("done", "fail") and running[index]:
            message_id = running[index].pop(0)
            harness.app.done(Message("t", "x", message_id, 0), handled=op == "done")
            finish(message_id, op == "done")
        elif op == "remove" and alive[index]:
            harness.app.remove(consumer)
            alive[index] = False
            for message_id in queues[index]:
                finish(message_id, True)
            queues[index].clear()
        harness.pump()
    acked = acks(harness.server)
    assert len(acked) == len(set(acked))  # each at most once
    assert set(acked) == expected
