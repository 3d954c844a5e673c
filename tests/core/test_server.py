"""The server core end to end in memory: HTTP upgrade, framing, JSON, broker, admin API, timers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastport_core.admin import AdminCredentials
from fastport_core.config import Limits, ServerConfig
from fastport_core.errors import CloseCode
from fastport_core.frames import Opcode, encode_frame
from fastport_core.server import ServerCore

from .test_frames import raw_frame
from .wire import RawPeer, basic_auth, http_request

ADMIN = AdminCredentials("admin", "secret")


def make_core(**config: object) -> ServerCore:
    config.setdefault("password_hash_cost", 2)  # scrypt's real cost is tested in test_auth; here it is noise
    core = ServerCore(ServerConfig(**config), admin_credentials=ADMIN)  # type: ignore[arg-type]
    core.create_session("demo", "pw", 0.0)
    core.create_session("other", "pw2", 0.0)
    return core


def ready(core: ServerCore, session: str = "demo", password: str = "pw", **extra: Any) -> RawPeer:
    peer = RawPeer(core)
    assert peer.init(session, password, **extra)["success"] is True
    return peer


def test_publish_reaches_every_other_subscriber_with_one_buffer_each() -> None:
    core = make_core()
    publisher = ready(core)
    subscribers = [ready(core) for _ in range(3)]
    for s in subscribers:
        s.send({"type": "subscribe", "topic": "t"})
        s.pump()
    publisher.send({"type": "subscribe", "topic": "t"})
    publisher.pump()
    core.take_dirty()
    # Three publishes in one received chunk: every touched connection ends up with one buffer.
    chunk = b""
    for i in range(3):
        publisher.ws.send_text(
            orjson.dumps(
                {
                    "type": "publish",
                    "topic": "t",
                    "data": f"d{i}",
                    "hash": "h",
                    "timestamp": 1,
                    "messageId": f"m{i}",
                }
            )
        )
    chunk = publisher.ws.data_to_send()
    core.receive_data(publisher.conn, chunk, 0.0)
    assert sorted(core.take_dirty()) == sorted([publisher.conn, *(s.conn for s in subscribers)])
    buffers = [core.data_to_send(s.conn) for s in subscribers]
    assert len(set(buffers)) == 1, "the message frames are encoded once and shared"
    for s, buffer in zip(subscribers, buffers, strict=True):
        frames = s._take(buffer, 0.0)
        assert [f["messageId"] for f in frames] == ["m0", "m1", "m2"]
        assert frames[0] == {
            "type": "message",
            "topic": "t",
            "data": "d0",
            "hash": "h",
            "timestamp": 1,
            "messageId": "m0",
        }
    responses = publisher.pump()
    assert [r["deliveredTo"] for r in responses] == [3, 3, 3]
    assert all(r["type"] == "publish_response" for r in responses), "the publisher never gets its own message"


def test_sessions_are_isolated() -> None:
    core = make_core()
    a_pub, a_sub, b_sub = ready(core), ready(core), ready(core, "other", "pw2")
    for s in (a_sub, b_sub):
        s.send({"type": "subscribe", "topic": "t"})
        s.pump()
    a_pub.publish("t", "m1")
    assert a_pub.pump()[0]["deliveredTo"] == 1
    assert [f["messageId"] for f in a_sub.pump()] == ["m1"]
    assert b_sub.pump() == []


def test_frames_before_init_and_bad_frames_get_error_frames_and_are_counted() -> None:
    core = make_core()
    peer = RawPeer(core)
    peer.send({"type": "subscribe", "topic": "t"})
    peer.send_frame(Opcode.TEXT, b"{not json")
    peer.send_frame(Opcode.BINARY, b"\x00\x01")
    codes = [f["code"] for f in peer.pump()]
    assert codes == ["not_initialised", "invalid_json", "binary_not_supported"]
    assert all("error" in f for f in peer.received)
    assert core.metrics.value("protocol_errors", "invalid_json") == 1
    assert core.metrics.value("binary_frames") == 1
    assert peer.ws.is_open


def test_oversized_message_is_refused_from_its_header_with_1009() -> None:
    core = make_core(limits=Limits(max_message_size=1000))
    peer = ready(core)
    header_only = encode_frame(Opcode.TEXT, b"x" * 5000, mask=True)[:14]
    peer.send_raw(header_only)
    peer.pump()
    assert peer.ws.close_code == CloseCode.MESSAGE_TOO_BIG
    assert core.should_close(peer.conn)


def test_a_message_in_too_many_fragments_closes_with_1009() -> None:
    core = make_core(limits=Limits(max_fragments_per_message=8))
    peer = ready(core)
    peer.send_raw(raw_frame(Opcode.TEXT, b"{", fin=False))
    peer.send_raw(raw_frame(Opcode.CONTINUATION, b"", fin=False) * 7)
    assert core.data_to_send(peer.conn) == b""  # 8 fragments: still waiting for the rest
    peer.send_raw(raw_frame(Opcode.CONTINUATION, b"", fin=False))
    peer.pump()
    assert peer.ws.close_code == CloseCode.MESSAGE_TOO_BIG
    assert core.should_close(peer.conn)


def test_ping_is_answered_and_silence_is_detected() -> None:
    core = make_core(ping_interval=10.0, ping_timeout=5.0)
    peer = ready(core)
    peer.send_frame(Opcode.PING, b"hi")
    assert core.data_to_send(peer.conn) == encode_frame(Opcode.PONG, b"hi", mask=False)
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= 10.0
    core.handle_timeout(10.0)
    assert core.data_to_send(peer.conn) == encode_frame(Opcode.PING, b"", mask=False)
    core.handle_timeout(15.0)
    assert core.should_close(peer.conn)
    core.connection_lost(peer.conn, 15.0)
    assert core.connection_count == 0
    assert core.stats().connections == 0


def test_connection_that_never_upgrades_is_closed_after_the_handshake_timeout() -> None:
    core = make_core(handshake_timeout=3.0)
    conn = core.open_connection(0.0, "10.0.0.1")
    core.receive_data(conn, b"GET / HTT", 1.0)
    assert not core.should_close(conn)
    core.handle_timeout(4.0)
    assert core.should_close(conn)


def test_upgraded_connection_that_never_inits_is_closed_with_4005() -> None:
    core = make_core(handshake_timeout=3.0, ping_interval=None)
    peer = RawPeer(core)
    core.handle_timeout(3.5)
    peer.pump(3.5)
    assert peer.ws.close_code == CloseCode.HANDSHAKE_TIMEOUT


def test_admin_api_on_the_same_port_with_keep_alive() -> None:
    core = make_core()
    conn = core.open_connection(0.0)
    auth = (("Authorization", basic_auth("admin", "secret")),)
    body = orjson.dumps({"sessionName": "new", "password": "p", "retryInterval": 1000})
    core.receive_data(conn, http_request("POST", "/api/createSession", body, auth), 0.0)
    head, _, payload = core.data_to_send(conn).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    answer = orjson.loads(payload)
    assert answer["success"] is True and answer["secretKey"]
    core.receive_data(conn, http_request("GET", "/healthz"), 0.0)
    assert core.data_to_send(conn).startswith(b"HTTP/1.1 200")
    assert not core.should_close(conn)
    assert ready(core, "new", "p")


def test_dropping_a_session_over_http_closes_its_connections_with_4001() -> None:
    core = make_core()
    secret = core.create_session("doomed", "pw", 0.0)
    peer = ready(core, "doomed", "pw")
    conn = core.open_connection(0.0)
    body = orjson.dumps({"sessionName": "doomed", "password": "pw", "secretKey": secret})
    core.receive_data(
        conn,
        http_request("POST", "/api/dropSession", body, (("Authorization", basic_auth("admin", "secret")),)),
        0.0,
    )
    assert core.data_to_send(conn).startswith(b"HTTP/1.1 200")
    peer.pump()
    assert peer.ws.close_code == CloseCode.SESSION_DROPPED


def test_max_connections_refuses_at_once() -> None:
    core = make_core(limits=Limits(max_connections=1))
    first = core.open_connection(0.0)
    second = core.open_connection(0.0)
    assert not core.should_close(first)
    assert core.should_close(second)


def test_shutdown_closes_websockets_with_1001() -> None:
    core = make_core()
    peer = ready(core)
    http_conn = core.open_connection(0.0)
    core.shutdown(1.0)
    peer.pump(1.0)
    assert peer.ws.close_code == CloseCode.GOING_AWAY
    assert core.should_close(peer.conn)
    assert core.should_close(http_conn)


@pytest.mark.patches_core
def test_an_internal_error_closes_only_that_connection_with_1011(monkeypatch: pytest.MonkeyPatch) -> None:
    core = make_core()
    victim, bystander = ready(core), ready(core)

    def explode(*_: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(core.broker, "handle_packet", explode)
    victim.send({"type": "subscribe", "topic": "t"})
    victim.pump()
    assert victim.ws.close_code == CloseCode.INTERNAL_ERROR
    assert core.metrics.value("internal_errors") == 1
    monkeypatch.undo()
    bystander.send({"type": "subscribe", "topic": "t"})
    assert bystander.pump()[0]["success"] is True


def test_output_of_a_peer_that_never_reads_is_bounded() -> None:
    core = make_core(limits=Limits(max_output_buffer=4096, max_inflight_per_subscriber=10_000))
    publisher, stuck = ready(core), ready(core)
    stuck.send({"type": "subscribe", "topic": "t"})
    stuck.pump()
    for i in range(200):  # the adapter never drains ``stuck``
        publisher.publish("t", f"m{i}", data="x" * 100)
        publisher.pump()
    assert core.metrics.value("output_overflows") == 1
    # The backlog is dropped; only a close frame saying why is left to send.
    assert core.data_to_send(stuck.conn) == encode_frame(
        Opcode.CLOSE,
        int(CloseCode.SLOW_CONSUMER).to_bytes(2, "big") + b"output buffer limit exceeded",
        mask=False,
    )
    assert core.should_close(stuck.conn)


def test_pipelined_http_requests_are_all_answered() -> None:
    core = make_core()
    conn = core.open_connection(0.0)
    core.receive_data(conn, http_request("GET", "/healthz") * 3, 0.0)
    assert core.data_to_send(conn).count(b"HTTP/1.1 200") == 3
    assert not core.should_close(conn)


def test_pipelined_http_requests_answered_per_read_are_capped() -> None:
    core = make_core(limits=Limits(max_http_pipeline=4))
    conn = core.open_connection(0.0)
    core.receive_data(conn, http_request("GET", "/healthz") * 4, 0.0)
    assert core.data_to_send(conn).count(b"HTTP/1.1 200") == 4
    assert not core.should_close(conn)  # at the cap, not past it
    core.receive_data(conn, http_request("GET", "/healthz") * 1000, 0.0)
    assert core.data_to_send(conn).count(b"HTTP/1.1 200") == 4
    assert core.should_close(conn)
    assert core.metrics.value("protocol_errors", "http_pipeline") == 1


# -- the "only documented errors" invariant ------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_before_the_upgrade_never_raise(chunks: list[bytes]) -> None:
    core = make_core()
    conn = core.open_connection(0.0)
    for chunk in chunks:
        core.receive_data(conn, chunk, 0.0)
        core.data_to_send(conn)
    assert core.metrics.value("internal_errors") == 0


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_after_the_upgrade_never_raise(chunks: list[bytes]) -> None:
    core = make_core()
    peer = ready(core)
    for chunk in chunks:
        peer.send_raw(chunk)
        peer.pump()
    assert core.metrics.value("internal_errors") == 0


json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
frame_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(["init", "subscribe", "unsubscribe", "publish", "ack", "nope"])},
    optional=dict.fromkeys(
        [
            "topic",
            "data",
            "hash",
            "timestamp",
            "messageId",
            "sessionName",
            "password",
            "clientId",
            "encoding",
        ],
        json_scalars,
    ),
)


@settings(max_examples=300)
@given(st.lists(frame_objects, max_size=12))
def test_arbitrary_json_frames_get_an_answer_or_nothing_never_an_exception(
    frames: list[dict[str, object]],
) -> None:
    core = make_core()
    peer = ready(core)
    for frame in frames:
        peer.send(frame)
        answers = peer.pump()
        if frame["type"] != "ack":
            # every frame but an ack is answered: a *_response or an error frame
            assert answers, frame
            assert all(
                a["type"]
                in {
                    "error",
                    "init_response",
                    "subscribe_response",
                    "unsubscribe_response",
                    "publish_response",
                    "message",
                }
                for a in answers
            )
    assert core.metrics.value("internal_errors") == 0


def test_a_closed_websocket_should_close_even_before_its_last_bytes_are_taken() -> None:
    """A peer that never reads must not keep its socket by leaving its close frame untaken."""
    core = make_core(limits=Limits(max_output_buffer=4096, max_inflight_per_subscriber=10_000))
    publisher, stuck = ready(core), ready(core)
    stuck.send({"type": "subscribe", "topic": "t"})
    stuck.pump()
    for i in range(100):
        publisher.publish("t", f"m{i}", data="x" * 100)
        publisher.pump()
    assert core.should_close(stuck.conn)  # the 4002 close frame is still queued, untaken
    assert core.data_to_send(stuck.conn)[:1] == b"\x88"


def test_a_closing_websocket_waits_for_the_close_reply_then_gives_up() -> None:
    core = make_core(ping_interval=None)
    peer = ready(core)
    core.shutdown(1.0)
    assert not core.should_close(peer.conn)  # the closing handshake is under way
    deadline = core.next_deadline()
    assert deadline is not None
    core.handle_timeout(deadline)
    assert core.should_close(peer.conn)


def test_pipelined_requests_from_a_peer_that_never_reads_are_bounded() -> None:
    core = make_core(limits=Limits(max_output_buffer=2000))
    conn = core.open_connection(0.0)
    core.receive_data(conn, http_request("GET", "/healthz") * 50, 0.0)
    assert core.should_close(conn)
    assert core.metrics.value("output_overflows") == 1
    assert len(core.data_to_send(conn)) < 2000 + 500


def test_close_codes_chosen_by_the_peer_do_not_grow_the_metrics() -> None:
    core = make_core()
    for code in (1000, *range(3000, 3050), 4321):
        peer = ready(core)
        peer.send_frame(Opcode.CLOSE, code.to_bytes(2, "big"))
        peer.pump()
        core.connection_lost(peer.conn, 0.0)
    closed = {labels: value for name, labels, value in core.metrics.items() if name == "connections_closed"}
    assert closed == {("1000",): 1, ("other",): 51}


def test_total_output_is_bounded_by_closing_the_largest_buffer() -> None:
    core = make_core(limits=Limits(max_total_output_buffer=4000))
    publisher, reader = ready(core), ready(core)
    laggard, other = ready(core), ready(core)  # neither reads; the laggard gets twice the traffic
    for peer, topics in ((reader, ["t"]), (laggard, ["t", "u"]), (other, ["t"])):
        for topic in topics:
            peer.send({"type": "subscribe", "topic": topic})
            peer.pump()
    for i in range(20):
        for topic in ("t", "u"):
            publisher.publish(topic, f"{topic}{i}", data="x" * 100)
            publisher.pump()
            reader.pump()
            assert core._output_total <= 4000
    assert core.metrics.value("output_overflows") >= 1
    closes = {}
    for name, peer in (("laggard", laggard), ("other", other)):
        peer.pump()
        closes[name] = peer.ws.close_code
    assert closes["laggard"] == CloseCode.SLOW_CONSUMER
    assert reader.ws.is_open and len([f for f in reader.received if f["type"] == "message"]) == 20
    live = [c.ws.pending_bytes for c in core._connections.values() if c.ws is not None]
    assert core._output_total == sum(live)  # the running total never drifts from the buffers
