"""In-memory peers for driving the server core in tests: no sockets, no clock, just bytes and ``now``."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from fastport_core.frames import Opcode, encode_frame
from fastport_core.handshake import ClientHandshake
from fastport_core.server import ServerCore
from fastport_core.websocket import TextMessage, WebSocket


class RawPeer:
    """A hand-driven WebSocket client of a :class:`ServerCore`, speaking JSON like an existing fastPort client."""

    def __init__(self, core: ServerCore, now: float = 0.0, peer: str = "127.0.0.1") -> None:
        self.core = core
        self.conn = core.open_connection(now, peer)
        handshake = ClientHandshake("localhost", "/")
        core.receive_data(self.conn, handshake.request, now)
        leftover = handshake.receive_data(core.data_to_send(self.conn))
        assert leftover is not None, "the server did not accept the upgrade"
        self.ws = WebSocket(client=True, max_message_size=1 << 24, now=now, ping_interval=None)
        self.received: list[dict[str, Any]] = []
        if leftover:
            self._take(leftover, now)

    def send(self, obj: dict[str, Any], now: float = 0.0) -> None:
        self.ws.send_text(orjson.dumps(obj))
        self.core.receive_data(self.conn, self.ws.data_to_send(), now)

    def send_raw(self, data: bytes, now: float = 0.0) -> None:
        self.core.receive_data(self.conn, data, now)

    def send_frame(self, opcode: Opcode, payload: bytes, now: float = 0.0) -> None:
        self.send_raw(encode_frame(opcode, payload, mask=True), now)

    def pump(self, now: float = 0.0) -> list[dict[str, Any]]:
        """Take what the server queued for this peer; return the JSON frames among it (also kept)."""
        return self._take(self.core.data_to_send(self.conn), now)

    def _take(self, data: bytes, now: float) -> list[dict[str, Any]]:
        if not data:
            return []  # b"" would mean EOF to the WebSocket
        frames = [orjson.loads(m.text) for m in self.ws.receive_data(data, now) if isinstance(m, TextMessage)]
        self.received += frames
        reply = self.ws.data_to_send()  # pongs, close replies
        if reply:
            self.core.receive_data(self.conn, reply, now)
        return frames

    def init(self, session: str, password: str, now: float = 0.0, **extra: Any) -> dict[str, Any]:
        self.send({"type": "init", "sessionName": session, "password": password, **extra}, now)
        return self.pump(now)[-1]

    def publish(self, topic: str, message_id: str, data: str = "payload", now: float = 0.0) -> None:
        self.send(
            {
                "type": "publish",
                "topic": topic,
                "data": data,
                "hash": "h",
                "timestamp": 1,
                "messageId": message_id,
            },
            now,
        )


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def http_request(
    method: str, target: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
