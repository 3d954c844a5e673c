"""The server core: every connection of one broker process, as one sans-IO object (DESIGN §1, §6).

An adapter owns the sockets and the clock and does only this::

    conn = core.open_connection(now, peer)            # a socket was accepted
    core.receive_data(conn, data, now)                # bytes arrived (b"" at EOF)
    for dirty in core.take_dirty():                   # after *every* call into the core
        data = core.data_to_send(dirty)               #   one write per touched connection
        ...write data...; if core.should_close(dirty): close the socket, core.connection_lost(dirty, now)
    sleep until core.next_deadline(); core.handle_timeout(now)
    core.connection_lost(conn, now)                   # the socket died on its own

Each connection starts in the HTTP stage (h11, through :mod:`.handshake`): a WebSocket upgrade moves it to
the WebSocket stage (:mod:`.websocket`, the core's own frame codec), any other request is answered by the
web console (:mod:`.console`) or the admin API (:mod:`.admin`) on the same port. In the WebSocket stage
every complete text message is parsed (:mod:`.protocol`) and handed to the
:class:`~fastport_core.broker.Broker`, which answers through this object (the
:class:`~fastport_core.broker.Sink` it implements).

Why one object for all connections: a publish on one connection produces output for many others. Doing
all of a received chunk's work in one call and leaving at most one buffer per touched connection lets the
adapter write each of them once (the measured 3-5x saving of DESIGN §6), and lets tests drive the entire
server, HTTP upgrade to fan-out, in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from .admin import AdminApi, AdminCredentials
from .broker import Broker
from .config import ServerConfig
from .console import Console, static_routes
from .errors import CloseCode, ErrorCode, RemoteProtocolError
from .frames import ABNORMAL_CLOSURE
from .handshake import HttpRequest, HttpServerConnection, WebSocketUpgrade
from .metrics import Metrics
from .protocol import CLIENT_FRAMES, FrameParser, encode_error
from .timers import Deadlines
from .websocket import TextMessage, WebSocket, WebSocketState

__all__ = ["ServerCore"]

logger = logging.getLogger(__name__)

_BINARY_REFUSED = RemoteProtocolError(
    "binary WebSocket frames are not part of protocol v1; send JSON text frames",
    code=ErrorCode.BINARY_NOT_SUPPORTED,
)


class _Connection:
    """One transport connection: the HTTP stage until upgraded, then its WebSocket."""

    __slots__ = ("http", "peer", "prefix", "transport_done", "ws")

    def __init__(self, http: HttpServerConnection, peer: str) -> None:
        self.http: HttpServerConnection | None = http
        self.ws: WebSocket | None = None
        self.peer = peer
        self.prefix = b""
        """HTTP bytes (a response, the 101) to send before anything the WebSocket queues."""
        self.transport_done = False
        """Nothing more will be sent or received: the adapter closes the socket once ``prefix`` is out."""


class ServerCore:
    """All connections of one broker: bytes and time in, bytes, closes and deadlines out."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        admin_credentials: AdminCredentials | None = None,
        random: Callable[[int], bytes] = os.urandom,
        web_files: Mapping[str, bytes] | None = None,
        secure_cookies: bool = False,
        console_history: bool = False,
    ) -> None:
        """``web_files``: the web console's pages by relative path (``admin/index.html``: bytes), read by the
        adapter from the package (:mod:`.console`); ``secure_cookies``: the server runs TLS;
        ``console_history``: sample the broker for the console's charts (a timer every few seconds, so
        off by default for tests that step the core's deadlines one by one)."""
        self.config = config = config or ServerConfig()
        self.metrics = Metrics()
        self.broker = Broker(config, self, metrics=self.metrics, random=random)
        self.admin = AdminApi(
            self.broker, admin_credentials, session_defaults=config.default_session_settings
        )
        self.console = Console(
            self.broker,
            self.admin,
            static_routes(web_files or {}),
            random=random,
            secure_cookie=secure_cookies,
            history=console_history,
        )
        self._parser = FrameParser(CLIENT_FRAMES, config.limits)
        self._connections: dict[int, _Connection] = {}
        self._next_id = 1
        self._dirty: set[int] = set()
        self._deadlines: Deadlines[int] = Deadlines()
        self._now = 0.0
        """The ``now`` of the call in progress, for sink calls that start a closing handshake."""

    # -- adapter API -------------------------------------------------------------------------------------

    def open_connection(self, now: float, peer: str = "") -> int:
        """Register an accepted transport and return its id; ``peer`` (its address) keys auth throttling.

        Past ``max_connections`` the connection is refused at once: :meth:`should_close` is already true.
        """
        conn = self._next_id
        self._next_id += 1
        limits = self.config.limits
        connection = _Connection(
            HttpServerConnection(max_header_size=limits.max_http_header, max_body_size=limits.max_http_body),
            peer,
        )
        self._connections[conn] = connection
        self.metrics.inc("connections_opened")
        if len(self._connections) > limits.max_connections:
            logger.warning(
                "refusing connection from %s: max_connections (%d) reached", peer, limits.max_connections
            )
            self._finish_transport(conn, connection, "refused: too many connections")
        else:
            self._deadlines.arm(conn, now + self.config.handshake_timeout)
        return conn

    def receive_data(self, conn: int, data: bytes, now: float) -> None:
        """Process bytes received on ``conn`` (``b""``: the peer closed its side). Never raises for input."""
        connection = self._connections.get(conn)
        if connection is None or connection.transport_done:
            return
        self._now = now
        try:
            if connection.ws is None:
                self._receive_http(conn, connection, data, now)
            else:
                self._receive_websocket(conn, connection, connection.ws, data, now)
        except Exception:
            # A bug of ours, not the peer's fault: one connection pays for it, the broker goes on.
            logger.exception("connection %d: internal error while processing its input; closing it", conn)
            self.metrics.inc("internal_errors")
            self._fail_internal(conn, connection, now)

    def data_to_send(self, conn: int) -> bytes:
        """Everything queued for ``conn``, as one buffer for one write."""
        connection = self._connections.get(conn)
        if connection is None:
            return b""
        data = connection.prefix
        connection.prefix = b""
        if connection.ws is not None:
            data += connection.ws.data_to_send()
        return data

    def should_close(self, conn: int) -> bool:
        """Whether the adapter should close ``conn``'s socket, after one bounded attempt to write what
        :meth:`data_to_send` still returns (a close frame, a last HTTP answer).

        True as soon as nothing more will be sent or received: a peer that never reads must not keep its
        socket, and the adapter's task, by leaving its last bytes untaken.
        """
        connection = self._connections.get(conn)
        if connection is None:
            return True
        if connection.ws is not None:
            return connection.ws.state is WebSocketState.CLOSED
        return connection.transport_done

    def take_dirty(self) -> list[int]:
        """Connections with bytes to send or a socket to close since the last call (each once)."""
        dirty = list(self._dirty)
        self._dirty.clear()
        return dirty

    def connection_lost(self, conn: int, now: float) -> None:
        """The socket is gone (closed by the adapter, or died). Idempotent."""
        connection = self._connections.pop(conn, None)
        if connection is None:
            return
        self._now = now
        self._deadlines.cancel(conn)
        self._dirty.discard(conn)
        ws = connection.ws
        if ws is not None:
            code = ws.close_code if ws.close_code is not None else ABNORMAL_CLOSURE
            self.metrics.inc("connections_closed", str(code))
            self.broker.connection_closed(conn, now)
        else:
            self.metrics.inc("connections_closed", "http")

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timeout` must run (keepalive, handshake, retries, expiry...)."""
        candidates = (self._deadlines.next(), self.broker.next_deadline(), self.console.next_deadline())
        return min((when for when in candidates if when is not None), default=None)

    def handle_timeout(self, now: float) -> None:
        """Do everything that fell due at ``now``."""
        self._now = now
        for conn in self._deadlines.pop_due(now):
            connection = self._connections.get(conn)
            if connection is None:
                continue
            ws = connection.ws
            if ws is None:
                self._finish_transport(conn, connection, "handshake timeout")
                continue
            ws.handle_timeout(now)
            self._after_websocket_io(conn, ws, now)
            self._arm(conn, ws)  # receiving only moved the keepalive deadline later: re-arm it lazily here
        self.broker.handle_timeout(now)
        self.console.handle_timeout(now)

    def shutdown(self, now: float) -> None:
        """Graceful stop: close every WebSocket with 1001 and every HTTP connection."""
        self._now = now
        for conn, connection in list(self._connections.items()):
            if connection.ws is not None:
                connection.ws.close(CloseCode.GOING_AWAY, "server shutting down", now)
                self._after_websocket_io(conn, connection.ws, now)
            else:
                self._finish_transport(conn, connection, "server shutting down")

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- the broker's sink -------------------------------------------------------------------------------

    def send_payload(self, conn: int, payload: bytes) -> None:
        """Queue one JSON frame for ``conn`` (the broker's replies)."""
        connection = self._connections.get(conn)
        if connection is not None and connection.ws is not None:
            connection.ws.send_text(payload)
            self._queued(conn, connection.ws)

    def send_frame(self, conn: int, frame: bytes) -> None:
        """Queue an already-encoded WebSocket frame for ``conn`` (fan-out: one encoding for all)."""
        connection = self._connections.get(conn)
        if connection is not None and connection.ws is not None:
            connection.ws.append_frame(frame)
            self._queued(conn, connection.ws)

    def close(self, conn: int, code: CloseCode, reason: str) -> None:
        """Start closing ``conn`` (the broker's decision: auth, dropped session, slow consumer)."""
        connection = self._connections.get(conn)
        if connection is None or connection.ws is None:
            return
        connection.ws.close(code, reason, self._now)
        self._dirty.add(conn)
        self._arm(conn, connection.ws)

    # -- internals ---------------------------------------------------------------------------------------

    def _queued(self, conn: int, ws: WebSocket) -> None:
        self._dirty.add(conn)
        if ws.pending_bytes > self.config.limits.max_output_buffer:
            # The adapter has not taken this connection's output for a while: its peer does not read.
            # Dropping the bytes (not queueing a close behind them) is what bounds memory; the peer still
            # gets a close frame saying why, in case it ever reads again.
            logger.info("connection %d: output buffer over %d bytes, dropping it", conn, ws.pending_bytes)
            ws.abort(CloseCode.SLOW_CONSUMER, "output buffer limit exceeded", notify=True)
            self.metrics.inc("output_overflows")
            self.broker.connection_closed(conn, self._now)

    def _arm(self, conn: int, ws: WebSocket) -> None:
        deadline = ws.next_deadline()
        if deadline is None:
            self._deadlines.cancel(conn)
        else:
            self._deadlines.arm(conn, deadline)

    def _finish_transport(self, conn: int, connection: _Connection, why: str) -> None:
        logger.debug("connection %d (%s): closing transport: %s", conn, connection.peer, why)
        connection.transport_done = True
        connection.http = None
        self._deadlines.cancel(conn)
        self._dirty.add(conn)

    def _fail_internal(self, conn: int, connection: _Connection, now: float) -> None:
        if connection.ws is None:
            self._finish_transport(conn, connection, "internal error")
            return
        connection.ws.close(CloseCode.INTERNAL_ERROR, "internal server error", now)
        self._after_websocket_io(conn, connection.ws, now)

    def _receive_http(self, conn: int, connection: _Connection, data: bytes, now: float) -> None:
        http = connection.http
        assert http is not None
        answers = [connection.prefix] if connection.prefix else []
        queued = len(connection.prefix)
        events = http.receive_data(data)
        while events:
            for event in events:
                if isinstance(event, WebSocketUpgrade):
                    connection.prefix = b"".join(answers)
                    self._upgrade(conn, connection, event, now)
                    return
                if isinstance(event, HttpRequest):
                    request = (event.method, event.target, event.headers, event.body, now)
                    response = self.console.handle(*request) or self.admin.handle(*request)
                    answer = http.respond(
                        response.status,
                        response.body,
                        content_type=response.content_type,
                        headers=response.headers,
                    )
                else:
                    answer = event.response
                    self.metrics.inc("protocol_errors", "http")
                answers.append(answer)
                queued += len(answer)
                self._dirty.add(conn)
            if queued > self.config.limits.max_output_buffer:
                # Pipelined requests from a peer that does not read its answers: stop serving it.
                logger.info("connection %d: %d bytes of unread HTTP answers, closing it", conn, queued)
                self.metrics.inc("output_overflows")
                break
            # A client may pipeline requests: the next one may already be buffered behind the answered one.
            events = [] if http.should_close else http.next_events()
        connection.prefix = b"".join(answers)
        if http.should_close or queued > self.config.limits.max_output_buffer:
            self._finish_transport(conn, connection, "HTTP connection done")
        else:
            self._deadlines.arm(conn, now + self.config.handshake_timeout)

    def _upgrade(self, conn: int, connection: _Connection, upgrade: WebSocketUpgrade, now: float) -> None:
        config = self.config
        connection.prefix += upgrade.response
        connection.http = None
        ws = connection.ws = WebSocket(
            client=False,
            max_message_size=config.limits.max_message_size,
            now=now,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        self._dirty.add(conn)
        self._arm(conn, ws)
        self.broker.connection_opened(conn, now, connection.peer)
        if upgrade.leftover:
            self._receive_websocket(conn, connection, ws, upgrade.leftover, now)

    def _receive_websocket(
        self, conn: int, connection: _Connection, ws: WebSocket, data: bytes, now: float
    ) -> None:
        messages = ws.receive_data(data, now)
        if messages and ws.state is not WebSocketState.CLOSED:
            parse = self._parser.parse
            handle = self.broker.handle_frame
            for message in messages:
                if type(message) is TextMessage:
                    try:
                        frame = parse(message.text)
                    except RemoteProtocolError as exc:
                        self._refuse(conn, exc)
                        continue
                    handle(conn, frame, now)
                else:
                    self.metrics.inc("binary_frames")
                    self._refuse(conn, _BINARY_REFUSED)
                if not ws.is_open:
                    break  # the broker closed it (e.g. repeated auth failures): ignore the rest
        self._after_websocket_io(conn, ws, now)

    def _refuse(self, conn: int, exc: RemoteProtocolError) -> None:
        logger.debug("connection %d: %s (%s)", conn, exc.message, exc.code)
        self.metrics.inc("protocol_errors", str(exc.code))
        self.send_payload(conn, encode_error(exc))

    def _after_websocket_io(self, conn: int, ws: WebSocket, now: float) -> None:
        """Reflect what the WebSocket did: output to send, a new deadline, or the end of the connection."""
        if ws.pending_bytes or ws.state is not WebSocketState.OPEN:
            self._dirty.add(conn)
        if ws.state is WebSocketState.OPEN:
            return
        if ws.failure is not None:
            failure = ws.failure
            self.metrics.inc("protocol_errors", str(failure.close_code or failure.code))
            logger.info("connection %d: protocol violation: %s", conn, ws.failure.message)
        self.broker.connection_closed(conn, now)
        self._arm(conn, ws)
