"""The wire as an existing fastPort client sees it: hand-written JSON over a raw wsproto WebSocket.

These tests pin exact frames (every field, nothing more) so that a change in the core that an old client
would notice fails here, whatever our own client does.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from wsproto.events import CloseConnection

from fastport_anyio import Server, SessionSpec
from fastport_core.config import SessionSettings

from .conftest import FAST_CONFIG, SESSIONS, TIMEOUT, RawClient, publish_frame

pytestmark = pytest.mark.anyio

INIT_OK = {"type": "init_response", "success": True, "sessionName": "alpha"}


async def connected(server: Server, session: str = "alpha") -> RawClient:
    client = await RawClient.connect(server.port)
    answer = await client.init(session, f"{session}-password")
    assert answer["success"] is True, answer
    return client


async def test_init_answers_with_the_session_name(server: Server) -> None:
    async with await RawClient.connect(server.port) as client:
        assert await client.init("alpha", "alpha-password") == INIT_OK


async def test_init_with_a_wrong_password_is_refused_with_an_error_text(server: Server) -> None:
    async with await RawClient.connect(server.port) as client:
        answer = await client.init("alpha", "wrong")
        assert answer["type"] == "init_response"
        assert answer["success"] is False
        assert isinstance(answer["error"], str) and answer["error"]
        assert answer["code"] == "auth_failed"
        assert "sessionName" not in answer


async def test_unknown_session_gets_the_same_answer_as_a_wrong_password(server: Server) -> None:
    # A second server, because a failed init throttles the peer address (127.0.0.1 for both clients).
    async with (
        Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS) as other,
        await RawClient.connect(server.port) as a,
        await RawClient.connect(other.port) as b,
    ):
        wrong_password = await a.init("alpha", "wrong")
        unknown = await b.init("no-such-session", "whatever")
    assert wrong_password == unknown


async def test_publish_reaches_another_client_with_exact_fields(server: Server) -> None:
    async with await connected(server) as publisher, await connected(server) as subscriber:
        assert await subscriber.subscribe("sensors/temp") == {
            "type": "subscribe_response",
            "success": True,
            "topic": "sensors/temp",
        }
        frame = publish_frame("sensors/temp", "iv:ciphertext", "id-1", timestamp=1764100000000)
        assert await publisher.request(frame) == {
            "type": "publish_response",
            "success": True,
            "messageId": "id-1",
            "deliveredTo": 1,
        }
        assert await subscriber.receive() == {
            "type": "message",
            "topic": "sensors/temp",
            "data": "iv:ciphertext",
            "hash": "0" * 64,
            "timestamp": 1764100000000,
            "messageId": "id-1",
        }


async def test_publisher_does_not_receive_its_own_message(server: Server) -> None:
    async with await connected(server) as client:
        await client.subscribe("t")
        answer = await client.request(publish_frame("t", "x", "own"))
        assert answer["deliveredTo"] == 0
        # Delivered to no one: settled at once (the original Dart client waits for this frame).
        assert await client.receive() == {"type": "ack_received", "messageId": "own", "topic": "t"}
        # The next frame is the answer to this request, not an echo of the publish.
        assert (await client.subscribe("barrier"))["type"] == "subscribe_response"


async def test_the_publisher_gets_ack_received_once_the_subscriber_acked(server: Server) -> None:
    async with await connected(server) as publisher, await connected(server) as subscriber:
        await subscriber.subscribe("t")
        assert (await publisher.request(publish_frame("t", "x", "m-1")))["deliveredTo"] == 1
        assert (await subscriber.receive())["messageId"] == "m-1"
        await subscriber.send_json({"type": "ack", "topic": "t", "messageId": "m-1"})
        assert await publisher.receive() == {"type": "ack_received", "messageId": "m-1", "topic": "t"}


async def test_binary_encoding_is_relayed_verbatim(server: Server) -> None:
    async with await connected(server) as publisher, await connected(server) as subscriber:
        await subscriber.subscribe("bin")
        frame = {**publish_frame("bin", "AAEC:BAUG", "b-1"), "encoding": "binary"}
        await publisher.request(frame)
        message = await subscriber.receive()
        assert message["encoding"] == "binary"
        assert message["data"] == "AAEC:BAUG"


async def test_ack_stops_retries_for_that_subscriber_only(anyio_backend: str) -> None:
    fast_retry = SessionSettings(retry_interval=0.05, max_retry_limit=5)
    sessions = [SessionSpec("alpha", "alpha-password", settings=fast_retry)]
    async with (
        Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=sessions) as server,
        await connected(server) as publisher,
        await connected(server) as acker,
        await connected(server) as silent,
    ):
        for subscriber in (acker, silent):
            await subscriber.subscribe("t")
        assert (await publisher.request(publish_frame("t", "x", "r-1")))["deliveredTo"] == 2
        first = await acker.receive()
        await acker.send_json({"type": "ack", "topic": "t", "messageId": first["messageId"]})
        assert "retry" not in await silent.receive()
        retried = await silent.receive()  # the silent one gets re-sends, counted on the wire
        assert retried["messageId"] == "r-1" and retried["retry"] == 1
        # Retries for one message are due together, so the acker's would have come before this answer.
        assert (await acker.subscribe("barrier"))["type"] == "subscribe_response"


async def test_ack_has_no_answer(server: Server) -> None:
    async with await connected(server) as publisher, await connected(server) as subscriber:
        await subscriber.subscribe("t")
        await publisher.request(publish_frame("t", "x", "a-1"))
        await subscriber.receive()
        await subscriber.send_json({"type": "ack", "topic": "t", "messageId": "a-1"})
        assert (await subscriber.subscribe("next"))["type"] == "subscribe_response"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "subscribe"}', "invalid_frame"),
        ('{"type": "subscribe", "topic": 7}', "invalid_frame"),
    ],
)
async def test_bad_frames_get_an_error_frame_with_the_error_field(
    server: Server, text: str, code: str
) -> None:
    async with await connected(server) as client:
        await client.send_text(text)
        answer = await client.receive()
        assert answer["type"] == "error"
        assert answer["code"] == code
        assert isinstance(answer["error"], str) and answer["error"]  # what existing clients read
        assert await client.subscribe("still-usable") == {
            "type": "subscribe_response",
            "success": True,
            "topic": "still-usable",
        }


async def test_frames_before_init_are_refused_as_not_initialised(server: Server) -> None:
    async with await RawClient.connect(server.port) as client:
        answer = await client.request({"type": "subscribe", "topic": "t"})
        assert answer["type"] == "error"
        assert answer["code"] == "not_initialised"
        assert answer["error"]
        assert await client.init("alpha", "alpha-password") == INIT_OK


async def test_a_second_init_is_refused(server: Server) -> None:
    async with await connected(server) as client:
        answer = await client.init("beta", "beta-password")
        assert answer["type"] == "error"
        assert answer["code"] == "already_initialised"


async def test_binary_websocket_frames_are_answered_with_an_error(server: Server) -> None:
    async with await connected(server) as client:
        await client.send_bytes(b'{"type": "subscribe", "topic": "t"}')
        answer = await client.receive()
        assert answer["type"] == "error"
        assert answer["code"] == "binary_not_supported"


async def test_sessions_are_isolated(server: Server) -> None:
    async with (
        await connected(server, "alpha") as alpha_subscriber,
        await connected(server, "beta") as beta_publisher,
        await connected(server, "beta") as beta_subscriber,
    ):
        await alpha_subscriber.subscribe("shared/topic")
        await beta_subscriber.subscribe("shared/topic")
        answer = await beta_publisher.request(publish_frame("shared/topic", "beta only", "same-id"))
        assert answer["deliveredTo"] == 1
        assert (await beta_subscriber.receive())["data"] == "beta only"
        # An ACK for beta's message id from alpha touches nothing, and alpha received nothing.
        await alpha_subscriber.send_json({"type": "ack", "topic": "shared/topic", "messageId": "same-id"})
        assert (await alpha_subscriber.subscribe("barrier"))["type"] == "subscribe_response"


async def test_unsubscribe_stops_delivery(server: Server) -> None:
    async with await connected(server) as publisher, await connected(server) as subscriber:
        await subscriber.subscribe("t")
        answer = await subscriber.request({"type": "unsubscribe", "topic": "t"})
        assert answer == {"type": "unsubscribe_response", "success": True, "topic": "t"}
        assert (await publisher.request(publish_frame("t", "x", "u-1")))["deliveredTo"] == 0


async def test_pipelined_frames_are_answered_in_order(server: Server) -> None:
    """An old client may fire frames without waiting; one TCP chunk holds them all."""
    async with await RawClient.connect(server.port) as client, await connected(server) as subscriber:
        await subscriber.subscribe("t")
        frames: list[dict[str, Any]] = [
            {"type": "init", "sessionName": "alpha", "password": "alpha-password"},
            {"type": "subscribe", "topic": "mine"},
            *(publish_frame("t", f"m{i}", f"p-{i}") for i in range(20)),
        ]
        data = b"".join(client.ws.send(_text(frame)) for frame in frames)
        await client.stream.send(data)
        with anyio.fail_after(TIMEOUT):
            answers = [await client.receive() for _ in frames]
            received = [await subscriber.receive() for _ in range(20)]
        assert [a["type"] for a in answers[:2]] == ["init_response", "subscribe_response"]
        assert [a["messageId"] for a in answers[2:]] == [f"p-{i}" for i in range(20)]
        assert [m["data"] for m in received] == [f"m{i}" for i in range(20)]


def _text(frame: dict[str, Any]) -> Any:
    import orjson
    from wsproto.events import TextMessage

    return TextMessage(data=orjson.dumps(frame).decode())


# --------------------------------------------------------------------------------------------------------
# Subscriber lifecycle: a clean close (a Close frame) releases a clientId subscriber unless it is persistent


async def resumable(server: Server, **init: Any) -> RawClient:
    client = await RawClient.connect(server.port)
    frame = {"type": "init", "sessionName": "alpha", "password": "alpha-password", "clientId": "dev", **init}
    assert await client.request(frame) == INIT_OK
    assert (await client.subscribe("t"))["success"] is True
    return client


async def close_cleanly(client: RawClient) -> None:
    """Send a Close frame and wait for the server's answer: by then the server has acted on it."""
    try:
        await client._send(CloseConnection(code=1000, reason="bye"))
        while not isinstance(event := await client.next_event(), CloseConnection):
            pass  # a delivery the server sent before it read our Close
        assert event.code == 1000
    finally:
        await client.aclose()


async def test_a_clean_close_releases_a_subscriber_that_is_not_persistent(server: Server) -> None:
    async with await connected(server) as publisher:
        subscriber = await resumable(server)
        assert (await publisher.request(publish_frame("t", "x", "c-1")))["deliveredTo"] == 1
        await close_cleanly(subscriber)
        assert (await publisher.request(publish_frame("t", "x", "c-2")))["deliveredTo"] == 0
        async with await RawClient.connect(server.port) as again:
            init = {"type": "init", "sessionName": "alpha", "password": "alpha-password", "clientId": "dev"}
            assert await again.request(init) == INIT_OK
            assert (await again.subscribe("other"))["type"] == "subscribe_response"  # no resent c-1 first


async def test_a_persistent_subscriber_is_kept_across_a_clean_close(server: Server) -> None:
    async with await connected(server) as publisher:
        subscriber = await resumable(server, persistent=True)
        assert (await publisher.request(publish_frame("t", "x", "p-1")))["deliveredTo"] == 1
        await close_cleanly(subscriber)
        assert (await publisher.request(publish_frame("t", "x", "p-2")))["deliveredTo"] == 1
        async with await RawClient.connect(server.port) as again:
            init = {"type": "init", "sessionName": "alpha", "password": "alpha-password", "clientId": "dev"}
            assert await again.request(init) == INIT_OK
            resent = [await again.receive(), await again.receive()]
            assert [(m["messageId"], m["retry"]) for m in resent] == [("p-1", 1), ("p-2", 1)]


async def test_a_connection_lost_without_a_close_frame_keeps_the_subscriber(server: Server) -> None:
    async with await connected(server) as publisher:
        subscriber = await resumable(server)
        await subscriber.aclose()  # TCP closed, no Close frame: a lost connection
        with anyio.fail_after(TIMEOUT):
            while server.core.stats().per_session["alpha"].detached_subscribers != 1:
                await anyio.sleep(0.01)
        assert (await publisher.request(publish_frame("t", "x", "l-1")))["deliveredTo"] == 1


async def test_persistent_must_be_a_boolean(server: Server) -> None:
    async with await RawClient.connect(server.port) as client:
        frame = {"type": "init", "sessionName": "alpha", "password": "alpha-password", "persistent": "yes"}
        answer = await client.request(frame)
        assert answer == {
            "type": "error",
            "error": "init: field 'persistent' must be a boolean",
            "code": "invalid_frame",
        }
