"""The application-level client: every decision the async and the blocking client share, made once, no IO.

Theory of operation
-------------------
:class:`~fastport_core.client.ClientCore` speaks the protocol. A :class:`ClientApp` sits on top of it
and owns what an *application* sees of a client, whichever adapter runs it (anyio tasks or threads):

* **Tickets** (:class:`Ticket`): one per caller waiting for an outcome: the first connection, a publish's
  confirmation, a subscription's confirmation. A ticket has its deadline (the caller's ``timeout``), which
  is folded into :meth:`ClientApp.next_deadline`, so a timeout is settled by :meth:`ClientApp.handle_timeout`
  like any protocol timer. Every ticket is settled exactly once: by the server's answer, by its timeout, by
  :meth:`ClientApp.cancel` (the caller stopped waiting) or by the end of the client.
* **Consumers** (:class:`Consumer`): one per local subscription (a handler or an iterator), each with its
  own bounded queue. Consumers are reference-counted per topic: the topic is unsubscribed from the server
  when its last consumer goes.
* **The refusal rule** (one rule for both clients): the fate of a topic is decided by the server's answer
  to the *latest* request for it, exactly as the core's topic table is. A confirmation settles every
  waiting subscription of the topic; a refusal of the latest request fails every waiting subscription
  *and* ends every consumer of the topic with :class:`~fastport_core.errors.SubscribeRefusedError` (the
  core no longer lists it); a refusal overtaken by a later request changes nothing (the later answer
  decides).
* **Flow control**: :attr:`ClientApp.paused` is true while some consumer's queue is at its ``max_buffer``;
  the adapter then stops *reading* the socket. Nothing is dropped: by default the core ACKs on receipt, so
  a dropped message would be lost for good. TCP then pushes back on the server, whose slow-consumer
  policy applies. :attr:`ClientApp.wake_io` is called when a queue falls below its mark, so the adapter
  reads again, and when an ACK was queued outside an IO call, so the adapter writes it.
* **When a message is consumed** (``ClientConfig.ack_when_consumed``): each message is held by the
  consumers it was queued for; an iterator is done with it when :meth:`ClientApp.take` hands it out, a
  handler when the adapter reports :meth:`ClientApp.done`, a withdrawn consumer with what it had buffered.
  The last one tells the core to ACK it (or, if a handler raised, to forget it for a redelivery).
* **The connection state** the application sees (:class:`~fastport_core.client_api.ConnectionState`),
  with repeated states deduplicated, and its callbacks; counters; and the first-connect policy
  (``ClientConfig.retry_first_connect``).

The adapter's loop
------------------
Both adapters run the same loop: dial when :attr:`ClientApp.wants_dial`; feed what they read to
:meth:`ClientApp.receive_data` (not while :attr:`ClientApp.paused`); write :meth:`ClientApp.data_to_send`;
close the socket when :meth:`ClientApp.should_close_transport`; sleep until :meth:`ClientApp.next_deadline`
then call :meth:`ClientApp.handle_timeout`; stop when :attr:`ClientApp.finished`. After every call they run
the callbacks :meth:`ClientApp.jobs` returns. A ticket's or consumer's ``waker`` (set by the adapter) is
called when it changes: that is how a future or an iterator learns it can go on.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from .client import (
    AuthRefused,
    ClientCore,
    ClientState,
    Connected,
    Disconnected,
    GaveUp,
    IntegrityFailure,
    MessageReceived,
    PublishConfirmed,
    PublishExpired,
    PublishRefused,
    ServerError,
    SubscribeConfirmed,
    SubscribeRefused,
    Token,
)
from .client_api import (
    DEFAULT_MAX_BUFFER,
    ConnectionState,
    Message,
    StateChange,
    auth_error,
    parse_url,
    subscribe_refused_error,
)
from .config import ClientConfig
from .errors import (
    AuthenticationError,
    ClientClosedError,
    ConnectError,
    LocalProtocolError,
    PublishRefusedError,
    PublishTimeoutError,
    SubscribeTimeoutError,
)
from .keys import SuiteName
from .timers import Deadlines

__all__ = ["ClientApp", "ClientViews", "Consumer", "Ended", "Ticket"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Job = tuple[Callable[[Any], object], object]
"""An application callback and its argument, for the adapter to run outside the core."""


class Ended(Exception):
    """Raised by :meth:`ClientApp.take` once a consumer ended quietly (the adapter's ``StopIteration``)."""


class Ticket(Generic[T]):
    """One caller waiting for an outcome; settled once, with ``result`` or ``error``."""

    __slots__ = ("consumer", "done", "error", "kind", "message_id", "result", "timeout", "topic", "waker")

    def __init__(
        self,
        kind: Literal["connect", "publish", "subscribe"],
        *,
        topic: str = "",
        message_id: str = "",
        timeout: float | None = None,
        consumer: Consumer | None = None,
    ) -> None:
        self.kind = kind
        self.topic = topic
        self.message_id = message_id
        self.timeout = timeout
        self.consumer = consumer
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None
        self.waker: Callable[[], object] | None = None
        """Set by the adapter; called once, when the ticket is settled."""

    def outcome(self) -> T | None:
        """The result of a settled ticket, or its error raised."""
        if self.error is not None:
            raise self.error
        return self.result


class Consumer:
    """One local subscription (a handler or an iterator) and its queue of messages not yet taken."""

    __slots__ = ("confirm", "ended", "error", "handler", "items", "max_buffer", "topic", "waker")

    def __init__(self, topic: str, max_buffer: int, handler: Callable[[Message], object] | None) -> None:
        self.topic = topic
        self.max_buffer = max_buffer
        self.handler = handler
        """Opaque here: the adapter's (it calls it for each message)."""
        self.items: deque[Message] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.confirm: Ticket[None] = Ticket("subscribe", topic=topic, consumer=self)
        self.waker: Callable[[], object] | None = None
        """Set by the adapter; called when a message arrives or the consumer ends."""

    def _wake(self) -> None:
        if self.waker is not None:
            self.waker()


class ClientApp:
    """A client as the application sees it, without IO: see the module docstring.

    Takes :func:`connect`'s arguments; configuration errors (URL, key, suite, a TLS context for a ``ws://``
    URL) raise :class:`~fastport_core.errors.LocalProtocolError` here, before any IO.
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
        client_id: str | None = None,
        tls_context_given: bool = False,
    ) -> None:
        self.url = url
        self.endpoint = endpoint = parse_url(url)
        if tls_context_given and not endpoint.tls:
            raise LocalProtocolError(f"ssl_context was given for a plain ws:// url ({url!r}): use wss://")
        self._config = config = config if config is not None else ClientConfig()
        self.core = ClientCore(
            session=session,
            password=password,
            token=token,
            key=key,
            suite=suite,
            host=endpoint.host_header,
            target=endpoint.target,
            config=config,
            client_id=client_id,
        )
        self.state = ConnectionState.CONNECTING
        self.connected: Ticket[None] = Ticket("connect")
        """Settled by the first successful ``init`` (or the first connection's failure)."""
        self.failure: BaseException | None = None
        """Why the client ended on its own (gave up, or the first connection failed)."""
        self.integrity_failures = 0
        """Received messages that failed verification or decryption (ACKed, never delivered)."""
        self.server_errors = 0
        """``error`` frames received (the server could not honour something this client sent)."""
        self.wake_io: Callable[[], object] = lambda: None
        """Set by the adapter: called when a consumer's queue fell below its mark (read the socket again) or
        an ACK was queued (write it)."""
        self._auth_error: AuthenticationError | None = None
        self._ever_connected = False
        self._closing = False
        self._terminated = False
        self._now = 0.0
        self._phase = ClientState.DISCONNECTED  # the core's state before the current IO call
        self._publishes: dict[str, Ticket[str]] = {}
        self._confirming: dict[str, list[Ticket[None]]] = {}
        self._consumers: dict[str, list[Consumer]] = {}
        # ack_when_consumed: (topic, messageId) -> consumers not yet done with it; those of which one failed.
        self._holds: dict[tuple[str, str], int] = {}
        self._failed: set[tuple[str, str]] = set()
        self._deadlines: Deadlines[Ticket[Any]] = Deadlines()
        self._state_callbacks: list[Callable[[StateChange], object]] = []
        self._integrity_callbacks: list[Callable[[IntegrityFailure], object]] = []
        self._jobs: list[Job] = []

    # -- views -------------------------------------------------------------------------------------------

    @property
    def pending_publishes(self) -> int:
        """Publishes sent or queued and not yet confirmed by the server."""
        return len(self.core.pending_publishes)

    @property
    def paused(self) -> bool:
        """True while some consumer's queue is at its mark: the adapter must not read the socket."""
        return not self._closing and any(
            len(consumer.items) >= consumer.max_buffer
            for consumers in self._consumers.values()
            for consumer in consumers
        )

    @property
    def wants_dial(self) -> bool:
        return self.core.state is ClientState.DISCONNECTED

    @property
    def finished(self) -> bool:
        """Nothing more will happen: closed or given up, and the last bytes were taken."""
        return self.core.state is ClientState.CLOSED and self.core.should_close_transport()

    def on_state_change(self, callback: Callable[[StateChange], object]) -> Callable[[], None]:
        self._state_callbacks.append(callback)
        return lambda: _discard(self._state_callbacks, callback)

    def on_integrity_failure(self, callback: Callable[[IntegrityFailure], object]) -> Callable[[], None]:
        self._integrity_callbacks.append(callback)
        return lambda: _discard(self._integrity_callbacks, callback)

    def jobs(self) -> list[Job]:
        """The application callbacks due since the last call (state changes, integrity failures)."""
        jobs, self._jobs = self._jobs, []
        return jobs

    # -- the adapter's IO side ---------------------------------------------------------------------------

    def start_connection(self, now: float) -> None:
        self.core.start_connection(now)
        self._process(now)

    def receive_data(self, data: bytes, now: float) -> None:
        self._phase = self.core.state
        self.core.receive_data(data, now)
        self._process(now)

    def connection_lost(self, now: float, reason: str) -> None:
        self._phase = self.core.state
        self.core.connection_lost(now, reason)
        self._process(now)

    def data_to_send(self) -> bytes:
        return self.core.data_to_send()

    def should_close_transport(self) -> bool:
        return self.core.should_close_transport()

    def next_deadline(self) -> float | None:
        """The earliest protocol timer or caller timeout."""
        core, tickets = self.core.next_deadline(), self._deadlines.next()
        if core is None or tickets is None:
            return tickets if core is None else core
        return min(core, tickets)

    def handle_timeout(self, now: float) -> None:
        self._phase = self.core.state
        self.core.handle_timeout(now)
        for ticket in self._deadlines.pop_due(now):
            self._expire(ticket, now)
        self._process(now)

    # -- the application's side --------------------------------------------------------------------------

    def check_usable(self, operation: str) -> None:
        if self._closing or self._terminated or self.core.state is ClientState.CLOSED:
            why = f" ({self.failure})" if self.failure is not None else ""
            raise ClientClosedError(f"cannot {operation}: the client is closed{why}") from self.failure

    def publish(
        self, topic: str, payload: str | bytes, *, now: float, timestamp: int, timeout: float | None
    ) -> Ticket[str]:
        """Publish; the ticket settles with the message id once the server confirmed it."""
        self.check_usable("publish")
        message_id = self.core.publish(topic, payload, now=now, timestamp=timestamp)
        ticket: Ticket[str] = Ticket("publish", topic=topic, message_id=message_id, timeout=timeout)
        self._publishes[message_id] = ticket
        if timeout is not None:
            self._deadlines.arm(ticket, now + timeout)
        self._process(now)
        return ticket

    def subscribe(
        self,
        topic: str,
        *,
        now: float,
        timeout: float | None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        handler: Callable[[Message], object] | None = None,
    ) -> Consumer:
        """Add a consumer of ``topic``; its ``confirm`` ticket settles with the server's answer.

        A failed confirmation (refused, timed out, cancelled, closed) withdraws the consumer.
        """
        self.check_usable("subscribe")
        if isinstance(max_buffer, bool) or not isinstance(max_buffer, int) or max_buffer < 1:
            raise LocalProtocolError(f"max_buffer must be an int of at least 1, got {max_buffer!r}")
        self.core.subscribe(topic)  # first: it validates the topic
        consumer = Consumer(topic, max_buffer, handler)
        consumer.confirm.timeout = timeout
        self._consumers.setdefault(topic, []).append(consumer)
        self._confirming.setdefault(topic, []).append(consumer.confirm)
        if timeout is not None:
            self._deadlines.arm(consumer.confirm, now + timeout)
        self._process(now)
        return consumer

    def cancel(self, ticket: Ticket[Any]) -> None:
        """The caller stopped waiting (cancelled, interrupted): stop the publish, or withdraw the consumer."""
        if ticket.done:
            return
        if ticket.kind == "publish":
            self._publishes.pop(ticket.message_id, None)
            self.core.cancel_publish(ticket.message_id)
        self._settle(ticket, error=ClientClosedError(f"the {ticket.kind} was cancelled by its caller"))

    def take(self, consumer: Consumer) -> Message | None:
        """The consumer's next message; ``None`` if none is queued yet. Once the consumer ended: its error
        (raised once) or :class:`Ended`."""
        items = consumer.items
        if items:
            message = items.popleft()
            if len(items) == consumer.max_buffer - 1:
                self.wake_io()  # it was at its mark: the adapter may read again
            if consumer.handler is None:
                self._release(message, handled=True)  # an iterator is done with what it took
            return message
        if consumer.ended:
            error, consumer.error = consumer.error, None
            raise error if error is not None else Ended
        return None

    def done(self, message: Message, *, handled: bool = True) -> None:
        """A handler returned (``handled``) or raised on ``message`` taken with :meth:`take`. The adapter
        calls it for every message a handler was given; it matters with ``ack_when_consumed`` only."""
        self._release(message, handled=handled)

    def remove(self, consumer: Consumer) -> None:
        """Withdraw one consumer (iterator closed, block left); the topic goes with its last consumer."""
        self._end(consumer, consumer.error)
        if not consumer.confirm.done:
            self._settle(
                consumer.confirm, error=ClientClosedError(f"subscription to {consumer.topic!r} ended")
            )
        consumers = self._consumers.get(consumer.topic)
        if consumers is None or consumer not in consumers:
            return
        consumers.remove(consumer)
        if not consumers:
            del self._consumers[consumer.topic]
            if self.core.state is not ClientState.CLOSED:
                self.core.unsubscribe(consumer.topic)

    def unsubscribe(self, topic: str) -> None:
        """End every consumer of ``topic`` (quietly, effective at once) and unsubscribe from the server."""
        self.check_usable("unsubscribe")
        for consumer in self._consumers.pop(topic, []):
            self._end(consumer, None)
            self._settle(consumer.confirm, error=ClientClosedError(f"unsubscribed from {topic!r}"))
        self.core.unsubscribe(topic)

    def close(self, now: float) -> None:
        """Close for good (idempotent): the core starts the WebSocket closing handshake (its Close frame
        is in :meth:`data_to_send`); every waiting caller fails, consumers end quietly."""
        if self._closing:
            return
        self._closing = True
        if self.core.state is not ClientState.CLOSED:
            self.core.close(now)
        closed = ClientClosedError("the client was closed")
        closed.__cause__ = self.failure
        self._terminate(closed, quietly=True)
        self._process(now)

    # -- internals ---------------------------------------------------------------------------------------

    def _process(self, now: float) -> None:
        """Turn the core's new events into settled tickets, queued messages, state changes and counts."""
        self._now = now
        for event in self.core.events():
            match event:
                case MessageReceived():
                    message = Message(event.topic, event.payload, event.message_id, event.timestamp)
                    holders = 0
                    for subscription in self.core.subscriptions_for(event.topic):  # filters too
                        for consumer in self._consumers.get(subscription, ()):
                            consumer.items.append(message)
                            consumer._wake()
                            holders += 1
                    if self._config.ack_when_consumed:
                        self._holds[event.topic, event.message_id] = holders + 1
                        self._release(message, handled=True)  # the + 1: settles one held by nobody
                case PublishExpired():
                    if (ticket := self._publishes.pop(event.message_id, None)) is not None:
                        after = self._config.publish_give_up_after
                        text = (f"publish {event.message_id} on {ticket.topic!r} not confirmed within "
                                f"publish_give_up_after ({after:g} s) of its first send; it is no longer "
                                "re-sent (the server's dedupe window could forget it)")  # fmt: skip
                        self._settle(ticket, error=PublishTimeoutError(text, message_id=event.message_id))
                case PublishConfirmed():
                    if (ticket := self._publishes.pop(event.message_id, None)) is not None:
                        self._settle(ticket, result=event.message_id)
                case PublishRefused():
                    if (ticket := self._publishes.pop(event.message_id, None)) is not None:
                        text = f"the server refused publish {event.message_id}: {event.error}"
                        self._settle(ticket, error=PublishRefusedError(text, message_id=event.message_id,
                                                                       code=event.code))  # fmt: skip
                case SubscribeConfirmed():
                    for confirm in tuple(self._confirming.get(event.topic, ())):
                        self._settle(confirm, result=None)
                case SubscribeRefused():
                    self._on_subscribe_refused(event)
                case Connected():
                    self._ever_connected = True
                    self._auth_error = None
                    self._set_state(StateChange(ConnectionState.CONNECTED))
                    self._settle(self.connected, result=None)
                case Disconnected():
                    if self._ever_connected:
                        self._set_state(
                            StateChange(ConnectionState.RECONNECTING, event.reason, event.reconnect_at)
                        )
                    elif not self._config.retry_first_connect:
                        self._first_connection_failed(event.reason, now)
                case AuthRefused():
                    self._auth_error = auth_error(event)
                case GaveUp():
                    if self._ever_connected:
                        logger.warning("the client gave up: %s", event.reason)
                        self._terminate(
                            self._auth_error or ClientClosedError(f"the client gave up: {event.reason}")
                        )
                    else:
                        self._first_connection_failed(event.reason, now)
                case IntegrityFailure():
                    self.integrity_failures += 1
                    self._jobs.extend((callback, event) for callback in self._integrity_callbacks)
                case ServerError():
                    self.server_errors += 1

    def _on_subscribe_refused(self, event: SubscribeRefused) -> None:
        """The refusal rule (module docstring): the answer to the latest request decides."""
        if event.topic in self.core.topics:
            logger.info("an earlier subscribe to %r was refused; a later one is pending", event.topic)
            return
        error = subscribe_refused_error(event)
        logger.warning("%s", error)
        for ticket in tuple(self._confirming.get(event.topic, ())):
            self._settle(ticket, error=error)
        for consumer in self._consumers.pop(event.topic, []):
            self._end(consumer, error)

    def _first_connection_failed(self, reason: str, now: float) -> None:
        """The first connection failed and is not retried: fail ``connect`` with the clearest error."""
        if self._auth_error is None and not self.endpoint.tls and self._phase is ClientState.CONNECTING:
            reason += " (if the server uses TLS, connect with wss://)"
        error = self._auth_error or ConnectError(f"cannot connect to {self.url}: {reason}")
        if self.core.state is not ClientState.CLOSED:
            self.core.close(now)
        self._terminate(error)

    def _expire(self, ticket: Ticket[Any], now: float) -> None:
        state = self.state.value
        if ticket.kind == "publish":
            self._publishes.pop(ticket.message_id, None)
            self.core.cancel_publish(ticket.message_id)
            text = (f"publish {ticket.message_id} on {ticket.topic!r} not confirmed within "
                    f"{ticket.timeout:g} s (state: {state}); it is no longer retried")  # fmt: skip
            self._settle(ticket, error=PublishTimeoutError(text, message_id=ticket.message_id))
        else:
            text = (
                f"subscription to {ticket.topic!r} not confirmed within {ticket.timeout:g} s (state: {state})"
            )
            self._settle(ticket, error=SubscribeTimeoutError(text))

    def _settle(
        self, ticket: Ticket[Any], *, result: object = None, error: BaseException | None = None
    ) -> None:
        if ticket.done:
            return
        ticket.done = True
        ticket.result = result
        ticket.error = error
        self._deadlines.cancel(ticket)
        if ticket.kind == "subscribe":
            waiting = self._confirming.get(ticket.topic, [])
            if ticket in waiting:
                waiting.remove(ticket)
                if not waiting:
                    del self._confirming[ticket.topic]
            if error is not None and ticket.consumer is not None:
                self.remove(ticket.consumer)
        if ticket.waker is not None:
            ticket.waker()

    def _release(self, message: Message, *, handled: bool) -> None:
        """One consumer is done with ``message`` (ack_when_consumed): the last one settles it in the core,
        ACKed if every one handled it, else left un-ACKed for the server to deliver again."""
        key = (message.topic, message.message_id)
        holders = self._holds.get(key)
        if holders is None:
            return  # the default mode, or already settled
        if not handled:
            self._failed.add(key)
        if holders > 1:
            self._holds[key] = holders - 1
            return
        del self._holds[key]
        ok = key not in self._failed
        self._failed.discard(key)
        self.core.finish_message(*key, handled=ok, now=self._now)
        self.wake_io()  # an ACK to write

    def _end(self, consumer: Consumer, error: BaseException | None) -> None:
        if not consumer.ended:
            consumer.ended = True
            consumer.error = error
            for message in consumer.items:  # withdrawn: done with them (never ACKed once the core closed)
                self._release(message, handled=True)
            consumer.items.clear()  # effective at once: nothing more is handed out
            consumer._wake()

    def _terminate(self, error: BaseException, *, quietly: bool = False) -> None:
        """The client is finished: fail every waiting caller, end every consumer (idempotent).

        Consumers end quietly when the application closed the client, and with ``error`` when the client
        ended on its own, so that a consumer can tell "done" from "broken".
        """
        if self._terminated:
            return
        self._terminated = True
        if not quietly:
            self.failure = error
        self._deadlines = Deadlines()
        waiting: list[Ticket[Any]] = [
            self.connected,
            *self._publishes.values(),
            *(t for ts in self._confirming.values() for t in ts),
        ]
        self._publishes.clear()
        for ticket in waiting:
            self._settle(ticket, error=error)
        for consumers in self._consumers.values():
            for consumer in consumers:
                self._end(consumer, None if quietly else error)
        self._consumers.clear()
        self._set_state(StateChange(ConnectionState.CLOSED, str(error)))

    def _set_state(self, change: StateChange) -> None:
        if change.state is self.state and change.state is not ConnectionState.RECONNECTING:
            return
        self.state = change.state
        self._jobs.extend((callback, change) for callback in self._state_callbacks)


def _discard(callbacks: list[Callable[[T], object]], callback: Callable[[T], object]) -> None:
    if callback in callbacks:
        callbacks.remove(callback)


class ClientViews:
    """What both adapters' ``Client`` show of their :class:`ClientApp` (one definition, one wording).

    Reads of single attributes: safe from any thread without the blocking client's lock.
    """

    _app: ClientApp

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._app.url} session={self.session!r} {self.state.value}>"

    @property
    def state(self) -> ConnectionState:
        """``CONNECTED``, ``RECONNECTING`` (publishes and subscriptions wait) or ``CLOSED``."""
        return self._app.state

    @property
    def session(self) -> str:
        return self._app.core.session

    @property
    def client_id(self) -> str:
        """Sent in every ``init``; an explicit one (``connect(client_id=...)``) asks for persistence."""
        return self._app.core.client_id

    @property
    def integrity_failures(self) -> int:
        """Received messages that failed verification or decryption (ACKed, never delivered)."""
        return self._app.integrity_failures

    @property
    def server_errors(self) -> int:
        """``error`` frames received (the server could not honour something this client sent)."""
        return self._app.server_errors

    @property
    def pending_publishes(self) -> int:
        """Publishes sent or queued and not yet confirmed by the server."""
        return self._app.pending_publishes

    def on_state_change(self, callback: Callable[[StateChange], object]) -> Callable[[], None]:
        """Call ``callback(change)`` on every connection state change; returns a function that unregisters.

        Callbacks run on the client's own task or dispatcher thread and must return quickly; an exception
        in one is logged and does not affect the client.
        """
        return self._app.on_state_change(callback)

    def on_integrity_failure(self, callback: Callable[[IntegrityFailure], object]) -> Callable[[], None]:
        """Call ``callback(failure)`` for every received message that failed verification or decryption
        (never delivered; ACKed so the server stops re-sending it). Same rules as :meth:`on_state_change`."""
        return self._app.on_integrity_failure(callback)
