"""A resumable subscriber's backlog (issue 8.3): deliveries beyond its window wait un-sent and flow as it
ACKs; resume and unsuspend re-send only the window; the backlog is bounded by the session's pending bytes
and message expiry. In memory, on a fake clock: the broker alone (``Harness``) and the whole server core
(``RawPeer``) where the output buffer matters."""

from __future__ import annotations

from typing import Any

from fastport_core.config import Limits, SlowConsumerPolicy
from fastport_core.server import ServerCore

from .test_broker import Harness, given_up, make_config
from .test_server import make_core, ready
from .wire import RawPeer


def ids(frames: list[dict[str, Any]]) -> list[str]:
    return [f["messageId"] for f in frames]


def drain_acking(h: Harness, conn: int, rounds: int = 1000) -> list[str]:
    """ACK every message ``conn`` received, as a client would, until nothing new arrives; all ids, in order."""
    acked = 0
    for _ in range(rounds):
        messages = h.messages(conn)
        if acked == len(messages):
            return ids(messages)
        for message in messages[acked:]:
            h.ack(conn, message["topic"], message["messageId"])
        acked = len(messages)
    raise AssertionError("the backlog never ran dry")


# -- the broker ------------------------------------------------------------------------------------------


def test_a_subscriber_away_for_more_than_its_window_resumes_and_gets_everything_as_it_acks() -> None:
    h = Harness(make_config(max_inflight_per_subscriber=3))
    sub = h.client("a", "t", client_id="dev")
    h.broker.connection_closed(sub, h.now)
    publisher = h.client("a")
    published = [f"m{i}" for i in range(10)]
    for mid in published:
        assert h.publish(publisher, "t", mid)["deliveredTo"] == 1
    again = h.open()
    assert h.init(again, client_id="dev")["success"] is True
    assert [(m["messageId"], m.get("retry")) for m in h.messages(again)] == [("m0", 1), ("m1", 1), ("m2", 1)]
    h.ack(again, "t", "m0")
    assert [(m["messageId"], m.get("retry")) for m in h.messages(again)][3:] == [("m3", None)]  # a first send
    assert drain_acking(h, again) == published  # in order, each once
    assert sum(given_up(h, "a", reason) for reason in ("overflow", "retries", "expired", "detached")) == 0
    stats = h.broker.stats().per_session["a"]
    assert (stats.inflight_deliveries, stats.backlogged_deliveries, stats.stored_messages) == (0, 0, 0)


def test_the_publisher_is_told_ack_received_only_once_a_backlogged_delivery_is_acked() -> None:
    h = Harness(make_config(max_inflight_per_subscriber=1))
    sub = h.client("a", "t", client_id="dev")
    publisher = h.client("a")
    h.publish(publisher, "t", "m1")
    h.publish(publisher, "t", "m2")  # waits in the backlog

    def settled() -> list[str]:
        return [f["messageId"] for c, f in h.sink.frames if c == publisher and f["type"] == "ack_received"]

    h.ack(sub, "t", "m2")  # not sent yet: an unknown ACK, it completes nothing
    assert h.metrics.value("acks_unknown", "a") == 1
    h.ack(sub, "t", "m1")
    assert settled() == ["m1"]
    h.ack(sub, "t", "m2")
    assert settled() == ["m1", "m2"]


def test_a_subscriber_resumed_at_its_cap_is_not_disconnected_by_the_next_publish() -> None:
    for policy in SlowConsumerPolicy:
        h = Harness(make_config(policy, max_inflight_per_subscriber=2))
        sub = h.client("a", "t", client_id="dev")
        h.broker.connection_closed(sub, h.now)
        publisher = h.client("a")
        for mid in ("m1", "m2"):
            h.publish(publisher, "t", mid)
        again = h.client("a", client_id="dev")  # resumed with its window full
        assert h.publish(publisher, "t", "m3")["deliveredTo"] == 1
        assert h.sink.closes == []
        assert h.metrics.value("slow_consumers", "a", policy.value) == 0
        assert given_up(h, "a", "overflow") == 0
        assert drain_acking(h, again) == ["m1", "m2", "m3"]


def test_retries_and_expiry_apply_to_the_window_and_a_freed_slot_is_filled_from_the_backlog() -> None:
    h = Harness(make_config(max_inflight_per_subscriber=2))  # SETTINGS: retry 1 s, 3 retries, expiry 100 s
    sub = h.client("a", "t", client_id="dev")
    publisher = h.client("a")
    for mid in ("m1", "m2", "m3"):
        h.publish(publisher, "t", mid)
    sent = [(m["messageId"], m.get("retry")) for m in h.messages(sub)]
    assert sent == [("m1", None), ("m2", None)]
    h.advance(3.5)  # the window is retried; the backlog is not
    sent = [(m["messageId"], m.get("retry")) for m in h.messages(sub)]
    assert sent[2:] == [("m1", 1), ("m2", 1), ("m1", 2), ("m2", 2), ("m1", 3), ("m2", 3)]
    h.advance(1.0)  # both given up after their last retry: m3 gets a slot, as a first send
    assert given_up(h, "a", "retries") == 2
    assert [(m["messageId"], m.get("retry")) for m in h.messages(sub)][8:] == [("m3", None)]
    h.publish(publisher, "t", "m4")
    h.publish(publisher, "t", "m5")  # m3 and m4 fill the window; m5 waits
    assert h.broker.stats().per_session["a"].backlogged_deliveries == 1
    h.advance(100.0)  # what retries left expires, the backlogged m5 with it
    stats = h.broker.stats().per_session["a"]
    assert (stats.inflight_deliveries, stats.backlogged_deliveries, stats.stored_messages) == (0, 0, 0)
    assert given_up(h, "a", "expired") + given_up(h, "a", "retries") == 5


def test_unsuspend_is_paced_by_the_window_like_a_resume() -> None:
    h = Harness(make_config(max_inflight_per_subscriber=2))
    sub = h.client("a", "t", client_id="dev")
    publisher = h.client("a")
    for mid in ("m1", "m2", "m3", "m4", "m5"):
        h.publish(publisher, "t", mid)
    h.broker.suspend_session("a", "pw-a", h.secrets["a"], True, h.now)
    h.ack(sub, "t", "m1")
    h.ack(sub, "t", "m2")
    assert ids(h.messages(sub)) == ["m1", "m2"]  # a suspended session sends nothing
    h.broker.suspend_session("a", "pw-a", h.secrets["a"], False, h.now)
    assert ids(h.messages(sub)) == ["m1", "m2", "m3", "m4"]  # the window, not the whole backlog
    assert drain_acking(h, sub) == ["m1", "m2", "m3", "m4", "m5"]
    assert h.broker.stats().per_session["a"].stored_messages == 0


def test_the_backlog_is_bounded_by_the_sessions_pending_bytes_disconnect_refuses_the_publish() -> None:
    h = Harness(
        make_config(
            SlowConsumerPolicy.DISCONNECT, max_inflight_per_subscriber=1, max_pending_bytes_per_session=2000
        )
    )
    sub = h.client("a", "t", client_id="dev")
    publisher = h.client("a")
    accepted = [mid for mid in ("m1", "m2", "m3", "m4", "m5") if h.publish(publisher, "t", mid)["success"]]
    assert accepted == ["m1", "m2", "m3", "m4", "m5"][: len(accepted)] and 1 < len(accepted) < 5
    refused = h.publish(publisher, "t", "late")
    assert refused["success"] is False and refused["code"] == "session_full"
    assert h.sink.closes == [] and given_up(h, "a", "overflow") == 0
    assert drain_acking(h, sub) == accepted  # nothing confirmed was lost
    assert h.publish(publisher, "t", "late")["success"] is True  # drained: room again


def test_the_backlog_bound_under_drop_oldest_sheds_the_oldest_backlogged_deliveries() -> None:
    h = Harness(
        make_config(
            SlowConsumerPolicy.DROP_OLDEST, max_inflight_per_subscriber=1, max_pending_bytes_per_session=2000
        )
    )
    sub = h.client("a", "t", client_id="dev")
    publisher = h.client("a")
    mids = [f"m{i}" for i in range(8)]
    assert all(h.publish(publisher, "t", mid)["success"] for mid in mids)  # room is made each time
    shed = int(given_up(h, "a", "overflow"))
    assert shed > 0
    assert h.broker.stats().per_session["a"].pending_bytes <= 2000
    received = drain_acking(h, sub)
    assert received[0] == "m0"  # the window is never shed: it may be on the wire
    assert received == [mids[0], *mids[1 + shed :]]  # the oldest backlogged ones went first
    assert h.sink.closes == []


def test_anonymous_subscribers_keep_the_slow_consumer_policy() -> None:
    h = Harness(make_config(SlowConsumerPolicy.DISCONNECT, max_inflight_per_subscriber=1))
    sub = h.client("a", "t")
    publisher = h.client("a")
    h.publish(publisher, "t", "m1")
    h.publish(publisher, "t", "m2")
    assert h.closes() == {sub: 4002}
    assert h.broker.stats().per_session["a"].backlogged_deliveries == 0


def test_a_released_or_forgotten_subscriber_gives_up_its_backlog_too() -> None:
    h = Harness(make_config(max_inflight_per_subscriber=1))
    sub = h.client("a", "t", client_id="dev")
    publisher = h.client("a")
    for mid in ("m1", "m2", "m3"):
        h.publish(publisher, "t", mid)
    h.broker.connection_closed(sub, h.now, clean=True)
    assert given_up(h, "a", "released") == 3
    assert h.broker.stats().per_session["a"].stored_messages == 0


# -- the server core: the output buffer ---------------------------------------------------------------------


def _acking(peer: RawPeer, now: float, rounds: int = 10_000) -> list[str]:
    """ACK like a client every message received, reading on, until nothing new arrives; the message ids
    received, in order."""
    acked = 0
    for _ in range(rounds):
        peer.pump(now)
        messages = [f for f in peer.received if f["type"] == "message"]
        if acked == len(messages):
            return ids(messages)
        for message in messages[acked:]:
            peer.send({"type": "ack", "topic": message["topic"], "messageId": message["messageId"]}, now)
        acked = len(messages)
    raise AssertionError("the backlog never ran dry")


def test_a_backlog_larger_than_the_output_buffer_resumes_without_4002() -> None:
    buffer = 64 * 1024
    core: ServerCore = make_core(ping_interval=None, limits=Limits(max_output_buffer=buffer))
    sub = ready(core, clientId="dev")
    sub.send({"type": "subscribe", "topic": "t"})
    sub.pump()
    core.connection_lost(sub.conn, 0.0)
    publisher = ready(core)
    published = [f"m{i:03}" for i in range(100)]
    for mid in published:  # ~400 KiB: six output buffers' worth
        publisher.publish("t", mid, data="x" * 4000)
        assert publisher.pump()[-1]["deliveredTo"] == 1
    again = RawPeer(core)
    again.send({"type": "init", "sessionName": "demo", "password": "pw", "clientId": "dev"})
    assert core._connections[again.conn].ws is not None
    assert core._connections[again.conn].ws.pending_bytes <= buffer  # type: ignore[union-attr]
    first = again.pump()
    assert first[0] == {"type": "init_response", "success": True, "sessionName": "demo"}
    assert 1 < len(first) < 100  # the window: bounded by bytes here, not the 1000-delivery cap
    assert _acking(again, 0.0) == published  # in order, each once
    assert core.metrics.value("output_overflows") == 0
    assert again.ws.is_open
    assert sum(core.metrics.value("deliveries_given_up", "demo", r) for r in ("overflow", "retries")) == 0
    settled = [f["messageId"] for f in publisher.pump() if f["type"] == "ack_received"]
    assert settled == published
