"""A simulated network for sans-IO cores: byte streams cut into WebSocket frames that faults can act on.

Each transport connection is a :class:`Link` with two :class:`Direction` s. What a core hands over for a
direction (``data_to_send``) is parsed at once into :class:`Packet` s: the HTTP upgrade request or answer
(passed through whole), then one packet per WebSocket frame, decoded with the core's own
:class:`~fastport_core.frames.FrameDecoder` (so a core that emits an invalid frame fails here, loudly),
and an end-of-file marker once the sender closed its side. Packets wait in a FIFO queue until the test
delivers them; a delivered frame is re-encoded (client-to-server frames with a fresh mask), so each one
reaches its receiver as one ``receive_data`` call.

Only *data* frames outside the protocol handshake are :attr:`Packet.faultable`: a test may drop,
duplicate, reorder or delay those. The HTTP upgrade, ``init`` / ``init_response`` and the control frames
(ping, pong, close) keep their order, which is what makes the faults protocol-level faults (a lost or
repeated JSON frame) rather than a broken byte stream; breaking a whole connection is a separate fault.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from fastport_core.errors import RemoteProtocolError
from fastport_core.frames import (
    NO_STATUS_RECEIVED,
    BinaryMessage,
    Close,
    FrameDecoder,
    Opcode,
    Ping,
    Pong,
    TextMessage,
    encode_close_payload,
    encode_frame,
)

__all__ = ["HANDSHAKE_TYPES", "Direction", "Link", "Packet"]

HANDSHAKE_TYPES: Final = frozenset({"init", "init_response"})
"""JSON frame types that belong to establishing a connection: never faulted."""

Kind = Literal["http", "data", "control", "eof"]


@dataclass(slots=True)
class Packet:
    """One unit the network moves: HTTP bytes, one WebSocket frame, or the sender's end of file."""

    kind: Kind
    payload: bytes = b""
    """HTTP bytes, or the frame's (unmasked) payload."""
    opcode: Opcode = Opcode.TEXT
    frame: dict[str, Any] | None = None
    """The JSON object of a text data frame."""
    close: tuple[int, str] | None = None
    """Code and reason of a Close frame."""
    forged: bool = False
    """Injected by the test, not written by a core."""

    @property
    def faultable(self) -> bool:
        return self.kind == "data" and (self.frame is None or self.frame.get("type") not in HANDSHAKE_TYPES)

    @property
    def frame_type(self) -> str | None:
        return None if self.frame is None else self.frame.get("type")

    def copy(self) -> Packet:
        return dataclasses.replace(self)

    def wire(self, *, mask: bool) -> bytes:
        """The bytes that reach the receiver (``b""`` is end of file); frames are encoded afresh."""
        if self.kind == "http":
            return self.payload
        if self.kind == "eof":
            return b""
        payload = self.payload
        if self.close is not None:
            code, reason = self.close
            payload = b"" if code == NO_STATUS_RECEIVED else encode_close_payload(code, reason)
        return encode_frame(self.opcode, payload, mask=mask)

    @classmethod
    def json(cls, frame: dict[str, Any], *, forged: bool = False) -> Packet:
        return cls("data", orjson.dumps(frame), frame=frame, forged=forged)

    def __repr__(self) -> str:  # short, for failure reports
        if self.kind == "data":
            return f"<{self.frame_type or self.opcode.name}{' forged' if self.forged else ''}>"
        if self.kind == "control":
            return f"<{self.opcode.name}{self.close or ''}>"
        return f"<{self.kind}>"


class Direction:
    """One direction of a link: parses what the sender wrote into packets, queues them for delivery."""

    def __init__(self, *, to_server: bool, max_message_size: int = 1 << 24) -> None:
        self.to_server = to_server
        self.queue: list[Packet] = []
        self._http = bytearray()
        self._upgraded = False
        self._raw = False  # a non-101 answer: the rest of the stream is HTTP too
        # The decoder runs on the receiving side: the server expects masked frames, a client unmasked ones.
        self._decoder = FrameDecoder(client=not to_server, max_message_size=max_message_size)

    def parse(self, data: bytes) -> list[Packet]:
        """Cut ``data`` (the sender's next bytes) into packets. An invalid stream is a test failure."""
        packets: list[Packet] = []
        if not data:
            return packets
        if self._raw:
            return [Packet("http", data)]
        if not self._upgraded:
            self._http += data
            data = b""
            end = self._http.find(b"\r\n\r\n")
            if end < 0:
                return packets
            head = bytes(self._http[: end + 4])
            rest = bytes(self._http[end + 4 :])
            self._http.clear()
            if self.to_server or head.startswith(b"HTTP/1.1 101 "):
                self._upgraded = True
                packets.append(Packet("http", head))
                data = rest
            else:
                self._raw = True
                return [Packet("http", head + rest)]
        if not data:
            return packets
        decoder = self._decoder
        assert not decoder.finished, f"bytes sent after a Close frame: {data!r}"
        decoder.feed(data)
        try:
            while (event := decoder.next_event()) is not None:
                packets.append(_packet(event))
        except RemoteProtocolError as exc:  # pragma: no cover - a core bug
            side = "client" if self.to_server else "server"
            raise AssertionError(f"the {side} core emitted an invalid frame: {exc.message}") from exc
        return packets


def _packet(event: TextMessage | BinaryMessage | Ping | Pong | Close) -> Packet:
    if isinstance(event, TextMessage):
        frame = orjson.loads(event.text)
        assert isinstance(frame, dict), f"a JSON frame that is not an object: {event.text!r}"
        return Packet("data", event.text.encode(), frame=frame)
    if isinstance(event, BinaryMessage):
        return Packet("data", event.data, opcode=Opcode.BINARY)
    if isinstance(event, Ping):
        return Packet("control", event.payload, opcode=Opcode.PING)
    if isinstance(event, Pong):
        return Packet("control", event.payload, opcode=Opcode.PONG)
    return Packet("control", opcode=Opcode.CLOSE, close=(event.code, event.reason))


class Link:
    """One transport connection between a client core and the server core (server connection ``conn``).

    Each side closes on its own: once a side closed, what it still had queued towards it is lost, and
    what it sent before closing is still delivered, followed by its end of file.
    """

    def __init__(self, conn: int, client: str) -> None:
        self.conn = conn
        self.client = client
        self.c2s = Direction(to_server=True)
        self.s2c = Direction(to_server=False)
        self.client_open = True
        self.server_open = True

    def direction(self, to_server: bool) -> Direction:
        return self.c2s if to_server else self.s2c

    def receiver_open(self, to_server: bool) -> bool:
        return self.server_open if to_server else self.client_open

    def sender_open(self, to_server: bool) -> bool:
        return self.client_open if to_server else self.server_open

    @property
    def finished(self) -> bool:
        return not self.client_open and not self.server_open and not self.c2s.queue and not self.s2c.queue

    def __repr__(self) -> str:
        return f"<link {self.conn} {self.client} c2s={self.c2s.queue} s2c={self.s2c.queue}>"
