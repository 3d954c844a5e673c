"""The server core: every connection of one broker process, as one sans-IO object (DESIGN §1, §6).

An adapter owns the sockets and the clock and does only this::

    conn = core.open_connection(now, peer)            # a socket was accepted (before any TLS handshake)
    core.receive_data(conn, data, now)                # bytes arrived (b"" at EOF)
    for dirty in core.take_dirty():                   # after *every* call into the core
        if core.should_abort(dirty): drop the socket now (even mid-write), core.connection_lost(dirty, now)
        data = core.data_to_send(dirty)               #   one write per touched connection
        ...write data...                              #   core.write_blocked / core.write_completed if
                                                      #   the socket did not take it at once
        if core.should_close(dirty): close the socket once written, core.connection_lost(dirty, now)
    sleep until core.next_deadline(); core.handle_timeout(now)   # the adapter's one timer
    core.connection_lost(conn, now)                   # the socket died on its own
    core.shutdown(now, grace)                         # graceful stop; aborts what is left after grace

Each connection starts in the HTTP stage (h11, through :mod:`.handshake`): a WebSocket upgrade moves it to
the WebSocket stage (:mod:`.websocket`, the core's own frame codec), any other request is answered by the
web console (:mod:`.console`) or the admin API (:mod:`.admin`) on the same port. In the WebSocket stage
every complete text message is parsed (:mod:`.protocol`) and handed to the
:class:`~fastport_core.broker.Broker`, whose answer is data (its :class:`~fastport_core.broker.BrokerOutput`:
frames to send, connections to close, inits that succeeded) that this object applies after each input,
h11/aioquic-style: the broker never calls back into it.

Every server timer lives here, behind :meth:`ServerCore.next_deadline`: the absolute handshake deadline
(from accept: TLS, HTTP upgrade and ``init`` together), keepalive and close timeouts, the write deadline
(a write the peer does not drain), the shutdown grace period, the console's sampling, and the broker's
retries and expiries.

Why one object for all connections: a publish on one connection produces output for many others. Doing
all of a received chunk's work in one call and leaving at most one buffer per touched connection lets the
adapter write each of them once (the measured 3-5x saving of DESIGN §6), and lets tests drive the entire
server, HTTP upgrade to fan-out, in memory.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final, TypeVar

from .admin import AdminApi, AdminCredentials
from .auth import PasswordCheck
from .broker import Broker, BrokerOutput, BrokerStats
from .config import ServerConfig, SessionSettings
from .console import Console, static_routes
from .errors import CloseCode, ErrorCode, RemoteProtocolError
from .frames import ABNORMAL_CLOSURE, encode_text_frame
from .handshake import HttpRequest, HttpServerConnection, WebSocketUpgrade
from .metrics import Metrics, close_code_label
from .peers import TrustedProxies, client_address, throttle_key
from .protocol import CLIENT_PACKETS, Init, PacketParser, encode_error
from .storage import BacklogRequest, MessageRecord, SessionRecord, Snapshot, StoreBatch
from .timers import Deadlines
from .websocket import BinaryMessage, TextMessage, WebSocket, WebSocketState

__all__ = ["LAST_WRITE_TIMEOUT", "ServerCore"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

LAST_WRITE_TIMEOUT: Final = 2.0
"""Seconds a blocked write may still take once the core is done with its connection (a Close frame, a
last HTTP answer behind unread output): a peer that stopped reading must not keep a finished connection."""

_BINARY_REFUSED = RemoteProtocolError(
    "binary WebSocket frames are not part of protocol v1; send JSON text frames",
    code=ErrorCode.BINARY_NOT_SUPPORTED,
)


class _Connection:
    """One transport connection: the HTTP stage until upgraded, then its WebSocket."""

    __slots__ = (
        "abort", "accounted", "held", "held_bytes", "http", "peer", "pre_init", "prefix", "transport_done",
        "ws",
    )  # fmt: skip

    def __init__(self, http: HttpServerConnection, peer: str) -> None:
        self.http: HttpServerConnection | None = http
        self.ws: WebSocket | None = None
        self.peer = peer
        self.prefix = b""
        """HTTP bytes (a response, the 101) to send before anything the WebSocket queues."""
        self.transport_done = False
        """Nothing more will be sent or received: the adapter closes the socket once ``prefix`` is out."""
        self.abort = False
        """Drop the socket now, without waiting for a write in progress (write deadline, shutdown grace)."""
        self.pre_init = False
        """Counted against its address's ``max_uninitialised_per_address`` (until its ``init`` succeeds)."""
        self.held: list[TextMessage | BinaryMessage] | None = None
        """Messages received while its ``init`` waits for a password check, handled in order after it."""
        self.held_bytes = 0
        self.accounted = 0
        """The WebSocket's queued bytes as last added to the server's total (``ServerCore._output_total``)."""


class ServerCore:
    """All connections of one broker: bytes and time in, bytes, closes and deadlines out."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        admin_credentials: AdminCredentials | None = None,
        random: Callable[[int], bytes] = os.urandom,
        offload_verification: bool = False,
        web_files: Mapping[str, bytes] | None = None,
        secure_cookies: bool = False,
        console_history: bool = False,
        durable: bool = False,
        cluster: bool = False,
    ) -> None:
        """``web_files``: the web console's pages by relative path (``admin/index.html``: bytes), read by the
        adapter from the package (:mod:`.console`); ``secure_cookies``: the server runs TLS;
        ``console_history``: sample the broker for the console's charts (a timer every few seconds, so
        off by default for tests that step the core's deadlines one by one); ``durable``: a store keeps the
        broker's state (the adapter takes :meth:`take_store_batch` and reports :meth:`store_committed`);
        ``cluster``: the broker is one node of a cluster over a shared engine, which the adapter drives
        through the same batches and the ``engine_*`` methods (``Broker(shared=True)``)."""
        self.config = config = config or ServerConfig()
        self.metrics = Metrics()
        self.broker = Broker(
            config,
            metrics=self.metrics,
            random=random,
            offload_verification=offload_verification,
            durable=durable,
            shared=cluster,
        )
        self._offload = offload_verification
        self._verifications: list[PasswordCheck] = []
        self._output: BrokerOutput = self.broker.output
        self.admin = AdminApi(
            self.broker,
            admin_credentials,
            session_defaults=config.default_session_settings,
            throttle=self.broker.throttle,
        )
        self._proxies = TrustedProxies(config.trusted_proxies)
        self.console = Console(
            self.broker,
            self.admin,
            static_routes(web_files or {}),
            random=random,
            secure_cookie=secure_cookies,
            history=console_history,
        )
        self._parser = PacketParser(CLIENT_PACKETS, config.limits)
        self._connections: dict[int, _Connection] = {}
        self._next_id = 1
        self._dirty: set[int] = set()
        self._deadlines: Deadlines[int] = Deadlines()
        """Each WebSocket's own deadline (keepalive, close timeout), re-armed lazily when it fires."""
        self._handshake: Deadlines[int] = Deadlines()
        """Absolute from accept until the ``init`` succeeds (for admin keep-alive: from the last answer)."""
        self._writes: Deadlines[int] = Deadlines()
        """Armed while the adapter reports a write blocked (:meth:`write_blocked`)."""
        self._uninitialised: dict[str, int] = {}
        """Per peer address: connections not (yet) past a successful ``init``."""
        self._shutting_down = False
        self._shutdown_at: float | None = None
        """When the shutdown grace period ends (every connection left is then aborted)."""
        self._output_total = 0
        """Bytes queued on every WebSocket and not yet taken by the adapter (``max_total_output_buffer``)."""
        self._committed = 0
        """The last store batch the adapter reported durable (:meth:`store_committed`)."""
        self._awaiting: deque[tuple[int, list[tuple[int, bytes]]]] = deque()
        """Confirmations (``publish_response``, ``ack_received``) held until the store batch they depend on
        is durable: ``(batch, frames)``, in batch order."""
        self._backlog_requests: list[BacklogRequest] = []
        self._store_signalled = False
        """:meth:`store_ready` said the journal's batch is due: its due time has left :meth:`next_deadline`
        until the batch is taken."""
        self._store_hold = -math.inf
        """Changes journalled while a commit ran, with no publish among them, wait until then (see
        :meth:`store_due`)."""
        self._held_http: dict[int, int] = {}
        """Admin connections whose answers wait for a store batch (they changed a session): conn -> batch."""

    # -- adapter API -------------------------------------------------------------------------------------

    def open_connection(self, now: float, peer: str = "") -> int:
        """Register an accepted transport (before its TLS handshake) and return its id.

        ``peer`` (its address) keys auth throttling (unless it is a trusted proxy naming the client:
        ``ServerConfig.trusted_proxies``, :mod:`.peers`) and ``max_uninitialised_per_address`` (IPv6 by its
        /64; a trusted proxy, which carries many clients, is exempt). The connection has
        ``handshake_timeout`` seconds from now, TLS included, to complete a successful ``init``. A refused
        connection (``max_connections``, the per-address bound, a shutdown) is closed at once:
        :meth:`should_close` is already true.
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
        if self._shutting_down:
            self._finish_transport(conn, connection, "refused: the server is shutting down", now)
        elif len(self._connections) > limits.max_connections:
            logger.warning(
                "refusing connection from %s: max_connections (%d) reached", peer, limits.max_connections
            )
            self.metrics.inc("connections_refused", "max_connections")
            self._finish_transport(conn, connection, "refused: too many connections", now)
        elif (key := self._address_key(peer)) and self._uninitialised.get(
            key, 0
        ) >= limits.max_uninitialised_per_address:
            logger.warning(
                "refusing connection from %s: it holds %d connections without a successful init",
                peer, limits.max_uninitialised_per_address,
            )  # fmt: skip
            self.metrics.inc("connections_refused", "max_uninitialised_per_address")
            self._finish_transport(conn, connection, "refused: too many uninitialised connections", now)
        else:
            if key:
                connection.pre_init = True
                self._uninitialised[key] = self._uninitialised.get(key, 0) + 1
            self._handshake.arm(conn, now + self.config.handshake_timeout)
        return conn

    def receive_data(self, conn: int, data: bytes, now: float) -> None:
        """Process bytes received on ``conn`` (``b""``: the peer closed its side). Never raises for input."""
        connection = self._connections.get(conn)
        if connection is None or connection.transport_done:
            return
        try:
            if connection.ws is None:
                self._receive_http(conn, connection, data, now)
            else:
                self._receive_websocket(conn, connection, connection.ws, data, now)
            output = self._output
            if output:
                self._apply(now)
        except Exception:
            self._contain(conn, "processing its input", now)

    def data_to_send(self, conn: int) -> bytes:
        """Everything queued for ``conn``, as one buffer for one write."""
        connection = self._connections.get(conn)
        if connection is None or conn in self._held_http:
            return b""
        data = connection.prefix
        connection.prefix = b""
        if connection.ws is not None:
            data += connection.ws.data_to_send()
            self._account(connection, connection.ws)
        return data

    def should_close(self, conn: int) -> bool:
        """Whether the adapter should close ``conn``'s socket once what :meth:`data_to_send` still returns
        (a close frame, a last HTTP answer) is written.

        True as soon as nothing more will be sent or received. A write of those last bytes that blocks is
        bounded by the write deadline (:data:`LAST_WRITE_TIMEOUT` once the connection is done), after which
        :meth:`should_abort` turns true.
        """
        connection = self._connections.get(conn)
        if connection is None:
            return True
        if conn in self._held_http:
            return False
        if connection.ws is not None:
            return connection.ws.state is WebSocketState.CLOSED
        return connection.transport_done

    def should_abort(self, conn: int) -> bool:
        """Whether the adapter should drop ``conn``'s socket now, abandoning any write in progress (its
        write deadline passed, or the shutdown grace period did). Implies :meth:`should_close`."""
        connection = self._connections.get(conn)
        return connection is None or connection.abort

    def take_dirty(self) -> list[int]:
        """Connections with bytes to send or a socket to close since the last call (each once)."""
        dirty = list(self._dirty)
        self._dirty.clear()
        return dirty

    def take_verifications(self) -> list[PasswordCheck]:
        """Password checks to run off the core's thread (``offload_verification``), each once: call
        ``check.run()`` in a worker, then :meth:`verification_done` with its result."""
        if not self._verifications:
            return []
        checks, self._verifications = self._verifications, []
        return checks

    def verification_done(self, check: PasswordCheck, ok: bool, now: float) -> None:
        """The result of a check from :meth:`take_verifications`: the ``init`` is answered, then the frames
        its connection sent meanwhile are handled, in order."""
        conn = check.conn
        try:
            self.broker.verification_done(check, ok, now)
            if self._output:
                self._apply(now)
            connection = self._connections.get(conn)
            if connection is None or connection.held is None or self.broker.is_verifying(conn):
                return
            held, connection.held, connection.held_bytes = connection.held, None, 0
            ws = connection.ws
            if ws is not None and ws.is_open:
                self._handle_messages(conn, connection, ws, held, now)
                self._after_websocket_io(conn, ws, now)
                if self._output:
                    self._apply(now)
        except Exception:
            self._contain(conn, "finishing a password check", now)

    # -- the store (with ``durable``) ---------------------------------------------------------------------

    def restore(self, snapshot: Snapshot, now: float) -> None:
        """Load the store's content into the broker (at start, after :meth:`set_wall_clock`)."""
        self.broker.restore(snapshot, now)

    def take_store_batch(self) -> StoreBatch | None:
        """The next batch of durable changes to commit (numbered in order), or ``None`` if nothing changed.

        Take it after every call that may have changed something (the adapter calls this where it takes
        dirty connections); commit batches in order, several in one transaction if it likes, then report
        the last one with :meth:`store_committed`.
        """
        self._store_signalled = False
        self._store_hold = -math.inf
        return self.broker.take_store_batch()

    def store_committed(self, seq: int, now: float) -> None:
        """Every batch up to ``seq`` is durable: send the confirmations and admin answers that waited."""
        self.broker.set_store_available(True)
        self._committed = max(self._committed, seq)
        if self._committed >= self.broker.journal_seq() and self.broker.store_pending():
            # What came in while this commit ran waits a little for more (see store_due).
            self._store_hold = now + self.config.group_commit_delay
        awaiting = self._awaiting
        frames = self._output.frames
        while awaiting and awaiting[0][0] <= self._committed:
            frames += awaiting.popleft()[1]
        for conn, needed in list(self._held_http.items()):
            if needed <= self._committed:
                del self._held_http[conn]
                self._dirty.add(conn)
        if self._output:
            self._apply(now)

    def store_due(self) -> float | None:
        """When the store writer should take the next batch (``None``: nothing is journalled, or it waits
        for the commit in progress); a time already past means at once.

        Group commit, decided here so that the writer only waits for :meth:`store_ready`:

        - A publish awaits its commit: at most ``group_commit_delay`` after the oldest such publish while
          a delivery the batch would write may still be ACKed first (which spares writing it and its
          message at all); at once when none may (:meth:`Broker.group_commit_due`).
        - Otherwise, changes journalled while a commit ran (ACKs, say) wait for it to end, then
          ``group_commit_delay`` more, so that they do not cost a transaction of their own under load;
          changes made while no commit runs are due at once.
        """
        broker = self.broker
        if not broker.store_pending():
            return None
        due = broker.group_commit_due(self.config.group_commit_delay)
        if due is not None:
            return due
        if broker.journal_seq() > self._committed:
            return None  # a commit is in progress: store_committed sets the hold
        return self._store_hold

    def store_ready(self, now: float) -> bool:
        """Whether the adapter's store writer should take a batch, or read a backlog page, now. The adapter
        asks after every call (where it takes dirty connections) and wakes its writer on ``True``; until
        then, the batch's due time is one of :meth:`next_deadline`'s."""
        if self._store_signalled or self._backlog_requests:
            return True
        due = self.store_due()
        if due is not None and due <= now:
            self._store_signalled = True
        return self._store_signalled

    def store_work(self) -> bool:
        """Whether anything waits for the store writer at all (a batch to take, a page to read), due or not:
        what a writer that commits synchronously (a test, a tool) loops on."""
        return self.broker.store_pending() or bool(self._backlog_requests)

    def take_backlog_requests(self) -> list[BacklogRequest]:
        """Pages of stored backlogs the broker wants read, each once. Answer each with
        :meth:`backlog_loaded` once every batch taken before it is committed."""
        if not self._backlog_requests:
            return []
        requests, self._backlog_requests = self._backlog_requests, []
        return requests

    def backlog_loaded(
        self, request: BacklogRequest, rows: list[tuple[MessageRecord, int]], now: float
    ) -> None:
        """The store's answer to ``request``: its rows (message, retries), oldest first."""
        self.broker.backlog_loaded(request, rows, now)
        if self._output:
            self._apply(now)

    # -- the cluster's engine (with ``cluster``; see Broker.engine_*) ---------------------------------------

    def engine_messages(self, messages: list[tuple[MessageRecord, int]], now: float) -> None:
        """Messages the engine stored, each with the id of the connection here that published it (or 0)."""
        self._from_engine(lambda: self.broker.engine_messages(messages, now), "fanning out", now)

    def engine_deliveries(
        self, session: str, client_id: str, rows: list[tuple[MessageRecord, int]], now: float
    ) -> list[str] | None:
        """The engine's deliveries for a resumable subscriber served here; see
        :meth:`Broker.engine_deliveries` for the answer (``None`` too after an internal error: the engine
        takes them back)."""
        return self._from_engine(
            lambda: self.broker.engine_deliveries(session, client_id, rows, now), "delivering", now
        )

    def engine_subscriptions(self, session: str, client_id: str, topics: list[str], now: float) -> None:
        """A resumable subscriber that resumed here gets back the subscriptions the engine kept."""
        self._from_engine(
            lambda: self.broker.engine_subscriptions(session, client_id, topics), "resubscribing", now
        )

    def engine_client_claimed(self, session: str, client_id: str, now: float) -> None:
        """A connection on another node resumed ``client_id``: the one here closes with 4003."""
        self._from_engine(
            lambda: self.broker.engine_client_claimed(session, client_id, now), "handing over", now
        )

    def engine_session(self, record: SessionRecord, now: float) -> None:
        """A session created or changed on any node of the cluster."""
        self._from_engine(lambda: self.broker.engine_session(record, now), "applying a session", now)

    def engine_session_dropped(self, name: str, now: float) -> None:
        """A session dropped on any node of the cluster: its connections here close with 4001."""
        self._from_engine(lambda: self.broker.engine_session_dropped(name, now), "dropping a session", now)

    def _from_engine(self, call: Callable[[], _T], what: str, now: float) -> _T | None:
        """Run one ``engine_*`` call: a bug there is contained (logged, counted) instead of reaching the
        adapter's engine link, whose commits or feeds it would stall."""
        try:
            result = call()
            if self._output:
                self._apply(now)
        except Exception:
            self._contain(None, f"{what} (from the cluster)", now)
            return None
        return result

    def engine_available(self, available: bool) -> None:
        """The node lost its engine (``False``: publishes and session changes are refused with
        ``cluster_unavailable``, ``/healthz`` answers 503) or has it back."""
        self.broker.set_store_available(available)

    def store_failed(self, now: float) -> None:
        """A commit failed (a full disk, an I/O error); the adapter retries the same batches. Meanwhile
        publishes and session changes are refused with ``store_unavailable``; what waited keeps waiting."""
        self.broker.set_store_available(False)

    def _needed_batch(self) -> int:
        """The batch whose commit makes everything decided so far durable (the one being journalled)."""
        return self.broker.journal_seq() + (1 if self.broker.store_pending() else 0)

    def write_blocked(self, conn: int, now: float) -> None:
        """The adapter's write to ``conn`` did not complete at once: start its write deadline (unless one
        runs already). The connection is dropped if that write has not completed by then."""
        connection = self._connections.get(conn)
        if connection is None or conn in self._writes:
            return
        done = connection.transport_done or (
            connection.ws is not None and connection.ws.state is WebSocketState.CLOSED
        )
        self._writes.arm(conn, now + (LAST_WRITE_TIMEOUT if done else self.config.write_timeout))

    def write_completed(self, conn: int, now: float) -> None:
        """The write in progress to ``conn`` completed: its write deadline stops."""
        self._writes.cancel(conn)

    def connection_lost(self, conn: int, now: float) -> None:
        """The socket is gone (closed by the adapter, or died). Idempotent; never raises."""
        connection = self._connections.pop(conn, None)
        if connection is None:
            return
        for deadlines in (self._deadlines, self._handshake, self._writes):
            deadlines.cancel(conn)
        self._dirty.discard(conn)
        self._held_http.pop(conn, None)
        self._output_total -= connection.accounted
        self._leave_uninitialised(connection)
        ws = connection.ws
        try:
            if ws is not None:
                code = ws.close_code if ws.close_code is not None else ABNORMAL_CLOSURE
                self.metrics.inc("connections_closed", close_code_label(code))
                self.broker.connection_closed(conn, now, clean=ws.closed_by_peer)
            else:
                self.metrics.inc("connections_closed", "http")
            if self._output:
                self._apply(now)
        except Exception:
            self._contain(None, f"forgetting connection {conn}", now)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timeout` must run (keepalive, handshake, writes, shutdown grace,
        retries, expiry, the console's sampling...)."""
        best = self.broker.next_deadline()
        for deadline in (
            self._deadlines.next(), self._handshake.next(), self._writes.next(), self._shutdown_at,
            self.console.next_deadline(), None if self._store_signalled else self.store_due(),
        ):  # fmt: skip
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        return best

    def handle_timeout(self, now: float) -> None:
        """Do everything that fell due at ``now``. A bug costs the connection it hit (1011), not the rest."""
        if self._shutdown_at is not None and self._shutdown_at <= now:
            self._shutdown_at = None
            for conn in list(self._connections):
                self._guarded(conn, self._grace_expired, "ending the shutdown grace period", now)
        for conn in self._writes.pop_due(now):
            self._guarded(conn, self._write_expired, "dropping a blocked writer", now)
        for conn in self._handshake.pop_due(now):
            self._guarded(conn, self._handshake_expired, "running a handshake deadline", now)
        for conn in self._deadlines.pop_due(now):
            self._guarded(conn, self._websocket_timeout, "running a WebSocket timer", now)
        try:
            self.broker.handle_timeout(now)
            if self._output:
                self._apply(now)
        except Exception:
            self._contain(None, "running the broker's timers", now)
        try:
            self.console.handle_timeout(now)
        except Exception:
            self._contain(None, "sampling the console's history", now)

    def shutdown(self, now: float, grace: float = 5.0) -> None:
        """Graceful stop: close every WebSocket with 1001 and every HTTP connection; refuse new ones.

        Whatever is still open ``grace`` seconds later is aborted (:meth:`should_abort`). A second call
        can only shorten the grace period.
        """
        deadline = now + grace
        if not self._shutting_down or (self._shutdown_at is not None and deadline < self._shutdown_at):
            self._shutdown_at = deadline
        self._shutting_down = True
        for conn in list(self._connections):
            self._guarded(conn, self._close_for_shutdown, "closing for shutdown", now)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- operations on the broker, for adapters and the config file --------------------------------------

    def create_session(
        self,
        name: str,
        password: str,
        now: float,
        settings: SessionSettings | None = None,
        *,
        secret_key: str | None = None,
        token_key: str | None = None,
    ) -> str:
        """Create a session (e.g. from the config file); see :meth:`Broker.create_session`."""
        return self.broker.create_session(
            name, password, now, settings, secret_key=secret_key, token_key=token_key
        )

    def drop_session(self, name: str, password: str, secret_key: str, now: float) -> None:
        """Drop a session, closing its connections with 4001; see :meth:`Broker.drop_session`."""
        self.broker.drop_session(name, password, secret_key, now)
        self._apply(now)

    def suspend_session(self, name: str, password: str, secret_key: str, suspend: bool, now: float) -> None:
        """Suspend or resume a session; see :meth:`Broker.suspend_session`."""
        self.broker.suspend_session(name, password, secret_key, suspend, now)
        self._apply(now)

    def session_names(self) -> list[str]:
        return self.broker.session_names()

    def set_wall_clock(self, epoch: float, now: float) -> None:
        """The wall clock read ``epoch`` at ``now`` (token expiry is wall-clock time); see
        :meth:`Broker.set_wall_clock`."""
        self.broker.set_wall_clock(epoch, now)

    def stats(self) -> BrokerStats:
        """The broker's gauges (sessions, connections, stored messages...), as ``/metrics`` shows them."""
        return self.broker.stats()

    # -- applying the broker's output ----------------------------------------------------------------------

    def _apply(self, now: float) -> None:
        """Carry out what the broker queued: frames, then closes, then finished inits; clears the queue.

        The hot path of a fan-out: each entry is one ``append_frame`` of bytes shared by every subscriber.
        A connection whose unsent output passed ``max_output_buffer`` is aborted, and the broker is told
        once the queue is applied, so a fan-out never sees its tables change under it.
        """
        output = self._output
        frames = output.frames
        while True:
            if output.confirmations:
                self._await_store(output.confirmations)
            overflowed = self._apply_frames(frames) if frames else None
            rest = output.closes or output.initialised or output.verifications or output.backlog_requests
            if rest or overflowed:
                self._apply_rest(output, overflowed, now)
            if not (
                frames or output.closes or output.initialised or output.verifications or output.confirmations
            ):
                return

    def _await_store(self, confirmations: list[tuple[int, bytes]]) -> None:
        """Queue ``confirmations`` behind the store batch they depend on (or send them: it is durable)."""
        needed = self._needed_batch()
        if needed <= self._committed:
            self._output.frames += confirmations
        elif self._awaiting and self._awaiting[-1][0] == needed:
            self._awaiting[-1][1].extend(confirmations)
        else:
            self._awaiting.append((needed, confirmations[:]))
        confirmations.clear()

    def _apply_frames(self, frames: list[tuple[int, bytes]]) -> list[int] | None:
        """Append each frame to its connection's queue; returns the connections aborted for overflow."""
        connections = self._connections
        dirty = self._dirty
        limit = self.config.limits.max_output_buffer
        overflowed: list[int] | None = None
        total = self._output_total
        for conn, frame in frames:
            connection = connections.get(conn)
            if connection is not None and (ws := connection.ws) is not None:
                ws.append_frame(frame)
                dirty.add(conn)
                pending = ws.pending_bytes
                total += pending - connection.accounted
                connection.accounted = pending
                if pending > limit:
                    # The adapter has not taken this connection's output for a while: its peer does not
                    # read. Dropping the bytes (not queueing a close behind them) is what bounds memory;
                    # the peer still gets a close frame saying why, in case it ever reads again. Later
                    # frames for it are ignored (it is no longer open).
                    logger.info(
                        "connection %d: output buffer over %d bytes, dropping it", conn, ws.pending_bytes
                    )
                    ws.abort(CloseCode.SLOW_CONSUMER, "output buffer limit exceeded", notify=True)
                    total += ws.pending_bytes - connection.accounted
                    connection.accounted = ws.pending_bytes
                    self.metrics.inc("output_overflows")
                    if overflowed is None:
                        overflowed = []
                    overflowed.append(conn)
        frames.clear()
        self._output_total = total
        if total > self.config.limits.max_total_output_buffer:
            shed = self._shed_output()
            overflowed = shed if overflowed is None else overflowed + shed
        return overflowed

    def _shed_output(self) -> list[int]:
        """Past ``max_total_output_buffer``: drop the largest buffers (4002) until the total fits; returns
        the connections dropped.

        Closing the biggest reader-behind-its-traffic, rather than refusing publishes, keeps the cost on
        the peer that does not read instead of on every publisher. A scan per shed connection is fine: it
        only runs past the bound, and each run frees a connection's whole buffer.
        """
        limit = self.config.limits.max_total_output_buffer
        shed: list[int] = []
        while self._output_total > limit:
            open_ones = [(c, x) for c, x in self._connections.items() if x.ws is not None and x.ws.is_open]
            if not open_ones:
                break
            conn, connection = max(open_ones, key=lambda item: item[1].accounted)
            ws = connection.ws
            assert ws is not None
            logger.info(
                "connection %d: total output over %d bytes, dropping the largest buffer (%d bytes)",
                conn, limit, ws.pending_bytes,
            )  # fmt: skip
            ws.abort(CloseCode.SLOW_CONSUMER, "server output memory limit exceeded", notify=True)
            self._account(connection, ws)
            self._dirty.add(conn)
            self.metrics.inc("output_overflows")
            shed.append(conn)
        return shed

    def _account(self, connection: _Connection, ws: WebSocket) -> None:
        """Bring ``_output_total`` up to date with what ``ws`` holds now."""
        pending = ws.pending_bytes
        self._output_total += pending - connection.accounted
        connection.accounted = pending

    def _apply_rest(self, output: BrokerOutput, overflowed: list[int] | None, now: float) -> None:
        connections = self._connections
        for conn, code, reason in output.closes:
            connection = connections.get(conn)
            if connection is not None and (ws := connection.ws) is not None:
                ws.close(code, reason, now)
                self._after_websocket_io(conn, ws, now)
        output.closes.clear()
        for conn in output.initialised:
            connection = connections.get(conn)
            if connection is not None:
                self._leave_uninitialised(connection)
            self._handshake.cancel(conn)
        output.initialised.clear()
        if output.verifications:
            self._verifications += output.verifications
            output.verifications.clear()
        if output.backlog_requests:
            self._backlog_requests += output.backlog_requests
            output.backlog_requests.clear()
        for conn in overflowed or ():
            connection = connections.get(conn)
            if connection is not None and connection.ws is not None:
                self._after_websocket_io(conn, connection.ws, now)  # the broker hears of it now

    # -- internals ---------------------------------------------------------------------------------------

    def _guarded(
        self, conn: int, action: Callable[[int, _Connection, float], None], what: str, now: float
    ) -> None:
        """Run one timer action for ``conn``; a bug there costs that connection (1011), nothing else."""
        connection = self._connections.get(conn)
        if connection is None:
            return
        try:
            action(conn, connection, now)
            if self._output:
                self._apply(now)
        except Exception:
            self._contain(conn, what, now)

    def _contain(self, conn: int | None, what: str, now: float) -> None:
        """A bug of ours, not the peer's: log it with its traceback, count it, and close the connection it
        hit (1011; its state may be half-updated), so every other connection and session carries on."""
        logger.exception("internal error while %s%s", what, "" if conn is None else f" (connection {conn})")
        self.metrics.inc("internal_errors")
        try:
            connection = self._connections.get(conn) if conn is not None else None
            if conn is not None and connection is not None:
                if connection.ws is None:
                    self._finish_transport(conn, connection, "internal error", now)
                else:
                    connection.ws.close(CloseCode.INTERNAL_ERROR, "internal server error", now)
                    self._after_websocket_io(conn, connection.ws, now)
            if self._output:
                self._apply(now)
        except Exception:
            logger.exception(
                "internal error while containing an internal error; dropping the broker's output"
            )
            self._output.clear()

    def _address_key(self, peer: str) -> str:
        """What ``max_uninitialised_per_address`` counts by (``""``: not counted)."""
        if not peer or peer in self._proxies:
            return ""
        return throttle_key(peer)

    def _leave_uninitialised(self, connection: _Connection) -> None:
        if connection.pre_init:
            connection.pre_init = False
            key = self._address_key(connection.peer)
            left = self._uninitialised[key] - 1
            if left:
                self._uninitialised[key] = left
            else:
                del self._uninitialised[key]

    def _arm(self, conn: int, ws: WebSocket) -> None:
        deadline = ws.next_deadline()
        if deadline is None:
            self._deadlines.cancel(conn)
        else:
            self._deadlines.arm(conn, deadline)

    def _finish_transport(self, conn: int, connection: _Connection, why: str, now: float) -> None:
        logger.debug("connection %d (%s): closing transport: %s", conn, connection.peer, why)
        connection.transport_done = True
        connection.http = None
        self._handshake.cancel(conn)
        self._done_writing(conn, now)
        self._dirty.add(conn)

    def _done_writing(self, conn: int, now: float) -> None:
        """The connection is finished: a write still blocked gets at most :data:`LAST_WRITE_TIMEOUT` more."""
        if conn in self._writes:
            self._writes.arm_earlier(conn, now + LAST_WRITE_TIMEOUT)

    def _drop(self, conn: int, connection: _Connection, code: CloseCode, why: str, now: float) -> None:
        """Give up on ``conn`` at once: nothing more is sent, the adapter drops the socket."""
        logger.info("connection %d (%s): dropping it: %s", conn, connection.peer, why)
        connection.abort = True
        connection.prefix = b""
        if connection.ws is None:
            self._finish_transport(conn, connection, why, now)
        else:
            connection.ws.abort(code, why)
            self._after_websocket_io(conn, connection.ws, now)

    def _write_expired(self, conn: int, connection: _Connection, now: float) -> None:
        self.metrics.inc("write_timeouts")
        self._drop(conn, connection, CloseCode.SLOW_CONSUMER, "a write stayed blocked past its deadline", now)

    def _grace_expired(self, conn: int, connection: _Connection, now: float) -> None:
        self._drop(conn, connection, CloseCode.GOING_AWAY, "the shutdown grace period is over", now)

    def _handshake_expired(self, conn: int, connection: _Connection, now: float) -> None:
        self.metrics.inc("handshake_timeouts")
        ws = connection.ws
        if ws is None:
            self._finish_transport(conn, connection, "handshake timeout", now)
        elif not self.broker.is_initialised(conn):
            logger.info("connection %d (%s): no successful init in time", conn, connection.peer)
            ws.close(CloseCode.HANDSHAKE_TIMEOUT, "no successful init in time", now)
            self._after_websocket_io(conn, ws, now)

    def _websocket_timeout(self, conn: int, connection: _Connection, now: float) -> None:
        ws = connection.ws
        if ws is not None:
            ws.handle_timeout(now)
            self._after_websocket_io(conn, ws, now)
            self._arm(conn, ws)  # receiving only moved the keepalive deadline later: re-arm it lazily here

    def _close_for_shutdown(self, conn: int, connection: _Connection, now: float) -> None:
        if connection.ws is not None:
            connection.ws.close(CloseCode.GOING_AWAY, "server shutting down", now)
            self._after_websocket_io(conn, connection.ws, now)
        elif not connection.transport_done:
            self._finish_transport(conn, connection, "server shutting down", now)

    def _receive_http(self, conn: int, connection: _Connection, data: bytes, now: float) -> None:
        http = connection.http
        assert http is not None
        answers = [connection.prefix] if connection.prefix else []
        queued = len(connection.prefix)
        answered = False
        served = 0
        pipeline = self.config.limits.max_http_pipeline
        events = http.receive_data(data)
        changes = self.broker.session_changes()
        while events:
            if served >= pipeline:
                served += 1  # marks the overflow for the close below
                # One read must not buy unbounded work: answer what we did, then close.
                logger.info("connection %d: more than %d pipelined HTTP requests in one read", conn, pipeline)
                self.metrics.inc("protocol_errors", "http_pipeline")
                break
            for event in events:
                if isinstance(event, WebSocketUpgrade):
                    connection.prefix = b"".join(answers)
                    self._upgrade(conn, connection, event, now)
                    return
                if isinstance(event, HttpRequest):
                    served += 1
                    peer = client_address(connection.peer, event.headers, self._proxies)
                    request = (event.method, event.target, event.headers, event.body, now)
                    response = self.console.handle(*request, peer=peer) or self.admin.handle(
                        *request, peer=peer
                    )
                    answer = http.respond(
                        response.status,
                        response.body,
                        content_type=response.content_type,
                        headers=response.headers,
                    )
                    answered = True
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
        if self.broker.session_changes() != changes:
            # An admin (or console) call changed a session: answer once that is durable.
            self._held_http[conn] = self._needed_batch()
        if http.should_close or queued > self.config.limits.max_output_buffer or served > pipeline:
            self._finish_transport(conn, connection, "HTTP connection done", now)
        elif answered:
            # An idle keep-alive admin connection gets a fresh window after each answered request; bytes
            # of an unfinished request never move the deadline (a slowloris is closed on time).
            self._handshake.arm(conn, now + self.config.handshake_timeout)

    def _upgrade(self, conn: int, connection: _Connection, upgrade: WebSocketUpgrade, now: float) -> None:
        config = self.config
        connection.prefix += upgrade.response
        connection.http = None
        ws = connection.ws = WebSocket(
            client=False,
            max_message_size=config.limits.max_message_size,
            max_fragments=config.limits.max_fragments_per_message,
            now=now,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        self._dirty.add(conn)
        self._arm(conn, ws)
        self.broker.connection_opened(
            conn, now, client_address(connection.peer, upgrade.headers, self._proxies)
        )
        if self._output:
            self._apply(now)  # the broker may refuse it at once (its connection limit)
        if upgrade.leftover:
            self._receive_websocket(conn, connection, ws, upgrade.leftover, now)

    def _receive_websocket(
        self, conn: int, connection: _Connection, ws: WebSocket, data: bytes, now: float
    ) -> None:
        messages = ws.receive_data(data, now)
        if messages and ws.state is not WebSocketState.CLOSED:
            self._handle_messages(conn, connection, ws, messages, now)
        self._after_websocket_io(conn, ws, now)

    def _handle_messages(
        self,
        conn: int,
        connection: _Connection,
        ws: WebSocket,
        messages: list[TextMessage | BinaryMessage],
        now: float,
    ) -> None:
        parse = self._parser.parse
        handle = self.broker.handle_packet
        closes = self._output.closes
        for message in messages:
            if connection.held is not None:
                self._hold(conn, connection, ws, message, now)
            elif type(message) is TextMessage:
                try:
                    packet = parse(message.text)
                except RemoteProtocolError as exc:
                    self._refuse(conn, exc)
                    continue
                handle(conn, packet, now)
                if closes:
                    self._apply(now)  # the broker closed a connection: maybe this one
                if type(packet) is Init and self._offload and self.broker.is_verifying(conn):
                    connection.held = []  # the rest waits for the password check, in order
            else:
                self.metrics.inc("binary_frames")
                self._refuse(conn, _BINARY_REFUSED)
            if not ws.is_open:
                break  # the broker closed it (e.g. repeated auth failures): ignore the rest

    def _hold(
        self,
        conn: int,
        connection: _Connection,
        ws: WebSocket,
        message: TextMessage | BinaryMessage,
        now: float,
    ) -> None:
        """Keep a message received while ``init`` waits for its password check, within one message's size."""
        assert connection.held is not None
        connection.held.append(message)
        connection.held_bytes += len(message.text) if isinstance(message, TextMessage) else len(message.data)
        if connection.held_bytes > self.config.limits.max_message_size:
            logger.info("connection %d: too much sent before its init was verified, closing it", conn)
            self.metrics.inc("protocol_errors", str(int(CloseCode.POLICY_VIOLATION)))
            ws.close(CloseCode.POLICY_VIOLATION, "too much sent before init completed", now)

    def _refuse(self, conn: int, exc: RemoteProtocolError) -> None:
        logger.debug("connection %d: %s (%s)", conn, exc.message, exc.code)
        self.metrics.inc("protocol_errors", str(exc.code))
        self._output.frames.append((conn, encode_text_frame(encode_error(exc))))

    def _after_websocket_io(self, conn: int, ws: WebSocket, now: float) -> None:
        """Reflect what the WebSocket did: output to send, a new deadline, or the end of the connection."""
        connection = self._connections.get(conn)
        if connection is not None:
            self._account(connection, ws)
        if ws.pending_bytes or ws.state is not WebSocketState.OPEN:
            self._dirty.add(conn)
        if ws.state is WebSocketState.OPEN:
            return
        if ws.failure is not None:
            failure = ws.failure
            self.metrics.inc("protocol_errors", str(failure.close_code or failure.code))
            logger.info("connection %d: protocol violation: %s", conn, ws.failure.message)
        self._handshake.cancel(conn)
        if ws.state is WebSocketState.CLOSED:
            self._done_writing(conn, now)
        self.broker.connection_closed(conn, now, clean=ws.closed_by_peer)
        self._arm(conn, ws)
