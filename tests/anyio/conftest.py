"""Loopback fixtures for the anyio adapter: both backends, a running server, and a raw WebSocket client.

:class:`RawClient` is deliberately *not* our client: it speaks hand-written JSON over wsproto the way an
existing fastPort client does, so these tests pin the wire, not our client's idea of it. Every wait in
these tests is bounded (:data:`TIMEOUT`), so a hang fails fast instead of stalling the suite.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)

from fastport_anyio import Server, SessionSpec
from fastport_core.admin import AdminCredentials
from fastport_core.config import ServerConfig
from tests.nats_support import NatsServer

TIMEOUT = 10.0
"""Seconds any single wait in these tests may take before the test fails."""

FAST_CONFIG = ServerConfig(password_hash_cost=2**4)
"""Production scrypt costs tens of ms per hash; the tests hash on every init."""

ADMIN = AdminCredentials("ops", "admin-secret")
SESSIONS = (
    SessionSpec("alpha", "alpha-password", secret_key="alpha-secret"),
    SessionSpec("beta", "beta-password", secret_key="beta-secret"),
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
async def server(anyio_backend: str) -> AsyncIterator[Server]:
    """A server on a free port with two sessions and the admin API on."""
    async with Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, admin=ADMIN) as running:
        yield running


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real ``nats-server -js`` on a free port with a temporary store (the cluster tests)."""
    server = NatsServer(store_dir=tmp_path / "jetstream").start()
    try:
        yield server
    finally:
        server.stop()


class ServerClosed(Exception):
    """The server closed the WebSocket; ``code`` and ``reason`` say how."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


class RawClient:
    """A WebSocket client of a few dozen lines over wsproto, speaking the protocol as plain dicts."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: deque[Event] = deque()
        self._text: list[str] = []

    @classmethod
    async def connect(
        cls, port: int, *, ssl_context: ssl.SSLContext | None = None, target: str = "/"
    ) -> RawClient:
        if ssl_context is None:
            stream: anyio.abc.ByteStream = await anyio.connect_tcp("127.0.0.1", port)
        else:
            stream = await anyio.connect_tcp(
                "127.0.0.1", port, tls=True, ssl_context=ssl_context, tls_hostname="localhost"
            )
        client = cls(stream)
        await client.handshake(port, target=target)
        return client

    async def handshake(self, port: int, *, target: str = "/") -> None:
        """The HTTP upgrade, over a stream connected by hand."""
        await self._send(Request(host=f"localhost:{port}", target=target))
        event = await self.next_event()
        assert isinstance(event, AcceptConnection), event

    async def _send(self, event: Event) -> None:
        await self.stream.send(self.ws.send(event))

    async def next_event(self, *, answer_pings: bool = True) -> Event:
        """The next wsproto event; pings are answered on the way (as browsers do) unless told not to."""
        with anyio.fail_after(TIMEOUT):
            while True:
                while self.events:
                    event = self.events.popleft()
                    if answer_pings and isinstance(event, Ping):
                        await self._send(event.response())
                        continue
                    return event
                try:
                    data = await self.stream.receive()
                except anyio.EndOfStream:
                    data = b""
                self.ws.receive_data(data or None)
                self.events.extend(self.ws.events())

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.send_text(orjson.dumps(obj).decode())

    async def send_text(self, text: str) -> None:
        await self._send(TextMessage(data=text))

    async def send_bytes(self, data: bytes) -> None:
        await self._send(BytesMessage(data=data))

    async def receive(self) -> dict[str, Any]:
        """The next JSON frame; :class:`ServerClosed` if the server closes instead."""
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    text, self._text = "".join(self._text), []
                    obj: dict[str, Any] = orjson.loads(text)
                    return obj
            elif isinstance(event, CloseConnection):
                if self.ws.state.name == "REMOTE_CLOSING":
                    await self._send(event.response())
                raise ServerClosed(event.code, event.reason or "")
            else:
                raise AssertionError(f"unexpected event {event!r}")

    async def receive_close(self) -> ServerClosed:
        """Read (and skip frames) until the server's Close; answer it; return it."""
        while True:
            try:
                await self.receive()
            except ServerClosed as closed:
                return closed

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send ``obj`` and return its answer: the next frame that is not an ``ack_received`` (those come
        whenever an earlier publish of this client settles; read them with :meth:`receive`)."""
        await self.send_json(obj)
        while (answer := await self.receive())["type"] == "ack_received":
            pass
        return answer

    async def init(self, session: str, password: str) -> dict[str, Any]:
        return await self.request({"type": "init", "sessionName": session, "password": password})

    async def subscribe(self, topic: str) -> dict[str, Any]:
        return await self.request({"type": "subscribe", "topic": topic})

    async def wait_eof(self) -> None:
        """Wait until the server closes the TCP connection."""
        with anyio.fail_after(TIMEOUT):
            while True:
                try:
                    if not await self.stream.receive():
                        return
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def publish_frame(
    topic: str, data: str, message_id: str, *, timestamp: int = 1700000000000
) -> dict[str, Any]:
    """A publish as an existing client sends it (the server never checks ``hash``)."""
    return {
        "type": "publish",
        "topic": topic,
        "data": data,
        "hash": "0" * 64,
        "timestamp": timestamp,
        "messageId": message_id,
    }


async def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with ``Connection: close``; returns (status, headers, body). Uses h11."""
    import h11

    conn = h11.Connection(h11.CLIENT)
    all_headers = {"Host": "localhost", "Connection": "close", "Content-Length": str(len(body))}
    all_headers.update(headers or {})
    with anyio.fail_after(TIMEOUT):
        if ssl_context is None:
            stream: anyio.abc.ByteStream = await anyio.connect_tcp("127.0.0.1", port)
        else:
            stream = await anyio.connect_tcp(
                "127.0.0.1", port, tls=True, ssl_context=ssl_context, tls_hostname="localhost"
            )
        async with stream:
            out = conn.send(h11.Request(method=method, target=path, headers=list(all_headers.items())))
            out += conn.send(h11.Data(data=body)) if body else b""
            out += conn.send(h11.EndOfMessage())
            await stream.send(out)
            status = 0
            response_headers: dict[str, str] = {}
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        conn.receive_data(await stream.receive())
                    except anyio.EndOfStream:
                        conn.receive_data(b"")
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, response_headers, b"".join(chunks)
