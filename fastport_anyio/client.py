"""The async client: :class:`fastport_core.client_app.ClientApp` driven by anyio tasks (asyncio or trio).

Every decision (protocol, reconnection, timeouts, subscriptions, the refusal rule, flow control, the
first-connect policy, error wording) is the core's (:mod:`fastport_core.client_app`); this module moves
bytes and time, and maps tickets to awaits and consumers to iterators and handler tasks. The tasks live
in the task group that ``async with connect(...)`` opens:

``io`` (one per client: the only writer and the only timer)
    Dials when the core wants (starting a ``connection`` task), writes ``data_to_send()`` in one write,
    retires a finished transport, and sleeps until ``next_deadline()`` or until a call *kicks* it, then
    calls ``handle_timeout``. One writer: no lock, no interleaved frames, coalesced output.
``connection`` (one per transport)
    Dials (TLS for ``wss://``), then reads into the core, except while the core says ``paused`` (a
    consumer's queue is full: TCP pushes back on the server instead of anything being dropped).
``handler`` (one per :meth:`Client.subscribe`)
    Calls the application's handler, sync or async, for each message of its consumer, one at a time.
"""

from __future__ import annotations

import inspect
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, TypeVar

import anyio
import anyio.abc

from fastport_core.client import Token
from fastport_core.client_api import (
    DEFAULT_MAX_BUFFER,
    DEFAULT_TIMEOUT,
    Message,
    describe_error,
)
from fastport_core.client_app import ClientApp, ClientViews, Consumer, Ended, Ticket
from fastport_core.config import ClientConfig
from fastport_core.errors import LocalProtocolError
from fastport_core.keys import SuiteName

__all__ = ["Client", "MessageStream", "connect"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_READ_SIZE: Final = 65536
"""Bytes asked of the socket per read: large enough that a burst costs few core calls."""
_CLOSE_GRACE: Final = 10.0
"""Upper bound (seconds) on :meth:`Client.close` waiting for the closing handshake; the core's own close
timeout (5 s) normally ends it first."""


class MessageStream:
    """``async for message in stream``: the messages of one subscription, each once, in order.

    Made by :meth:`Client.messages` and :meth:`Client.subscription`. With an idle ``timeout``, the
    iteration ends (and the stream closes) when no message came for that long. It ends after
    :meth:`aclose`, :meth:`Client.unsubscribe` or :meth:`Client.close`; it raises
    :class:`~fastport_core.errors.SubscribeRefusedError` if the server withdrew the topic and
    :class:`~fastport_core.errors.ClientClosedError` if the client gave up.
    """

    __slots__ = ("_client", "_consumer", "_timeout")

    def __init__(self, client: Client, consumer: Consumer, timeout: float | None) -> None:
        self._client = client
        self._consumer = consumer
        self._timeout = timeout

    @property
    def topic(self) -> str:
        return self._consumer.topic

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by the iteration."""
        return len(self._consumer.items)

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._client._next(self._consumer, self._timeout)
        except Ended:
            raise StopAsyncIteration from None

    async def receive(self) -> Message:
        """The next message (raises :class:`StopAsyncIteration` once the stream ended)."""
        return await self.__anext__()

    async def aclose(self) -> None:
        """End the iteration and withdraw this subscription (idempotent)."""
        self._client._remove(self._consumer)

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def connect(
    url: str,
    *,
    session: str,
    password: str | None = None,
    token: Token | None = None,
    key: str | bytes,
    suite: SuiteName = "authenticated",
    config: ClientConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    client_id: str | None = None,
) -> Client:
    """A client for ``url`` (``ws://host:port/path`` or ``wss://``); use it as ``async with``.

    Configuration errors (a bad key, suite or URL) raise here, before any IO. ``async with`` returns once
    the first connection is authenticated; if it fails, it raises :class:`~fastport_core.errors.ConnectError`
    or :class:`~fastport_core.errors.AuthenticationError` at once (unless ``config.retry_first_connect``).
    ``ssl_context`` is used for ``wss://`` (default: the system's trust store). An explicit ``client_id``
    makes the subscriber persistent (docs/clients.md). Give ``password``, or ``token`` (a str, or a callable
    that returns a fresh one per connection).
    """
    return Client(url, session=session, password=password, token=token, key=key, suite=suite,
                  config=config, ssl_context=ssl_context, client_id=client_id)  # fmt: skip


class Client(ClientViews):
    """A fastport client for one session, across reconnections. Create it with :func:`connect`.

    All methods must be called from the event loop that entered ``async with``.
    """

    def __init__(
        self,
        url: str,
        *,
        session: str,
        password: str | None = None,
        token: Token | None = None,
        key: str | bytes,
        suite: SuiteName = "authenticated",
        config: ClientConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        client_id: str | None = None,
    ) -> None:
        self._config = config if config is not None else ClientConfig()
        self._app = app = ClientApp(url, session=session, password=password, token=token, key=key,
                                    suite=suite, config=self._config, client_id=client_id,
                                    tls_context_given=ssl_context is not None)  # fmt: skip
        if app.endpoint.tls and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl_context = ssl_context
        app.wake_io = self._on_room
        self._task_group: anyio.abc.TaskGroup | None = None
        self._task_scopes: set[anyio.CancelScope] = set()
        self._conn_scope: anyio.CancelScope | None = None
        self._stream: anyio.abc.ByteStream | None = None
        # Event-loop objects are made in __aenter__, so connect() also works outside a running loop.
        self._wake: anyio.Event
        self._room: anyio.Event
        self._io_done: anyio.Event
        self._closed: anyio.Event
        self._entered = False
        self._close_started = False

    # -- life cycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._entered:
            raise LocalProtocolError("a Client can be entered only once; call connect() again")
        self._entered = True
        self._wake, self._room, self._io_done, self._closed = (anyio.Event() for _ in range(4))
        task_group = self._task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            self._spawn(self._io, done=self._io_done)
            await self._wait(self._app.connected)
        except BaseException as exc:
            await self._shutdown()
            if isinstance(exc, Exception):  # the first connection failed: raise it from outside the group
                await task_group.__aexit__(None, None, None)
                raise
            await task_group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self._shutdown()
        assert self._task_group is not None
        return await self._task_group.__aexit__(exc_type, exc, tb)

    async def close(self, timeout: float = _CLOSE_GRACE) -> None:
        """Close cleanly: send a WebSocket Close frame and wait (bounded) for the server's answer, then stop
        every task (after ``timeout`` seconds at most). Idempotent. Waiting calls raise
        :class:`~fastport_core.errors.ClientClosedError`; streams and handlers end. Unconfirmed publishes
        are abandoned (the server may have some)."""
        await self._shutdown(timeout)

    async def _shutdown(self, timeout: float = _CLOSE_GRACE) -> None:
        if not self._entered:
            self._close_started = True
            return
        with anyio.CancelScope(shield=True):  # runs from __aexit__ even when the body was cancelled
            if self._close_started:
                await self._closed.wait()
            else:
                self._close_started = True
                self._app.close(anyio.current_time())
                self._after()
                with anyio.move_on_after(timeout):
                    await self._io_done.wait()
                self._closed.set()
            for scope in tuple(self._task_scopes):
                scope.cancel()

    def _spawn(self, function: Callable[[], Any], *, done: anyio.Event | None = None) -> anyio.CancelScope:
        """Start a task in its own cancel scope (cancelling the group would cancel the application's code,
        which runs inside it)."""
        assert self._task_group is not None
        scope = anyio.CancelScope()
        self._task_scopes.add(scope)

        async def run() -> None:
            try:
                with scope:
                    await function()
            finally:
                self._task_scopes.discard(scope)
                if done is not None:
                    done.set()

        self._task_group.start_soon(run)
        return scope

    def _check_entered(self, operation: str) -> None:
        if not self._entered:
            raise LocalProtocolError(f"cannot {operation}: use the client as `async with connect(...)`")

    # -- publishing and subscribing ----------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: str | bytes, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> str:
        """Encrypt and publish ``payload``; return its message id once the server confirmed it.

        While disconnected the publish waits (sent after reconnecting, in order). Without a confirmation
        within ``timeout`` seconds it stops being retried (:class:`PublishTimeoutError`); cancelling the
        call does the same. Either way the server may already have it: delivery is at least once.
        """
        self._check_entered("publish")
        ticket = self._app.publish(topic, payload, now=anyio.current_time(),
                                   timestamp=int(time.time() * 1000), timeout=timeout)  # fmt: skip
        self._after()
        result = await self._wait(ticket)
        assert result is not None
        return result

    async def subscribe(
        self,
        topic: str,
        handler: Callable[[Message], object],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        """Call ``handler(message)`` (sync, or async and awaited) for every message on ``topic``.

        Returns once the server confirmed the subscription (at most ``timeout`` seconds, reconnections
        included; otherwise it is withdrawn and the error raised). The handler runs on its own task, one
        message at a time, in order; ``max_buffer`` messages wait for a busy handler before the client
        stops reading (backpressure). An exception from the handler is logged.
        """
        self._check_entered("subscribe")
        consumer = self._app.subscribe(topic, now=anyio.current_time(), timeout=timeout,
                                       max_buffer=max_buffer, handler=handler)  # fmt: skip
        self._after()
        self._spawn(lambda: self._run_handler(consumer))
        await self._wait(consumer.confirm)

    async def messages(
        self,
        topic: str,
        timeout: float | None = None,
        *,
        subscribe_timeout: float | None = DEFAULT_TIMEOUT,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> MessageStream:
        """Subscribe (confirmed, as :meth:`subscribe`) and return a :class:`MessageStream` whose iteration
        waits at most ``timeout`` seconds per message (``None``: no bound). Close it (``aclose`` or
        ``async with``) to withdraw the subscription."""
        self._check_entered("subscribe")
        consumer = self._app.subscribe(topic, now=anyio.current_time(), timeout=subscribe_timeout,
                                       max_buffer=max_buffer)  # fmt: skip
        self._after()
        await self._wait(consumer.confirm)
        return MessageStream(self, consumer, timeout)

    @asynccontextmanager
    async def subscription(
        self, topic: str, *, timeout: float | None = DEFAULT_TIMEOUT, max_buffer: int = DEFAULT_MAX_BUFFER
    ) -> AsyncIterator[MessageStream]:
        """``async with client.subscription(topic) as messages: async for message in messages: ...``

        Subscribes (confirmed within ``timeout``) on entry, withdraws this subscription on exit."""
        stream = await self.messages(topic, subscribe_timeout=timeout, max_buffer=max_buffer)
        async with stream:
            yield stream

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``: every handler and stream of it ends, effective at once."""
        self._check_entered("unsubscribe")
        self._app.unsubscribe(topic)
        self._after()

    def _remove(self, consumer: Consumer) -> None:
        self._app.remove(consumer)
        self._after()

    async def _wait(self, ticket: Ticket[T]) -> T | None:
        """Wait for a ticket to settle; a cancelled wait cancels the ticket (stops the publish, withdraws
        the subscription)."""
        if not ticket.done:
            event = anyio.Event()
            ticket.waker = event.set
            try:
                await event.wait()
            finally:
                if not ticket.done:
                    self._app.cancel(ticket)
                    self._after()
        return ticket.outcome()

    async def _next(self, consumer: Consumer, timeout: float | None) -> Message:
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                message = self._app.take(consumer)
                if message is not None:
                    return message
                event = anyio.Event()
                consumer.waker = event.set
                await event.wait()
        self._remove(consumer)  # idle for ``timeout``: the stream ends
        raise Ended

    async def _run_handler(self, consumer: Consumer) -> None:
        handler = consumer.handler
        assert handler is not None
        while True:
            try:
                message = await self._next(consumer, None)
            except Exception:  # ended: unsubscribed, refused, closed (the subscriber sees the error)
                return
            handled = False
            try:
                result = handler(message)
                if inspect.isawaitable(result):
                    await result
                handled = True
            except Exception:
                logger.exception(
                    "handler for topic %r raised on message %s", consumer.topic, message.message_id
                )
            self._app.done(message, handled=handled)  # ACKs it with ack_when_consumed (not if it raised)
            self._after()

    # -- the IO tasks ------------------------------------------------------------------------------------

    async def _io(self) -> None:
        """The documented loop (fastport_core.client_app): dial, write, retire, sleep, time out."""
        app = self._app
        while True:
            if self._conn_scope is not None and app.should_close_transport():
                self._conn_scope.cancel()  # the core is done with this transport (or its dial)
                self._conn_scope = self._stream = None
            if app.wants_dial:
                app.start_connection(anyio.current_time())
                self._after()
                self._conn_scope = self._spawn(self._connection)
            stream = self._stream
            if stream is not None and (data := app.data_to_send()):
                try:
                    await stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    app.connection_lost(anyio.current_time(), f"write failed: {describe_error(exc)}")
                    app.data_to_send()  # bytes for a dead transport
                    self._after()
                continue  # calls made while we were writing may have queued more
            if app.finished and self._stream is None:
                return
            deadline = app.next_deadline()
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline):
                await self._wake.wait()
            self._wake = anyio.Event()  # no checkpoint since wait(): no kick is lost
            now = anyio.current_time()
            if deadline is not None and now >= deadline:
                app.handle_timeout(now)
                self._after()

    async def _connection(self) -> None:
        """One transport: dial, then read into the core until it ends (or the io task retires it)."""
        app, endpoint = self._app, self._app.endpoint
        stream: anyio.abc.ByteStream
        try:
            if self._ssl_context is not None:
                stream = await anyio.connect_tcp(endpoint.host, endpoint.port, ssl_context=self._ssl_context,
                                                 tls_standard_compatible=False)  # fmt: skip
            else:
                stream = await anyio.connect_tcp(endpoint.host, endpoint.port)
        except (OSError, anyio.BrokenResourceError) as exc:
            app.connection_lost(anyio.current_time(), describe_error(exc))
            self._after()
            return
        try:
            self._stream = stream
            self._kick()
            while True:
                while app.paused:
                    self._room = anyio.Event()
                    await self._room.wait()
                try:
                    data = await stream.receive(_READ_SIZE)
                except anyio.EndOfStream:
                    data = b""
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    app.connection_lost(anyio.current_time(), f"read failed: {describe_error(exc)}")
                    self._after()
                    return
                app.receive_data(data, anyio.current_time())
                self._after()
                if not data:
                    return
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    def _kick(self) -> None:
        self._wake.set()

    def _on_room(self) -> None:
        """The core's ``wake_io``: a queue fell below its mark (read again), or an ACK waits to be written."""
        if self._entered:
            self._room.set()
            self._kick()

    def _after(self) -> None:
        """Run the application callbacks the core asked for and wake the io task: after *every* core call."""
        for callback, argument in self._app.jobs():
            try:
                callback(argument)
            except Exception:
                logger.exception("%r raised on %r", callback, argument)
        self._kick()
