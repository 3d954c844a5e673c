"""The opening handshake and plain HTTP, both sides, in memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastport_core.errors import LocalProtocolError, RemoteProtocolError
from fastport_core.handshake import (
    ClientHandshake,
    HttpEvent,
    HttpFailure,
    HttpRequest,
    HttpServerConnection,
    WebSocketUpgrade,
)

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3 example
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def request(
    method: str = "GET",
    target: str = "/ws",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    lines = [
        f"{method} {target} HTTP/{version}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


UPGRADE_HEADERS = {
    "Host": "example.com",
    "Upgrade": "websocket",
    "Connection": "keep-alive, Upgrade",
    "Sec-WebSocket-Key": RFC_KEY,
    "Sec-WebSocket-Version": "13",
}


def upgrade(**changes: str | None) -> bytes:
    """An upgrade request; a header set to None is left out, names use underscores for dashes."""
    headers = dict(UPGRADE_HEADERS)
    for name, value in changes.items():
        header = name.replace("_", "-")
        if value is None:
            del headers[header]
        else:
            headers[header] = value
    return request(headers=headers)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """A small independent parser: status, headers (lower-cased names), body."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def only(events: list[HttpEvent]) -> HttpEvent:
    assert len(events) == 1, events
    return events[0]


# -- server: upgrades -------------------------------------------------------------------------------------


def test_valid_upgrade_with_the_rfc_example_key() -> None:
    http = HttpServerConnection()
    event = only(http.receive_data(upgrade(Sec_WebSocket_Extensions="permessage-deflate")))
    assert isinstance(event, WebSocketUpgrade)
    assert event.target == "/ws"
    assert ("sec-websocket-key", RFC_KEY) in event.headers
    assert event.leftover == b""
    assert event.response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    status, headers, body = parse_response(event.response)
    assert status == 101
    assert headers["sec-websocket-accept"] == RFC_ACCEPT
    assert headers["upgrade"].lower() == "websocket" and headers["connection"].lower() == "upgrade"
    assert "sec-websocket-extensions" not in headers  # offers are ignored: nothing is negotiated
    assert body == b""
    with pytest.raises(LocalProtocolError):
        http.receive_data(b"\x81\x80")  # the bytes belong to the WebSocket now


def test_first_frame_in_the_same_chunk_is_left_over() -> None:
    frame = b"\x81\x82abcd\x09\x0b"
    event = only(HttpServerConnection().receive_data(upgrade() + frame))
    assert isinstance(event, WebSocketUpgrade) and event.leftover == frame


def test_upgrade_request_byte_by_byte() -> None:
    http = HttpServerConnection()
    data = upgrade()
    events = [event for i in range(len(data)) for event in http.receive_data(data[i : i + 1])]
    event = only(events)  # answered as soon as the request is complete
    assert isinstance(event, WebSocketUpgrade) and event.leftover == b""


# -- server: plain HTTP -----------------------------------------------------------------------------------


def test_plain_request_with_body_and_keep_alive() -> None:
    http = HttpServerConnection()
    body = b'{"sessionName":"s"}'
    post = request("POST", "/api/createSession", {"Host": "h", "Content-Length": str(len(body))}, body)
    event = only(http.receive_data(post))
    assert isinstance(event, HttpRequest)
    assert (event.method, event.target, event.body) == ("POST", "/api/createSession", body)
    assert ("content-length", str(len(body))) in event.headers
    status, headers, response_body = parse_response(http.respond(200, b'{"success":true}'))
    assert (status, headers["content-type"], response_body) == (200, "application/json", b'{"success":true}')
    assert not http.should_close
    second = only(http.receive_data(request("GET", "/healthz", {"Host": "h"})))
    assert isinstance(second, HttpRequest) and second.target == "/healthz"
    text = http.respond(200, b"ok", content_type="text/plain", headers=[("X-Extra", "1")])
    assert parse_response(text)[1]["x-extra"] == "1"


def test_other_upgrades_are_plain_requests() -> None:
    http = HttpServerConnection()
    h2c = {"Host": "h", "Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings", "HTTP2-Settings": ""}
    event = only(http.receive_data(request("GET", "/healthz", h2c)))
    assert isinstance(event, HttpRequest)
    assert parse_response(http.respond(200, b"{}"))[0] == 200  # not 101: the offer is declined
    assert isinstance(only(http.receive_data(request("GET", "/metrics", {"Host": "h"}))), HttpRequest)


def test_pipelined_request_waits_for_the_first_answer() -> None:
    http = HttpServerConnection()
    first = request("GET", "/a", {"Host": "h"})
    second = request("GET", "/b", {"Host": "h"})
    event = only(http.receive_data(first + second))
    assert isinstance(event, HttpRequest) and event.target == "/a"
    http.respond(404, b"{}")
    event = only(http.next_events())
    assert isinstance(event, HttpRequest) and event.target == "/b"


def test_chunked_body() -> None:
    http = HttpServerConnection()
    headers = {"Host": "h", "Transfer-Encoding": "chunked"}
    event = only(http.receive_data(request("POST", "/x", headers, b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")))
    assert isinstance(event, HttpRequest) and event.body == b"abcde"


def test_head_response_has_no_body() -> None:
    http = HttpServerConnection()
    only(http.receive_data(request("HEAD", "/healthz", {"Host": "h"})))
    status, headers, body = parse_response(http.respond(200, b"ok"))
    assert (status, headers["content-length"], body) == (200, "2", b"")


@pytest.mark.parametrize(
    "data",
    [
        request("GET", "/", {"Host": "h", "Connection": "close"}),
        request("GET", "/", {}, version="1.0"),
    ],
    ids=["Connection: close", "HTTP/1.0"],
)
def test_connection_closes_after_the_response_when_the_client_asks(data: bytes) -> None:
    http = HttpServerConnection()
    only(http.receive_data(data))
    http.respond(200, b"{}")
    assert http.should_close


def test_respond_without_a_request_is_a_local_error() -> None:
    http = HttpServerConnection()
    with pytest.raises(LocalProtocolError):
        http.respond(200, b"")
    http.receive_data(request("GET", "/", {"Host": "h"}))
    http.respond(200, b"")
    with pytest.raises(LocalProtocolError):
        http.respond(200, b"")


def test_eof() -> None:
    http = HttpServerConnection()
    assert http.receive_data(request("GET", "/", {"Host": "h"})) != []
    assert http.receive_data(b"") == []
    assert http.should_close
    assert parse_response(http.respond(200, b"{}"))[0] == 200  # a request already returned is answered
    assert http.receive_data(b"more") == []


def test_eof_in_the_middle_of_a_request() -> None:
    http = HttpServerConnection()
    assert http.receive_data(upgrade()[:20]) == []
    assert http.receive_data(b"") == []
    assert http.should_close


# -- server: failures -------------------------------------------------------------------------------------

FAILURES = {
    "missing key": (upgrade(Sec_WebSocket_Key=None), 400),
    "key of 15 bytes": (upgrade(Sec_WebSocket_Key="AAAAAAAAAAAAAAAAAAAA"), 400),
    "key not base64": (upgrade(Sec_WebSocket_Key="!" * 24), 400),
    "two keys": (upgrade()[:-2] + f"Sec-WebSocket-Key: {RFC_KEY}\r\n\r\n".encode(), 400),
    "wrong version": (upgrade(Sec_WebSocket_Version="8"), 426),
    "missing version": (upgrade(Sec_WebSocket_Version=None), 426),
    "no upgrade token": (upgrade(Connection="keep-alive"), 400),
    "POST": (upgrade().replace(b"GET", b"POST", 1), 400),
    "HTTP/1.0": (upgrade().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400),
    "upgrade with a body": (upgrade(Content_Length="3") + b"abc", 400),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "header too large": (request("GET", "/", {"Host": "h", "X-Big": "a" * 20_000}), 431),
    "header too large, incomplete": (request("GET", "/", {"Host": "h", "X-Big": "a" * 20_000})[:-4], 431),
    "declared body too large": (request("POST", "/", {"Host": "h", "Content-Length": "70000"}), 413),
    "chunked body too large": (
        request(
            "POST",
            "/",
            {"Host": "h", "Transfer-Encoding": "chunked"},
            b"10001\r\n" + b"a" * 65537 + b"\r\n0\r\n\r\n",
        ),
        413,
    ),
}


@pytest.mark.parametrize(("data", "status"), FAILURES.values(), ids=FAILURES.keys())
def test_failures_are_answered_and_close(data: bytes, status: int) -> None:
    http = HttpServerConnection()
    event = only(http.receive_data(data))
    assert isinstance(event, HttpFailure)
    assert event.status == status
    parsed_status, headers, body = parse_response(event.response)
    assert parsed_status == status
    assert headers["connection"] == "close"
    assert body == event.message.encode()
    if status == 426:
        assert headers["sec-websocket-version"] == "13"
    assert http.should_close
    assert http.receive_data(upgrade()) == []


def test_oversize_body_is_refused_from_its_header() -> None:
    http = HttpServerConnection(max_body_size=10)
    event = only(http.receive_data(request("POST", "/", {"Host": "h", "Content-Length": "11"})))
    assert isinstance(event, HttpFailure) and event.status == 413


@settings(max_examples=200, deadline=None, derandomize=True)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8), prefix=st.sampled_from([b"", upgrade()[:40]]))
def test_garbage_never_raises(chunks: list[bytes], prefix: bytes) -> None:
    http = HttpServerConnection(max_header_size=256, max_body_size=32)
    for chunk in [prefix, *chunks, b""]:
        for event in http.receive_data(chunk):
            if isinstance(event, HttpRequest):
                http.respond(200, b"{}")
                http.next_events()
            elif isinstance(event, WebSocketUpgrade):
                return


@settings(max_examples=200, deadline=None, derandomize=True)
@given(position=st.integers(0, len(upgrade()) - 1), byte=st.integers(0, 255))
def test_corrupted_upgrade_never_raises(position: int, byte: int) -> None:
    data = bytearray(upgrade())
    data[position] = byte
    events = HttpServerConnection().receive_data(bytes(data))
    assert all(isinstance(event, WebSocketUpgrade | HttpRequest | HttpFailure) for event in events)


# -- client -----------------------------------------------------------------------------------------------


def connect(
    host: str = "example.com:8080", target: str = "/ws?a=1"
) -> tuple[ClientHandshake, WebSocketUpgrade]:
    client = ClientHandshake(host, target)
    event = only(HttpServerConnection().receive_data(client.request))
    assert isinstance(event, WebSocketUpgrade)
    return client, event


def test_client_against_the_server() -> None:
    client, upgrade_event = connect()
    assert upgrade_event.target == "/ws?a=1"
    assert ("host", "example.com:8080") in upgrade_event.headers
    first_frame = b"\x81\x02hi"
    assert client.receive_data(upgrade_event.response + first_frame) == first_frame
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"\x81\x00")


def test_client_reads_the_answer_in_pieces() -> None:
    client, upgrade_event = connect()
    response = upgrade_event.response
    for i in range(len(response) - 1):
        assert client.receive_data(response[i : i + 1]) is None
    assert client.receive_data(response[-1:]) == b""


def test_client_skips_100_continue() -> None:
    client, upgrade_event = connect()
    assert client.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n" + upgrade_event.response) == b""


def swap_header(response: bytes, name: bytes, value: bytes | None) -> bytes:
    lines = [line for line in response.split(b"\r\n") if not line.lower().startswith(name.lower() + b":")]
    if value is not None:
        lines.insert(1, name + b": " + value)
    return b"\r\n".join(lines)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "server answered 404 Not Found"),
        (lambda r: b"HTTP/1.1 503 \r\nContent-Length: 0\r\n\r\n", "server answered 503 Service Unavailable"),
        (lambda r: swap_header(r, b"Sec-WebSocket-Accept", RFC_ACCEPT.encode()), "Sec-WebSocket-Accept"),
        (lambda r: swap_header(r, b"Sec-WebSocket-Accept", None), "Sec-WebSocket-Accept"),
        (lambda r: swap_header(r, b"Upgrade", b"h2c"), "Upgrade"),
        (lambda r: swap_header(r, b"Connection", b"keep-alive"), "Connection"),
        (lambda r: swap_header(r, b"Sec-WebSocket-Extensions", b"permessage-deflate"), "extensions"),
        (lambda r: swap_header(r, b"Sec-WebSocket-Protocol", b"chat"), "protocol"),
        (lambda r: b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "invalid HTTP"),
        (lambda r: b"", "closed the connection"),
    ],
    ids=[
        "404",
        "503 without reason",
        "wrong accept",
        "no accept",
        "upgrade",
        "connection",
        "ext",
        "proto",
        "garbage",
        "EOF",
    ],
)
def test_client_rejects_anything_but_a_valid_101(change: object, message: str) -> None:
    client, upgrade_event = connect()
    answer = change(upgrade_event.response)  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError, match=message) as first:
        client.receive_data(answer)
    with pytest.raises(RemoteProtocolError) as again:
        client.receive_data(b"more")
    assert again.value is first.value


def test_client_eof_after_a_partial_answer() -> None:
    client, upgrade_event = connect()
    assert client.receive_data(upgrade_event.response[:10]) is None
    with pytest.raises(RemoteProtocolError, match="closed the connection"):
        client.receive_data(b"")


def test_client_refuses_an_invalid_target() -> None:
    with pytest.raises(LocalProtocolError):
        ClientHandshake("example.com", "/with space")


def test_failure_answer_to_head_has_no_body() -> None:
    http = HttpServerConnection(max_header_size=100)
    event = only(http.receive_data(request("HEAD", "/", {"Host": "h", "X-Big": "a" * 200})))
    assert isinstance(event, HttpFailure) and event.status == 431
    assert parse_response(event.response)[2] == b""
