"""Topic filters in the broker: routing, once-per-subscriber delivery, refusals, resumption (DESIGN §10)."""

from __future__ import annotations

import pytest

from fastport_core.errors import ErrorCode
from fastport_core.protocol import Publish, Subscribe, Unsubscribe

from .test_broker import Harness


@pytest.fixture
def h() -> Harness:
    return Harness()


def topics_received(h: Harness, conn: int) -> list[str]:
    return [m["topic"] for m in h.messages(conn)]


def test_plus_matches_one_level_and_hash_the_rest_including_the_parent(h: Harness) -> None:
    plus = h.client("a", "sensors/+/temp")
    hashed = h.client("a", "sensors/#")
    publisher = h.client("a")
    for index, topic in enumerate(
        ["sensors/1/temp", "sensors/1/hum", "sensors", "sensors/1/temp/raw", "other"]
    ):
        h.publish(publisher, topic, f"m{index}")
    assert topics_received(h, plus) == ["sensors/1/temp"]
    assert topics_received(h, hashed) == ["sensors/1/temp", "sensors/1/hum", "sensors", "sensors/1/temp/raw"]


def test_overlapping_filters_deliver_once_and_one_ack_completes(h: Harness) -> None:
    subscriber = h.client("a", "s/x", "s/+", "s/#", "#")
    publisher = h.client("a")
    assert h.publish(publisher, "s/x", "m1")["deliveredTo"] == 1
    (message,) = h.messages(subscriber)
    assert message["messageId"] == "m1"
    h.ack(subscriber, "s/x", "m1")
    assert h.broker.stats().stored_messages == 0
    h.advance(10)  # no retry: the one ACK completed the one delivery
    assert len(h.messages(subscriber)) == 1


def test_exact_and_filter_subscribers_are_both_served(h: Harness) -> None:
    exact = h.client("a", "s/x")
    wild = h.client("a", "s/+")
    publisher = h.client("a", "s/#")  # the publisher's own filter does not send it its message
    assert h.publish(publisher, "s/x", "m1")["deliveredTo"] == 2
    assert topics_received(h, exact) == topics_received(h, wild) == ["s/x"]
    assert h.messages(publisher) == []


def test_unsubscribe_takes_the_filter_as_subscribed(h: Harness) -> None:
    subscriber = h.client("a", "s/+")
    publisher = h.client("a")
    assert h.send(subscriber, Unsubscribe("s/x")) == [
        {"type": "unsubscribe_response", "success": True, "topic": "s/x"}
    ]
    h.publish(publisher, "s/x", "m1")
    assert topics_received(h, subscriber) == ["s/x"]
    h.ack(subscriber, "s/x", "m1")
    h.send(subscriber, Unsubscribe("s/+"))
    h.publish(publisher, "s/x", "m2")
    assert topics_received(h, subscriber) == ["s/x"]
    assert len(h.broker._sessions["a"].filters) == 0


def test_publish_with_a_wildcard_is_refused(h: Harness) -> None:
    subscriber = h.client("a", "#")
    publisher = h.client("a")
    (response,) = h.send(publisher, Publish("s/+", "d", "h", 1, "m1"))
    assert response["success"] is False and response["code"] == ErrorCode.INVALID_TOPIC
    assert h.messages(subscriber) == []
    assert h.metrics.value("protocol_errors", "invalid_topic") == 1


@pytest.mark.parametrize("bad", ["a/#/b", "a+", "#a"])
def test_malformed_filters_are_refused(h: Harness, bad: str) -> None:
    conn = h.client("a")
    (response,) = h.send(conn, Subscribe(bad))
    assert response["success"] is False and response["code"] == ErrorCode.INVALID_FILTER
    assert response["topic"] == bad


def test_filters_count_towards_the_subscription_limit() -> None:
    from .test_broker import make_config

    h = Harness(make_config(max_subscriptions_per_connection=2))
    conn = h.client("a", "a/+", "b/#")
    (response,) = h.send(conn, Subscribe("c/+"))
    assert response["code"] == ErrorCode.TOO_MANY_SUBSCRIPTIONS


def test_a_resumable_subscriber_keeps_its_filters_across_reconnects(h: Harness) -> None:
    first = h.client("a", "s/+", client_id="c1")
    publisher = h.client("a")
    h.broker.connection_closed(first, h.now)
    h.publish(publisher, "s/x", "m1")  # recorded for the detached subscriber
    second = h.open()
    assert h.init(second, "a", client_id="c1")["success"]
    h.publish(publisher, "s/y", "m2")
    assert [(m["topic"], m["messageId"]) for m in h.messages(second)] == [("s/x", "m1"), ("s/y", "m2")]


def test_filters_are_per_session(h: Harness) -> None:
    other = h.client("b", "#")
    publisher = h.client("a")
    h.publish(publisher, "s/x", "m1")
    assert h.messages(other) == []
