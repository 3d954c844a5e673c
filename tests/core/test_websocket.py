"""One WebSocket endpoint on virtual time: ping/pong, both closing handshakes, keepalive, faults, EOF."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastport_core.errors import CloseCode, LocalProtocolError
from fastport_core.frames import (
    ABNORMAL_CLOSURE,
    NO_STATUS_RECEIVED,
    BinaryMessage,
    Close,
    FrameDecoder,
    FrameEvent,
    Opcode,
    Ping,
    Pong,
    TextMessage,
    encode_close_payload,
    encode_frame,
)
from fastport_core.websocket import WebSocket, WebSocketState

LIMIT = 1000


server = functools.partial(WebSocket, client=False, max_message_size=LIMIT, now=0.0)
client = functools.partial(WebSocket, client=True, max_message_size=LIMIT, now=0.0)


def from_client(opcode: Opcode, payload: bytes = b"") -> bytes:
    return encode_frame(opcode, payload, mask=True)


def fragment(opcode: Opcode, payload: bytes, *, fin: bool) -> bytes:
    """One masked fragment (``encode_frame`` always sets FIN); the zero key leaves the payload as is."""
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def sent(ws: WebSocket) -> list[FrameEvent]:
    """Decode what the server ``ws`` queued, as its client would (every frame, the Close included)."""
    decoder = FrameDecoder(client=True, max_message_size=2**32)
    decoder.feed(ws.data_to_send())
    events = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def transfer(source: WebSocket, target: WebSocket, now: float) -> list[TextMessage | BinaryMessage]:
    return target.receive_data(source.data_to_send(), now)


# -- messages and ping/pong -------------------------------------------------------------------------------


def test_messages_are_returned_and_pings_answered() -> None:
    ws = server()
    data = (
        from_client(Opcode.TEXT, b"hi") + from_client(Opcode.PING, b"p") + from_client(Opcode.BINARY, b"\0")
    )
    assert ws.receive_data(data, 1.0) == [TextMessage("hi"), BinaryMessage(b"\0")]
    assert sent(ws) == [Pong(b"p")]
    assert ws.state is WebSocketState.OPEN


def test_fragmented_message_reassembled_across_chunks() -> None:
    ws = server()
    data = (
        fragment(Opcode.TEXT, b"he", fin=False)
        + from_client(Opcode.PING)
        + fragment(Opcode.CONTINUATION, b"llo", fin=True)
    )
    received: list[TextMessage | BinaryMessage] = []
    for i in range(len(data)):
        received += ws.receive_data(data[i : i + 1], float(i))
    assert received == [TextMessage("hello")]
    assert sent(ws) == [Pong(b"")]


def test_client_masks_and_server_does_not() -> None:
    a, b = client(), server()
    a.send_text(b'{"type":"init"}')
    raw = a.data_to_send()
    assert raw[1] & 0x80
    assert b.receive_data(raw, 0.0) == [TextMessage('{"type":"init"}')]
    b.send_text(b"{}")
    b.append_frame(encode_frame(Opcode.TEXT, b"[]", mask=False))
    raw = b.data_to_send()
    assert not raw[1] & 0x80
    assert a.receive_data(raw, 0.0) == [TextMessage("{}"), TextMessage("[]")]


def test_data_to_send_empties_the_queue_and_pending_bytes_counts_it() -> None:
    ws = server()
    assert ws.data_to_send() == b""
    ws.send_text(b"abc")
    ws.append_frame(b"\x81\x01x")
    assert ws.pending_bytes == 5 + 3
    assert ws.data_to_send() == b"\x81\x03abc\x81\x01x"
    assert ws.pending_bytes == 0
    assert ws.data_to_send() == b""


# -- closing handshake ------------------------------------------------------------------------------------


def test_peer_initiated_close_is_echoed_and_closes() -> None:
    ws = server()
    data = from_client(Opcode.TEXT, b"last") + from_client(Opcode.CLOSE, encode_close_payload(4000, "bye"))
    assert ws.receive_data(data, 1.0) == [TextMessage("last")]
    assert ws.state is WebSocketState.CLOSED
    assert (ws.close_code, ws.close_reason, ws.failure) == (4000, "bye", None)
    assert not ws.should_close_transport  # the echo is still queued
    assert sent(ws) == [Close(4000, "")]
    assert ws.should_close_transport
    assert ws.next_deadline() is None


def test_peer_close_without_code_is_echoed_without_code() -> None:
    ws = server()
    ws.receive_data(from_client(Opcode.CLOSE), 1.0)
    assert ws.close_code == NO_STATUS_RECEIVED
    assert ws.data_to_send() == b"\x88\x00"


def test_our_close_waits_for_the_answer() -> None:
    ws = server()
    ws.close(CloseCode.GOING_AWAY, "shutdown", now=10.0)
    assert ws.state is WebSocketState.CLOSING
    assert ws.next_deadline() == 15.0
    assert sent(ws) == [Close(1001, "shutdown")]
    # The peer may still be sending: its messages arrive, its pings are no longer answered.
    assert ws.receive_data(from_client(Opcode.TEXT, b"late") + from_client(Opcode.PING), 11.0) == [
        TextMessage("late")
    ]
    assert ws.data_to_send() == b""
    ws.receive_data(from_client(Opcode.CLOSE, encode_close_payload(1001, "")), 12.0)
    assert ws.state is WebSocketState.CLOSED
    assert (ws.close_code, ws.close_reason) == (1001, "shutdown")
    assert ws.should_close_transport


def test_close_timeout() -> None:
    ws = server(close_timeout=5.0)
    ws.close(CloseCode.NORMAL, "", now=0.0)
    ws.handle_timeout(4.9)
    assert ws.state is WebSocketState.CLOSING
    ws.handle_timeout(5.0)
    assert ws.state is WebSocketState.CLOSED
    assert ws.close_code == ABNORMAL_CLOSURE
    assert ws.should_close_transport  # the unsent Close is dropped: the peer is not reading anyway
    assert ws.next_deadline() is None


def test_close_handshake_between_a_client_and_a_server() -> None:
    a, b = client(), server()
    a.send_text(b"1")
    a.close(CloseCode.NORMAL, "done", now=0.0)
    a.send_text(b"never sent")
    assert transfer(a, b, 0.1) == [TextMessage("1")]
    assert b.state is WebSocketState.CLOSED
    assert transfer(b, a, 0.2) == []
    assert a.state is WebSocketState.CLOSED
    assert a.should_close_transport and b.should_close_transport
    assert a.close_code == b.close_code == 1000


def test_sending_is_ignored_once_not_open() -> None:
    ws = server()
    ws.close(CloseCode.NORMAL, "", now=0.0)
    ws.data_to_send()
    assert not ws.is_open
    ws.send_text(b"x")
    ws.append_frame(b"\x81\x01x")
    ws.close(CloseCode.GOING_AWAY, "again", now=1.0)
    assert ws.data_to_send() == b""
    assert ws.close_code == 1000


def test_close_with_a_code_that_cannot_be_sent_is_a_local_error() -> None:
    ws = server()
    with pytest.raises(LocalProtocolError):
        ws.close(ABNORMAL_CLOSURE, "", now=0.0)
    assert ws.is_open


def test_long_close_reason_is_truncated() -> None:
    ws = server()
    ws.close(CloseCode.NORMAL, "x" * 500, now=0.0)
    assert sent(ws) == [Close(1000, "x" * 123)]


# -- keepalive --------------------------------------------------------------------------------------------


def test_idle_connection_is_pinged_then_aborted() -> None:
    ws = server(now=0.0, ping_interval=10.0, ping_timeout=5.0)
    assert ws.next_deadline() == 10.0
    ws.handle_timeout(9.0)
    assert ws.data_to_send() == b""
    ws.handle_timeout(10.0)
    assert sent(ws) == [Ping(b"")]
    assert ws.next_deadline() == 15.0
    ws.handle_timeout(14.9)
    assert ws.is_open
    ws.send_text(b"unsent")
    ws.handle_timeout(15.0)
    assert ws.state is WebSocketState.CLOSED
    assert ws.close_code == CloseCode.KEEPALIVE_TIMEOUT
    assert ws.data_to_send() == b""  # aborted: nothing more is sent
    assert ws.should_close_transport


def test_any_received_bytes_answer_the_ping() -> None:
    ws = server(now=0.0, ping_interval=10.0, ping_timeout=5.0)
    ws.handle_timeout(10.0)
    ws.receive_data(from_client(Opcode.TEXT, b"{}")[:3], 12.0)  # not even a whole frame
    assert ws.next_deadline() == 22.0
    ws.handle_timeout(15.0)
    assert ws.is_open


def test_pong_answers_the_ping() -> None:
    a, b = client(ping_interval=10.0, ping_timeout=5.0), server(ping_interval=None)
    a.handle_timeout(10.0)
    transfer(a, b, 10.5)
    transfer(b, a, 11.0)
    assert a.next_deadline() == 21.0
    assert b.next_deadline() is None


def test_received_data_postpones_the_ping() -> None:
    ws = server(now=0.0, ping_interval=10.0)
    ws.receive_data(from_client(Opcode.TEXT, b"{}"), 7.0)
    assert ws.next_deadline() == 17.0
    ws.handle_timeout(10.0)
    assert ws.data_to_send() == b""


def test_late_timer_pings_before_it_aborts() -> None:
    """A timer that fires very late (a suspended process) does not kill a peer that was never pinged."""
    ws = server(now=0.0, ping_interval=10.0, ping_timeout=5.0)
    ws.handle_timeout(100.0)
    assert ws.is_open
    assert sent(ws) == [Ping(b"")]
    assert ws.next_deadline() == 105.0


def test_invalid_timeouts_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        server(ping_interval=0.0)
    with pytest.raises(LocalProtocolError):
        server(close_timeout=-1.0)


# -- faults and EOF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encode_frame(Opcode.TEXT, b"x", mask=False), CloseCode.PROTOCOL_ERROR),
        (from_client(Opcode.TEXT, b"\xff"), CloseCode.INVALID_PAYLOAD),
        (from_client(Opcode.BINARY, b"x" * (LIMIT + 1))[:4], CloseCode.MESSAGE_TOO_BIG),
    ],
    ids=["unmasked", "invalid UTF-8", "too big"],
)
def test_protocol_violation_closes_with_its_code_and_never_raises(data: bytes, code: CloseCode) -> None:
    ws = server()
    before = from_client(Opcode.TEXT, b"ok")
    assert ws.receive_data(before + data + from_client(Opcode.TEXT, b"ignored"), 1.0) == [TextMessage("ok")]
    assert ws.state is WebSocketState.CLOSED
    assert ws.failure is not None and ws.failure.close_code is code
    assert ws.close_code == code
    [close] = sent(ws)
    assert isinstance(close, Close) and close.code == code and close.reason == ws.failure.message[:123]
    assert ws.should_close_transport
    assert ws.receive_data(from_client(Opcode.TEXT, b"more"), 2.0) == []


def test_protocol_violation_while_closing_sends_no_second_close() -> None:
    ws = server()
    ws.close(CloseCode.NORMAL, "", now=0.0)
    ws.data_to_send()
    ws.receive_data(fragment(Opcode.CONTINUATION, b"stray", fin=True), 1.0)
    assert ws.state is WebSocketState.CLOSED
    assert ws.failure is not None
    assert ws.close_code == 1000
    assert ws.data_to_send() == b""


@pytest.mark.parametrize("closing", [False, True])
def test_eof_before_the_closing_handshake_is_abnormal(closing: bool) -> None:
    ws = server()
    if closing:
        ws.close(CloseCode.NORMAL, "", now=0.0)
    ws.receive_data(b"", 1.0)
    assert ws.state is WebSocketState.CLOSED
    assert ws.close_code == ABNORMAL_CLOSURE
    assert ws.next_deadline() is None


def test_eof_after_the_closing_handshake_changes_nothing() -> None:
    ws = server()
    ws.receive_data(from_client(Opcode.CLOSE, encode_close_payload(1000, "")), 1.0)
    ws.receive_data(b"", 2.0)
    assert ws.close_code == 1000


def test_abort() -> None:
    ws = server()
    ws.send_text(b"x")
    ws.abort(CloseCode.SLOW_CONSUMER, "too slow")
    assert (ws.state, ws.close_code, ws.close_reason) == (WebSocketState.CLOSED, 4002, "too slow")
    assert ws.pending_bytes == 0
    assert ws.should_close_transport
    ws.abort(CloseCode.INTERNAL_ERROR, "ignored")
    assert ws.close_code == 4002


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    data=st.lists(st.binary(max_size=40), max_size=10),
    is_client=st.booleans(),
    eof=st.booleans(),
)
def test_arbitrary_input_never_raises(data: list[bytes], is_client: bool, eof: bool) -> None:
    ws = client() if is_client else server()
    for index, chunk in enumerate([*data, b""] if eof else data):
        ws.receive_data(chunk, float(index))
        ws.handle_timeout(float(index))
        ws.data_to_send()
    if ws.failure is not None:
        assert ws.state is WebSocketState.CLOSED
        assert ws.close_code == ws.failure.close_code
    if eof:
        assert ws.state is WebSocketState.CLOSED


def test_abort_with_notify_replaces_the_backlog_with_one_close_frame() -> None:
    ws = WebSocket(client=False, max_message_size=1000, now=0.0)
    ws.send_text(b"x" * 500)
    ws.abort(4002, "slow", notify=True)
    assert ws.data_to_send() == encode_frame(Opcode.CLOSE, encode_close_payload(4002, "slow"), mask=False)
    assert ws.state is WebSocketState.CLOSED
    assert ws.should_close_transport
