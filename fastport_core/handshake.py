"""The HTTP/1.1 side of a connection: the WebSocket opening handshake (RFC 6455 §4) and plain requests.

Both sides wrap an ``h11.Connection`` (h11 parses and serialises HTTP; this module only decides), as
wsproto's handshake does, then hand over to :mod:`fastport_core.websocket` with whatever bytes followed the
handshake. wsproto itself contributes only its two handshake primitives, the nonce and the accept token.

Server side, :class:`HttpServerConnection` turns received bytes into events:

* :class:`WebSocketUpgrade` for a valid upgrade request, with the complete ``101 Switching Protocols``
  answer to send and the bytes that followed the request (a client may send its first frame right
  behind its handshake). No extension or subprotocol is ever negotiated: offers are ignored.
* :class:`HttpRequest` for any other request (the server core routes it to its admin API), answered with
  :meth:`HttpServerConnection.respond`; connections are kept alive between requests as HTTP/1.1 wants.
* :class:`HttpFailure` for anything that cannot be served: malformed HTTP (400), an invalid upgrade
  request (400, or 426 with ``Sec-WebSocket-Version: 13`` for a missing or wrong version, RFC 6455 §4.4),
  request headers over ``max_header_size`` (431), a body over ``max_body_size`` (413, refused from its
  ``Content-Length`` before the body arrives). The event carries the response bytes; afterwards
  :attr:`HttpServerConnection.should_close` is true.

Nothing the peer sends makes ``receive_data`` raise. ``b""`` means end of file.

Client side, :class:`ClientHandshake` builds the upgrade request and checks the answer, raising
:class:`~fastport_core.errors.RemoteProtocolError` with a readable message for anything but a valid 101.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import h11
from wsproto.utilities import generate_accept_token, generate_nonce

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ClientHandshake",
    "Headers",
    "HttpEvent",
    "HttpFailure",
    "HttpRequest",
    "HttpServerConnection",
    "WebSocketUpgrade",
]

Headers = tuple[tuple[str, str], ...]
"""Header (name, value) pairs in received order; names lower-cased, both decoded as Latin-1 (lossless)."""

_WEBSOCKET_VERSION: Final = "13"


@dataclass(frozen=True, slots=True)
class WebSocketUpgrade:
    """A valid WebSocket upgrade request: send ``response``, then feed ``leftover`` to the WebSocket."""

    target: str
    headers: Headers
    response: bytes
    leftover: bytes


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A complete plain HTTP request, body included; answer it with :meth:`HttpServerConnection.respond`."""

    method: str
    target: str
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class HttpFailure:
    """A request that cannot be served: send ``response``, then close the connection."""

    status: int
    message: str
    response: bytes


HttpEvent = WebSocketUpgrade | HttpRequest | HttpFailure


def _decode_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    return tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in headers)


def _values(headers: Headers, name: str) -> list[str]:
    return [value for key, value in headers if key == name]


def _tokens(headers: Headers, name: str) -> set[str]:
    """The comma-separated, case-insensitive tokens of every ``name`` header (``Connection``, ``Upgrade``)."""
    return {token.strip().lower() for value in _values(headers, name) for token in value.split(",")}


def _is_valid_key(key: str) -> bool:
    """RFC 6455 §4.2.1: the key is the base64 encoding of 16 bytes."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _upgrade_problem(request: h11.Request, headers: Headers) -> tuple[int, str] | None:
    """Why an upgrade request is not a valid RFC 6455 §4.2.1 handshake, as (status, message); else None."""
    if request.method != b"GET":
        return 400, "a WebSocket handshake must use GET"
    if request.http_version != b"1.1":
        return 400, "a WebSocket handshake must use HTTP/1.1"
    if "upgrade" not in _tokens(headers, "connection"):
        return 400, "the Connection header lacks the upgrade token"
    if _values(headers, "sec-websocket-version") != [_WEBSOCKET_VERSION]:
        return 426, "unsupported or missing Sec-WebSocket-Version (this server speaks 13)"
    keys = _values(headers, "sec-websocket-key")
    if len(keys) != 1 or not _is_valid_key(keys[0]):
        return 400, "missing or invalid Sec-WebSocket-Key"
    if _values(headers, "transfer-encoding") or any(
        value != "0" for value in _values(headers, "content-length")
    ):
        return 400, "a WebSocket handshake has no body"
    return None


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class HttpServerConnection:
    """The server's HTTP/1.1 state machine for one connection, until it is upgraded or closed.

    Use: pass received bytes to :meth:`receive_data` and handle the events it returns; answer each
    :class:`HttpRequest` with :meth:`respond`, then call :meth:`next_events` for any request the client
    pipelined behind it. Close the connection once :attr:`should_close` is true and the last response is
    sent. After a :class:`WebSocketUpgrade` the connection's bytes belong to the WebSocket and this object
    must not be fed again.
    """

    __slots__ = (
        "_body",
        "_h11",
        "_max_body_size",
        "_max_header_size",
        "_request",
        "_should_close",
        "_upgraded",
    )

    def __init__(self, *, max_header_size: int = 16384, max_body_size: int = 65536) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)
        self._max_header_size = max_header_size
        self._max_body_size = max_body_size
        # The request being received or waiting for its response, with its decoded headers and whether it
        # is a (valid) WebSocket upgrade.
        self._request: tuple[h11.Request, Headers, bool] | None = None
        self._body = bytearray()
        self._should_close = False
        self._upgraded = False

    @property
    def should_close(self) -> bool:
        """The connection must be closed once the bytes already produced are sent (no more requests)."""
        return self._should_close

    def receive_data(self, data: bytes) -> list[HttpEvent]:
        """Process received bytes and return the events they complete.

        ``b""`` (end of file) makes :attr:`should_close` true and returns no event: the client is gone or
        sends nothing more, and a request it left unfinished is dropped without an answer. A request
        returned earlier can still be answered.
        """
        if self._upgraded:
            raise LocalProtocolError("the connection was upgraded: its bytes belong to the WebSocket now")
        if self._should_close:
            return []
        if not data:
            self._should_close = True
            return []
        self._h11.receive_data(data)
        return self.next_events()

    def next_events(self) -> list[HttpEvent]:
        """Events from bytes already received: a request pipelined behind the one just answered."""
        events: list[HttpEvent] = []
        while not self._should_close and not self._upgraded:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                events.append(self._fail(exc.error_status_hint, f"bad HTTP request: {exc}"))
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            result: HttpEvent | None = None
            if isinstance(event, h11.Request):
                result = self._on_request(event)
            elif isinstance(event, h11.Data):
                result = self._on_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                result = self._on_end_of_message()
            if result is not None:
                events.append(result)
        return events

    def _on_request(self, request: h11.Request) -> HttpFailure | None:
        headers = _decode_headers(request.headers)
        upgrade = "websocket" in _tokens(headers, "upgrade")
        self._request = (request, headers, upgrade)
        # h11 bounds only a head that is still incomplete; one that arrived whole in a chunk is measured
        # here (request line and header lines, give or take the separators h11 has stripped).
        head_size = len(request.method) + len(request.target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if head_size > self._max_header_size:
            return self._fail(431, f"request headers exceed {self._max_header_size} bytes")
        if upgrade:
            problem = _upgrade_problem(request, headers)
            return None if problem is None else self._fail(*problem)
        for value in _values(headers, "content-length"):  # h11 has checked it is a number
            if int(value) > self._max_body_size:
                return self._fail(413, f"request body of {value} bytes exceeds {self._max_body_size}")
        return None

    def _on_body(self, data: bytes) -> HttpFailure | None:
        # An upgrade request with a body was refused at its headers, so this is a plain request's body.
        self._body += data
        if len(self._body) > self._max_body_size:
            return self._fail(413, f"request body exceeds {self._max_body_size} bytes")
        return None

    def _on_end_of_message(self) -> HttpEvent:
        assert self._request is not None  # h11 emits EndOfMessage only after a Request
        request, headers, upgrade = self._request
        target = request.target.decode("latin-1")
        if not upgrade:
            body = bytes(self._body)
            self._body.clear()
            return HttpRequest(request.method.decode("latin-1"), target, headers, body)
        key = _values(headers, "sec-websocket-key")[0].encode("ascii")
        response = self._h11.send(
            h11.InformationalResponse(
                status_code=101,
                reason=_reason(101),
                headers=[
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", generate_accept_token(key).decode("ascii")),
                ],
            )
        )
        assert response is not None  # h11 returns None only for ConnectionClosed
        self._upgraded = True
        self._request = None
        return WebSocketUpgrade(target, headers, response, bytes(self._h11.trailing_data[0]))

    def respond(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> bytes:
        """The bytes of the response to the pending :class:`HttpRequest`; readies the next request.

        Raises :class:`~fastport_core.errors.LocalProtocolError` when no request waits for an answer.
        """
        if self._request is None or self._h11.our_state is not h11.SEND_RESPONSE or self._upgraded:
            raise LocalProtocolError("no HTTP request is waiting for a response")
        data = self._serialise(status, body, content_type, headers)
        self._request = None
        if self._h11.states[h11.SERVER] is h11.MUST_CLOSE:  # HTTP/1.0, or "Connection: close"
            self._should_close = True
        elif self._h11.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            self._h11.start_next_cycle()
        return data

    def _fail(self, status: int, message: str) -> HttpFailure:
        headers = [("Connection", "close")]
        if status == 426:
            headers.append(("Sec-WebSocket-Version", _WEBSOCKET_VERSION))
        response = self._serialise(status, message.encode("utf-8"), "text/plain; charset=utf-8", headers)
        self._should_close = True
        self._request = None
        return HttpFailure(status, message, response)

    def _serialise(
        self, status: int, body: bytes, content_type: str, headers: Iterable[tuple[str, str]]
    ) -> bytes:
        is_head = self._request is not None and self._request[0].method == b"HEAD"
        response = h11.Response(
            status_code=status,
            reason=_reason(status),
            headers=[("Content-Type", content_type), ("Content-Length", str(len(body))), *headers],
        )
        parts = [self._h11.send(response)]
        if not is_head:  # a response to HEAD announces its body's length but never carries it
            parts.append(self._h11.send(h11.Data(data=body)))
        parts.append(self._h11.send(h11.EndOfMessage()))
        return b"".join(part for part in parts if part is not None)


class ClientHandshake:
    """The client's half of the opening handshake.

    Send the bytes of :attr:`request`, then feed the server's answer to :meth:`receive_data`. ``host`` is
    the ``Host`` header (with the port when it is not the scheme's default) and ``target`` the request
    target (path and query).
    """

    __slots__ = ("_accept", "_complete", "_error", "_h11", "request")

    def __init__(self, host: str, target: str) -> None:
        self._h11 = h11.Connection(h11.CLIENT)
        key = generate_nonce()
        self._accept = generate_accept_token(key).decode("ascii")
        try:
            request = self._h11.send(
                h11.Request(
                    method="GET",
                    target=target,
                    headers=[
                        ("Host", host),
                        ("Upgrade", "websocket"),
                        ("Connection", "Upgrade"),
                        ("Sec-WebSocket-Key", key.decode("ascii")),
                        ("Sec-WebSocket-Version", _WEBSOCKET_VERSION),
                    ],
                )
            )
            end = self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(
                f"cannot build a handshake request for {host!r} {target!r}: {exc}"
            ) from None
        assert request is not None and end is not None  # h11 returns None only for ConnectionClosed
        self.request: bytes = request + end
        self._error: RemoteProtocolError | None = None
        self._complete = False

    def receive_data(self, data: bytes) -> bytes | None:
        """Process the server's answer (``b""`` for end of file).

        Returns ``None`` while more bytes are needed and, once a valid ``101`` arrived, the bytes that
        followed it (the first WebSocket frames). Raises
        :class:`~fastport_core.errors.RemoteProtocolError` for any other answer, and the same error again
        on any later call.
        """
        if self._error is not None:
            raise self._error
        if self._complete:
            raise LocalProtocolError("the handshake is complete: the bytes belong to the WebSocket now")
        if not data:
            raise self._fail("the server closed the connection during the WebSocket handshake")
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._fail(f"invalid HTTP answer to the WebSocket handshake: {exc}") from None
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                continue  # e.g. 100 Continue: the real answer follows
            if isinstance(event, h11.InformationalResponse):
                self._check_switch(event)
                self._complete = True
                return bytes(self._h11.trailing_data[0])
            if isinstance(event, h11.Response):
                reason = event.reason.decode("latin-1") or _reason(event.status_code).decode("ascii")
                raise self._fail(f"server answered {event.status_code} {reason}".rstrip())
            raise self._fail(f"unexpected {type(event).__name__} during the WebSocket handshake")

    def _check_switch(self, response: h11.InformationalResponse) -> None:
        """RFC 6455 §4.1: the 101 must confirm the upgrade, prove it read our key, and add nothing."""
        headers = _decode_headers(response.headers)
        if "websocket" not in _tokens(headers, "upgrade"):
            raise self._fail("the server's 101 answer lacks Upgrade: websocket")
        if "upgrade" not in _tokens(headers, "connection"):
            raise self._fail("the server's 101 answer lacks Connection: upgrade")
        if _values(headers, "sec-websocket-accept") != [self._accept]:
            raise self._fail("the server's Sec-WebSocket-Accept does not match our key")
        for name in ("sec-websocket-extensions", "sec-websocket-protocol"):
            if _values(headers, name):
                raise self._fail(f"the server selected a {name} we did not offer")

    def _fail(self, message: str) -> RemoteProtocolError:
        self._error = RemoteProtocolError(message)
        return self._error
