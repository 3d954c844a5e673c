"""The async client: :class:`fastport_core.client.ClientCore` driven by anyio tasks (asyncio or trio).

Theory of operation
-------------------
Every protocol decision (handshake, keepalive, publish retries, re-subscription, dedupe, backoff, give-up)
is the core's. This module only moves bytes and time, and turns the core's events into awaitables,
callbacks and iterators. One :class:`Client` owns these tasks, all in the task group that its
``async with`` opens:

``supervisor``
    Follows the core's state: ``DISCONNECTED`` → :meth:`~ClientCore.start_connection`, dial (TLS for
    ``wss://``), then run the connection until the core says the transport is finished; ``WAITING`` →
    sleep until :meth:`~ClientCore.next_deadline` (the reconnect time) and call
    :meth:`~ClientCore.handle_timeout`; ``CLOSED`` → stop.
``reader`` (one per connection)
    ``receive`` → :meth:`~ClientCore.receive_data`. It never runs application code: received messages go
    to the bounded *inbox*, and while the inbox is above its high watermark the reader stops reading, so
    TCP flow control (and, past that, the server's slow-consumer policy) pushes back on the sender.
``pump`` (one per connection; the only writer and the only timer)
    Writes :meth:`~ClientCore.data_to_send` in one write, then sleeps until the core's next deadline or
    until a call into the core *kicks* it (a call may queue bytes or move the deadline earlier), then calls
    :meth:`~ClientCore.handle_timeout` when a deadline is due. One writer means no lock and no interleaved
    frames; coalescing comes for free because every kick is served by a single ``data_to_send``.
``router``
    Moves messages from the inbox into each local subscription's bounded buffer.
``handler`` (one per :meth:`Client.subscribe`)
    Calls the application's handler for each message of its buffer, sync or async, one at a time (so a
    handler sees its topic in order).

Backpressure, not drops (a decision)
------------------------------------
The core ACKs a message as soon as it is received, so a message dropped by this adapter would be lost for
good, breaking the at-least-once promise exactly where the application can least see it. So no buffer
here ever drops: when a subscription's buffer (``max_buffer``) is full, the router waits for it; the
inbox then fills, the reader stops reading, and the server holds (and, per its slow-consumer policy,
eventually disconnects or sheds) what this client cannot take. Until the buffer fills, a slow handler
stalls nothing but itself: other subscriptions, publishes and keepalive go on. The price is head-of-line
blocking once a consumer falls a full buffer behind; the alternative, losing acknowledged messages, is
worse for a broker whose point is delivery guarantees.

First connection (a decision)
-----------------------------
``async with connect(...)`` returns once the first ``init`` succeeded. If that *first* attempt fails
(refused TCP connection, DNS, TLS, a failed handshake, the core's ``connect_timeout``, a refused
``init``), it raises at once (:class:`ConnectError`, or :class:`~fastport_core.errors.AuthenticationError`
for a refused ``init``) instead of retrying: at start-up a failure is almost always configuration (wrong
URL, server not started, wrong password), and a hang would hide it. After the first success every outage
is handled by the core's reconnect policy, invisibly to ``publish`` and the subscriptions.
"""

from __future__ import annotations

import inspect
import logging
import math
import ssl
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Final, TypeVar, cast

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from fastport_core.client import (
    AuthRefused,
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
    "Client",
    "ClientClosedError",
    "ConnectError",
    "ConnectionState",
    "IntegrityFailure",
    "Message",
    "PublishRefusedError",
    "PublishTimeoutError",
    "StateChange",
    "SubscribeRefusedError",
    "SubscribeTimeoutError",
    "Subscription",
    "connect",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_READ_SIZE: Final = 65536
"""Bytes asked of the socket per read: large enough that a burst costs few core calls."""
_INBOX_HIGH_WATER: Final = 1000
"""Received messages waiting for the router before the reader stops reading (DESIGN §3.6: bounded).

A single read can complete several messages, so the inbox may exceed this by what one read holds."""
_CLOSE_GRACE: Final = 10.0
"""Upper bound (seconds) on :meth:`Client.close` waiting for the WebSocket closing handshake; the core's own
close timeout (5 s) normally ends it first."""


def _describe(exc: BaseException) -> str:
    """A one-line reason for logs and errors, with the underlying cause (anyio wraps dial failures)."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


class _Waiter(Answer[T]):
    """An :class:`~fastport_core.client_api.Answer` awaited by a task."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(anyio.Event())

    async def wait(self) -> None:
        await cast(anyio.Event, self._flag).wait()


class _Inbox:
    """Messages from the reader to the router: a queue with a high watermark instead of a hard bound.

    The reader appends synchronously (right after a core call, so never loses a message to a
    cancellation) and waits for room *before* its next read; that turns a full inbox into a paused socket.
    """

    __slots__ = ("_high_water", "_items", "_not_empty", "_room")

    def __init__(self, high_water: int) -> None:
        self._items: deque[Message] = deque()
        self._high_water = high_water
        self._not_empty = anyio.Event()
        self._room = anyio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Message) -> None:
        self._items.append(item)
        self._not_empty.set()
        if len(self._items) >= self._high_water and self._room.is_set():
            self._room = anyio.Event()

    async def wait_for_room(self) -> None:
        while len(self._items) >= self._high_water:
            await self._room.wait()

    async def get(self) -> Message:
        while not self._items:
            if self._not_empty.is_set():
                self._not_empty = anyio.Event()
            await self._not_empty.wait()
        item = self._items.popleft()
        if len(self._items) < self._high_water:
            self._room.set()
        return item


@dataclass(eq=False)
class _Local:
    """One local subscription (a handler or an iterator) and its bounded buffer."""

    topic: str
    send: MemoryObjectSendStream[Message]
    receive: MemoryObjectReceiveStream[Message]
    handler: Callable[[Message], object] | None = None
    closed: bool = False
    error: BaseException | None = None

    def close(self, error: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = error
        self.send.close()
        self.receive.close()


class Subscription:
    """The async iterator that :meth:`Client.subscription` yields: ``async for message in messages``.

    Iteration ends when the subscription ends (``unsubscribe``, ``close``); it raises if the client gave up
    or the server refused the topic. Each message is handed out once (the core dedupes redeliveries).
    """

    __slots__ = ("_local",)

    def __init__(self, local: _Local) -> None:
        self._local = local

    @property
    def topic(self) -> str:
        return self._local.topic

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by the iteration."""
        return self._local.receive.statistics().current_buffer_used

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._local.receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._local.error is not None:
                raise self._local.error from None
            raise StopAsyncIteration from None

    async def receive(self) -> Message:
        """The next message (raises :class:`StopAsyncIteration` once the subscription ended)."""
        return await self.__anext__()


# --------------------------------------------------------------------------------------------------------
# The client.


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
) -> Client:
    """A client for ``url`` (``ws://host:port/path`` or ``wss://``); use it as ``async with``.

    Configuration errors (a bad key, suite or URL) raise here, before any IO. ``async with`` then returns
    once the first connection is authenticated, or raises :class:`ConnectError` /
    :class:`~fastport_core.errors.AuthenticationError` (see the module docstring for why the first
    attempt is not retried). ``ssl_context`` is used for ``wss://`` (default: the system's trust store).
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
    )


class Client:
    """A fastport client for one session, across reconnections. Create it with :func:`connect`.

    All methods must be called from the event loop that entered ``async with`` (the client's tasks live in
    that task group).
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
    ) -> None:
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
        self._ssl_context: ssl.SSLContext | None = ssl_context

        self._task_group: anyio.abc.TaskGroup | None = None
        self._task_scopes: set[anyio.CancelScope] = set()
        self._dial_scope: anyio.CancelScope | None = None
        # Event-loop objects are made in __aenter__, so that connect() also works outside a running loop
        # (older anyio versions bind events to the loop that creates them).
        self._wake: anyio.Event
        self._supervisor_done: anyio.Event
        self._first_done: anyio.Event
        self._closed: anyio.Event
        self._inbox: _Inbox
        self._first_error: BaseException | None = None
        self._ever_connected = False
        self._entered = False
        self._close_started = False
        self._failure: BaseException | None = None
        self.auth_error: AuthenticationError | None = None
        self._failure_reason = ""

        self._state = ConnectionState.CONNECTING
        self._state_callbacks: list[Callable[[StateChange], object]] = []
        self._integrity_callbacks: list[Callable[[IntegrityFailure], object]] = []
        self._integrity_failures = 0
        self._server_errors = 0

        self._locals: dict[str, list[_Local]] = {}
        self._publish_waiters: dict[str, _Waiter[str]] = {}
        self._subscribe_waiters: dict[str, list[_Waiter[None]]] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._url} session={self._core.session!r} {self._state.value}>"

    # -- views -------------------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
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
        return self._integrity_failures

    @property
    def server_errors(self) -> int:
        """``error`` frames received (the server could not honour something this client sent)."""
        return self._server_errors

    @property
    def pending_publishes(self) -> int:
        """Publishes sent or queued and not yet confirmed by the server."""
        return len(self._core.pending_publishes)

    def on_state_change(self, callback: Callable[[StateChange], object]) -> Callable[[], None]:
        """Call ``callback(change)`` on every connection state change; returns a function that unregisters.

        Callbacks run on the client's own tasks and must return quickly (no blocking IO); an exception in
        one is logged and does not affect the client.
        """
        self._state_callbacks.append(callback)
        return lambda: self._unregister(self._state_callbacks, callback)

    def on_integrity_failure(self, callback: Callable[[IntegrityFailure], object]) -> Callable[[], None]:
        """Call ``callback(failure)`` for every received message that failed verification or decryption.

        Such a message is never delivered (and is ACKed so the server stops re-sending it). Same rules as
        :meth:`on_state_change`.
        """
        self._integrity_callbacks.append(callback)
        return lambda: self._unregister(self._integrity_callbacks, callback)

    @staticmethod
    def _unregister(callbacks: list[Callable[[T], object]], callback: Callable[[T], object]) -> None:
        if callback in callbacks:
            callbacks.remove(callback)

    # -- life cycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._entered:
            raise LocalProtocolError("a Client can be entered only once; call connect() again")
        self._entered = True
        self._wake = anyio.Event()
        self._supervisor_done = anyio.Event()
        self._first_done = anyio.Event()
        self._closed = anyio.Event()
        self._inbox = _Inbox(_INBOX_HIGH_WATER)
        task_group = self._task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            self._spawn(self._supervise, done=self._supervisor_done)
            self._spawn(self._route)
            await self._first_done.wait()
        except BaseException:
            exc_info = sys.exc_info()
            await self._shutdown()
            await task_group.__aexit__(*exc_info)
            raise
        if self._first_error is not None:
            await self._shutdown()
            await task_group.__aexit__(None, None, None)
            raise self._first_error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self._shutdown()
        assert self._task_group is not None
        return await self._task_group.__aexit__(exc_type, exc, tb)

    async def close(self) -> None:
        """Close cleanly: WebSocket close handshake (bounded), then stop every task of this client.

        Idempotent. Waiting ``publish`` and ``subscribe`` calls raise :class:`ClientClosedError`;
        subscription iterators end. Unconfirmed publishes are abandoned (the server may have some).
        """
        await self._shutdown()

    async def _shutdown(self) -> None:
        # Shielded: this runs from __aexit__ even when the body was cancelled, and it must always finish
        # (it is bounded by _CLOSE_GRACE) or the task group would wait on tasks nobody stops.
        if not self._entered:
            self._close_started = True  # never started: nothing to stop
            return
        with anyio.CancelScope(shield=True):
            if self._close_started:
                await self._closed.wait()  # a concurrent close() is doing the work
            else:
                self._close_started = True
                if self._core.state is not ClientState.CLOSED:
                    self._core.close(anyio.current_time())
                    self._after_core_call()
                if self._dial_scope is not None:
                    self._dial_scope.cancel()
                with anyio.move_on_after(_CLOSE_GRACE):
                    await self._supervisor_done.wait()
                closed = ClientClosedError("the client was closed")
                closed.__cause__ = self._failure
                self._terminate(closed, closed_by_application=True)
                self._closed.set()
            for scope in tuple(self._task_scopes):
                scope.cancel()

    def _spawn(self, function: Callable[[], object], *, done: anyio.Event | None = None) -> None:
        """Start a task of this client in its own cancel scope.

        Why not cancel the task group: ``async with`` enters the group in ``__aenter__``, so the
        application's own code runs inside the group's cancel scope; cancelling it would cancel the
        application too. Each task gets a scope that :meth:`close` cancels instead.
        """
        assert self._task_group is not None
        scope = anyio.CancelScope()
        self._task_scopes.add(scope)

        async def run() -> None:
            try:
                with scope:
                    result = function()
                    if inspect.isawaitable(result):
                        await result
            finally:
                self._task_scopes.discard(scope)
                if done is not None:
                    done.set()

        self._task_group.start_soon(run)

    def _check_usable(self, operation: str) -> None:
        if not self._entered:
            raise LocalProtocolError(f"cannot {operation}: use the client as `async with connect(...)`")
        if self._close_started or self._core.state is ClientState.CLOSED:
            error = ClientClosedError(f"cannot {operation}: the client is closed")
            raise error from self._failure

    # -- publishing --------------------------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: str | bytes, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> str:
        """Encrypt and publish ``payload``; return its message id once the server confirmed it.

        While disconnected the publish waits (it is sent after reconnecting, in publish order) instead of
        failing. Without a confirmation within ``timeout`` seconds it stops being retried and
        :class:`PublishTimeoutError` is raised; cancelling the call does the same. Either way the server
        may already have it: delivery is at least once, never "at most once".

        Raises :class:`~fastport_core.errors.LocalProtocolError` for a bad topic or payload, a message over
        ``max_message_size`` or too many pending publishes; :class:`PublishRefusedError` if the server
        refused it; :class:`ClientClosedError` if the client closed or gave up meanwhile.
        """
        self._check_usable("publish")
        message_id = self._core.publish(
            topic, payload, now=anyio.current_time(), timestamp=int(time.time() * 1000)
        )
        waiter: _Waiter[str] = _Waiter()
        self._publish_waiters[message_id] = waiter
        try:
            self._after_core_call()
            with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
                await waiter.wait()
            if scope.cancelled_caught:
                raise PublishTimeoutError(
                    f"publish {message_id} on {topic!r} not confirmed within {timeout:g} s "
                    f"(state: {self._state.value}); it is no longer retried",
                    message_id=message_id,
                )
        finally:
            del self._publish_waiters[message_id]
            if not waiter.done and self._core.state is not ClientState.CLOSED:
                self._core.cancel_publish(message_id)
                self._after_core_call()
        if waiter.error is not None:
            raise waiter.error
        return message_id

    # -- subscribing -------------------------------------------------------------------------------------

    async def subscribe(
        self,
        topic: str,
        handler: Callable[[Message], object],
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """Call ``handler(message)`` (sync, or async and awaited) for every message on ``topic``.

        Returns once the server confirmed the subscription (waiting for a reconnection if needed, at most
        ``timeout`` seconds: then :class:`SubscribeTimeoutError` and the subscription is withdrawn). The
        handler runs on its own task, messages of the topic one at a time and in order; ``max_buffer``
        messages wait for a busy handler before the client applies backpressure (module docstring). An
        exception from the handler is logged; the message counts as delivered. A sync handler blocks the
        event loop while it runs: keep it short, or make it async.
        """
        self._check_usable("subscribe")
        local = self._add_local(topic, max_buffer, handler)
        self._spawn(lambda: self._run_handler(local))
        await self._confirm_or_withdraw(local, timeout)

    @asynccontextmanager
    async def subscription(
        self, topic: str, *, max_buffer: int = DEFAULT_MAX_BUFFER, timeout: float | None = DEFAULT_TIMEOUT
    ) -> AsyncIterator[Subscription]:
        """``async with client.subscription(topic) as messages: async for message in messages: ...``

        Subscribes (confirmed, as :meth:`subscribe`) on entry and withdraws this subscription on exit.
        Up to ``max_buffer`` messages wait for the iteration; past that the client applies backpressure
        rather than dropping anything (module docstring), so keep iterating, or leave the block.
        """
        self._check_usable("subscribe")
        local = self._add_local(topic, max_buffer, None)
        try:
            await self._confirm_or_withdraw(local, timeout)
            yield Subscription(local)
        finally:
            self._remove_local(local)

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``: every handler and iterator of it ends, effective at once.

        Messages already buffered for a handler are not handed to it any more.
        """
        self._check_usable("unsubscribe")
        for local in self._locals.pop(topic, []):
            local.close()
        self._core.unsubscribe(topic)
        self._after_core_call()

    def _add_local(self, topic: str, max_buffer: int, handler: Callable[[Message], object] | None) -> _Local:
        if max_buffer < 1:
            raise LocalProtocolError(f"max_buffer must be at least 1, got {max_buffer!r}")
        self._core.subscribe(topic)  # first: it validates the topic
        send, receive = anyio.create_memory_object_stream[Message](max_buffer)
        local = _Local(topic, send, receive, handler)
        self._locals.setdefault(topic, []).append(local)
        self._after_core_call()
        return local

    def _remove_local(self, local: _Local, error: BaseException | None = None) -> None:
        local.close(error)
        locals_ = self._locals.get(local.topic)
        if locals_ is not None and local in locals_:
            locals_.remove(local)
            if not locals_:
                del self._locals[local.topic]
                if self._core.state is not ClientState.CLOSED:
                    self._core.unsubscribe(local.topic)
                    self._after_core_call()

    async def _confirm_or_withdraw(self, local: _Local, timeout: float | None) -> None:
        """Wait for the server's answer to the subscription; on any failure withdraw it and raise."""
        waiter: _Waiter[None] = _Waiter()
        waiters = self._subscribe_waiters.setdefault(local.topic, [])
        waiters.append(waiter)
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
                await waiter.wait()
            if scope.cancelled_caught:
                raise SubscribeTimeoutError(
                    f"subscription to {local.topic!r} not confirmed within {timeout:g} s "
                    f"(state: {self._state.value})"
                )
            if waiter.error is not None:
                raise waiter.error
        except BaseException:
            self._remove_local(local)
            raise
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._subscribe_waiters.pop(local.topic, None)

    async def _run_handler(self, local: _Local) -> None:
        """Feed one handler subscription; ends when the subscription is withdrawn (the handler call in
        progress, if any, is allowed to finish) or when the client closes (cancelled)."""
        handler = local.handler
        assert handler is not None
        while True:
            try:
                message = await local.receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            try:
                result = handler(message)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("handler for topic %r raised on message %s", local.topic, message.message_id)
            if local.closed:
                return

    # -- tasks -------------------------------------------------------------------------------------------

    async def _route(self) -> None:
        """Move each received message into every local subscription of its topic (waiting if one is full)."""
        while True:
            message = await self._inbox.get()
            topics = self._core.subscriptions_for(message.topic)  # the topic itself, and matching filters
            for local in [one for topic in topics for one in self._locals.get(topic, ())]:
                if local.closed:
                    continue
                try:
                    await local.send.send(message)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    continue  # withdrawn while we waited for room

    async def _supervise(self) -> None:
        core = self._core
        while True:
            state = core.state
            if state is ClientState.CLOSED:
                return
            if state is ClientState.DISCONNECTED:
                await self._run_connection()
                if not self._ever_connected:
                    self._first_attempt_failed()
                    return
            elif state is ClientState.WAITING:
                await self._sleep_until(core.next_deadline())
                core.handle_timeout(anyio.current_time())
                self._after_core_call()
            else:  # pragma: no cover - a transport state outside _run_connection would be a bug here
                raise AssertionError(f"supervisor found the core in state {state.name} with no connection")

    def _first_attempt_failed(self) -> None:
        core = self._core
        error: BaseException
        if self.auth_error is not None:
            error = self.auth_error
        else:
            reason = self._failure_reason or "connection failed"
            error = ConnectError(f"cannot connect to {self._url}: {reason}")
        if core.state is not ClientState.CLOSED:
            core.close(anyio.current_time())  # no transport is live: nothing to send
            core.data_to_send()
        self._first_error = error
        self._first_done.set()

    async def _run_connection(self) -> None:
        """One transport, from dial to the core's verdict that it is finished."""
        core = self._core
        endpoint = self._endpoint
        core.start_connection(anyio.current_time())
        self._after_core_call()
        stream: anyio.abc.ByteStream | None = None
        reason = "the dial was cancelled"
        with anyio.CancelScope() as self._dial_scope:
            try:
                with anyio.fail_after(self._config.connect_timeout):
                    if self._ssl_context is not None:
                        stream = await anyio.connect_tcp(
                            endpoint.host,
                            endpoint.port,
                            ssl_context=self._ssl_context,
                            tls_standard_compatible=False,
                        )
                    else:
                        stream = await anyio.connect_tcp(endpoint.host, endpoint.port)
            except TimeoutError:
                transport = "TCP/TLS" if endpoint.tls else "TCP"
                reason = f"no {transport} connection within {self._config.connect_timeout:g} s"
            except (OSError, anyio.BrokenResourceError) as exc:
                reason = _describe(exc)
        self._dial_scope = None
        if stream is None:
            core.connection_lost(anyio.current_time(), reason)
            self._after_core_call()
            self._failure_reason = reason  # the dial's own words read better than "connection lost: ..."
            return
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._read, stream, task_group.cancel_scope)
                await self._pump(stream)
                task_group.cancel_scope.cancel()
        finally:
            await anyio.aclose_forcefully(stream)
            if core.state in (ClientState.CONNECTING, ClientState.INITIALISING, ClientState.READY):
                # Defensive: the tasks ended without the core's verdict (cancelled, or a bug): tell it.
                core.connection_lost(anyio.current_time(), "connection task ended")
                self._after_core_call()

    async def _read(self, stream: anyio.abc.ByteStream, connection_scope: anyio.CancelScope) -> None:
        core = self._core
        while True:
            await self._inbox.wait_for_room()
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                data = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                core.connection_lost(anyio.current_time(), f"read failed: {_describe(exc)}")
                self._after_core_call()
                connection_scope.cancel()
                return
            core.receive_data(data, anyio.current_time())
            self._after_core_call()
            if not data:
                # End of file: nothing more can arrive, and the core has ended the connection with it.
                connection_scope.cancel()
                return

    async def _pump(self, stream: anyio.abc.ByteStream) -> None:
        """The connection's only writer and only timer; returns once the core is done with the transport."""
        core = self._core
        while True:
            data = core.data_to_send()
            if data:
                try:
                    await stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    core.connection_lost(anyio.current_time(), f"write failed: {_describe(exc)}")
                    self._after_core_call()
                    core.data_to_send()  # bytes for a dead transport
                    return
                continue  # calls made while we were writing may have queued more
            if core.should_close_transport():
                return
            deadline = core.next_deadline()
            await self._sleep_until(deadline)
            now = anyio.current_time()
            if deadline is not None and now >= deadline:
                core.handle_timeout(now)
                self._after_core_call()

    async def _sleep_until(self, deadline: float | None) -> None:
        """Sleep until ``deadline`` (``None``: forever) or until :meth:`_kick`, whichever comes first."""
        wake = self._wake
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline):
            await wake.wait()
        # No checkpoint since wait() returned: a kick either set this event (and its bytes are taken by
        # the caller's next data_to_send) or comes after the replacement.
        if wake.is_set():
            self._wake = anyio.Event()

    def _kick(self) -> None:
        self._wake.set()

    # -- events ------------------------------------------------------------------------------------------

    def _after_core_call(self) -> None:
        """Handle the core's new events and wake the pump: run after *every* call into the core."""
        for event in self._core.events():
            if settle_answers(event, self._publish_waiters, self._subscribe_waiters):
                if isinstance(event, SubscribeRefused):
                    self._on_subscribe_refused(event)
                continue
            match event:
                case MessageReceived():
                    self._inbox.put(Message(event.topic, event.payload, event.message_id, event.timestamp))
                case Connected():
                    self._ever_connected = True
                    self.auth_error = None
                    self._set_state(StateChange(ConnectionState.CONNECTED))
                    self._first_done.set()
                case Disconnected():
                    self._failure_reason = event.reason
                    if self._ever_connected:
                        self._set_state(
                            StateChange(ConnectionState.RECONNECTING, event.reason, event.reconnect_at)
                        )
                case AuthRefused():
                    self.auth_error = auth_error(event)
                case GaveUp():
                    self._failure_reason = event.reason
                    failure: BaseException = self.auth_error or ClientClosedError(
                        f"the client gave up: {event.reason}"
                    )
                    self._failure = failure
                    if self._ever_connected:
                        self._terminate(failure)
                case IntegrityFailure():
                    self._integrity_failures += 1
                    self._notify(self._integrity_callbacks, event)
                case ServerError():
                    self._server_errors += 1
        self._kick()

    def _on_subscribe_refused(self, event: SubscribeRefused) -> None:
        error = subscribe_refused_error(event)
        # The core forgot the topic: every local subscription of it ends with the refusal.
        for local in self._locals.pop(event.topic, []):
            local.close(error)

    def _terminate(self, error: BaseException, *, closed_by_application: bool = False) -> None:
        """The client is done: fail every waiter, end every subscription.

        Iterators end quietly when the application closed the client, and raise ``error`` when the client
        gave up on its own (the application must be able to tell "done" from "failed").
        """
        for publish_waiter in self._publish_waiters.values():
            publish_waiter.fail(error)
        for waiters in self._subscribe_waiters.values():
            for waiter in waiters:
                waiter.fail(error)
        ending = None if closed_by_application else error
        for locals_ in self._locals.values():
            for local in locals_:
                local.close(ending)
        self._locals.clear()
        self._set_state(StateChange(ConnectionState.CLOSED, str(error)))

    def _set_state(self, change: StateChange) -> None:
        if change.state is self._state and change.state is not ConnectionState.RECONNECTING:
            return
        self._state = change.state
        self._notify(self._state_callbacks, change)

    @staticmethod
    def _notify(callbacks: list[Callable[[T], object]], event: T) -> None:
        for callback in tuple(callbacks):
            try:
                callback(event)
            except Exception:
                logger.exception("%r raised on %r", callback, event)
