"""The broker's guarantees (DESIGN §3), each shown on a recorder of its output with a fake clock."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastport_core.accounting import MESSAGE_OVERHEAD, message_size
from fastport_core.broker import (
    AccessDeniedError,
    Broker,
    SessionExistsError,
    UnknownSessionError,
    _encode_ack_received,
    _encode_publish_ok,
)
from fastport_core.config import Limits, ServerConfig, SessionSettings, SlowConsumerPolicy
from fastport_core.errors import CloseCode, ErrorCode, LocalProtocolError
from fastport_core.frames import encode_text_frame
from fastport_core.metrics import Metrics
from fastport_core.protocol import (
    Ack,
    AckReceived,
    ClientPacket,
    Init,
    MessagePacket,
    Publish,
    PublishResponse,
    Subscribe,
    Unsubscribe,
    encode,
)

SETTINGS = SessionSettings(retry_interval=1.0, max_retry_limit=3, message_expiry_time=100.0)


def unframe(frame: bytes) -> bytes:
    """The payload of one unmasked server text frame (what ``send_frame`` carries)."""
    assert frame[0] == 0x81 and not frame[1] & 0x80
    length = frame[1]
    start = 2 if length < 126 else 4 if length == 126 else 10
    return frame[start:]


class Recorder:
    """Records what the broker queued on its output, decoded, per connection (as the server core would
    apply it: the output is drained, and cleared, whenever the recorder is looked at)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._frames: list[tuple[int, dict[str, Any]]] = []
        self._raw_frames: list[tuple[int, bytes]] = []
        self._closes: list[tuple[int, int, str]] = []
        self._initialised: list[int] = []

    def _drain(self) -> None:
        output = self.broker.output
        for conn, frame in output.frames:
            self._raw_frames.append((conn, frame))
            self._frames.append((conn, orjson.loads(unframe(frame))))
        self._closes.extend((conn, int(code), reason) for conn, code, reason in output.closes)
        self._initialised.extend(output.initialised)
        output.clear()

    @property
    def frames(self) -> list[tuple[int, dict[str, Any]]]:
        self._drain()
        return self._frames

    @property
    def raw_frames(self) -> list[tuple[int, bytes]]:
        self._drain()
        return self._raw_frames

    @property
    def closes(self) -> list[tuple[int, int, str]]:
        self._drain()
        return self._closes

    @property
    def initialised(self) -> list[int]:
        self._drain()
        return self._initialised


class Harness:
    """A broker with two sessions ("a" and "b") on a recording sink and a fake clock."""

    def __init__(self, config: ServerConfig | None = None, settings: SessionSettings = SETTINGS) -> None:
        self.config = config or make_config()
        self.broker = Broker(self.config, random=random.Random(7).randbytes)
        self.sink = Recorder(self.broker)
        self.now = 0.0
        self.secrets = {
            name: self.broker.create_session(name, f"pw-{name}", self.now, settings) for name in ("a", "b")
        }
        self._next_conn = 0

    @property
    def metrics(self) -> Metrics:
        return self.broker.metrics

    def open(self, peer: str = "") -> int:
        self._next_conn += 1
        self.broker.connection_opened(self._next_conn, self.now, peer)
        return self._next_conn

    def send(self, conn: int, frame: ClientPacket) -> list[dict[str, Any]]:
        """Hand ``frame`` to the broker; returns what ``conn`` itself got back."""
        mark = len(self.sink.frames)
        self.broker.handle_packet(conn, frame, self.now)
        return [f for c, f in self.sink.frames[mark:] if c == conn]

    def init(
        self,
        conn: int,
        session: str = "a",
        *,
        client_id: str | None = None,
        password: str = "",
        persistent: bool = False,
    ) -> dict[str, Any]:
        """Returns the ``init_response`` (a resumed subscriber's re-sends follow it)."""
        init = Init(session, password or f"pw-{session}", client_id, persistent)
        response, *_resent = self.send(conn, init)
        assert response["type"] == "init_response"
        return response

    def client(
        self, session: str = "a", *topics: str, client_id: str | None = None, persistent: bool = False
    ) -> int:
        conn = self.open()
        assert self.init(conn, session, client_id=client_id, persistent=persistent)["success"]
        for topic in topics:
            assert self.send(conn, Subscribe(topic)) == [
                {"type": "subscribe_response", "success": True, "topic": topic}
            ]
        return conn

    def publish(self, conn: int, topic: str, message_id: str, data: str = "payload") -> dict[str, Any]:
        responses = [
            f
            for f in self.send(conn, Publish(topic, data, "h", 1, message_id))
            if f["type"] == "publish_response"
        ]
        (response,) = responses
        return response

    def ack(self, conn: int, topic: str, message_id: str) -> None:
        """ACK; nothing answers it (backlogged messages it makes room for are sent: see ``messages``)."""
        assert [f for f in self.send(conn, Ack(topic, message_id)) if f["type"] != "message"] == []

    def messages(self, conn: int) -> list[dict[str, Any]]:
        """The ``message`` frames ``conn`` received so far (all of them, in order)."""
        return [f for c, f in self.sink.frames if c == conn and f["type"] == "message"]

    def advance(self, seconds: float) -> None:
        """Let time pass, calling ``handle_timeout`` at each deadline the broker asks for (like an adapter)."""
        end = self.now + seconds
        for _ in range(10_000):  # a deadline that never moves on would be a bug, not a hang
            deadline = self.broker.next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            self.broker.handle_timeout(self.now)
        else:
            raise AssertionError("the broker keeps asking for the same deadline")
        self.now = end

    def closes(self) -> dict[int, int]:
        return {conn: code for conn, code, _ in self.sink.closes}


def make_config(policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT, **limits: int) -> ServerConfig:
    return ServerConfig(limits=Limits(**limits), slow_consumer_policy=policy, password_hash_cost=2)


def given_up(h: Harness, session: str, reason: str) -> int:
    return int(h.metrics.value("deliveries_given_up", session, reason))


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts scrypt runs (one entry per call) from here on."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


# -- init -------------------------------------------------------------------------------------------------


def test_init_succeeds_with_the_session_name(h: Harness) -> None:
    conn = h.open()
    assert h.init(conn) == {"type": "init_response", "success": True, "sessionName": "a"}
    assert h.metrics.value("inits", "a") == 1


def test_unknown_session_and_wrong_password_are_indistinguishable(h: Harness) -> None:
    unknown = h.init(h.open(), "nope", password="pw-a")
    wrong = h.init(h.open(), "a", password="wrong")
    assert unknown == wrong
    assert unknown["success"] is False and unknown["code"] == ErrorCode.AUTH_FAILED
    assert h.metrics.value("auth_failures", "auth_failed") == 2


def test_unknown_session_pays_scrypt_like_a_wrong_password(h: Harness, scrypt_calls: list[int]) -> None:
    h.init(h.open(), "nope", password="x")  # the first also creates the decoy hash
    for session in ("a", "nope", "a", "nope"):
        scrypt_calls.clear()
        h.init(h.open(), session, password="wrong")
        assert len(scrypt_calls) == 1


def test_second_init_is_refused_and_the_connection_stays_in_its_session(h: Harness) -> None:
    conn = h.client("a", "t")
    assert h.send(conn, Init("b", "pw-b")) == [
        {"type": "error", "error": "already in session 'a'", "code": "already_initialised"}
    ]
    assert h.metrics.value("protocol_errors", "already_initialised") == 1
    in_b = h.client("b")
    h.publish(in_b, "t", "m1")
    assert h.messages(conn) == []  # not routed from b
    in_a = h.client("a")
    h.publish(in_a, "t", "m1")
    assert [m["messageId"] for m in h.messages(conn)] == ["m1"]


@pytest.mark.parametrize(
    "frame", [Subscribe("t"), Unsubscribe("t"), Publish("t", "d", "h", 1, "m"), Ack("t", "m")]
)
def test_frames_before_init_are_refused(h: Harness, frame: ClientPacket) -> None:
    conn = h.open()
    assert h.send(conn, frame) == [{"type": "error", "error": "send init first", "code": "not_initialised"}]
    assert h.metrics.value("protocol_errors", "not_initialised") == 1


def test_suspended_session_refuses_init(h: Harness) -> None:
    h.broker.suspend_session("a", "pw-a", h.secrets["a"], True, h.now)
    response = h.init(h.open())
    assert response["success"] is False and response["code"] == "session_suspended"


def test_connections_per_session_are_limited() -> None:
    h = Harness(make_config(max_connections_per_session=2))
    h.client("a")
    h.client("a")
    response = h.init(h.open())
    assert response["success"] is False and response["code"] == "too_many_connections"
    assert h.init(h.open(), "b")["success"]  # the limit is per session


def test_successful_inits_are_reported_for_the_server_cores_handshake_deadline(h: Harness) -> None:
    refused = h.open()
    done = h.open()
    h.init(refused, password="bad")
    h.init(done)
    assert h.sink.initialised == [done]
    assert h.broker.is_initialised(done) and not h.broker.is_initialised(refused)
    assert h.broker.next_deadline() is None  # the init deadline is the server core's (test_server.py)


def test_repeated_auth_failures_close_the_connection_with_1008(h: Harness) -> None:
    conn = h.open()
    for _ in range(h.config.auth_max_failures - 1):
        assert h.init(conn, password="bad")["code"] == "auth_failed"
    assert h.sink.closes == []
    h.init(conn, password="bad")
    assert h.closes() == {conn: CloseCode.POLICY_VIOLATION}


def fail_budget(h: Harness, peer: str, session: str = "a") -> None:
    """Spend ``peer``'s whole failure budget on ``session`` (one wrong password per connection)."""
    for _ in range(h.config.auth_failure_budget):
        assert h.init(h.open(peer), session, password="bad")["code"] == "auth_failed"


def test_one_wrong_password_does_not_lock_out_the_next_client_of_the_address(h: Harness) -> None:
    """The NAT / reverse-proxy case: one client mistypes, the next one from the same address gets in."""
    assert h.init(h.open("127.0.0.1"), password="bad")["code"] == "auth_failed"
    assert h.init(h.open("127.0.0.1"))["success"]


def test_failed_auth_is_throttled_per_peer_without_running_scrypt(
    h: Harness, scrypt_calls: list[int]
) -> None:
    base = h.config.auth_throttle_base
    fail_budget(h, "10.0.0.1")
    assert h.init(h.open("10.0.0.1"))["success"]  # within the budget: no delay at all
    assert h.init(h.open("10.0.0.1"), password="bad")["code"] == "auth_failed"  # past it: delayed
    scrypt_calls.clear()
    throttled = h.init(h.open("10.0.0.1"))  # even the right password
    assert throttled["success"] is False and throttled["code"] == "auth_throttled"
    assert scrypt_calls == []
    assert h.init(h.open("10.0.0.2"))["success"]  # another peer is not affected
    assert h.init(h.open("10.0.0.1"), "b")["success"]  # nor is another session from the same peer
    h.advance(base)
    assert h.init(h.open("10.0.0.1"))["success"]
    assert h.metrics.value("auth_failures", "auth_throttled") == 1


def test_ipv6_peers_are_throttled_by_their_64_prefix(h: Harness) -> None:
    fail_budget(h, "2001:db8::1")
    h.init(h.open("2001:db8::2"), password="bad")  # same /64: this one is over the budget
    assert h.init(h.open("2001:db8::ffff"))["code"] == "auth_throttled"
    assert h.init(h.open("2001:db8:0:1::1"))["success"]  # the next /64 is someone else


def test_the_budget_refills_over_the_window() -> None:
    h = Harness(dataclasses.replace(make_config(), auth_failure_budget=2, auth_throttle_window=10.0))
    for _ in range(10):  # 2 failures per 10 s, for ever: never a delay
        h.init(h.open("p"), password="bad")
        h.advance(5.0)
    assert h.init(h.open("p"))["success"]
    for _ in range(3):  # 3 in a row: over the budget of 2
        h.init(h.open("p"), password="bad")
    assert h.init(h.open("p"))["code"] == "auth_throttled"


def test_throttle_doubles_and_is_forgotten_through_the_deadlines() -> None:
    h = Harness(dataclasses.replace(make_config(), handshake_timeout=1000.0))
    base, window = h.config.auth_throttle_base, h.config.auth_throttle_window
    fail_budget(h, "p")
    h.init(h.open("p"), password="bad")  # first failure over the budget: base
    h.advance(base)
    h.init(h.open("p"), password="bad")  # second: 2 * base (the bucket drained a little meanwhile)
    h.advance(base)
    assert h.init(h.open("p"))["code"] == "auth_throttled"
    h.advance(base)
    assert h.init(h.open("p"))["success"]
    assert h.broker.stats().throttled_peers == 1
    assert h.broker.next_deadline() == base + window  # forgotten a window after the last failure
    h.advance(window)
    assert h.broker.stats().throttled_peers == 0


def test_throttled_attempts_count_towards_the_connection_limit() -> None:
    h = Harness(dataclasses.replace(make_config(), auth_failure_budget=0))
    conn = h.open("p")
    h.init(conn, password="bad")
    h.init(conn)
    h.init(conn)
    assert h.closes() == {conn: CloseCode.POLICY_VIOLATION}


# -- subscribe / unsubscribe ---------------------------------------------------------------------------------


def test_subscribe_and_unsubscribe_are_idempotent(h: Harness) -> None:
    conn = h.client("a")
    for _ in range(2):
        assert h.send(conn, Subscribe("t")) == [{"type": "subscribe_response", "success": True, "topic": "t"}]
    for _ in range(2):
        assert h.send(conn, Unsubscribe("t")) == [
            {"type": "unsubscribe_response", "success": True, "topic": "t"}
        ]
    publisher = h.client("a")
    assert h.publish(publisher, "t", "m1")["deliveredTo"] == 0
    assert h.messages(conn) == []


def test_subscriptions_per_connection_are_limited() -> None:
    h = Harness(make_config(max_subscriptions_per_connection=2))
    conn = h.client("a", "t1", "t2")
    (refused,) = h.send(conn, Subscribe("t3"))
    assert refused["success"] is False and refused["code"] == "too_many_subscriptions"
    assert h.send(conn, Subscribe("t1"))[0]["success"]  # already held: still fine
    assert h.metrics.value("protocol_errors", "too_many_subscriptions") == 1


def test_unsubscribing_keeps_in_flight_deliveries(h: Harness) -> None:
    sub = h.client("a", "t")
    h.publish(h.client("a"), "t", "m1")
    h.send(sub, Unsubscribe("t"))
    h.advance(1.0)
    assert [m.get("retry") for m in h.messages(sub)] == [None, 1]
    h.ack(sub, "t", "m1")
    assert h.metrics.value("acks", "a") == 1


# -- publish and fan-out ------------------------------------------------------------------------------------


def test_publish_fans_out_once_encoded_to_every_other_subscriber(h: Harness) -> None:
    publisher = h.client("a", "t")
    subs = [h.client("a", "t") for _ in range(3)]
    h.client("a", "other")
    response = h.publish(publisher, "t", "m1", "hello")
    assert response == {"type": "publish_response", "success": True, "messageId": "m1", "deliveredTo": 3}
    fanned_out = [(conn, frame) for conn, frame in h.sink.raw_frames if b'"type":"message"' in frame]
    frames = [frame for _, frame in fanned_out]
    assert [conn for conn, _ in fanned_out] == subs
    assert all(frame is frames[0] for frame in frames)  # one encoding, shared
    assert frames[0] == encode_text_frame(encode(MessagePacket("t", "hello", "h", 1, "m1")))
    assert h.messages(publisher) == []
    assert h.metrics.value("publishes", "a") == 1 and h.metrics.value("deliveries", "a") == 3


def test_binary_encoding_is_relayed(h: Harness) -> None:
    sub = h.client("a", "t")
    h.send(h.client("a"), Publish("t", "AAE=", "h", 5, "m1", "binary"))
    assert h.messages(sub)[0]["encoding"] == "binary"


def test_publish_response_fast_path_is_byte_identical() -> None:
    assert _encode_publish_ok("m-1", 7) == encode(PublishResponse(True, "m-1", 7))
    assert _encode_publish_ok("m-1", 0) == encode(PublishResponse(True, "m-1", 0))
    assert _encode_ack_received("m-1", "a/b") == encode(AckReceived("m-1", "a/b"))


def test_only_the_subscriber_that_did_not_ack_gets_retries(h: Harness) -> None:
    publisher = h.client("a", "t")
    first, second = h.client("a", "t"), h.client("a", "t")
    h.publish(publisher, "t", "m1")
    h.ack(first, "t", "m1")
    h.advance(2.0)
    assert [m.get("retry") for m in h.messages(first)] == [None]
    assert [m.get("retry") for m in h.messages(second)] == [None, 1, 2]
    assert h.messages(publisher) == []
    h.ack(second, "t", "m1")
    h.advance(10.0)
    assert len(h.messages(second)) == 3
    assert h.broker.stats().stored_messages == 0
    assert h.metrics.value("acks", "a") == 2


def test_retries_stop_at_the_limit_and_are_counted(h: Harness) -> None:
    sub = h.client("a", "t")
    h.publish(h.client("a"), "t", "m1")
    h.advance(20.0)
    assert [m.get("retry") for m in h.messages(sub)] == [None, 1, 2, 3]
    assert h.metrics.value("retries", "a") == 3
    assert given_up(h, "a", "retries") == 1
    assert h.broker.stats().stored_messages == 0
    assert h.broker.stats().pending_bytes == 0


def test_expired_messages_are_given_up_for_every_remaining_subscriber() -> None:
    h = Harness(settings=SessionSettings(retry_interval=1.0, max_retry_limit=100, message_expiry_time=2.5))
    subs = [h.client("a", "t") for _ in range(3)]
    h.publish(h.client("a"), "t", "m1")
    h.ack(subs[0], "t", "m1")
    h.advance(10.0)
    assert given_up(h, "a", "expired") == 2
    assert [len(h.messages(s)) for s in subs] == [1, 3, 3]  # first send, then retries at 1 and 2
    assert h.broker.stats().stored_messages == 0


def test_ack_from_another_session_changes_nothing(h: Harness) -> None:
    sub_a = h.client("a", "t")
    h.publish(h.client("a"), "t", "m1")
    intruder = h.client("b", "t")
    h.ack(intruder, "t", "m1")
    assert h.metrics.value("acks_unknown", "b") == 1
    h.advance(1.0)
    assert [m.get("retry") for m in h.messages(sub_a)] == [None, 1]
    assert h.broker.stats().per_session["a"].stored_messages == 1


def test_ack_from_a_subscriber_that_never_got_the_message_changes_nothing(h: Harness) -> None:
    sub = h.client("a", "t")
    bystander = h.client("a", "other")
    h.publish(h.client("a"), "t", "m1")
    h.ack(bystander, "t", "m1")
    h.advance(1.0)
    assert [m.get("retry") for m in h.messages(sub)] == [None, 1]
    assert h.metrics.value("acks_unknown", "a") == 1


def test_the_same_message_id_in_two_sessions_is_two_messages(h: Harness) -> None:
    sub_a, sub_b = h.client("a", "t"), h.client("b", "t")
    h.publish(h.client("a"), "t", "m1", "from-a")
    h.publish(h.client("b"), "t", "m1", "from-b")
    assert [m["data"] for m in h.messages(sub_a)] == ["from-a"]
    assert [m["data"] for m in h.messages(sub_b)] == ["from-b"]
    h.ack(sub_a, "t", "m1")
    h.advance(1.0)
    assert [m["data"] for m in h.messages(sub_b)] == ["from-b", "from-b"]
    assert h.metrics.value("publish_duplicates", "b") == 0


def test_a_retried_publish_is_confirmed_again_without_a_second_fan_out(h: Harness) -> None:
    publisher = h.client("a")
    subs = [h.client("a", "t") for _ in range(2)]
    first = h.publish(publisher, "t", "m1")
    again = h.publish(publisher, "t", "m1")
    assert (
        first == again == {"type": "publish_response", "success": True, "messageId": "m1", "deliveredTo": 2}
    )
    assert [len(h.messages(s)) for s in subs] == [1, 1]
    for sub in subs:
        h.ack(sub, "t", "m1")
    assert h.publish(publisher, "t", "m1")["deliveredTo"] == 2  # remembered after the message is freed
    assert [len(h.messages(s)) for s in subs] == [1, 1]
    assert h.metrics.value("publish_duplicates", "a") == 2
    assert h.metrics.value("publishes", "a") == 1


def test_dedupe_window_is_bounded_by_its_ttl() -> None:
    h = Harness(dataclasses.replace(make_config(), dedupe_ttl=5.0))
    sub = h.client("a", "t")
    publisher = h.client("a")
    h.publish(publisher, "t", "m1")
    h.ack(sub, "t", "m1")
    h.advance(6.0)
    h.publish(publisher, "t", "m1")
    assert len(h.messages(sub)) == 2  # forgotten: a new message


def size(message_id: str, data: str, topic: str = "t") -> int:
    """What the Harness's publish of ``data`` is charged (hash "h")."""
    return message_size(Publish(topic, data, "h", 1, message_id))


def test_pending_bytes_count_every_string_in_utf8_and_the_overhead() -> None:
    h = Harness()
    sub = h.client("a", "topic")
    h.publish(h.client("a"), "topic", "id-1", "é€😀")  # 3 characters, 2 + 3 + 4 bytes
    assert h.broker.stats().pending_bytes == MESSAGE_OVERHEAD + 5 + 4 + 1 + 9
    h.ack(sub, "topic", "id-1")
    assert h.broker.stats().pending_bytes == 0


def test_pending_bytes_per_session_are_limited() -> None:
    h = Harness(make_config(max_pending_bytes_per_session=size("m1", "x" * 6) + 4))
    sub = h.client("a", "t")
    publisher = h.client("a")
    assert h.publish(publisher, "t", "m1", "x" * 6)["success"]
    refused = h.publish(publisher, "t", "m2", "x" * 5)
    assert refused["success"] is False and refused["code"] == "session_full" and refused["messageId"] == "m2"
    assert h.metrics.value("publishes_refused", "a", "session_full") == 1
    assert h.publish(publisher, "nobody", "m3", "x" * 50)["success"]  # nothing to store
    assert h.publish(h.client("b"), "t", "m2", "x" * 10)["success"]  # another session's budget
    h.ack(sub, "t", "m1")
    assert h.publish(publisher, "t", "m2", "x" * 8)["success"]
    assert not h.publish(publisher, "t", "m4", "")["success"]  # an empty message is not free
    assert h.broker.stats().per_session["a"].pending_bytes == size("m2", "x" * 8)


# -- connections that go away --------------------------------------------------------------------------------


def test_without_client_id_a_closed_connection_gives_up_its_deliveries(h: Harness) -> None:
    sub = h.client("a", "t")
    h.publish(h.client("a"), "t", "m1")
    h.broker.connection_closed(sub, h.now)
    h.broker.connection_closed(sub, h.now)  # idempotent
    assert given_up(h, "a", "disconnected") == 1
    assert h.broker.stats().stored_messages == 0
    h.advance(5.0)
    assert len(h.messages(sub)) == 1


def test_a_resumable_subscriber_gets_what_was_published_while_detached_once_as_a_retry(h: Harness) -> None:
    sub = h.client("a", "t", client_id="dev-1")
    publisher = h.client("a")
    h.broker.connection_closed(sub, h.now)
    assert h.publish(publisher, "t", "m1")["deliveredTo"] == 1
    h.advance(5.0)  # detached: no sends, no retries spent
    assert h.messages(sub) == []
    again = h.open()
    assert h.init(again, client_id="dev-1")["success"]
    assert h.send(again, Subscribe("t")) == [{"type": "subscribe_response", "success": True, "topic": "t"}]
    assert [(m["messageId"], m["retry"]) for m in h.messages(again)] == [("m1", 1)]
    assert h.metrics.value("subscribers_resumed", "a") == 1
    h.ack(again, "t", "m1")
    h.advance(5.0)
    assert len(h.messages(again)) == 1
    assert h.metrics.value("retries", "a") == 1
    h.publish(publisher, "t", "m2")  # its topics came back with it
    assert [m["messageId"] for m in h.messages(again)] == ["m1", "m2"]


def test_resume_resends_every_in_flight_delivery_in_order(h: Harness) -> None:
    sub = h.client("a", "t", client_id="dev-1")
    publisher = h.client("a")
    for mid in ("m1", "m2", "m3"):
        h.publish(publisher, "t", mid)
    h.ack(sub, "t", "m2")
    h.broker.connection_closed(sub, h.now)
    h.publish(publisher, "t", "m4")
    again = h.client("a", client_id="dev-1")
    assert [(m["messageId"], m["retry"]) for m in h.messages(again)] == [("m1", 1), ("m3", 1), ("m4", 1)]


def test_resuming_a_client_id_that_is_still_connected_replaces_the_old_connection(h: Harness) -> None:
    old = h.client("a", "t", client_id="dev-1")
    h.publish(h.client("a"), "t", "m1")
    new = h.client("a", client_id="dev-1")
    assert h.closes() == {old: CloseCode.REPLACED}
    assert [(m["messageId"], m["retry"]) for m in h.messages(new)] == [("m1", 1)]
    h.advance(0.5)
    h.ack(new, "t", "m1")
    assert h.broker.stats().stored_messages == 0
    assert h.send(old, Ack("t", "m1")) == []  # the old connection is forgotten


def test_replacing_does_not_count_against_the_connection_limit() -> None:
    h = Harness(make_config(max_connections_per_session=1))
    h.client("a", client_id="dev-1")
    assert h.init(h.open(), client_id="dev-1")["success"]
    assert h.init(h.open(), client_id="dev-2")["code"] == "too_many_connections"


def test_client_ids_are_per_session(h: Harness) -> None:
    in_a = h.client("a", "t", client_id="dev")
    h.broker.connection_closed(in_a, h.now)
    h.publish(h.client("a"), "t", "m1")
    in_b = h.client("b", client_id="dev")
    assert h.messages(in_b) == []
    assert h.closes() == {}


def test_a_detached_subscriber_is_forgotten_after_the_message_expiry_time() -> None:
    h = Harness(settings=SessionSettings(retry_interval=1.0, max_retry_limit=1000, message_expiry_time=50.0))
    sub = h.client("a", "t", client_id="dev-1")
    publisher = h.client("a")
    h.advance(10.0)
    h.broker.connection_closed(sub, h.now)
    h.advance(30.0)
    h.publish(publisher, "t", "m1")
    h.advance(20.0)  # 50 s after the detach
    assert given_up(h, "a", "detached") == 1
    again = h.client("a", client_id="dev-1")
    assert h.messages(again) == []
    assert h.publish(publisher, "t", "m2")["deliveredTo"] == 0  # a new subscriber, with no topics


def test_detached_subscribers_per_session_are_bounded() -> None:
    h = Harness(make_config(max_detached_per_session=2))
    for client_id in ("c1", "c2", "c3"):
        h.broker.connection_closed(h.client("a", "t", client_id=client_id), h.now)
    assert h.broker.stats().per_session["a"].detached_subscribers == 2
    assert h.publish(h.client("a"), "t", "m1")["deliveredTo"] == 2


def test_a_detached_subscriber_keeps_what_is_beyond_its_window_in_its_backlog() -> None:
    h = Harness(make_config(max_inflight_per_subscriber=2))
    sub = h.client("a", "t", client_id="dev-1")
    h.broker.connection_closed(sub, h.now)
    publisher = h.client("a")
    for mid in ("m1", "m2", "m3"):
        assert h.publish(publisher, "t", mid)["deliveredTo"] == 1
    stats = h.broker.stats().per_session["a"]
    assert (stats.inflight_deliveries, stats.backlogged_deliveries, stats.stored_messages) == (2, 1, 3)
    again = h.client("a", client_id="dev-1")
    assert [(m["messageId"], m.get("retry")) for m in h.messages(again)] == [("m1", 1), ("m2", 1)]
    h.ack(again, "t", "m1")
    assert [m["messageId"] for m in h.messages(again)][2:] == ["m3"]
    assert given_up(h, "a", "overflow") == 0


# -- slow consumers ------------------------------------------------------------------------------------------


def test_slow_consumer_is_disconnected_and_its_deliveries_given_up() -> None:
    h = Harness(make_config(SlowConsumerPolicy.DISCONNECT, max_inflight_per_subscriber=2))
    slow, fine = h.client("a", "t"), h.client("a", "t")
    publisher = h.client("a")
    for mid in ("m1", "m2"):
        h.publish(publisher, "t", mid)
        h.ack(fine, "t", mid)
    assert h.publish(publisher, "t", "m3")["deliveredTo"] == 2
    assert h.closes() == {slow: CloseCode.SLOW_CONSUMER}
    assert [m["messageId"] for m in h.messages(slow)] == ["m1", "m2"]  # m3 was not sent to it
    assert h.metrics.value("slow_consumers", "a", "disconnect") == 1
    assert given_up(h, "a", "disconnected") == 3
    assert h.broker.stats().per_session["a"].inflight_deliveries == 1  # fine's m3


def test_a_resumable_subscriber_at_its_window_is_not_a_slow_consumer() -> None:
    h = Harness(make_config(SlowConsumerPolicy.DISCONNECT, max_inflight_per_subscriber=2))
    sub = h.client("a", "t", client_id="dev-1")
    publisher = h.client("a")
    for mid in ("m1", "m2", "m3"):
        assert h.publish(publisher, "t", mid)["deliveredTo"] == 1
    assert h.closes() == {}
    assert h.metrics.value("slow_consumers", "a", "disconnect") == 0
    assert [m["messageId"] for m in h.messages(sub)] == ["m1", "m2"]  # m3 waits for a free slot
    h.ack(sub, "t", "m2")
    assert [(m["messageId"], m.get("retry")) for m in h.messages(sub)][2:] == [("m3", None)]


def test_slow_consumer_drop_oldest_policy() -> None:
    h = Harness(make_config(SlowConsumerPolicy.DROP_OLDEST, max_inflight_per_subscriber=2))
    slow = h.client("a", "t")
    publisher = h.client("a")
    for mid in ("m1", "m2", "m3"):
        h.publish(publisher, "t", mid)
    assert h.sink.closes == []
    assert [m["messageId"] for m in h.messages(slow)] == ["m1", "m2", "m3"]
    assert h.metrics.value("slow_consumers", "a", "drop_oldest") == 1
    assert given_up(h, "a", "overflow") == 1
    h.advance(1.0)
    assert [m["messageId"] for m in h.messages(slow)[3:]] == ["m2", "m3"]  # m1 is no longer retried


def test_closes_reported_while_a_fan_out_is_applied_leave_consistent_state(h: Harness) -> None:
    """The server core applies a fan-out's frames after the broker call and reports the connections whose
    output overflowed only then: the broker sees them as ordinary closes, between calls."""
    subs = [h.client("a", "t") for _ in range(3)]
    resumable = h.client("a", "t", client_id="dev")
    assert h.publish(h.client("a"), "t", "m1")["deliveredTo"] == 4
    for conn in (subs[0], subs[1], resumable):
        h.broker.connection_closed(conn, h.now)
    stats = h.broker.stats().per_session["a"]
    assert stats.connections == 2 and stats.detached_subscribers == 1
    assert given_up(h, "a", "disconnected") == 2
    h.advance(1.0)
    assert [m.get("retry") for m in h.messages(subs[2])] == [None, 1]


# -- suspend, drop, expiry ---------------------------------------------------------------------------------


def test_suspend_refuses_publishes_and_holds_retries_until_resumed(h: Harness) -> None:
    sub = h.client("a", "t")
    publisher = h.client("a")
    h.publish(publisher, "t", "m1")
    h.broker.suspend_session("a", "pw-a", h.secrets["a"], True, h.now)
    refused = h.publish(publisher, "t", "m2")
    assert refused["success"] is False and refused["code"] == "session_suspended"
    assert h.publish(publisher, "t", "m1")["success"]  # already accepted: confirmed again
    h.advance(10.0)
    assert len(h.messages(sub)) == 1  # no retries while suspended
    assert h.broker.stats().per_session["a"].inflight_deliveries == 1  # it waits
    h.broker.suspend_session("a", "pw-a", h.secrets["a"], False, h.now)
    assert [m.get("retry") for m in h.messages(sub)] == [None, 1]
    h.advance(1.0)
    assert [m.get("retry") for m in h.messages(sub)] == [None, 1, 2]
    assert h.publish(publisher, "t", "m2")["success"]


def test_suspend_and_drop_need_both_credentials(h: Harness) -> None:
    with pytest.raises(AccessDeniedError):
        h.broker.suspend_session("a", "pw-a", "wrong", True, h.now)
    with pytest.raises(AccessDeniedError):
        h.broker.drop_session("a", "wrong", h.secrets["a"], h.now)
    with pytest.raises(UnknownSessionError):
        h.broker.drop_session("zzz", "pw-a", h.secrets["a"], h.now)
    assert h.broker.session_names() == ["a", "b"]


def test_drop_closes_its_connections_and_frees_everything(h: Harness) -> None:
    subs = [h.client("a", "t") for _ in range(2)]
    other = h.client("b", "t")
    publisher = h.client("a")
    h.publish(publisher, "t", "m1")
    h.broker.drop_session("a", "pw-a", h.secrets["a"], h.now)
    assert h.closes() == dict.fromkeys([*subs, publisher], CloseCode.SESSION_DROPPED)
    assert h.broker.session_names() == ["b"]
    assert h.metrics.value("publishes", "a") == 0  # its series are forgotten
    assert h.metrics.value("sessions_dropped", "dropped") == 1
    stats = h.broker.stats()
    assert (stats.connections, stats.stored_messages, stats.pending_bytes) == (1, 0, 0)
    assert h.send(subs[0], Ack("t", "m1")) == []
    h.broker.connection_closed(subs[0], h.now)  # the transport's close after ours: a no-op
    h.advance(10.0)
    assert len(h.messages(subs[0])) == 1
    assert h.init(h.open(), "a")["code"] == "auth_failed"
    assert h.send(other, Subscribe("x"))[0]["success"]


def test_idle_sessions_expire() -> None:
    h = Harness(settings=SessionSettings(session_expiry=30.0))
    conn = h.client("a")
    h.advance(100.0)
    assert h.broker.session_names() == ["a"]  # b never had a connection; a is connected: never idle
    h.broker.connection_closed(conn, h.now)
    h.advance(29.0)
    assert h.broker.session_names() == ["a"]
    h.advance(1.0)
    assert h.broker.session_names() == []
    assert h.metrics.value("sessions_dropped", "expired") == 2
    assert h.sink.closes == []


# -- sessions -----------------------------------------------------------------------------------------------


def test_create_session_returns_a_generated_or_given_secret_key(h: Harness) -> None:
    generated = h.secrets["a"]
    assert len(generated) == 43 and generated != h.secrets["b"]
    assert h.broker.create_session("c", "pw", 0.0, secret_key="mine") == "mine"
    h.broker.suspend_session("c", "pw", "mine", True, 0.0)
    with pytest.raises(SessionExistsError):
        h.broker.create_session("c", "other", 0.0)
    assert h.metrics.value("sessions_created") == 3


@pytest.mark.parametrize(
    ("name", "password", "secret_key"),
    [("", "pw", None), ("n" * 129, "pw", None), ("ok", "", None), ("ok", "p" * 1025, None), ("ok", "pw", "")],
)
def test_create_session_checks_lengths(h: Harness, name: str, password: str, secret_key: str | None) -> None:
    with pytest.raises(LocalProtocolError, match="must be 1 to"):
        h.broker.create_session(name, password, 0.0, secret_key=secret_key)


def test_sessions_are_limited() -> None:
    with pytest.raises(LocalProtocolError, match="maximum of 1 sessions"):
        Harness(make_config(max_sessions=1))


def test_caller_errors_and_unknown_connections(h: Harness) -> None:
    conn = h.open()
    with pytest.raises(LocalProtocolError):
        h.broker.connection_opened(conn, h.now)
    assert h.send(999, Subscribe("t")) == []
    h.broker.connection_closed(999, h.now)


def test_connections_are_limited() -> None:
    h = Harness(make_config(max_connections=1))
    h.open()
    refused = h.open()
    assert h.closes() == {refused: CloseCode.POLICY_VIOLATION}


def test_stats_count_everything_per_session(h: Harness) -> None:
    subs = [h.client("a", "t") for _ in range(2)]
    h.broker.connection_closed(h.client("a", "t", client_id="dev"), h.now)
    h.publish(h.client("a"), "t", "m1", "12345")
    h.ack(subs[0], "t", "m1")
    stats = h.broker.stats()
    a = stats.per_session["a"]
    assert (a.connections, a.subscribers, a.detached_subscribers) == (3, 4, 1)
    stored = size("m1", "12345")
    assert (a.stored_messages, a.inflight_deliveries, a.pending_bytes, a.suspended) == (1, 2, stored, False)
    assert (stats.sessions, stats.connections, stats.stored_messages, stats.pending_bytes) == (
        2,
        3,
        1,
        stored,
    )


# -- the property: isolation and bounds under any sequence of operations -----------------------------------

PROPERTY_LIMITS = {
    "max_inflight_per_subscriber": 2,
    "max_pending_bytes_per_session": 2 * MESSAGE_OVERHEAD + 60,
    "max_subscriptions_per_connection": 2,
    "max_connections_per_session": 3,
    "max_detached_per_session": 2,
    "dedupe_window": 4,
}


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of the property; ``kind`` says which of the other fields it uses."""

    kind: str
    conn: int  # an index into the connections opened so far
    session: str
    topic: str
    message_id: str
    size: int
    flag: bool  # init: a wrong password; suspend: suspend (else resume); close: a clean close
    client_id: str | None
    seconds: float
    peer: str


#: Weighted by repetition: mostly traffic, enough churn (closes, resumes, suspends, time) to reach every path.
KINDS = ["pub"] * 5 + ["ack_received"] * 3 + ["tick"] * 2 + [
    "ack", "sub", "unsub", "close", "init", "connect", "open", "suspend",
]  # fmt: skip

operations = st.lists(
    st.builds(
        Op,
        kind=st.sampled_from(KINDS),
        conn=st.integers(0, 9),
        session=st.sampled_from("ab"),
        topic=st.sampled_from(["t1", "t2", "t3"]),
        message_id=st.sampled_from(["m1", "m2", "m3", "m4", "m5", "m6"]),
        size=st.integers(0, 10),
        flag=st.booleans(),
        client_id=st.sampled_from([None, "c1", "c2"]),
        seconds=st.sampled_from([0.3, 1.0, 2.5, 12.0]),
        peer=st.sampled_from(["", "p1", "p2"]),
    ),
    min_size=10,
    max_size=50,
)


class PropertyRun:
    """Plays operations against a harness, remembering which session the broker confirmed per connection."""

    def __init__(self, policy: SlowConsumerPolicy) -> None:
        settings = SessionSettings(retry_interval=1.0, max_retry_limit=2, message_expiry_time=5.0)
        self.h = Harness(make_config(policy, **PROPERTY_LIMITS), settings)
        self.conns: list[int] = []
        self.member_of: dict[int, str] = {}
        self.checked = 0
        for index, client_id in enumerate([None, "c1", None, None, "c1", None]):  # a populated start
            self.connect("ab"[index // 3], client_id, f"t{2 + index % 2}")

    def connect(self, session: str, client_id: str | None, topic: str) -> None:
        conn = self.h.open()
        self.conns.append(conn)
        self.init(conn, Init(session, f"pw-{session}", client_id))
        for name in ("t1", topic):
            self.h.broker.handle_packet(conn, Subscribe(name), self.h.now)

    def init(self, conn: int, frame: Init) -> None:
        for response in self.h.send(conn, frame):
            if response["type"] == "init_response" and response["success"]:
                self.member_of[conn] = frame.session_name

    def apply(self, op: Op) -> None:
        h, kind = self.h, op.kind
        conn = self.conns[op.conn % len(self.conns)]
        if kind == "pub":
            data = f"{self.member_of.get(conn, '-')}|{conn}|" + "x" * op.size
            h.send(conn, Publish(op.topic, data, "h", 1, op.message_id))
        elif kind == "ack_received":
            received = h.messages(conn)[-1 - op.size % 4 :]
            if received:
                h.send(conn, Ack(received[0]["topic"], received[0]["messageId"]))
        elif kind == "ack":
            h.send(conn, Ack(op.topic, op.message_id))
        elif kind == "sub":
            h.send(conn, Subscribe(op.topic))
        elif kind == "unsub":
            h.send(conn, Unsubscribe(op.topic))
        elif kind == "close":
            h.broker.connection_closed(conn, h.now, clean=op.flag)
        elif kind == "init":
            password = "bad" if op.flag else f"pw-{op.session}"
            self.init(conn, Init(op.session, password, op.client_id, persistent=op.size % 2 == 0))
        elif kind == "connect":
            self.connect(op.session, op.client_id, op.topic)
        elif kind == "open":
            self.conns.append(h.open(op.peer))
        elif kind == "tick":
            h.advance(op.seconds)
        else:
            h.broker.suspend_session(op.session, f"pw-{op.session}", h.secrets[op.session], op.flag, h.now)

    def check_deliveries(self) -> None:
        frames = self.h.sink.frames
        for conn, frame in frames[self.checked :]:
            if frame["type"] == "message":
                session, publisher, _ = frame["data"].split("|")
                assert session == self.member_of[conn]  # never a delivery from another session
                assert int(publisher) != conn  # never the publisher's own message
        self.checked = len(frames)


def check_invariants(broker: Broker) -> None:
    """Every table within its bound, and the bookkeeping consistent (white-box)."""
    limits = PROPERTY_LIMITS
    for session in broker._sessions.values():
        assert session.pending_bytes == sum(m.size for m in session.messages.values())
        assert session.pending_bytes <= limits["max_pending_bytes_per_session"]
        assert len(session.connections) <= limits["max_connections_per_session"]
        assert len(session.detached) <= limits["max_detached_per_session"]
        assert len(session.dedupe) <= limits["dedupe_window"]
        subscribers = [c.subscriber for c in session.connections if c.subscriber is not None]
        subscribers += list(session.detached)
        owed: dict[str, int] = {}
        for sub in subscribers:
            assert len(sub.inflight) <= limits["max_inflight_per_subscriber"]
            assert len(sub.topics) <= limits["max_subscriptions_per_connection"]
            for topic_name in sub.topics:
                assert sub in session.topics[topic_name]
            for mid, delivery in sub.inflight.items():
                assert session.messages[mid] is delivery.message and delivery.subscriber is sub
                owed[mid] = owed.get(mid, 0) + 1
        assert {mid: m.owed for mid, m in session.messages.items()} == owed
        assert all(subs for subs in session.topics.values())
        dues = [d.due for d in session.retry_queue]
        assert dues == sorted(dues)  # the FIFO trick holds
        for delivery in session.retry_queue:
            assert delivery.subscriber.inflight.get(delivery.message.publish.message_id) is delivery
        due = session.next_due()
        if due is not None:  # the session's deadline is armed no later than its earliest queue head
            armed = broker._deadlines.get(session)
            assert armed is not None and armed <= due
    for conn, connection in broker._connections.items():
        assert connection.conn == conn
        if connection.session is not None:
            assert broker._sessions[connection.session.name] is connection.session
            assert connection in connection.session.connections


@settings(max_examples=150)
@given(operations, st.sampled_from(list(SlowConsumerPolicy)))
def test_sessions_stay_isolated_and_bounded_under_any_operations(
    ops: list[Op], policy: SlowConsumerPolicy
) -> None:
    run = PropertyRun(policy)
    for op in ops:
        run.apply(op)
        run.check_deliveries()
        check_invariants(run.h.broker)


def test_a_detached_subscriber_due_at_an_inexact_float_time_is_forgotten_then() -> None:
    """Found by the stateful test: 1000.1 + 25 == 1025.1, but 1025.1 - 25 < 1000.1 in floats."""
    h = Harness(settings=SessionSettings(retry_interval=1.0, max_retry_limit=4, message_expiry_time=25.0))
    sub = h.client("a", "t", client_id="dev-1")
    h.now = 1000.1
    h.broker.connection_closed(sub, h.now)
    deadline = h.broker.next_deadline()
    assert deadline == 1000.1 + 25.0
    h.broker.handle_timeout(deadline)
    assert given_up(h, "a", "detached") == 0  # it had nothing in flight
    assert h.broker.next_deadline() is None or h.broker.next_deadline() > deadline  # type: ignore[operator]


# -- subscriber lifecycle: clean close vs lost connection (DESIGN §3.10) ------------------------------------


def test_a_clean_close_releases_a_non_persistent_resumable_subscriber_at_once(h: Harness) -> None:
    sub = h.client("a", "t", client_id="dev")
    h.publish(h.client("a"), "t", "m1")
    h.broker.connection_closed(sub, h.now, clean=True)
    stats = h.broker.stats().per_session["a"]
    assert (stats.subscribers, stats.detached_subscribers, stats.inflight_deliveries) == (1, 0, 0)
    assert stats.stored_messages == 0 and stats.pending_bytes == 0
    assert given_up(h, "a", "released") == 1
    assert h.publish(h.client("a"), "t", "m2")["deliveredTo"] == 0  # nobody stores for it any more
    again = h.client("a", client_id="dev")
    assert h.messages(again) == []  # a fresh subscriber: nothing to resume
    assert h.metrics.value("subscribers_resumed", "a") == 0


def test_a_lost_connection_keeps_a_non_persistent_subscriber_for_the_detached_window(h: Harness) -> None:
    sub = h.client("a", "t", client_id="dev")
    h.publish(h.client("a"), "t", "m1")
    h.broker.connection_closed(sub, h.now)  # EOF, reset, keepalive, a close the server started
    assert h.broker.stats().per_session["a"].detached_subscribers == 1
    again = h.client("a", client_id="dev")
    assert [m["messageId"] for m in h.messages(again)] == ["m1"]


def test_a_persistent_subscriber_survives_a_clean_close_until_it_expires(h: Harness) -> None:
    sub = h.client("a", "t", client_id="dev", persistent=True)
    publisher = h.client("a")
    h.publish(publisher, "t", "m1")
    h.broker.connection_closed(sub, h.now, clean=True)
    assert h.broker.stats().per_session["a"].detached_subscribers == 1
    assert h.publish(publisher, "t", "m2")["deliveredTo"] == 1  # its backlog accumulates
    again = h.client("a", client_id="dev")  # resumed without persistent: the latest init decides
    assert [m["messageId"] for m in h.messages(again)] == ["m1", "m2"]
    h.broker.connection_closed(again, h.now, clean=True)
    assert h.broker.stats().per_session["a"].subscribers == 1  # released: only the publisher is left
    assert given_up(h, "a", "released") == 2


def test_a_clean_close_of_an_anonymous_subscriber_is_unchanged(h: Harness) -> None:
    sub = h.client("a", "t")
    h.publish(h.client("a"), "t", "m1")
    h.broker.connection_closed(sub, h.now, clean=True)
    assert given_up(h, "a", "disconnected") == 1 and given_up(h, "a", "released") == 0


# -- ack_received (compatibility with the original's clients) --------------------------------------------


def acks_received(h: Harness, conn: int) -> list[str]:
    return [f["messageId"] for c, f in h.sink.frames if c == conn and f["type"] == "ack_received"]


def test_ack_received_follows_the_publish_response_at_once_when_no_one_subscribes(h: Harness) -> None:
    publisher = h.client("a")
    frames = h.send(publisher, Publish("nobody", "d", "h", 1, "m1"))
    assert [f["type"] for f in frames] == ["publish_response", "ack_received"]
    assert frames[1] == {"type": "ack_received", "messageId": "m1", "topic": "nobody"}


def test_ack_received_waits_for_every_subscriber_and_only_the_publisher_gets_it(h: Harness) -> None:
    publisher, one, two = h.client("a", "t"), h.client("a", "t"), h.client("a", "t")
    h.publish(publisher, "t", "m1")
    assert acks_received(h, publisher) == []
    h.ack(one, "t", "m1")
    h.ack(one, "t", "m1")  # a duplicate ACK settles nothing more
    assert acks_received(h, publisher) == []
    h.ack(two, "t", "m1")
    assert acks_received(h, publisher) == ["m1"]
    assert acks_received(h, one) == acks_received(h, two) == []


def test_given_up_deliveries_count_as_settled(h: Harness) -> None:
    publisher, subscriber = h.client("a", "t"), h.client("a", "t")
    h.publish(publisher, "t", "m1")
    h.advance(SETTINGS.retry_interval * (SETTINGS.max_retry_limit + 1))
    assert given_up(h, "a", "retries") == 1
    assert acks_received(h, publisher) == ["m1"]
    assert subscriber


def test_a_departed_publisher_gets_nothing(h: Harness) -> None:
    publisher, subscriber = h.client("a", "t"), h.client("a", "t")
    h.publish(publisher, "t", "m1")
    h.broker.connection_closed(publisher, h.now)
    h.ack(subscriber, "t", "m1")
    assert acks_received(h, publisher) == []


def test_a_resent_publish_gets_the_ack_received(h: Harness) -> None:
    first, subscriber = h.client("a", "t"), h.client("a", "t")
    h.publish(first, "t", "m1")
    h.broker.connection_closed(first, h.now)
    second = h.client("a")  # the publisher reconnected and sends the publish again: deduplicated
    assert h.publish(second, "t", "m1")["deliveredTo"] == 1
    h.ack(subscriber, "t", "m1")
    assert acks_received(h, second) == ["m1"]
    third = h.client("a")  # and once more, after the message was settled: answered at once
    assert h.send(third, Publish("t", "d", "h", 1, "m1"))[-1]["type"] == "ack_received"


def test_a_slow_consumer_closed_by_the_publish_settles_after_the_publish_response() -> None:
    h = Harness(make_config(max_inflight_per_subscriber=1))
    publisher, subscriber = h.client("a", "t"), h.client("a", "t")
    h.publish(publisher, "t", "m1")
    h.ack(subscriber, "t", "m1")
    h.publish(publisher, "t", "m2")
    frames = h.send(publisher, Publish("t", "d", "h", 1, "m3"))  # the subscriber is over its bound: closed
    assert h.closes() == {subscriber: CloseCode.SLOW_CONSUMER}
    assert [f["type"] for f in frames] == ["publish_response", "ack_received", "ack_received"]


def test_ack_received_can_be_turned_off() -> None:
    h = Harness(dataclasses.replace(make_config(), send_ack_received=False))
    publisher, subscriber = h.client("a", "t"), h.client("a", "t")
    h.publish(publisher, "t", "m1")
    h.ack(subscriber, "t", "m1")
    assert [f["type"] for f in h.send(publisher, Publish("x", "d", "h", 1, "m2"))] == ["publish_response"]
    assert acks_received(h, publisher) == []


def test_a_retry_round_shares_one_encoding_between_subscribers(h: Harness) -> None:
    subscribers = [h.client("a", "t") for _ in range(3)]
    h.publish(h.client("a"), "t", "m1")
    mark = len(h.sink.raw_frames)
    h.advance(SETTINGS.retry_interval)
    retried = [frame for conn, frame in h.sink.raw_frames[mark:] if conn in subscribers]
    assert len(retried) == 3
    assert retried[0] is retried[1] is retried[2]  # one bytes object, not a copy per subscriber
    assert orjson.loads(unframe(retried[0]))["retry"] == 1
