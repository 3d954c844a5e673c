"""One WebSocket endpoint after the opening handshake: messages, ping/pong, keepalive and the close handshake.

The server core keeps one :class:`WebSocket` per connection and the client core keeps one for its
connection, so every rule about pings, closes and timeouts lives here exactly once (docs/architecture.md §4;
the websockets library's weakness is to repeat them in every adapter).

The object is sans-IO: bytes go in through :meth:`WebSocket.receive_data`, bytes come out of
:meth:`WebSocket.data_to_send`, and time only enters as the ``now`` arguments (monotonic seconds). The owner
asks :meth:`WebSocket.next_deadline` when it next needs attention and calls
:meth:`WebSocket.handle_timeout` then.

States (:class:`WebSocketState`), and what moves between them::

    OPEN ──close()──────────────────────────► CLOSING ──peer's Close / EOF / close_timeout──► CLOSED
    OPEN ──peer's Close (echoed) / protocol violation (Close sent) / EOF / abort()────────────► CLOSED
    CLOSING ──protocol violation / abort()────────────────────────────────────────────────────► CLOSED

* Receiving: data messages are returned while OPEN or CLOSING (the peer may have sent them before it saw
  our Close). Pings are answered with a Pong while OPEN. A Pong has no further meaning: *any* received
  bytes prove the peer alive.
* Sending (:meth:`WebSocket.send_text`, :meth:`WebSocket.append_frame`) only queues bytes while OPEN and is
  silently ignored otherwise: the server fans one frame out to many connections and a closing one is
  simply skipped (check :attr:`WebSocket.is_open` first to avoid encoding work). Nothing at all is
  queued after our Close frame (RFC 6455 §5.5.1).
* A protocol violation by the peer never raises: it queues a Close frame with the violation's close code,
  records :attr:`WebSocket.failure` and goes straight to CLOSED without waiting for the peer's Close
  ("fail the WebSocket connection", RFC 6455 §7.1.7); the rest of the received data is ignored.
* Keepalive (when ``ping_interval`` is set): after ``ping_interval`` seconds without receiving a byte a
  Ping is sent; if nothing at all arrives within ``ping_timeout`` seconds after it, the connection is
  aborted with 4004 (KEEPALIVE_TIMEOUT). A dead peer is therefore detected at most
  ``ping_interval + ping_timeout`` seconds after its last byte. Only the receive time is recorded on the
  hot path; the deadline is computed when asked for, so receiving never touches a timer structure.
* The transport is closed by the adapter once :attr:`WebSocket.should_close_transport` is true: CLOSED and
  every queued byte taken.
"""

from __future__ import annotations

from enum import Enum

from .errors import CloseCode, LocalProtocolError, RemoteProtocolError
from .frames import (
    ABNORMAL_CLOSURE,
    DEFAULT_MAX_FRAGMENTS,
    NO_STATUS_RECEIVED,
    BinaryMessage,
    Close,
    FrameDecoder,
    Opcode,
    Ping,
    TextMessage,
    encode_close_payload,
    encode_frame,
    encode_text_frame,
)

__all__ = ["BinaryMessage", "TextMessage", "WebSocket", "WebSocketState"]


class WebSocketState(Enum):
    OPEN = "open"
    """Messages flow both ways."""
    CLOSING = "closing"
    """We sent a Close frame and wait (at most ``close_timeout``) for the peer's."""
    CLOSED = "closed"
    """Nothing more is received or queued; the transport closes once the queued bytes are sent."""


_OPEN = WebSocketState.OPEN
_CLOSING = WebSocketState.CLOSING
_CLOSED = WebSocketState.CLOSED


class WebSocket:
    """One end of an open WebSocket connection (``client`` says which end: clients mask their frames).

    ``max_message_size`` bounds one received message and ``max_fragments`` its frames (close 1009 beyond
    either); ``now`` is the time the
    connection opened, the start of the first keepalive interval. ``ping_interval=None`` disables
    keepalive pings (and so the keepalive timeout); ``close_timeout`` bounds the wait for the peer's
    answer to our Close frame.
    """

    __slots__ = (
        "_close_code",
        "_close_deadline",
        "_close_reason",
        "_close_timeout",
        "_closed_by_peer",
        "_decoder",
        "_failure",
        "_last_received",
        "_mask",
        "_outgoing",
        "_pending_bytes",
        "_ping_interval",
        "_ping_sent_at",
        "_ping_timeout",
        "_state",
    )

    def __init__(
        self,
        *,
        client: bool,
        max_message_size: int,
        now: float,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
        close_timeout: float = 5.0,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
    ) -> None:
        if ping_interval is not None and ping_interval <= 0:
            raise LocalProtocolError("ping_interval must be positive (or None to disable keepalive)")
        if ping_timeout <= 0 or close_timeout <= 0:
            raise LocalProtocolError("ping_timeout and close_timeout must be positive")
        self._decoder = FrameDecoder(
            client=client, max_message_size=max_message_size, max_fragments=max_fragments
        )
        self._mask = client
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._state = _OPEN
        self._close_code: int | None = None
        self._close_reason = ""
        self._closed_by_peer = False
        self._failure: RemoteProtocolError | None = None
        self._outgoing: list[bytes] = []
        self._pending_bytes = 0
        self._last_received = now
        self._ping_sent_at: float | None = None  # set while a keepalive ping waits for any answer
        self._close_deadline: float | None = None

    # -- state -------------------------------------------------------------------------------------------

    @property
    def state(self) -> WebSocketState:
        return self._state

    @property
    def is_open(self) -> bool:
        """Whether sending is still possible (cheap check before encoding a frame for this connection)."""
        return self._state is _OPEN

    @property
    def close_code(self) -> int | None:
        """Why the connection is closing or closed; ``None`` while OPEN.

        The code of whichever Close came first (ours, or the peer's, which is
        :data:`~fastport_core.frames.NO_STATUS_RECEIVED` if it carried none), the violation's code after a
        protocol error, the ``abort`` code, or :data:`~fastport_core.frames.ABNORMAL_CLOSURE` (1006) when
        the transport ended, or the close timeout expired, before the closing handshake completed.
        """
        return self._close_code

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def closed_by_peer(self) -> bool:
        """Whether the peer started the closing handshake (its Close frame arrived while we were OPEN): a
        clean close it meant, as opposed to a lost transport or a close this side started."""
        return self._closed_by_peer

    @property
    def failure(self) -> RemoteProtocolError | None:
        """The peer's protocol violation that closed the connection, if that is what closed it."""
        return self._failure

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet taken by :meth:`data_to_send` (the server bounds this per connection)."""
        return self._pending_bytes

    @property
    def should_close_transport(self) -> bool:
        """CLOSED and nothing left to send: the adapter closes the socket now."""
        return self._state is _CLOSED and not self._outgoing

    # -- receiving ---------------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[TextMessage | BinaryMessage]:
        """Process received bytes; return the complete messages they finished, in order.

        ``b""`` means end of file from the transport. Control frames are handled here (see the module
        docstring) and never returned. Never raises for anything the peer sent. Data received once
        CLOSED is ignored.
        """
        if self._state is _CLOSED:
            return []
        if not data:
            self._set_closed(ABNORMAL_CLOSURE, "the transport ended before the closing handshake completed")
            return []
        self._last_received = now
        self._ping_sent_at = None
        decoder = self._decoder
        decoder.feed(data)
        messages: list[TextMessage | BinaryMessage] = []
        try:
            while (event := decoder.next_event()) is not None:
                if isinstance(event, (TextMessage, BinaryMessage)):
                    messages.append(event)
                elif isinstance(event, Ping):
                    if self._state is _OPEN:
                        self._queue(encode_frame(Opcode.PONG, event.payload, mask=self._mask))
                elif isinstance(event, Close):
                    self._on_close(event)
        except RemoteProtocolError as exc:
            self._on_violation(exc)
        return messages

    def _on_close(self, event: Close) -> None:
        if self._state is _OPEN:
            # The peer started the closing handshake: echo its code (RFC 6455 §5.5.1) and we are done.
            code = event.code
            self._queue(
                encode_frame(
                    Opcode.CLOSE,
                    b"" if code == NO_STATUS_RECEIVED else encode_close_payload(code, ""),
                    mask=self._mask,
                )
            )
            self._close_code = code
            self._close_reason = event.reason
            self._closed_by_peer = True
        self._state = _CLOSED
        self._close_deadline = None

    def _on_violation(self, exc: RemoteProtocolError) -> None:
        self._failure = exc
        if self._state is _OPEN:
            code = exc.close_code or CloseCode.PROTOCOL_ERROR
            self._queue(encode_frame(Opcode.CLOSE, encode_close_payload(code, exc.message), mask=self._mask))
            self._close_code = code
            self._close_reason = exc.message
        self._state = _CLOSED
        self._close_deadline = None

    # -- sending -----------------------------------------------------------------------------------------

    def send_text(self, payload: bytes) -> None:
        """Queue a text message; ``payload`` is already UTF-8 (JSON). Ignored unless OPEN."""
        if self._state is _OPEN:
            self._queue(
                encode_frame(Opcode.TEXT, payload, mask=True) if self._mask else encode_text_frame(payload)
            )

    def append_frame(self, frame: bytes) -> None:
        """Queue an already-encoded frame (server fan-out: one encoding, many subscribers).

        Ignored unless OPEN. The caller vouches that ``frame`` is a complete frame valid from this side
        (unmasked on a server).
        """
        if self._state is _OPEN:
            self._queue(frame)

    def close(self, code: int, reason: str, now: float) -> None:
        """Start the closing handshake: send a Close frame, then wait ``close_timeout`` for the peer's.

        Ignored unless OPEN. A code that may not be sent (1005, 1006, 1015, out of range) is a
        :class:`~fastport_core.errors.LocalProtocolError`; a long reason is truncated to fit the frame.
        """
        if self._state is not _OPEN:
            return
        self._queue(encode_frame(Opcode.CLOSE, encode_close_payload(code, reason), mask=self._mask))
        self._state = _CLOSING
        self._close_code = code
        self._close_reason = reason
        self._close_deadline = now + self._close_timeout

    def abort(self, code: int, reason: str, *, notify: bool = False) -> None:
        """Give up on the connection at once: CLOSED, queued bytes dropped.

        For a peer that cannot be talked to any more (keepalive death, a slow consumer far past its bound);
        ``code`` and ``reason`` are recorded for the owner's logs and metrics. With ``notify`` (and unless
        our Close was already queued) the dropped bytes are replaced by one Close frame carrying them, so a
        peer that reads again learns why; nothing else is sent. Ignored once CLOSED.
        """
        if self._state is _CLOSED:
            return
        notify = notify and self._state is _OPEN
        self._outgoing = []
        self._pending_bytes = 0
        if notify:
            self._queue(encode_frame(Opcode.CLOSE, encode_close_payload(code, reason), mask=self._mask))
        self._set_closed(code, reason)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one buffer for one write; empties the queue."""
        outgoing = self._outgoing
        if not outgoing:
            return b""
        self._outgoing = []
        self._pending_bytes = 0
        return b"".join(outgoing)

    def _queue(self, frame: bytes) -> None:
        self._outgoing.append(frame)
        self._pending_bytes += len(frame)

    def _set_closed(self, code: int, reason: str) -> None:
        self._state = _CLOSED
        self._close_code = code
        self._close_reason = reason
        self._close_deadline = None

    # -- time --------------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` must next be called, or ``None`` if no timer is needed."""
        state = self._state
        if state is _OPEN:
            if self._ping_interval is None:
                return None
            if self._ping_sent_at is not None:
                return self._ping_sent_at + self._ping_timeout
            return self._last_received + self._ping_interval
        if state is _CLOSING:
            return self._close_deadline
        return None

    def handle_timeout(self, now: float) -> None:
        """Do what fell due at ``now``: send a keepalive ping, abort a silent peer, end a stalled close.

        Calling it early, late or repeatedly is harmless: only what is actually due happens.
        """
        state = self._state
        if state is _OPEN and self._ping_interval is not None:
            if self._ping_sent_at is not None:
                if now >= self._ping_sent_at + self._ping_timeout:
                    self.abort(
                        CloseCode.KEEPALIVE_TIMEOUT,
                        f"nothing received within {self._ping_timeout:g} s after a ping",
                    )
            elif now >= self._last_received + self._ping_interval:
                self._queue(encode_frame(Opcode.PING, b"", mask=self._mask))
                self._ping_sent_at = now
        elif state is _CLOSING and self._close_deadline is not None and now >= self._close_deadline:
            self.abort(ABNORMAL_CLOSURE, f"no answer to our close frame within {self._close_timeout:g} s")
