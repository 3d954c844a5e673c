"""The blocking client: :class:`fastport_core.client_app.ClientApp` driven by two threads and one lock.

Every decision is the core's (:mod:`fastport_core.client_app`); this module moves bytes and time, and maps
tickets to blocking waits and consumers to iterators and callbacks. ``fastport-io`` is the only thread
that touches the socket (:mod:`.transport`) and runs the documented loop on one ``selectors`` call;
``fastport-dispatch`` runs the application's callbacks one at a time (topics take turns, each in order).
One lock guards the core, held only to call into it; nothing that can block runs under it.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar

from fastport_core.client import Token
from fastport_core.client_api import DEFAULT_MAX_BUFFER, DEFAULT_TIMEOUT, Message, describe_error
from fastport_core.client_app import ClientApp, ClientViews, Consumer, Ended, Job, Ticket
from fastport_core.config import ClientConfig
from fastport_core.keys import SuiteName

from .transport import Phase, Transport

__all__ = ["Client", "MessageStream", "connect"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSE_GRACE: Final = 10.0
"""Default bound (seconds) on :meth:`Client.close` waiting for each thread (a callback may still run)."""


class MessageStream:
    """``for message in stream``: one subscription's messages, each once, in order, from any thread. The
    same contract as :class:`fastport_anyio.MessageStream`; a stream dropped without :meth:`close` is
    withdrawn when it is garbage-collected."""

    __slots__ = ("__weakref__", "_client", "_consumer", "_finalizer", "_ready", "_timeout")

    def __init__(self, client: Client, consumer: Consumer, ready: threading.Condition, timeout: float | None):
        self._client = client
        self._consumer = consumer
        self._ready = ready
        self._timeout = timeout
        # The finalizer may run inside the garbage collector, in a thread holding the lock: no lock there.
        self._finalizer = weakref.finalize(self, client._abandon, consumer)

    @property
    def topic(self) -> str:
        return self._consumer.topic

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by the iteration."""
        return len(self._consumer.items)

    def __iter__(self) -> MessageStream:
        return self

    def __next__(self) -> Message:
        try:
            return self._client._next(self._consumer, self._ready, self._timeout)
        except Ended:
            raise StopIteration from None

    def close(self) -> None:
        """End the iteration and withdraw this subscription (idempotent, any thread)."""
        self._finalizer.detach()
        self._client._call(self._client._app.remove, self._consumer)

    def __enter__(self) -> MessageStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client(ClientViews):
    """A blocking fastport client for one session, across reconnections; ``with connect(url, ...) as c:``.

    Same keywords and behaviour as :func:`fastport_anyio.connect` (docs/clients.md): configuration errors
    raise before any IO; the constructor returns once the session is open, or raises ``ConnectError`` /
    ``AuthenticationError`` with no thread left behind (unless ``config.retry_first_connect``). Every
    method may be called from any thread, callbacks included; blocking ones wait without the lock.
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
        self._app = app = ClientApp(url, session=session, password=password, token=token, key=key,
                                    suite=suite, config=config, client_id=client_id,
                                    tls_context_given=ssl_context is not None)  # fmt: skip
        if app.endpoint.tls and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl_context = ssl_context
        app.wake_io = self._wake
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # the dispatcher's: a job or a message to hand out
        self._jobs: deque[Job] = deque()
        self._handlers: deque[Consumer] = deque()
        self._abandoned: list[Consumer] = []  # appended without the lock (finalizers), reaped by IO thread
        self._closing = False
        self._transport: Transport | None = None  # the IO thread's own
        self._wake_lock = threading.Lock()
        self._wake_open = True
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._threads = [
            threading.Thread(target=target, name=f"fastport-{name}", daemon=True)
            for target, name in ((self._run_io, "io"), (self._run_dispatcher, "dispatch"))
        ]
        for thread in self._threads:
            thread.start()
        try:
            self._wait(app.connected)
        except BaseException:
            self.close()
            raise

    # -- publishing and subscribing ----------------------------------------------------------------------

    def publish(self, topic: str, payload: str | bytes, *, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """Encrypt and publish ``payload``; return its message id once the server confirmed it (the async
        client's contract: waits across reconnections, at most ``timeout`` seconds)."""
        ticket = self._call(self._app.publish, topic, payload, now=time.monotonic(),
                            timestamp=time.time_ns() // 1_000_000, timeout=timeout)  # fmt: skip
        result = self._wait(ticket)
        assert result is not None
        return result

    def subscribe(self, topic: str, handler: Callable[[Message], object], *,
                  timeout: float | None = DEFAULT_TIMEOUT,
                  max_buffer: int = DEFAULT_MAX_BUFFER) -> None:  # fmt: skip
        """Call ``handler(message)`` on the dispatcher thread for every message on ``topic``; returns once
        the server confirmed the subscription (at most ``timeout`` seconds; otherwise it is withdrawn and
        the error raised). ``max_buffer`` messages wait for a busy handler before the client stops reading.
        """
        consumer = self._call(self._app.subscribe, topic, now=time.monotonic(), timeout=timeout,
                              max_buffer=max_buffer, handler=handler)  # fmt: skip
        with self._lock:
            consumer.waker = self._ready.notify
            self._handlers.append(consumer)
        self._wait(consumer.confirm)

    def messages(self, topic: str, timeout: float | None = None, *,
                 subscribe_timeout: float | None = DEFAULT_TIMEOUT,
                 max_buffer: int = DEFAULT_MAX_BUFFER) -> MessageStream:  # fmt: skip
        """Subscribe (confirmed, as :meth:`subscribe`) and return a :class:`MessageStream` whose iteration
        waits at most ``timeout`` seconds per message (``None``: no bound)."""
        consumer = self._call(self._app.subscribe, topic, now=time.monotonic(), timeout=subscribe_timeout,
                              max_buffer=max_buffer)  # fmt: skip
        ready = threading.Condition(self._lock)
        with self._lock:
            consumer.waker = ready.notify_all
        self._wait(consumer.confirm)
        return MessageStream(self, consumer, ready, timeout)

    @contextmanager
    def subscription(
        self, topic: str, *, timeout: float | None = DEFAULT_TIMEOUT, max_buffer: int = DEFAULT_MAX_BUFFER
    ) -> Iterator[MessageStream]:
        """``with client.subscription(topic) as messages: for message in messages: ...``"""
        with self.messages(topic, subscribe_timeout=timeout, max_buffer=max_buffer) as stream:
            yield stream

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``: every callback and stream of it ends, effective at once."""
        self._call(self._app.unsubscribe, topic)

    # -- closing -----------------------------------------------------------------------------------------

    def close(self, timeout: float = _CLOSE_GRACE) -> None:
        """Close: send a WebSocket Close frame and wait (bounded) for the server's answer, then stop both
        threads. Idempotent, any thread (a callback too). Waiting calls raise ``ClientClosedError``;
        streams end; callbacks still queued are discarded. A thread that does not stop within ``timeout``
        (a callback that never returns) is left running, with a warning."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._handlers.clear()
                self._app.close(time.monotonic())
                self._collect_locked()
                self._ready.notify_all()
        self._wake()
        for thread in self._threads:
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(timeout)
                if thread.is_alive():
                    logger.warning("%s did not stop within %g s (a callback that does not return?)",
                                   thread.name, timeout)  # fmt: skip

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the application side's internals ----------------------------------------------------------------

    def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call into the core under the lock, queue the callbacks it asked for, wake the IO thread."""
        with self._lock:
            result = function(*args, **kwargs)
            self._collect_locked()
        self._wake()
        return result

    def _collect_locked(self) -> None:
        jobs = self._app.jobs()
        if jobs:
            self._jobs.extend(jobs)
            self._ready.notify()

    def _wait(self, ticket: Ticket[T]) -> T | None:
        """Wait for a ticket to settle; an interrupted wait cancels it."""
        done = threading.Event()
        with self._lock:
            ticket.waker = done.set
            if ticket.done:
                done.set()
        try:
            done.wait()
        finally:
            if not done.is_set():
                self._call(self._app.cancel, ticket)
        return ticket.outcome()

    def _next(self, consumer: Consumer, ready: threading.Condition, timeout: float | None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while (message := self._app.take(consumer)) is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._app.remove(consumer)  # idle for ``timeout``: the stream ends
                    raise Ended
                ready.wait(remaining)
            return message

    def _abandon(self, consumer: Consumer) -> None:
        self._abandoned.append(consumer)
        self._wake()

    def _wake(self) -> None:
        """Make the IO thread run its loop now. Takes only its own leaf lock: finalizers call it."""
        with self._wake_lock:
            if self._wake_open:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    self._wake_w.send(b"\0")

    def _run_dispatcher(self) -> None:
        while True:
            with self._lock:
                while not (job := self._next_job_locked()):
                    if self._closing and not self._jobs:
                        return
                    self._ready.wait()
            callback, argument = job
            handled = False
            try:
                callback(argument)
                handled = True
            except Exception:
                logger.exception("callback %r raised on %r", callback, argument)
            if isinstance(argument, Message):  # a handler's: ACK it (with ack_when_consumed) unless it raised
                self._call(self._app.done, argument, handled=handled)

    def _next_job_locked(self) -> Job | None:
        """A state/integrity callback first, else the next message of a handler, taking turns."""
        if self._jobs:
            return self._jobs.popleft()
        for _ in range(len(self._handlers)):
            consumer = self._handlers[0]
            self._handlers.rotate(-1)
            try:
                message = self._app.take(consumer)
            except Exception:  # the consumer ended (its subscriber saw why)
                self._handlers.remove(consumer)
                continue
            if message is not None:
                assert consumer.handler is not None
                return consumer.handler, message
        return None

    # -- the IO thread -----------------------------------------------------------------------------------

    def _run_io(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while self._io_turn(selector):
                pass
        except BaseException:
            logger.exception("the IO thread failed; the client is closed")
            self._call(self._app.close, time.monotonic())
        finally:
            if self._transport is not None:
                self._transport.close()
            selector.close()
            with self._wake_lock:
                self._wake_open = False
                self._wake_r.close()
                self._wake_w.close()

    def _io_turn(self, selector: selectors.BaseSelector) -> bool:
        """One turn of the documented loop; ``False`` once the client is finished."""
        app = self._app
        with self._lock:
            now = time.monotonic()
            while self._abandoned:
                app.remove(self._abandoned.pop())
            if (deadline := app.next_deadline()) is not None and deadline <= now:
                app.handle_timeout(now)
            transport = self._transport
            if transport is not None and app.should_close_transport():
                self._retire(selector, transport)
                transport = None
            dial = app.wants_dial
            if dial:
                app.start_connection(now)
                transport = self._transport = Transport(app.endpoint, self._ssl_context)
            if transport is not None and (data := app.data_to_send()):
                try:
                    transport.send_app(data)
                except OSError as exc:  # a TLS failure while encrypting
                    app.connection_lost(now, describe_error(exc))
            self._collect_locked()
            if app.finished and self._transport is None:
                return False
            deadline, paused = app.next_deadline(), app.paused
        if transport is not None and not transport.failed:
            try:
                if dial:
                    transport.dial()
                if transport.sock is not None and transport.out:
                    transport.write()
            except OSError as exc:
                self._lost(transport, describe_error(exc))
                return True
        sock = transport.sock if transport is not None and not transport.failed else None
        events = 0
        if sock is not None and transport is not None:
            if transport.phase is Phase.CONNECTING or transport.out:
                events |= selectors.EVENT_WRITE
            reading = not transport.eof and transport.phase is not Phase.CONNECTING
            if reading and not (paused and transport.phase is Phase.OPEN):
                events |= selectors.EVENT_READ
        key = next((key for key in selector.get_map().values() if key.data is not None), None)
        if key is not None and (key.fileobj is not sock or not events):
            selector.unregister(key.fileobj)
            key = None
        if sock is not None and events:
            if key is None:
                selector.register(sock, events, transport)
            elif key.events != events:
                selector.modify(sock, events, transport)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, mask in selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    while self._wake_r.recv(4096):
                        pass
            elif key.data is self._transport and self._transport is not None:
                self._on_ready(self._transport, mask)
        return True

    def _retire(self, selector: selectors.BaseSelector, transport: Transport) -> None:
        if transport.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(transport.sock)
        transport.close()
        self._transport = None

    def _on_ready(self, transport: Transport, mask: int) -> None:
        """The socket is writable and/or readable: move bytes, then let the core see what was read."""
        try:
            if mask & selectors.EVENT_WRITE:
                if transport.phase is Phase.CONNECTING:
                    transport.on_connect_ready()
                if transport.sock is not None and transport.out:
                    transport.write()
            if mask & selectors.EVENT_READ and transport.sock is not None:
                data = transport.read()
                if data or transport.eof:
                    with self._lock:
                        if data:
                            self._app.receive_data(data, time.monotonic())
                        if transport.eof:
                            self._app.receive_data(b"", time.monotonic())
                        self._collect_locked()
        except OSError as exc:
            self._lost(transport, describe_error(exc))

    def _lost(self, transport: Transport, reason: str) -> None:
        transport.failed = True
        with self._lock:
            if self._transport is transport:
                self._app.connection_lost(time.monotonic(), reason)
                self._collect_locked()


connect = Client
"""``connect(url, session=..., password=..., key=...)``: the blocking client is made connected."""
