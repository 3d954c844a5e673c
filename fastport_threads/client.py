"""The blocking client: :class:`fastport_core.client.ClientCore` driven by two threads and one lock.

Theory of operation
-------------------
Every protocol decision (handshake, keepalive, publish retries, re-subscription, dedupe, backoff, give-up)
is the core's. This module moves bytes and time, and turns the core's events into return values,
callbacks and iterators. A :class:`Client` starts exactly two threads:

``fastport-io`` (the IO thread)
    The only thread that touches the socket and the only one that calls the core's IO side
    (:meth:`~ClientCore.start_connection`, :meth:`~ClientCore.receive_data`,
    :meth:`~ClientCore.connection_lost`, :meth:`~ClientCore.data_to_send`,
    :meth:`~ClientCore.handle_timeout`, :meth:`~ClientCore.events`). It loops on one ``selectors`` call
    whose timeout is :meth:`~ClientCore.next_deadline` (keepalive, publish retries, connect timeout, the
    reconnect time: the core's timers, not ours), watching the socket and a wake-up socket pair. The
    socket is non-blocking from the dial on (only the DNS lookup blocks), and TLS runs in memory
    (``ssl.MemoryBIO``), so ``ws://`` and ``wss://`` share one read path and one write path. It never
    runs application code.
``fastport-dispatch`` (the dispatcher thread)
    Runs the callbacks given to :meth:`Client.subscribe`, one at a time, in the order the messages
    arrived, from a bounded queue the IO thread fills. A slow callback therefore delays later callbacks,
    never the connection: keepalive, ACKs (sent by the core on receipt), publish confirmations and
    :meth:`Client.messages` iterators go on.

The lock
    One ``threading.Lock`` guards the core and this object's tables. Every public method takes it only
    for as long as it takes to call into the core and update a table, then writes one byte to the wake-up
    socket so the IO thread sends the new output at once (and recomputes its timeout). No code runs under
    the lock that can block: no socket IO, no callback, no DNS. Conditions built on that same lock let
    iterators and the dispatcher sleep without a second lock. (The wake-up socket has a tiny lock of its
    own, a leaf that never waits for anything else: see :meth:`Client._wake`.)

Backpressure, not drops (a decision shared with the async client)
-----------------------------------------------------------------
The core ACKs a message as soon as it is read, so a message this adapter dropped would be lost for good.
So nothing here drops: the callback queue (``max_buffer`` of :func:`connect`) and each iterator's buffer
(``max_buffer`` of :meth:`Client.messages`) have a high watermark, and while any of them is at its mark
the IO thread stops *reading* the socket (it still writes, and the core's timers still run). TCP flow
control then pushes back on the server, which holds what this client cannot take, and applies its
slow-consumer policy if that lasts. Until a buffer fills, a slow consumer stalls nothing but itself.
Past it, everything received waits (the price of not losing acknowledged messages), and if the pause
outlasts ``ping_interval + ping_timeout`` the core's keepalive gives up on the silent connection and the
client reconnects; the server then re-delivers what was never read. A buffer can exceed its mark by what
one read (64 KiB) holds.

First connection, reconnection, close
-------------------------------------
:func:`connect` returns once the first ``init`` succeeded; if that first attempt fails it raises
(:class:`ConnectError`, or :class:`~fastport_core.errors.AuthenticationError` for refused credentials)
instead of retrying, exactly as the async client does. After that, every outage is the core's business:
the IO thread dials again when :meth:`~ClientCore.reconnect_at` is due, and the core re-``init``\\ s,
re-subscribes every topic and resends every unconfirmed publish in order; the application notices
nothing but a delay (and :attr:`Client.state`). :meth:`Client.close` does the WebSocket closing handshake,
then joins both threads (bounded), from any thread, callbacks included.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any, Final, TypeVar, cast

from fastport_core.client import (
    AuthRefused,
    ClientEvent,
    ClientState,
    Connected,
    Disconnected,
    GaveUp,
    IntegrityFailure,
    MessageReceived,
    ServerError,
    SubscribeRefused,
)
from fastport_core.client_api import (
    DEFAULT_MAX_BUFFER,
    DEFAULT_TIMEOUT,
    Answer,
    ConnectionState,
    Endpoint,
    Message,
    StateChange,
    auth_error,
    make_client_core,
    settle_answers,
    subscribe_refused_error,
)
from fastport_core.config import ClientConfig
from fastport_core.crypto import SuiteName
from fastport_core.errors import (
    AuthenticationError,
    ClientClosedError,
    ConnectError,
    LocalProtocolError,
    PublishRefusedError,
    PublishTimeoutError,
    SubscribeRefusedError,
    SubscribeTimeoutError,
)

__all__ = [
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_TIMEOUT",
    "Callback",
    "Client",
    "ClientClosedError",
    "ConnectError",
    "ConnectionState",
    "Message",
    "MessageStream",
    "PublishRefusedError",
    "PublishTimeoutError",
    "StateChange",
    "SubscribeRefusedError",
    "SubscribeTimeoutError",
    "connect",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

Callback = Callable[[Message], object]
"""What :meth:`Client.subscribe` calls, on the dispatcher thread, with each message of its topic."""

_Job = tuple[Callable[[Any], object], Any, str | None]
"""A call for the dispatcher: (callback, argument, topic). With a topic, the call is skipped if the callback
no longer subscribes to it when its turn comes (unsubscribed meanwhile)."""

_READ_SIZE: Final = 65536
"""Bytes asked of the socket per read: a burst of frames costs one core call."""
_CLOSE_GRACE: Final = 10.0
"""Default bound (seconds) on :meth:`Client.close` waiting for each thread. The core's own close timeout
(5 s) normally ends the closing handshake first; the rest is for a callback that is still running."""


# --------------------------------------------------------------------------------------------------------
# Small internals.


class _Waiter(Answer[T]):
    """An :class:`~fastport_core.client_api.Answer` a thread waits for: resolved under the client's lock,
    awaited without it."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(threading.Event())

    def wait(self, timeout: float | None) -> bool:
        return cast(threading.Event, self._flag).wait(timeout)


@dataclass(eq=False)
class _StreamBuffer:
    """The buffer behind one :class:`MessageStream`; registered in the client, guarded by its lock.

    The client holds this, not the :class:`MessageStream`, so that an iterator the application drops
    (``break`` out of a ``for``) can be garbage-collected and its subscription withdrawn.
    """

    topic: str
    max_buffer: int
    ready: threading.Condition
    items: deque[Message] = field(default_factory=deque)
    ended: bool = False
    error: BaseException | None = None
    abandoned: bool = False
    """Set by the iterator's finalizer, without the lock (it may run inside the garbage collector)."""


class _Phase(Enum):
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    TLS_HANDSHAKE = "tls handshake"
    OPEN = "open"


class _Transport:
    """One connection attempt's socket. Owned by the IO thread alone: no lock protects it.

    TLS runs in memory (an ``SSLObject`` over two ``MemoryBIO``\\ s): the socket only ever carries raw
    bytes, so plain and TLS connections share one non-blocking read path and one write path, without the
    want-read/want-write dance of a non-blocking ``SSLSocket``. Errors surface as ``OSError`` (which
    ``ssl.SSLError`` is), for the IO loop to report to the core as a lost connection.
    """

    def __init__(self, endpoint: Endpoint, ssl_context: ssl.SSLContext | None) -> None:
        self._endpoint = endpoint
        self._ssl_context = ssl_context
        self.sock: socket.socket | None = None
        self.phase = _Phase.RESOLVING
        self.out = bytearray()
        """Bytes for the socket (already encrypted under TLS), written when it is writable."""
        self.eof = False
        self.failed = False
        """Reported to the core as lost: no more IO on it; the next pump retires it."""
        self._held = bytearray()  # application bytes waiting for TCP (and TLS) to be up
        self._addresses: list[tuple[socket.AddressFamily, socket.SocketKind, int, tuple[object, ...]]] = []
        self._address = ""  # the one being tried, for error messages
        self._errors: list[str] = []
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()

    # -- dialling

    def dial(self) -> None:
        """Resolve the host (this blocks, outside the lock) and start a non-blocking connect."""
        endpoint = self._endpoint
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        self._addresses = [(family, kind, proto, address) for family, kind, proto, _, address in infos]
        self._connect_next()

    def _connect_next(self) -> None:
        """Start connecting to the next resolved address; raise once every address failed."""
        while self._addresses:
            family, kind, proto, address = self._addresses.pop(0)
            self._address = str(address[0])
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                self._errors.append(f"{self._address}: {exc.strerror or exc}")
                continue
            sock.setblocking(False)
            if family in (socket.AF_INET, socket.AF_INET6):
                # The core already coalesces its output into one buffer per call; Nagle would only delay it.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                self.sock = sock
                self.phase = _Phase.CONNECTING
                return
            sock.close()
            self._errors.append(f"{self._address}: {os.strerror(code)}")
        endpoint = self._endpoint
        raise OSError(f"cannot connect to {endpoint.host}:{endpoint.port} ({'; '.join(self._errors)})")

    def on_connect_ready(self) -> None:
        """The socket became writable while connecting: connected, or try the next address."""
        sock = self.sock
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            sock.close()
            self.sock = None
            self._errors.append(f"{self._address}: {os.strerror(code)}")
            self._connect_next()
            return
        if self._ssl_context is None:
            self._open()
            return
        self._tls = self._ssl_context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=self._endpoint.host
        )
        self.phase = _Phase.TLS_HANDSHAKE
        self._handshake()

    def _handshake(self) -> None:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            self._open()
        self._take_tls_output()

    def _open(self) -> None:
        self.phase = _Phase.OPEN
        held = bytes(self._held)
        self._held.clear()
        if held:
            self.send_app(held)

    # -- data

    def send_app(self, data: bytes) -> None:
        """Queue application bytes (from the core): encrypted and queued now if open, else held."""
        if self.phase is not _Phase.OPEN:
            self._held += data
        elif self._tls is None:
            self.out += data
        else:
            self._tls.write(data)
            self._take_tls_output()

    def write(self) -> None:
        """Write what the socket takes without blocking."""
        sock = self.sock
        assert sock is not None
        while self.out:
            try:
                sent = sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            del self.out[:sent]

    def read(self) -> bytes:
        """Read once; return the application bytes (possibly none). Sets :attr:`eof` at end of file."""
        sock = self.sock
        assert sock is not None
        try:
            raw = sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return b""
        if not raw:
            self.eof = True
        if self._tls is None:
            return raw
        if raw:
            self._incoming.write(raw)
        else:
            self._incoming.write_eof()
        if self.phase is _Phase.TLS_HANDSHAKE:
            self._handshake()
        data = self._decrypt() if self.phase is _Phase.OPEN else b""
        self._take_tls_output()
        return data

    def _decrypt(self) -> bytes:
        assert self._tls is not None
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True  # close_notify, or the TCP end of file after the last record
                break
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _take_tls_output(self) -> None:
        if self._outgoing.pending:
            self.out += self._outgoing.read()

    def close(self) -> None:
        """Close the socket after one last non-blocking write (typically our Close frame)."""
        sock = self.sock
        if sock is None:
            return
        if self.out and self.phase is _Phase.OPEN and not self.failed:
            with contextlib.suppress(OSError):  # the peer is gone: nothing more to tell it
                self.write()
        sock.close()


def _abandon(buffer: _StreamBuffer, wake: Callable[[], None]) -> None:
    """Finalizer of a dropped :class:`MessageStream`: flag its buffer for the IO thread to withdraw.

    It takes no lock: the garbage collector may run it in any thread, including one holding the lock.
    """
    buffer.abandoned = True
    wake()


# --------------------------------------------------------------------------------------------------------
# Public API.


class MessageStream:
    """The iterator :meth:`Client.messages` returns: ``for message in stream: ...``.

    Each ``next()`` returns the next buffered message of the topic at once, or waits up to ``timeout``
    seconds (from that call) for one to arrive; if none does, the iteration ends (``StopIteration``) and
    the stream closes. It also ends after :meth:`close`, :meth:`Client.unsubscribe` of the topic or
    :meth:`Client.close`, once the messages already buffered have been handed out. It raises
    :class:`SubscribeRefusedError` if the server withdrew the topic, and :class:`ClientClosedError` if the
    client gave up reconnecting. Messages come in the order they were received, each once.

    Thread safety: any thread may iterate or close it (each message goes to exactly one ``next()``).
    Leaving a ``for`` loop early leaves the subscription in place until the stream is garbage-collected;
    use ``with client.messages(...) as stream:`` (or :meth:`close`) to end it at a precise moment.
    """

    __slots__ = ("__weakref__", "_buffer", "_client", "_finalizer", "_timeout")

    def __init__(self, client: Client, buffer: _StreamBuffer, timeout: float | None) -> None:
        self._client = client
        self._buffer = buffer
        self._timeout = timeout
        self._finalizer = weakref.finalize(self, _abandon, buffer, client._wake)

    @property
    def topic(self) -> str:
        return self._buffer.topic

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by the iteration."""
        with self._client._lock:
            return len(self._buffer.items)

    def __iter__(self) -> MessageStream:
        return self

    def __next__(self) -> Message:
        return self._client._next_message(self._buffer, self._timeout)

    def close(self) -> None:
        """End the iteration and withdraw this stream's subscription (idempotent, any thread)."""
        self._finalizer.detach()
        self._client._close_stream(self._buffer)

    def __enter__(self) -> MessageStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(
    url: str,
    *,
    session: str,
    password: str | None = None,
    token: str | Callable[[], str] | None = None,
    key: str | bytes,
    suite: SuiteName = "authenticated",
    config: ClientConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    client_id: str | None = None,
    max_buffer: int = DEFAULT_MAX_BUFFER,
) -> Client:
    """Connect to ``url`` (``ws://host:port/path`` or ``wss://``) and return once the session is open.

    Use the result as ``with connect(...) as client:`` so that it is closed. Configuration errors (a bad
    key, suite or URL) raise :class:`~fastport_core.errors.LocalProtocolError` before any IO. A failed
    first attempt raises :class:`ConnectError` (unreachable server, TLS, handshake, ``connect_timeout``)
    or :class:`~fastport_core.errors.AuthenticationError` (wrong password, unknown session), at once and
    with no thread left behind. ``ssl_context`` is used for ``wss://`` (default: the system's trust
    store). ``max_buffer`` is the watermark of the queue of messages waiting for callbacks.
    """
    return Client(
        url,
        session=session,
        password=password,
        token=token,
        key=key,
        suite=suite,
        config=config,
        ssl_context=ssl_context,
        client_id=client_id,
        max_buffer=max_buffer,
    )


class Client:
    """A blocking fastport client for one session, across reconnections. Made by :func:`connect`.

    The constructor connects (see :func:`connect`, which takes the same arguments) and starts the IO and
    dispatcher threads; :meth:`close`, or leaving ``with``, stops them.

    Thread-safety contract: every public method and property may be called from any thread, concurrently,
    including from a callback running on the dispatcher thread. Each takes the client's one lock only
    briefly; the blocking ones (:meth:`publish`, :meth:`subscribe`, :meth:`messages`, iteration,
    :meth:`close`) wait without holding it, so one blocked caller never blocks another. Publishes made
    from one thread are sent, resent after a reconnection, and delivered in the order that thread made
    them; publishes from different threads are ordered as their calls took the lock.
    """

    def __init__(
        self,
        url: str,
        *,
        session: str,
        password: str | None = None,
        token: str | Callable[[], str] | None = None,
        key: str | bytes,
        suite: SuiteName = "authenticated",
        config: ClientConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        client_id: str | None = None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if max_buffer < 1:
            raise LocalProtocolError(f"max_buffer must be at least 1, got {max_buffer!r}")
        self._url = url
        self._config = config if config is not None else ClientConfig()
        self._endpoint, self._core = make_client_core(
            url,
            session=session,
            password=password,
            token=token,
            key=key,
            suite=suite,
            config=self._config,
            client_id=client_id,
            tls_context_given=ssl_context is not None,
        )
        if self._endpoint.tls and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._max_buffer = max_buffer

        # Guarded by the lock.
        self._state = ConnectionState.CONNECTING
        self._ever_connected = False
        self._closing = False
        self._terminated = False
        self._failure: BaseException | None = None
        self.auth_error: AuthenticationError | None = None
        self._first: _Waiter[None] = _Waiter()
        self._publish_waiters: dict[str, _Waiter[str]] = {}
        self._subscribe_waiters: dict[str, list[_Waiter[None]]] = {}
        self._callbacks: dict[str, list[Callback]] = {}
        self._streams: dict[str, list[_StreamBuffer]] = {}
        self._dispatch: deque[_Job] = deque()
        self._state_callbacks: list[Callable[[StateChange], object]] = []
        self._dispatch_ready = threading.Condition(self._lock)
        self._dispatcher_stopped = False
        self._paused = False
        self._integrity_failures = 0
        self._server_errors = 0

        # The IO thread's own (never touched elsewhere).
        self._transport: _Transport | None = None
        self._retired: list[_Transport] = []

        self._wake_lock = threading.RLock()
        self._wake_open = True
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._io_thread = threading.Thread(target=self._run_io, name="fastport-io", daemon=True)
        self._dispatcher = threading.Thread(
            target=self._run_dispatcher, name="fastport-dispatch", daemon=True
        )
        self._io_thread.start()
        self._dispatcher.start()
        try:
            self._first.wait(None)  # the IO thread always resolves it: connected, failed, or ended
        except BaseException:
            self.close()
            raise
        if self._first.error is not None:
            self.close()
            raise self._first.error

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._url} session={self._core.session!r} {self._state.value}>"

    # -- views -------------------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """``CONNECTED``, ``RECONNECTING`` (publishes and subscriptions wait) or ``CLOSED``."""
        with self._lock:
            return self._state

    @property
    def session(self) -> str:
        return self._core.session

    @property
    def client_id(self) -> str:
        return self._core.client_id

    @property
    def integrity_failures(self) -> int:
        """Received messages that failed verification or decryption (ACKed, never delivered)."""
        with self._lock:
            return self._integrity_failures

    @property
    def server_errors(self) -> int:
        """``error`` frames received (the server could not honour something this client sent)."""
        with self._lock:
            return self._server_errors

    @property
    def pending_publishes(self) -> int:
        """Publishes sent or queued and not yet confirmed by the server."""
        with self._lock:
            return len(self._core.pending_publishes)

    def on_state_change(self, callback: Callable[[StateChange], object]) -> Callable[[], None]:
        """Call ``callback(change)`` on every connection state change; returns a function that unregisters.

        Callbacks run on the dispatcher thread, in order with the message callbacks (so a slow message
        callback delays them too). ``RECONNECTING`` carries the reason and the ``time.monotonic()`` of
        the next attempt; ``CLOSED`` is reported when the client gives up, not after :meth:`close` (no
        callback runs after that). An exception in one is logged. Any thread.
        """
        with self._lock:
            self._state_callbacks.append(callback)

        def unregister() -> None:
            with self._lock:
                if callback in self._state_callbacks:
                    self._state_callbacks.remove(callback)

        return unregister

    # -- publishing --------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: str | bytes, *, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """Encrypt and publish ``payload`` (``str`` or ``bytes``); return its message id once the server
        confirmed it.

        While disconnected the publish waits (it is sent after reconnecting, in publish order) instead of
        failing. Without a confirmation within ``timeout`` seconds (``None``: no bound) it stops being
        retried and :class:`PublishTimeoutError` is raised; the server may already have it, so delivery
        is at least once, never "at most once".

        Raises :class:`~fastport_core.errors.LocalProtocolError` for a bad topic or payload, a message over
        ``max_message_size`` or too many pending publishes; :class:`PublishRefusedError` if the server
        refused it; :class:`ClientClosedError` if the client is closed or gave up meanwhile. Any thread.
        """
        waiter: _Waiter[str] = _Waiter()
        with self._lock:
            self._check_usable_locked("publish")
            message_id = self._core.publish(
                topic, payload, now=time.monotonic(), timestamp=time.time_ns() // 1_000_000
            )
            self._publish_waiters[message_id] = waiter
        self._wake()
        try:
            waiter.wait(timeout)
        finally:
            with self._lock:
                del self._publish_waiters[message_id]
                if not waiter.done and self._core.state is not ClientState.CLOSED:
                    self._core.cancel_publish(message_id)
        if not waiter.done:
            assert timeout is not None
            raise PublishTimeoutError(
                f"publish {message_id} on {topic!r} not confirmed within {timeout:g} s "
                f"(state: {self.state.value}); it is no longer retried",
                message_id=message_id,
            )
        if waiter.error is not None:
            raise waiter.error
        return message_id

    # -- subscribing -------------------------------------------------------------------------------------

    def subscribe(self, topic: str, callback: Callback, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Call ``callback(message)`` on the dispatcher thread for every message on ``topic``.

        Returns once the server confirmed the subscription (waiting for a reconnection if needed, at most
        ``timeout`` seconds: then :class:`SubscribeTimeoutError`, and this subscription is withdrawn;
        :class:`SubscribeRefusedError` if the server refused it). The topic stays subscribed across
        reconnections. Callbacks run one at a time in arrival order (see the module docstring for what a
        slow one does); several callbacks on one topic all run, in subscription order. An exception from a
        callback is logged and the message counts as delivered. Any thread, callbacks included.
        """
        with self._lock:
            self._check_usable_locked("subscribe")
            self._core.subscribe(topic)  # first: it validates the topic
            self._callbacks.setdefault(topic, []).append(callback)
            waiter = self._add_subscribe_waiter_locked(topic)

        def withdraw() -> None:
            callbacks = self._callbacks.get(topic, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._callbacks.pop(topic, None)
            self._unsubscribe_if_unused_locked(topic)

        self._wake()
        self._confirm_or_withdraw(topic, waiter, timeout, withdraw)

    def messages(
        self,
        topic: str,
        timeout: float | None = None,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        subscribe_timeout: float | None = DEFAULT_TIMEOUT,
    ) -> MessageStream:
        """Subscribe to ``topic`` and return an iterator over its messages (:class:`MessageStream`).

        The subscription is made (and confirmed, as :meth:`subscribe`, within ``subscribe_timeout``) before
        this returns, so nothing published afterwards is missed. Iterating waits at most ``timeout``
        seconds for each next message (``None``: until the stream or client closes) and ends, closing the
        stream, at the first wait that times out. Up to ``max_buffer`` messages wait for the iteration;
        past that the client applies backpressure (module docstring), so keep iterating, or close it.
        Any thread.
        """
        if max_buffer < 1:
            raise LocalProtocolError(f"max_buffer must be at least 1, got {max_buffer!r}")
        with self._lock:
            self._check_usable_locked("subscribe")
            self._core.subscribe(topic)
            buffer = _StreamBuffer(topic, max_buffer, threading.Condition(self._lock))
            self._streams.setdefault(topic, []).append(buffer)
            waiter = self._add_subscribe_waiter_locked(topic)
        self._wake()
        self._confirm_or_withdraw(
            topic, waiter, subscribe_timeout, lambda: self._remove_stream_locked(buffer)
        )
        return MessageStream(self, buffer, timeout)

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``: every callback and iterator of it ends, effective at once.

        Messages already queued for a callback of the topic are not handed to it any more; iterators
        still hand out what they had buffered, then stop. Does not wait for the server. Any thread.
        """
        with self._lock:
            self._check_usable_locked("unsubscribe")
            self._callbacks.pop(topic, None)
            for buffer in self._streams.pop(topic, []):
                self._end_stream_locked(buffer, None)
            self._core.unsubscribe(topic)
        self._wake()

    # -- closing -----------------------------------------------------------------------------------------

    def close(self, timeout: float = _CLOSE_GRACE) -> None:
        """Close: WebSocket closing handshake, then stop both threads and close the socket.

        Idempotent, and safe from any thread, including from a callback (the dispatcher thread then ends
        as soon as that callback returns, instead of being joined). Waiting :meth:`publish`,
        :meth:`subscribe` and :meth:`messages` calls raise :class:`ClientClosedError`; iterators end after
        what they had buffered; callbacks still queued are discarded. Unconfirmed publishes are abandoned
        (the server may have some). Each thread is waited for at most ``timeout`` seconds: a callback that
        never returns is left running (a daemon thread), with a warning.
        """
        with self._lock:
            if not self._closing:
                self._closing = True
                if self._core.state is not ClientState.CLOSED:
                    self._core.close(time.monotonic())
                self._terminate_locked(
                    ClientClosedError("the client was closed"),
                    cause=self._failure,
                    closed_by_application=True,
                )
                self._dispatch.clear()
                self._dispatcher_stopped = True
                self._dispatch_ready.notify_all()
        self._wake()
        current = threading.current_thread()
        for thread in (self._io_thread, self._dispatcher):
            if thread is current or not thread.is_alive():
                continue
            thread.join(timeout)
            if thread.is_alive():
                logger.warning(
                    "%s did not stop within %g s (a callback that does not return?)", thread.name, timeout
                )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals for the public methods ----------------------------------------------------------------

    def _wake(self) -> None:
        """Make the IO thread run its loop now (new output, a new deadline, room in a buffer).

        It does not take the client's lock, because a stream's finalizer calls it and the garbage collector
        may run that in a thread that holds the lock. Its own re-entrant lock (never held while taking
        another) only keeps the IO thread from closing the socket pair mid-send. A full socket buffer
        means a wake-up is already pending; a closed pair means the IO thread is gone.
        """
        with self._wake_lock:
            if self._wake_open:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    self._wake_w.send(b"\0")

    def _check_usable_locked(self, operation: str) -> None:
        if self._closing or self._terminated or self._core.state is ClientState.CLOSED:
            why = f" ({self._failure})" if self._failure is not None else ""
            raise ClientClosedError(f"cannot {operation}: the client is closed{why}") from self._failure

    def _add_subscribe_waiter_locked(self, topic: str) -> _Waiter[None]:
        waiter: _Waiter[None] = _Waiter()
        self._subscribe_waiters.setdefault(topic, []).append(waiter)
        return waiter

    def _confirm_or_withdraw(
        self, topic: str, waiter: _Waiter[None], timeout: float | None, withdraw: Callable[[], None]
    ) -> None:
        """Wait for the server's answer to a subscription; on any failure withdraw it and raise."""
        try:
            waiter.wait(timeout)
        finally:
            with self._lock:
                waiters = self._subscribe_waiters.get(topic, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._subscribe_waiters.pop(topic, None)
                if not waiter.done or waiter.error is not None:
                    withdraw()
            self._wake()
        if not waiter.done:
            assert timeout is not None
            raise SubscribeTimeoutError(
                f"subscription to {topic!r} not confirmed within {timeout:g} s (state: {self.state.value})"
            )
        if waiter.error is not None:
            raise waiter.error

    def _unsubscribe_if_unused_locked(self, topic: str) -> None:
        if self._callbacks.get(topic) or self._streams.get(topic):
            return
        if self._core.state is not ClientState.CLOSED:
            self._core.unsubscribe(topic)

    def _end_stream_locked(self, buffer: _StreamBuffer, error: BaseException | None) -> None:
        if not buffer.ended:
            buffer.ended = True
            buffer.error = error
            buffer.ready.notify_all()

    def _remove_stream_locked(self, buffer: _StreamBuffer) -> None:
        self._end_stream_locked(buffer, buffer.error)
        buffers = self._streams.get(buffer.topic)
        if buffers is not None and buffer in buffers:
            buffers.remove(buffer)
            if not buffers:
                del self._streams[buffer.topic]
            self._unsubscribe_if_unused_locked(buffer.topic)

    def _close_stream(self, buffer: _StreamBuffer) -> None:
        with self._lock:
            self._remove_stream_locked(buffer)
        self._wake()

    def _next_message(self, buffer: _StreamBuffer, timeout: float | None) -> Message:
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not buffer.items:
                if buffer.ended:
                    error, buffer.error = buffer.error, None  # raised once; then a plain end
                    if error is not None:
                        raise error
                    raise StopIteration
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._remove_stream_locked(buffer)
                    self._wake()
                    raise StopIteration
                buffer.ready.wait(remaining)
            message = buffer.items.popleft()
            resume = self._paused and len(buffer.items) < buffer.max_buffer
        if resume:
            self._wake()
        return message

    # -- the dispatcher thread ---------------------------------------------------------------------------

    def _run_dispatcher(self) -> None:
        while True:
            with self._lock:
                while not self._dispatch and not self._dispatcher_stopped:
                    self._dispatch_ready.wait()
                if self._dispatcher_stopped:
                    return
                callback, argument, topic = self._dispatch.popleft()
                resume = self._paused and len(self._dispatch) < self._max_buffer
                current = topic is None or callback in self._callbacks.get(topic, ())
            if resume:
                self._wake()
            if not current:
                continue  # unsubscribed (or withdrawn) since the message was queued
            try:
                callback(argument)
            except Exception:
                logger.exception("callback %r raised on %r", callback, argument)

    # -- the IO thread -----------------------------------------------------------------------------------

    def _run_io(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        registered: socket.socket | None = None
        registered_events = 0
        try:
            while True:
                with self._lock:
                    dial = self._pump_locked(time.monotonic())
                    transport = self._transport
                    finished = self._core.state is ClientState.CLOSED and transport is None
                    deadline = self._core.next_deadline()
                    self._paused = paused = self._backlogged_locked()
                for old in self._retired:
                    if registered is not None and registered is old.sock:
                        selector.unregister(registered)
                        registered = None
                    old.close()
                self._retired.clear()
                if finished:
                    return
                if transport is not None and not transport.failed:
                    try:
                        if dial:
                            transport.dial()
                        elif transport.sock is not None and transport.out:
                            transport.write()
                    except OSError as exc:
                        self._lost(transport, _describe(exc))
                        continue

                # Watch the socket for what the transport needs now.
                sock = transport.sock if transport is not None and not transport.failed else None
                events = 0
                if sock is not None and transport is not None:
                    if transport.phase is _Phase.CONNECTING or transport.out:
                        events |= selectors.EVENT_WRITE
                    reading = not transport.eof and transport.phase is not _Phase.CONNECTING
                    if reading and not (paused and transport.phase is _Phase.OPEN):
                        events |= selectors.EVENT_READ
                if registered is not None and (registered is not sock or not events):
                    selector.unregister(registered)
                    registered = None
                if sock is not None and events:
                    if registered is None:
                        selector.register(sock, events, transport)
                        registered, registered_events = sock, events
                    elif events != registered_events:
                        selector.modify(sock, events, transport)
                        registered_events = events

                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, mask in selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    elif key.data is self._transport and self._transport is not None:
                        self._on_ready(self._transport, mask)
        except BaseException as exc:
            logger.exception("the IO thread failed; the client is closed")
            with self._lock:
                self._failure = exc
                if self._core.state is not ClientState.CLOSED:
                    self._core.close(time.monotonic())
                    self._core.data_to_send()
        finally:
            with self._lock:
                self._terminate_locked(ClientClosedError("the client is closed"), cause=self._failure)
            for transport in (self._transport, *self._retired):
                if transport is not None:
                    transport.close()
            self._transport = None
            self._retired.clear()
            selector.close()
            with self._wake_lock:
                self._wake_open = False
                self._wake_r.close()
                self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _on_ready(self, transport: _Transport, mask: int) -> None:
        """The socket is writable and/or readable: move bytes, then let the core see what was read."""
        try:
            if mask & selectors.EVENT_WRITE:
                if transport.phase is _Phase.CONNECTING:
                    transport.on_connect_ready()
                if transport.sock is not None and transport.out:
                    transport.write()
            if mask & selectors.EVENT_READ and transport.sock is not None:
                data = transport.read()
                if data or transport.eof:
                    with self._lock:
                        now = time.monotonic()
                        if data:
                            self._core.receive_data(data, now)
                        if transport.eof:
                            self._core.receive_data(b"", now)
        except OSError as exc:
            self._lost(transport, _describe(exc))

    def _lost(self, transport: _Transport, reason: str) -> None:
        """Report a failed transport to the core (the next pump then retires it)."""
        transport.failed = True
        with self._lock:
            if self._transport is transport:
                self._core.connection_lost(time.monotonic(), reason)

    def _pump_locked(self, now: float) -> bool:
        """Everything the IO thread does with the core on each turn; True if a new dial must start."""
        core = self._core
        self._reap_abandoned_locked()
        deadline = core.next_deadline()
        if deadline is not None and deadline <= now:
            core.handle_timeout(now)
        self._flush_locked(now)
        if core.state is ClientState.DISCONNECTED:
            core.start_connection(now)
            self._transport = _Transport(self._endpoint, self._ssl_context)
            self._flush_locked(now)  # the upgrade request, held until TCP (and TLS) is up
            return True
        return False

    def _flush_locked(self, now: float) -> None:
        """Take the core's output and events; retire the transport once the core is done with it."""
        core = self._core
        while True:
            data = core.data_to_send()
            transport = self._transport
            if data and transport is not None and not transport.failed:
                try:
                    transport.send_app(data)
                except OSError as exc:  # a TLS failure while encrypting
                    transport.failed = True
                    core.connection_lost(now, _describe(exc))
                    continue
            events = core.events()
            if not events:
                break
            self._on_events_locked(events, now)
        transport = self._transport
        if transport is not None and core.should_close_transport():
            self._retired.append(transport)
            self._transport = None

    def _backlogged_locked(self) -> bool:
        """Whether some consumer's buffer is at its watermark (then the IO thread stops reading)."""
        if self._closing:
            return False
        if len(self._dispatch) >= self._max_buffer:
            return True
        return any(
            len(buffer.items) >= buffer.max_buffer and not buffer.abandoned
            for buffers in self._streams.values()
            for buffer in buffers
        )

    def _reap_abandoned_locked(self) -> None:
        for buffers in list(self._streams.values()):
            for buffer in [b for b in buffers if b.abandoned]:
                self._remove_stream_locked(buffer)

    # -- events ------------------------------------------------------------------------------------------

    def _on_events_locked(self, events: list[ClientEvent], now: float) -> None:
        for event in events:
            if settle_answers(event, self._publish_waiters, self._subscribe_waiters):
                if isinstance(event, SubscribeRefused):
                    self._on_subscribe_refused_locked(event)
                continue
            match event:
                case MessageReceived():
                    self._deliver_locked(
                        Message(event.topic, event.payload, event.message_id, event.timestamp)
                    )
                case Connected():
                    self._ever_connected = True
                    self.auth_error = None
                    self._set_state_locked(StateChange(ConnectionState.CONNECTED))
                    self._first.resolve(None)
                case Disconnected():
                    if self._ever_connected:
                        logger.info("connection lost (%s); reconnecting", event.reason)
                        self._set_state_locked(
                            StateChange(ConnectionState.RECONNECTING, event.reason, event.reconnect_at)
                        )
                    else:
                        self._first_attempt_failed_locked(event.reason, now)
                case AuthRefused():
                    self.auth_error = auth_error(event)
                case GaveUp():
                    if self._ever_connected:
                        failure = self.auth_error or ClientClosedError(f"the client gave up: {event.reason}")
                        self._failure = failure
                        self._terminate_locked(failure)
                    else:
                        self._first_attempt_failed_locked(event.reason, now)
                case IntegrityFailure():
                    self._integrity_failures += 1
                case ServerError():
                    self._server_errors += 1

    def _deliver_locked(self, message: Message) -> None:
        for topic in self._core.subscriptions_for(message.topic):  # the topic itself, and matching filters
            for buffer in self._streams.get(topic, ()):
                if not buffer.ended and not buffer.abandoned:
                    buffer.items.append(message)
                    buffer.ready.notify()
            callbacks = self._callbacks.get(topic)
            if callbacks and not self._dispatcher_stopped:
                self._dispatch.extend((callback, message, topic) for callback in callbacks)
                self._dispatch_ready.notify()

    def _set_state_locked(self, change: StateChange) -> None:
        if change.state is self._state and change.state is not ConnectionState.RECONNECTING:
            return
        self._state = change.state
        if self._state_callbacks and not self._dispatcher_stopped:
            self._dispatch.extend((callback, change, None) for callback in self._state_callbacks)
            self._dispatch_ready.notify()

    def _on_subscribe_refused_locked(self, event: SubscribeRefused) -> None:
        """Its answers are failed already (:func:`settle_answers`); end what listens to the topic."""
        error = subscribe_refused_error(event)
        if event.topic in self._core.topics:
            return  # a later request for the topic is still unanswered: only the last answer decides
        logger.warning("%s", error)
        self._callbacks.pop(event.topic, None)
        for buffer in self._streams.pop(event.topic, []):
            self._end_stream_locked(buffer, error)

    def _first_attempt_failed_locked(self, reason: str, now: float) -> None:
        """The first connection failed: stop the core (no reconnection) and fail :func:`connect`."""
        error: BaseException = self.auth_error or ConnectError(f"cannot connect to {self._url}: {reason}")
        if self._core.state is not ClientState.CLOSED:
            self._core.close(now)
        self._failure = error
        self._first.fail(error)

    def _terminate_locked(
        self, error: BaseException, *, cause: BaseException | None = None, closed_by_application: bool = False
    ) -> None:
        """The client is finished: fail every waiter, end every iterator (idempotent).

        Iterators end quietly (``StopIteration``) only when the application closed the client; when the
        client gave up or failed they raise ``error``, so a consumer can tell "done" from "broken".
        """
        if self._terminated:
            return
        self._terminated = True
        self._set_state_locked(StateChange(ConnectionState.CLOSED, str(error)))
        if cause is not None and error.__cause__ is None:
            error.__cause__ = cause
        self._first.fail(error)
        for publish_waiter in self._publish_waiters.values():
            publish_waiter.fail(error)
        for waiters in self._subscribe_waiters.values():
            for waiter in waiters:
                waiter.fail(error)
        ending = None if closed_by_application else error
        for buffers in self._streams.values():
            for buffer in buffers:
                self._end_stream_locked(buffer, ending)
        self._streams.clear()


def _describe(exc: BaseException) -> str:
    """A one-line reason for logs and errors (``OSError`` strings can be empty, SSL ones verbose)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    return str(exc) or type(exc).__name__
