"""The client core, wired in memory to a scripted server, on a fake clock.

The server side is wsproto (handshake and framing) plus a few lines of the JSON protocol: an implementation
independent of the client's own handshake and frame codec, so these tests also check that the client
speaks standard WebSocket. Time only moves when a test says so.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections.abc import Mapping
from typing import Any, get_args
from unittest.mock import ANY

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from fastport_core.client import (
    TRANSITIONS,
    AuthRefused,
    ClientCore,
    ClientEvent,
    ClientInput,
    ClientState,
    Connected,
    Disconnected,
    GaveUp,
    IntegrityFailure,
    MessageReceived,
    PublishConfirmed,
    PublishRefused,
    ServerError,
    SubscribeConfirmed,
    SubscribeRefused,
)
from fastport_core.config import ClientConfig, ServerConfig
from fastport_core.crypto import make_suite
from fastport_core.errors import InvalidKeyError, LocalProtocolError
from fastport_core.server import ServerCore

KEY = base64.b64encode(bytes(range(32))).decode("ascii")
SESSION = "fleet"
PASSWORD = "s3cret"
PING_INTERVAL = 20.0
CONFIG = ClientConfig(
    publish_retry_interval=5.0,
    ping_interval=PING_INTERVAL,
    ping_timeout=10.0,
    connect_timeout=10.0,
    reconnect_initial_delay=1.0,
    reconnect_max_delay=8.0,
)
T0 = 1000.0
INIT_ACCEPTED: Mapping[str, Any] = {"success": True, "sessionName": SESSION}
SENDER = make_suite("authenticated", KEY)


class FakeServer:
    """One server-side connection: wsproto for the WebSocket, a scripted fastport on top.

    It records every JSON frame the client sent, answers ``init`` (with ``init_answer``; ``None``: silence),
    ``subscribe``/``unsubscribe`` and (unless ``confirm_publishes`` is off) ``publish``, echoes pings and closes, and builds frames for the test to
    feed the client.
    """

    def __init__(
        self,
        *,
        init_answer: Mapping[str, Any] | None = INIT_ACCEPTED,
        confirm_publishes: bool = True,
        accept: bool = True,
    ) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.init_answer = init_answer
        self.confirm_publishes = confirm_publishes
        self.accept = accept
        self.request: Request | None = None
        self.frames: list[dict[str, Any]] = []
        self.pings = 0
        self.close_code: int | None = None

    def feed(self, data: bytes) -> bytes:
        """Bytes from the client (``b""``: EOF); returns the server's answer bytes."""
        self.ws.receive_data(data or None)
        out: list[bytes] = []
        for event in self.ws.events():
            if isinstance(event, Request):
                self.request = event
                if self.accept:
                    out.append(self.ws.send(AcceptConnection()))
                else:
                    out.append(self.ws.send(RejectConnection(status_code=401)))
            elif isinstance(event, TextMessage):
                assert event.message_finished
                frame = json.loads(event.data)
                self.frames.append(frame)
                out.extend(self.send(**answer) for answer in self._answers(frame))
            elif isinstance(event, Ping):
                self.pings += 1
                out.append(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    out.append(self.ws.send(event.response()))
        return b"".join(out)

    def _answers(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        match frame["type"]:
            case "init" if self.init_answer is not None:
                return [{"type": "init_response", **self.init_answer}]
            case "subscribe" | "unsubscribe":
                return [{"type": f"{frame['type']}_response", "success": True, "topic": frame["topic"]}]
            case "publish" if self.confirm_publishes:
                return [self.publish_response(frame["messageId"])]
        return []

    @staticmethod
    def publish_response(message_id: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": "publish_response",
            "success": True,
            "messageId": message_id,
            "deliveredTo": 1,
        } | fields

    def send(self, **frame: Any) -> bytes:
        """The bytes of one server → client JSON frame."""
        return self.ws.send(TextMessage(data=json.dumps(frame)))

    def close(self, code: int, reason: str = "") -> bytes:
        return self.ws.send(CloseConnection(code=code, reason=reason))

    def of_type(self, frame_type: str) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame["type"] == frame_type]

    def types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]


def make_client(**overrides: Any) -> ClientCore:
    options: dict[str, Any] = {
        "session": SESSION,
        "password": PASSWORD,
        "key": KEY,
        "host": "broker.example:8080",
        "target": "/ws",
        "config": CONFIG,
        "client_id": "client-1",
        "rng": random.Random(42),
    }
    return ClientCore(**(options | overrides))


def pump(client: ClientCore, server: FakeServer, now: float) -> None:
    """Move bytes both ways until the client has nothing more to say."""
    while out := client.data_to_send():
        answer = server.feed(out)
        if answer:
            client.receive_data(answer, now)


def connect(client: ClientCore, server: FakeServer, now: float = T0) -> list[ClientEvent]:
    assert client.state is ClientState.DISCONNECTED
    client.start_connection(now)
    pump(client, server, now)
    return client.events()


def ready(**overrides: Any) -> tuple[ClientCore, FakeServer]:
    client, server = make_client(**overrides), FakeServer()
    assert connect(client, server) == [Connected(SESSION)]
    assert client.state is ClientState.READY
    return client, server


def subscribe(client: ClientCore, server: FakeServer, *topics: str) -> None:
    for topic in topics:
        client.subscribe(topic)
    pump(client, server, T0)
    assert client.events() == [SubscribeConfirmed(topic) for topic in topics]


def sealed_message(topic: str, payload: str | bytes, message_id: str = "m1", **extra: Any) -> dict[str, Any]:
    """A ``message`` frame as another client of the session would have published it."""
    timestamp = 1_700_000_000_000
    sealed = SENDER.seal(session=SESSION, topic=topic, message_id=message_id, timestamp=timestamp,
                         payload=payload)  # fmt: skip
    frame = {"type": "message", "topic": topic, "data": sealed.data, "hash": sealed.hash,
             "timestamp": timestamp, "messageId": message_id}  # fmt: skip
    if sealed.encoding == "binary":
        frame["encoding"] = "binary"
    return frame | extra


def deliver(
    client: ClientCore, server: FakeServer, frame: dict[str, Any], now: float = T0
) -> list[ClientEvent]:
    client.receive_data(server.send(**frame), now)
    pump(client, server, now)
    return client.events()


def wait_for_reconnect(client: ClientCore) -> float:
    """Run the client's timers up to its reconnect time; it is then DISCONNECTED (dial now)."""
    assert client.state is ClientState.WAITING
    when = client.reconnect_at()
    assert when is not None and client.next_deadline() == when
    client.handle_timeout(when - 1e-6)
    assert client.state is ClientState.WAITING
    client.handle_timeout(when)
    assert client.state is ClientState.DISCONNECTED and client.reconnect_at() is None
    return when


# --------------------------------------------------------------------------------------------------------
# Connecting.


def test_handshake_request_then_init_with_session_password_and_client_id() -> None:
    client, server = make_client(), FakeServer()
    client.start_connection(T0)
    assert client.state is ClientState.CONNECTING
    request = client.data_to_send()
    assert request.startswith(b"GET /ws HTTP/1.1\r\n")
    assert b"host: broker.example:8080\r\n" in request.lower()
    answer = server.feed(request)
    assert server.request is not None and server.request.host == "broker.example:8080"
    assert server.request.target == "/ws"
    client.receive_data(answer, T0)
    assert client.state is ClientState.INITIALISING
    server.feed(client.data_to_send())
    assert server.frames == [  # an explicit client id asks for a persistent subscriber
        {
            "type": "init",
            "sessionName": SESSION,
            "password": PASSWORD,
            "clientId": "client-1",
            "persistent": True,
        }
    ]
    assert client.events() == []
    client.receive_data(server.send(type="init_response", success=True, sessionName=SESSION), T0)
    assert client.state is ClientState.READY
    assert client.events() == [Connected(SESSION)]
    assert not client.should_close_transport()


def test_default_client_id_is_random_and_stable_across_reconnections() -> None:
    client = make_client(client_id=None)
    assert re.fullmatch(r"[0-9a-f]{32}", client.client_id)
    assert make_client(client_id=None).client_id != client.client_id
    first, second = FakeServer(), FakeServer()
    connect(client, first)
    client.connection_lost(T0, "reset")
    connect(client, second, wait_for_reconnect(client))
    assert first.frames[0]["clientId"] == second.frames[0]["clientId"] == client.client_id
    assert "persistent" not in first.frames[0]  # a random client id is a clean session


def test_configuration_errors_raise_at_construction() -> None:
    with pytest.raises(InvalidKeyError):
        make_client(key="not a key")
    with pytest.raises(InvalidKeyError):
        make_client(key=None)
    with pytest.raises(LocalProtocolError):
        make_client(suite="rot13")
    with pytest.raises(LocalProtocolError):
        make_client(session="")
    with pytest.raises(LocalProtocolError):
        make_client(client_id="")
    with pytest.raises(LocalProtocolError):
        make_client(host="bad\r\nhost")


def test_start_connection_is_refused_while_a_connection_is_live() -> None:
    client, _ = ready()
    with pytest.raises(LocalProtocolError, match="READY"):
        client.start_connection(T0)


def test_refused_upgrade_waits_and_retries() -> None:
    client, server = make_client(), FakeServer(accept=False)
    events = connect(client, server)
    assert client.state is ClientState.WAITING
    [event] = events
    assert isinstance(event, Disconnected) and "401" in event.reason
    assert T0 <= event.reconnect_at <= T0 + CONFIG.reconnect_initial_delay
    assert client.should_close_transport()


def test_connect_timeout_cuts_a_silent_server() -> None:
    client = make_client()
    client.start_connection(T0)
    client.data_to_send()
    assert client.next_deadline() == T0 + CONFIG.connect_timeout
    client.handle_timeout(T0 + CONFIG.connect_timeout)
    [event] = client.events()
    assert isinstance(event, Disconnected) and "connect_timeout" in event.reason
    assert client.should_close_transport()


def test_connect_timeout_also_covers_a_missing_init_response() -> None:
    client, server = make_client(), FakeServer(init_answer=None)
    client.start_connection(T0)
    client.receive_data(server.feed(client.data_to_send()), T0)
    assert client.state is ClientState.INITIALISING
    server.feed(client.data_to_send())  # the init, which this server leaves unanswered
    client.handle_timeout(T0 + CONFIG.connect_timeout)
    assert client.state is ClientState.WAITING
    server.feed(client.data_to_send())
    assert server.close_code == 4005  # HANDSHAKE_TIMEOUT, sent as a courtesy before the socket closes


# --------------------------------------------------------------------------------------------------------
# Publishing.


def test_publish_before_connecting_is_sent_after_init_in_order_and_retried_until_confirmed() -> None:
    client, server = make_client(), FakeServer(confirm_publishes=False)
    ids = [client.publish("sensors/temp", f"{n} C", now=T0, timestamp=1_000 + n) for n in range(3)]
    assert client.pending_publishes == tuple(ids)
    assert client.data_to_send() == b""  # nothing goes anywhere before a connection
    assert connect(client, server) == [Connected(SESSION)]
    assert server.types() == ["init", "publish", "publish", "publish"]
    publishes = server.of_type("publish")
    assert [frame["messageId"] for frame in publishes] == ids
    first = publishes[0]
    assert first["topic"] == "sensors/temp" and first["timestamp"] == 1_000 and "encoding" not in first
    assert first["hash"].startswith("v1:")
    opened = SENDER.open(session=SESSION, topic="sensors/temp", message_id=ids[0], timestamp=1_000,
                         data=first["data"], hash=first["hash"], encoding="text")  # fmt: skip
    assert opened == "0 C"

    # Unconfirmed: re-sent, same bytes and ids, same order, every publish_retry_interval.
    retry_at = T0 + CONFIG.publish_retry_interval
    assert client.next_deadline() == retry_at
    client.handle_timeout(retry_at - 0.001)
    assert client.data_to_send() == b""
    client.handle_timeout(retry_at)
    pump(client, server, retry_at)
    assert [frame["messageId"] for frame in server.of_type("publish")] == ids * 2
    assert server.of_type("publish")[3:] == publishes

    # Confirmed: reported once, and no more retries.
    answers = b"".join(
        server.send(**FakeServer.publish_response(mid, deliveredTo=n)) for n, mid in enumerate(ids)
    )
    client.receive_data(answers, retry_at)
    assert client.events() == [PublishConfirmed(mid, n) for n, mid in enumerate(ids)]
    assert client.pending_publishes == ()
    client.handle_timeout(retry_at + 60.0)
    pump(client, server, retry_at + 60.0)
    assert len(server.of_type("publish")) == 6
    # A second confirmation (of a retry the server deduplicated) is ignored.
    client.receive_data(server.send(**FakeServer.publish_response(ids[0])), retry_at)
    assert client.events() == []


def test_publish_while_ready_goes_out_at_once() -> None:
    client, server = ready()
    message_id = client.publish("t", b"\x00\xff", now=T0, timestamp=5)
    pump(client, server, T0)
    [frame] = server.of_type("publish")
    assert frame["messageId"] == message_id and frame["encoding"] == "binary"
    assert client.events() == [PublishConfirmed(message_id, 1)]


def test_refused_publish_is_reported_and_dropped() -> None:
    client, server = ready(config=CONFIG)
    server.confirm_publishes = False
    message_id = client.publish("t", "x", now=T0, timestamp=1)
    pump(client, server, T0)
    refusal = FakeServer.publish_response(message_id, success=False, error="no", code="not_allowed")
    client.receive_data(server.send(**refusal), T0)
    assert client.events() == [PublishRefused(message_id, "no", "not_allowed")]
    assert client.pending_publishes == () and client.next_deadline() == T0 + PING_INTERVAL


@pytest.mark.parametrize("code", ["session_full", "session_suspended"])
def test_a_passing_refusal_keeps_the_publish_and_retries_it(code: str) -> None:
    """Suspended or full sessions recover: the publish is retried until confirmed (or cancelled)."""
    client, server = ready(config=CONFIG)
    server.confirm_publishes = False
    message_id = client.publish("t", "x", now=T0, timestamp=1)
    pump(client, server, T0)
    refusal = FakeServer.publish_response(message_id, success=False, error="later", code=code)
    client.receive_data(server.send(**refusal), T0)
    assert client.events() == []
    assert client.pending_publishes == (message_id,)
    client.handle_timeout(T0 + CONFIG.publish_retry_interval)
    pump(client, server, T0 + CONFIG.publish_retry_interval)
    assert [frame["messageId"] for frame in server.of_type("publish")] == [message_id, message_id]
    client.receive_data(
        server.send(**FakeServer.publish_response(message_id)), T0 + CONFIG.publish_retry_interval
    )
    assert client.events() == [PublishConfirmed(message_id, 1)]


def test_cancel_publish_stops_retries() -> None:
    client, server = ready()
    server.confirm_publishes = False
    keep = client.publish("t", "keep", now=T0, timestamp=1)
    drop = client.publish("t", "drop", now=T0, timestamp=2)
    pump(client, server, T0)
    client.cancel_publish(drop)
    client.cancel_publish("unknown-id")
    assert client.pending_publishes == (keep,)
    client.handle_timeout(T0 + CONFIG.publish_retry_interval)
    pump(client, server, T0)
    assert [frame["messageId"] for frame in server.of_type("publish")] == [keep, drop, keep]
    # A late answer for the cancelled publish produces no event.
    client.receive_data(server.send(**FakeServer.publish_response(drop)), T0)
    assert client.events() == []


def test_publish_argument_and_state_checks() -> None:
    client = make_client(config=ClientConfig(max_pending_publishes=2, max_message_size=2048))
    for topic in ("", "x" * 257, "\ud800", 7):
        with pytest.raises(LocalProtocolError):
            client.publish(topic, "p", now=T0, timestamp=1)  # type: ignore[arg-type]
    for timestamp in (-1, 1.5, True, 2**53):
        with pytest.raises(LocalProtocolError, match="timestamp"):
            client.publish("t", "p", now=T0, timestamp=timestamp)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="payload"):
        client.publish("t", 12, now=T0, timestamp=1)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="max_message_size"):
        client.publish("t", "x" * 2000, now=T0, timestamp=1)
    client.publish("t", "1", now=T0, timestamp=1)
    client.publish("t", "2", now=T0, timestamp=1)
    with pytest.raises(LocalProtocolError, match="2 publishes"):
        client.publish("t", "3", now=T0, timestamp=1)
    assert len(client.pending_publishes) == 2
    client.close(T0)
    with pytest.raises(LocalProtocolError, match="closed"):
        client.publish("t", "4", now=T0, timestamp=1)
    with pytest.raises(LocalProtocolError, match="closed"):
        client.subscribe("t")


def test_published_payload_round_trips_to_another_client_through_the_wire() -> None:
    alice, alice_server = ready(client_id="alice")
    bob, bob_server = ready(client_id="bob")
    subscribe(bob, bob_server, "chat")
    for payload in ("héllo", b"\x00binary\xff"):
        alice.publish("chat", payload, now=T0, timestamp=42)
        pump(alice, alice_server, T0)
        publish = alice_server.of_type("publish")[-1]
        relayed = {key: value for key, value in publish.items() if key != "type"} | {"type": "message"}
        events = deliver(bob, bob_server, relayed)
        assert events == [MessageReceived("chat", payload, publish["messageId"], 42)]


# --------------------------------------------------------------------------------------------------------
# Receiving.


def test_message_is_verified_decrypted_acked_and_delivered_once() -> None:
    client, server = ready()
    subscribe(client, server, "sensors/temp")
    frame = sealed_message("sensors/temp", "24.5C", "m1")
    assert deliver(client, server, frame) == [
        MessageReceived("sensors/temp", "24.5C", "m1", frame["timestamp"])
    ]
    assert server.of_type("ack") == [{"type": "ack", "topic": "sensors/temp", "messageId": "m1"}]
    # The server's retry (our ACK crossed it) is ACKed again but not delivered again.
    assert deliver(client, server, frame | {"retry": 1}) == []
    assert len(server.of_type("ack")) == 2
    # The same id on another topic is another message.
    subscribe(client, server, "other")
    assert deliver(client, server, sealed_message("other", "x", "m1")) == [
        MessageReceived("other", "x", "m1", frame["timestamp"])
    ]


def test_binary_message_is_delivered_as_bytes() -> None:
    client, server = ready()
    subscribe(client, server, "blobs")
    [event] = deliver(client, server, sealed_message("blobs", b"\x00\x01\xfe"))
    assert isinstance(event, MessageReceived) and event.payload == b"\x00\x01\xfe"


def test_tampered_message_is_acked_counted_and_not_delivered() -> None:
    client, server = ready()
    subscribe(client, server, "t")
    genuine = sealed_message("t", "pay me 10", "m1")
    forgeries = [
        genuine | {"topic": "t", "timestamp": genuine["timestamp"] + 1},  # replayed under another time
        genuine | {"hash": "v1:" + "0" * 64},
        genuine | {"data": "AAAA:BBBB"},
        sealed_message("t", "x", "m1") | {"hash": base64.b16encode(b"x" * 32).decode().lower()},
    ]
    for forgery in forgeries:
        [event] = deliver(client, server, forgery)
        assert isinstance(event, IntegrityFailure) and (event.topic, event.message_id) == ("t", "m1")
    assert len(server.of_type("ack")) == len(forgeries)
    assert client.metrics.value("integrity_failures") == len(forgeries)
    # A forged copy does not shadow the genuine message that follows with the same id.
    assert deliver(client, server, genuine) == [MessageReceived("t", "pay me 10", "m1", genuine["timestamp"])]


def test_message_for_an_unsubscribed_topic_is_acked_and_dropped() -> None:
    client, server = ready()
    subscribe(client, server, "t")
    client.unsubscribe("t")
    pump(client, server, T0)
    assert client.topics == ()
    assert server.types()[-1] == "unsubscribe"
    assert deliver(client, server, sealed_message("t", "late")) == []
    assert server.of_type("ack") == [{"type": "ack", "topic": "t", "messageId": "m1"}]


def test_error_frames_are_events_not_fatal() -> None:
    client, server = ready()
    events = deliver(client, server, {"type": "error", "error": "unknown frame type", "code": "unknown_type"})
    assert events == [ServerError("unknown frame type", "unknown_type")]
    assert client.state is ClientState.READY


def test_ack_received_from_the_server_is_ignored_quietly() -> None:
    """The server tells publishers ``ack_received`` for the original's clients; ours need nothing from it."""
    client, server = ready()
    message_id = client.publish("t", "x", now=T0, timestamp=5)
    pump(client, server, T0)
    client.events()
    client.receive_data(server.send(type="ack_received", messageId=message_id, topic="t"), T0)
    assert client.events() == [] and client.state is ClientState.READY
    assert client.metrics.total("protocol_errors") == 0


def test_invalid_and_binary_server_frames_are_counted_and_ignored() -> None:
    client, server = ready()
    client.receive_data(server.send(type="message", topic="t"), T0)  # missing fields
    client.receive_data(server.ws.send(TextMessage(data="not json")), T0)
    client.receive_data(server.ws.send(BytesMessage(data=b"\x01")), T0)
    assert client.events() == [] and client.state is ClientState.READY
    assert client.metrics.value("protocol_errors", "invalid_frame") == 1
    assert client.metrics.value("protocol_errors", "invalid_json") == 1
    assert client.metrics.value("binary_frames") == 1


# --------------------------------------------------------------------------------------------------------
# Subscriptions.


def test_refused_subscription_is_forgotten() -> None:
    client, server = ready()
    client.subscribe("t")
    client.receive_data(server.send(type="subscribe_response", success=False, topic="t", error="too many",
                                    code="too_many_subscriptions"), T0)  # fmt: skip
    assert client.events() == [SubscribeRefused("t", "too many", "too_many_subscriptions")]
    assert client.topics == ()


def test_a_refusal_answered_before_a_later_subscribe_does_not_drop_the_topic() -> None:
    client, server = ready()
    client.subscribe("t")
    client.unsubscribe("t")
    client.subscribe("t")
    refusal = server.send(type="subscribe_response", success=False, topic="t", error="no", code="too_long")
    client.receive_data(refusal, T0)
    assert client.topics == ("t",)  # the last request (a subscribe) is still unanswered
    client.receive_data(server.send(type="unsubscribe_response", success=True, topic="t"), T0)
    client.receive_data(server.send(type="subscribe_response", success=True, topic="t"), T0)
    assert client.topics == ("t",)
    assert client.events() == [SubscribeRefused("t", "no", "too_long"), SubscribeConfirmed("t")]


def test_subscribe_while_disconnected_is_sent_after_init_and_unsubscribe_is_local() -> None:
    client, server = make_client(), FakeServer()
    client.subscribe("a")
    client.subscribe("b")
    client.subscribe("c")
    client.unsubscribe("b")
    client.unsubscribe("never")
    assert client.topics == ("a", "c")
    assert connect(client, server) == [Connected(SESSION), SubscribeConfirmed("a"), SubscribeConfirmed("c")]
    assert server.types() == ["init", "subscribe", "subscribe"]
    assert [frame["topic"] for frame in server.of_type("subscribe")] == ["a", "c"]


# --------------------------------------------------------------------------------------------------------
# Reconnecting.


def test_reconnect_reinits_resubscribes_and_resends_unconfirmed_publishes_in_order() -> None:
    client, first = ready()
    first.confirm_publishes = False
    client.subscribe("b")
    client.subscribe("a")
    ids = [client.publish("a", str(n), now=T0, timestamp=n) for n in range(3)]
    pump(client, first, T0)
    client.receive_data(first.send(**FakeServer.publish_response(ids[1])), T0)
    client.events()

    client.connection_lost(T0 + 1, "connection reset by peer")
    [event] = client.events()
    assert isinstance(event, Disconnected) and event.reason == "connection lost: connection reset by peer"
    assert client.state is ClientState.WAITING and client.should_close_transport()
    assert client.data_to_send() == b""
    assert client.pending_publishes == (ids[0], ids[2])
    when = wait_for_reconnect(client)

    second = FakeServer()
    assert connect(client, second, when) == [
        Connected(SESSION),
        SubscribeConfirmed("b"),
        SubscribeConfirmed("a"),
        PublishConfirmed(ids[0], 1),
        PublishConfirmed(ids[2], 1),
    ]
    assert second.types() == ["init", "subscribe", "subscribe", "publish", "publish"]
    assert [frame["topic"] for frame in second.of_type("subscribe")] == ["b", "a"]
    assert [frame["messageId"] for frame in second.of_type("publish")] == [ids[0], ids[2]]
    assert second.of_type("publish") == [first.of_type("publish")[0], first.of_type("publish")[2]]


def test_a_topic_dropped_while_disconnected_is_unsubscribed_on_the_next_connection() -> None:
    """A server that resumes the client id still routes the topics of the last connection to it."""
    client, first = ready()
    subscribe(client, first, "keep", "drop", "back")
    client.connection_lost(T0)
    client.unsubscribe("drop")
    client.unsubscribe("back")
    client.subscribe("back")
    second = FakeServer()
    connect(client, second, wait_for_reconnect(client))
    requests = [(frame["type"], frame["topic"]) for frame in second.frames[1:]]
    assert requests == [("unsubscribe", "drop"), ("subscribe", "keep"), ("subscribe", "back")]
    assert client.topics == ("keep", "back")
    client.connection_lost(T0)
    third = FakeServer()
    connect(client, third, wait_for_reconnect(client))
    assert third.types() == ["init", "subscribe", "subscribe"]  # said once is enough


def test_eof_and_server_close_lead_to_reconnection() -> None:
    client, server = ready()
    client.receive_data(b"", T0)
    [event] = client.events()
    assert isinstance(event, Disconnected) and "1006" in event.reason
    connect(client, server := FakeServer(), wait_for_reconnect(client))
    client.receive_data(server.close(1001, "server shutting down"), T0 + 50)
    assert client.events() == [Disconnected("connection closed (1001: server shutting down)", ANY)]
    server.feed(client.data_to_send())  # the client echoed the close
    assert server.ws.state is ConnectionState.CLOSED
    assert client.should_close_transport() and client.state is ClientState.WAITING


def test_replaced_client_id_is_fatal() -> None:
    client, server = ready()
    client.receive_data(server.close(4003, "replaced"), T0)
    [event] = client.events()
    assert isinstance(event, GaveUp) and "client-1" in event.reason
    assert client.state is ClientState.CLOSED and client.next_deadline() is None


def test_keepalive_pings_an_idle_server_and_reconnects_when_it_is_dead() -> None:
    client, server = ready()
    ping_at = T0 + PING_INTERVAL
    assert client.next_deadline() == ping_at
    # A live server answers the ping: the connection stays.
    client.handle_timeout(ping_at)
    pump(client, server, ping_at)
    assert server.pings == 1 and client.state is ClientState.READY
    # A dead one does not: after ping_timeout the connection is dropped and the client backs off.
    second_ping = ping_at + PING_INTERVAL
    client.handle_timeout(second_ping)
    assert server.feed(client.data_to_send()) != b""  # the pong we never deliver
    assert client.next_deadline() == second_ping + CONFIG.ping_timeout
    client.handle_timeout(second_ping + CONFIG.ping_timeout)
    [event] = client.events()
    assert isinstance(event, Disconnected) and "4004" in event.reason
    assert client.state is ClientState.WAITING and client.should_close_transport()


def test_publish_retries_stop_while_disconnected_and_resume_on_reconnect() -> None:
    client, server = ready()
    server.confirm_publishes = False
    message_id = client.publish("t", "x", now=T0, timestamp=1)
    pump(client, server, T0)
    client.connection_lost(T0 + 1)
    assert client.next_deadline() == client.reconnect_at()  # no retry timer without a connection
    when = wait_for_reconnect(client)
    second = FakeServer(confirm_publishes=False)
    connect(client, second, when)
    assert [frame["messageId"] for frame in second.of_type("publish")] == [message_id]
    assert client.next_deadline() == when + CONFIG.publish_retry_interval


def test_backoff_grows_across_failed_attempts_and_resets_after_a_successful_init() -> None:
    client = make_client(rng=random.Random(3))
    now = T0
    delays = []
    for _ in range(6):
        client.start_connection(now)
        client.connection_lost(now, "refused")
        [event] = client.events()
        assert isinstance(event, Disconnected)
        delays.append(event.reconnect_at - now)
        now = wait_for_reconnect(client)
    caps = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(0.0 <= delay <= cap for delay, cap in zip(delays, caps, strict=True))
    assert max(delays[3:]) > CONFIG.reconnect_initial_delay  # it did grow
    connect(client, FakeServer(), now)
    for _ in range(20):  # after a success, each first failure waits at most the initial delay again
        client.connection_lost(now)
        [event] = client.events()
        assert isinstance(event, Disconnected) and event.reconnect_at - now <= CONFIG.reconnect_initial_delay
        now = wait_for_reconnect(client)
        connect(client, FakeServer(), now)


def test_gives_up_after_reconnect_give_up_after_of_continuous_failure() -> None:
    config = ClientConfig(reconnect_initial_delay=1.0, reconnect_max_delay=4.0, reconnect_give_up_after=30.0)
    client = make_client(config=config)
    now = T0
    while client.state is not ClientState.CLOSED:
        client.start_connection(now)
        client.connection_lost(now, "connection refused")
        *_, event = client.events()
        if isinstance(event, Disconnected):
            assert event.reconnect_at <= T0 + 30.0
            now = wait_for_reconnect(client)
    assert isinstance(event, GaveUp) and "connection refused" in event.reason
    assert now == T0 + 30.0  # the last attempt happened at the horizon, not after it
    assert client.next_deadline() is None and client.should_close_transport()


# --------------------------------------------------------------------------------------------------------
# Refused init.


def test_wrong_password_is_fatal_not_an_endless_retry_loop() -> None:
    server = FakeServer(
        init_answer={"success": False, "error": "authentication failed", "code": "auth_failed"}
    )
    client = make_client()
    events = connect(client, server)
    assert events == [
        AuthRefused("authentication failed", "auth_failed"),
        GaveUp("init refused: authentication failed (auth_failed)"),
    ]
    assert client.state is ClientState.CLOSED
    assert server.close_code == 1000  # the client said goodbye before leaving
    assert client.should_close_transport() and client.next_deadline() is None
    with pytest.raises(LocalProtocolError):
        client.start_connection(T0)


def test_an_old_server_refusal_without_a_code_is_fatal() -> None:
    client = make_client()
    events = connect(client, FakeServer(init_answer={"success": False, "error": "Invalid credentials"}))
    assert events[0] == AuthRefused("Invalid credentials", None) and isinstance(events[1], GaveUp)


@pytest.mark.parametrize("code", ["auth_throttled", "session_suspended", "too_many_connections"])
def test_transient_init_refusals_are_retried_with_backoff(code: str) -> None:
    client = make_client()
    events = connect(client, FakeServer(init_answer={"success": False, "error": "later", "code": code}))
    assert events[0] == AuthRefused("later", code)
    assert isinstance(events[1], Disconnected) and client.state is ClientState.WAITING


def test_an_error_frame_answering_init_is_a_refusal() -> None:
    client = make_client()
    client.start_connection(T0)
    server = FakeServer()
    client.receive_data(server.feed(client.data_to_send()), T0)
    server.feed(client.data_to_send())
    client.receive_data(server.send(type="error", error="password too long", code="too_long"), T0)
    assert client.events() == [
        AuthRefused("password too long", "too_long"),
        GaveUp("init refused: password too long (too_long)"),
    ]


# --------------------------------------------------------------------------------------------------------
# Closing.


def test_close_sends_1000_waits_for_the_answer_and_never_reconnects() -> None:
    client, server = ready()
    subscribe(client, server, "t")
    client.close(T0 + 1)
    assert client.state is ClientState.CLOSED
    assert not client.should_close_transport()  # the closing handshake is under way
    # A message that crossed our Close is neither delivered nor ACKed.
    client.receive_data(server.send(**sealed_message("t", "late")), T0 + 1)
    answer = server.feed(client.data_to_send())
    assert server.close_code == 1000
    client.receive_data(answer, T0 + 1)
    assert client.data_to_send() == b""
    assert client.should_close_transport()
    assert client.events() == [] and client.next_deadline() is None and server.of_type("ack") == []
    client.close(T0 + 2)  # idempotent
    client.connection_lost(T0 + 2)
    assert client.events() == [] and client.state is ClientState.CLOSED


def test_a_transport_lost_during_the_closing_handshake_ends_it_quietly() -> None:
    client, _ = ready()
    client.close(T0)
    client.connection_lost(T0, "reset")
    assert client.events() == [] and client.state is ClientState.CLOSED
    assert client.data_to_send() != b""  # the Close frame, for an adapter that still has a socket
    assert client.should_close_transport() and client.next_deadline() is None


def test_close_gives_up_waiting_for_a_silent_server() -> None:
    client, server = ready()
    client.close(T0)
    server.feed(client.data_to_send())
    assert client.next_deadline() is not None
    deadline = client.next_deadline()
    assert deadline is not None
    client.handle_timeout(deadline)
    assert client.should_close_transport() and client.next_deadline() is None


@pytest.mark.parametrize("state", [ClientState.DISCONNECTED, ClientState.CONNECTING, ClientState.WAITING])
def test_close_without_a_websocket_just_drops_the_transport(state: ClientState) -> None:
    client = make_client()
    if state is not ClientState.DISCONNECTED:
        client.start_connection(T0)
    if state is ClientState.WAITING:
        client.connection_lost(T0)
    assert client.state is state
    client.close(T0)
    assert client.state is ClientState.CLOSED
    assert client.data_to_send() == b"" and client.should_close_transport() and client.next_deadline() is None


# --------------------------------------------------------------------------------------------------------
# Robustness and the transition table.


server_frames = st.one_of(
    st.builds(dict, type=st.sampled_from(["init_response", "subscribe_response", "unsubscribe_response"]),
              success=st.booleans(), topic=st.sampled_from(["t", "u"]), error=st.text(max_size=5),
              code=st.sampled_from(["auth_failed", "auth_throttled", "too_long"])),
    st.builds(dict, type=st.just("publish_response"), success=st.booleans(), messageId=st.text(max_size=4),
              deliveredTo=st.integers(0, 3)),
    st.builds(lambda topic, payload, mid, retry: sealed_message(topic, payload, mid, retry=retry),
              st.sampled_from(["t", "u"]), st.text(max_size=5) | st.binary(max_size=5),
              st.sampled_from(["m1", "m2"]), st.integers(0, 2)),
    st.builds(dict, type=st.just("error"), error=st.text(max_size=5), code=st.text(max_size=5)),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5) | st.none(), max_size=4),
)  # fmt: skip
steps = st.one_of(
    st.tuples(st.just("frame"), server_frames),
    st.tuples(st.just("garbage"), st.binary(max_size=40)),
    st.tuples(st.just("time"), st.floats(min_value=0.0, max_value=40.0)),
    st.tuples(st.just("eof"), st.none()),
    st.tuples(st.just("publish"), st.sampled_from(["t", "u"])),
)


@settings(max_examples=300)
@given(upgrade_first=st.booleans(), steps=st.lists(steps, max_size=25))
def test_no_server_input_makes_the_client_raise(upgrade_first: bool, steps: list[tuple[str, Any]]) -> None:
    """Whatever the server sends, and whenever, ``receive_data``/``handle_timeout`` never raise and the
    client stays in a coherent state, with events of the documented types only."""
    client, server = make_client(), FakeServer()
    client.subscribe("t")
    now = T0
    client.start_connection(now)
    if upgrade_first:
        client.receive_data(server.feed(client.data_to_send()), now)
    for kind, value in steps:
        if client.state is ClientState.DISCONNECTED:
            client.start_connection(now)
            server = FakeServer()
            client.receive_data(server.feed(client.data_to_send()), now)
        match kind:
            case "frame" if server.ws.state is ConnectionState.OPEN:
                client.receive_data(server.send(**value), now)
            case "garbage":
                client.receive_data(value, now)
            case "time":
                now += value
                client.handle_timeout(now)
            case "eof":
                client.receive_data(b"", now)
            case "publish" if client.state is not ClientState.CLOSED:
                client.publish(value, "x", now=now, timestamp=1)
        out = client.data_to_send()
        if out and server.ws.state is not ConnectionState.CLOSED:
            server.feed(out)
        assert isinstance(out, bytes)
        for event in client.events():
            assert type(event) in get_args(ClientEvent)
        deadline = client.next_deadline()
        assert deadline is None or deadline > now or (deadline == now and kind != "time")
        if client.state is ClientState.WAITING:
            assert client.should_close_transport() and deadline == client.reconnect_at()


def test_every_state_is_reachable_and_only_closed_is_final() -> None:
    reachable = {ClientState.DISCONNECTED}
    while True:
        more = {new for (old, _), new in TRANSITIONS.items() if old in reachable} - reachable
        if not more:
            break
        reachable |= more
    assert reachable == set(ClientState)
    assert {old for old, _ in TRANSITIONS} == set(ClientState) - {ClientState.CLOSED}
    assert {event for _, event in TRANSITIONS} == set(ClientInput)


# --------------------------------------------------------------------------------------------------------
# Against the real server core, in memory.


class Network:
    """Clients wired to one :class:`ServerCore`, bytes moved until every side is quiet."""

    def __init__(self) -> None:
        self.server = ServerCore(ServerConfig(password_hash_cost=2))
        self.server.create_session(SESSION, PASSWORD, T0)
        self.links: dict[int, ClientCore] = {}

    def dial(self, client: ClientCore, now: float) -> int:
        client.start_connection(now)
        conn = self.server.open_connection(now, "peer")
        self.links[conn] = client
        self.pump(now)
        return conn

    def cut(self, conn: int, now: float) -> None:
        self.links.pop(conn).connection_lost(now, "cable cut")
        self.server.connection_lost(conn, now)

    def pump(self, now: float) -> None:
        moved = True
        while moved:
            moved = False
            for conn, client in list(self.links.items()):
                if data := client.data_to_send():
                    self.server.receive_data(conn, data, now)
                    moved = True
            for conn in self.server.take_dirty():
                if (data := self.server.data_to_send(conn)) and conn in self.links:
                    self.links[conn].receive_data(data, now)
                    moved = True


def test_publish_subscribe_and_resume_through_the_real_server_core() -> None:
    net = Network()
    alice, bob = make_client(client_id="alice"), make_client(client_id="bob")
    net.dial(alice, T0)
    bob_conn = net.dial(bob, T0)
    bob.subscribe("chat")
    net.pump(T0)
    assert alice.events() == [Connected(SESSION)]
    assert bob.events() == [Connected(SESSION), SubscribeConfirmed("chat")]

    first = alice.publish("chat", "hello", now=T0, timestamp=1)
    second = alice.publish("chat", b"\x00\x01", now=T0, timestamp=2)
    net.pump(T0)
    assert alice.events() == [PublishConfirmed(first, 1), PublishConfirmed(second, 1)]
    assert bob.events() == [
        MessageReceived("chat", "hello", first, 1),
        MessageReceived("chat", b"\x00\x01", second, 2),
    ]

    # Bob's cable is cut; a message published meanwhile reaches him when he resumes his client id.
    net.cut(bob_conn, T0 + 1)
    [event] = bob.events()
    assert isinstance(event, Disconnected)
    third = alice.publish("chat", "while you were away", now=T0 + 1, timestamp=3)
    net.pump(T0 + 1)
    assert alice.events() == [PublishConfirmed(third, 1)]  # a detached subscriber still counts
    net.dial(bob, wait_for_reconnect(bob))
    assert bob.events() == [
        Connected(SESSION),
        MessageReceived("chat", "while you were away", third, 3),
        SubscribeConfirmed("chat"),
    ]
    # Bob ACKed it: the server's retry timer finds nothing more to send him.
    net.server.handle_timeout(T0 + 3600)
    net.pump(T0 + 3600)
    assert [event for event in bob.events() if isinstance(event, MessageReceived)] == []
