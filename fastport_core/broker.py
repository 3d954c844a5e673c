"""The broker: sessions, routing, per-subscriber delivery state, retries, expiry and limits (DESIGN §3).

Theory of operation
-------------------
The broker is pure routing and bookkeeping. The server core parses each client frame into a
:mod:`~fastport_core.protocol` event and calls :meth:`Broker.handle_frame`; the broker answers through a
:class:`Sink`. It never sees WebSocket bytes, a socket or a clock: every entry point takes ``now``, and
:meth:`Broker.next_deadline` / :meth:`Broker.handle_timeout` drive everything that happens later.

State, all of it under a session (so nothing of session A can be reached from session B, DESIGN §3.2)::

    Broker ── connections: conn id → _Connection ── session, subscriber (after a successful init)
          └─ sessions: name → _Session
                ├─ topics: topic → {_Subscriber}          routing table
                ├─ messages: messageId → _Message         stored once, until every subscriber ACKed
                ├─ retry_queue: {_Delivery}               deliveries awaiting an ACK, in due order
                ├─ clients: clientId → _Subscriber        resumable subscribers
                ├─ detached: {_Subscriber}                resumable subscribers without a connection
                └─ dedupe: messageId → deliveredTo        recent publishes (a retried publish is not re-sent)

    _Subscriber ── topics, inflight: messageId → _Delivery (its own un-ACKed deliveries, oldest first)
    _Delivery   ── one (message, subscriber) pair: retries so far, when the next retry is due

An ACK is looked up in the acking subscriber's own ``inflight`` table, so it can only complete that
subscriber's delivery, in that subscriber's session (DESIGN §3.1).

Time without a heap per delivery: within a session ``retry_interval`` is constant and ``now`` only grows,
so retry due times are monotonic in send order and the retry queue is a FIFO (an :class:`OrderedDict`,
so an ACK removes its entry in O(1) and the queue never holds completed deliveries). Message expiry is
monotonic in publish order (``messages`` is the expiry FIFO) and detached-subscriber expiry in detach
order. Each session arms one :class:`~fastport_core.timers.Deadlines` key at (or before) the earliest of
its queue heads; the key is re-armed only when a queue goes from empty to non-empty and after the session
has run its timers, so an early wake-up (the head was ACKed meanwhile) costs one idle call per interval.

Closing: when the broker closes a connection (auth failures, init timeout, slow consumer, replaced, session
dropped) it forgets it first and then calls ``sink.close``, so a later ``connection_closed`` from the
server core is a no-op. When the sink reports a close from *inside* a sink call (an output buffer that
overflowed during a fan-out), the broker defers it to the end of the running entry point, so no table
changes under a loop that is walking it.
"""

from __future__ import annotations

import base64
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

import orjson

from .auth import AuthThrottle, PasswordHash
from .config import ServerConfig, SessionSettings, SlowConsumerPolicy
from .dedupe import DedupeWindow
from .errors import CloseCode, ErrorCode, LocalProtocolError, RemoteProtocolError
from .frames import encode_text_frame
from .metrics import Metrics
from .protocol import (
    Ack,
    ClientFrame,
    Init,
    InitResponse,
    Publish,
    PublishResponse,
    Subscribe,
    SubscribeResponse,
    Unsubscribe,
    UnsubscribeResponse,
    encode,
    encode_error,
    encode_message,
)
from .timers import Deadlines

__all__ = [
    "AccessDeniedError",
    "Broker",
    "BrokerStats",
    "GiveUpReason",
    "SessionExistsError",
    "SessionStats",
    "Sink",
    "UnknownSessionError",
]

_log = logging.getLogger(__name__)

SECRET_KEY_BYTES: Final = 32
"""Random bytes in a generated secret key (shown once, base64url without padding: 43 characters)."""


class Sink(Protocol):
    """How the broker answers; implemented by the server core.

    A sink may call :meth:`Broker.connection_closed` from inside one of these calls (say, a connection's
    output buffer overflowed): the broker is then in the middle of walking its tables, so it defers that
    close to the end of the call that is running (see ``Broker._deferred_closes``).
    """

    def send_payload(self, conn: int, payload: bytes) -> None:
        """Queue one JSON frame payload for ``conn`` (the sink wraps it in a WebSocket text frame)."""

    def send_frame(self, conn: int, frame: bytes) -> None:
        """Queue an already-encoded WebSocket text frame (fan-out: one encoding shared by subscribers)."""

    def close(self, conn: int, code: CloseCode, reason: str) -> None:
        """Start closing ``conn``. The broker has already forgotten it; must be idempotent."""


class SessionExistsError(LocalProtocolError):
    """``create_session`` with a name that is taken."""


class UnknownSessionError(LocalProtocolError):
    """A session operation named no existing session."""


class AccessDeniedError(LocalProtocolError):
    """A session operation with a wrong password or secret key."""


class GiveUpReason(StrEnum):
    """The ``reason`` label of ``deliveries_given_up``: why a delivery was abandoned un-ACKed."""

    RETRIES = "retries"
    """Re-sent ``max_retry_limit`` times without an ACK."""
    EXPIRED = "expired"
    """The message outlived its session's ``message_expiry_time``."""
    OVERFLOW = "overflow"
    """Its subscriber held ``max_inflight_per_subscriber`` deliveries and the oldest made room."""
    DISCONNECTED = "disconnected"
    """Its subscriber's connection closed and had no ``clientId`` to resume with."""
    DETACHED = "detached"
    """Its resumable subscriber stayed without a connection too long, or was evicted by a newer one."""


@dataclass(frozen=True, slots=True)
class SessionStats:
    """Gauges of one session, for ``/metrics`` and ``/healthz``."""

    connections: int
    subscribers: int
    """Connected subscribers plus detached resumable ones."""
    detached_subscribers: int
    stored_messages: int
    inflight_deliveries: int
    pending_bytes: int
    suspended: bool


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """Gauges of the whole broker; ``per_session`` holds the same per live session."""

    sessions: int
    connections: int
    """Every connection the broker knows, initialised or not."""
    subscribers: int
    stored_messages: int
    inflight_deliveries: int
    pending_bytes: int
    throttled_peers: int
    per_session: Mapping[str, SessionStats]


def _encode_publish_ok(message_id: str, delivered_to: int) -> bytes:
    """``encode(PublishResponse(True, message_id, delivered_to))`` without the generic encoder (hot path).

    Byte-identical to the generic encoding (a test pins that); ~0.6 µs instead of ~3.5 µs.
    """
    return orjson.dumps(
        {"type": "publish_response", "success": True, "messageId": message_id, "deliveredTo": delivered_to}
    )


class _Message:
    """A published message, stored once per session until no subscriber owes an ACK for it."""

    __slots__ = ("delivered_to", "deliveries", "expires_at", "owed", "publish", "size")

    def __init__(self, publish: Publish, expires_at: float) -> None:
        self.publish = publish
        self.size = len(publish.data)
        self.expires_at = expires_at
        self.deliveries: list[_Delivery] = []
        """Every delivery made (ACKed ones included); expiry walks it to find those still owed."""
        self.owed = 0
        """Deliveries still in some subscriber's ``inflight``; the message is freed when it reaches 0."""
        self.delivered_to = 0


class _Delivery:
    """One (message, subscriber) pair awaiting the subscriber's ACK."""

    __slots__ = ("due", "message", "retries", "subscriber")

    def __init__(self, message: _Message, subscriber: _Subscriber, due: float) -> None:
        self.message = message
        self.subscriber = subscriber
        self.retries = 0
        self.due = due
        """When the next re-send is due; meaningful while the delivery is in the retry queue."""


class _Subscriber:
    """What receives messages: a connection's, or a ``clientId``'s across connections (resumable)."""

    __slots__ = ("client_id", "connection", "detached_at", "inflight", "topics")

    def __init__(self, connection: _Connection, client_id: str | None) -> None:
        self.client_id = client_id
        self.connection: _Connection | None = connection
        """``None`` while a resumable subscriber is detached."""
        self.detached_at = 0.0
        self.topics: set[str] = set()
        self.inflight: dict[str, _Delivery] = {}
        """Un-ACKed deliveries by message id, oldest first (insertion order)."""


class _Connection:
    """A transport connection as the broker sees it: unauthenticated until a successful ``init``."""

    __slots__ = ("auth_failures", "conn", "peer", "session", "subscriber")

    def __init__(self, conn: int, peer: str) -> None:
        self.conn = conn
        self.peer = peer
        self.session: _Session | None = None
        self.subscriber: _Subscriber | None = None
        self.auth_failures = 0


class _Context:
    """What the broker shares with each of its sessions."""

    __slots__ = ("config", "deadlines", "disconnect", "metrics", "sink")

    def __init__(
        self,
        config: ServerConfig,
        sink: Sink,
        metrics: Metrics,
        disconnect: Callable[[_Connection, CloseCode, str, float], None],
    ) -> None:
        self.config = config
        self.sink = sink
        self.metrics = metrics
        self.deadlines: Deadlines[_Session | _Connection] = Deadlines()
        """Keys: a session (its retry, expiry and idle timers) or a connection (its init deadline)."""
        self.disconnect = disconnect
        """Forget a connection, then close it (the broker owns the connection table)."""


class _Session:
    """One virtual broker: its routing table and the delivery state of its messages.

    It sends through the sink and counts into the metrics itself, but closing a connection is the
    broker's business (``_Context.disconnect``), because the broker owns the connection table.
    """

    __slots__ = (
        "_acks", "_acks_unknown", "_deadlines", "_deliveries", "_disconnect", "_limits", "_metrics",
        "_policy", "_publish_duplicates", "_publishes", "_retries", "_sink", "clients", "connections",
        "dedupe", "detached", "idle_since", "messages", "name", "password", "pending_bytes", "retry_queue",
        "secret", "settings", "suspended", "topics",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        password: PasswordHash,
        secret: PasswordHash,
        settings: SessionSettings,
        *,
        context: _Context,
        now: float,
    ) -> None:
        self.name = name
        self.password = password
        self.secret = secret
        self.settings = settings
        config = context.config
        self._limits = config.limits
        self._policy = config.slow_consumer_policy
        self._sink = context.sink
        metrics = self._metrics = context.metrics
        # The counters bumped per message, as cells (see Metrics.cell): a keyed ``inc`` costs ~0.4 µs.
        self._publishes = metrics.cell("publishes", name)
        self._publish_duplicates = metrics.cell("publish_duplicates", name)
        self._deliveries = metrics.cell("deliveries", name)
        self._retries = metrics.cell("retries", name)
        self._acks = metrics.cell("acks", name)
        self._acks_unknown = metrics.cell("acks_unknown", name)
        self._deadlines = context.deadlines
        self._disconnect = context.disconnect
        self.suspended = False
        self.connections: dict[_Connection, None] = {}
        self.topics: dict[str, dict[_Subscriber, None]] = {}
        self.messages: OrderedDict[str, _Message] = OrderedDict()
        self.pending_bytes = 0
        self.retry_queue: OrderedDict[_Delivery, None] = OrderedDict()
        self.clients: dict[str, _Subscriber] = {}
        self.detached: OrderedDict[_Subscriber, None] = OrderedDict()
        self.dedupe: DedupeWindow[str, int] = DedupeWindow(self._limits.dedupe_window, ttl=config.dedupe_ttl)
        self.idle_since: float | None = None
        self._start_idle(now)

    # -- timers --------------------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        self._deadlines.arm_earlier(self, when)

    def _start_idle(self, now: float) -> None:
        if self.settings.session_expiry is not None:
            self.idle_since = now
            self._arm(now + self.settings.session_expiry)

    def idle_expired(self, now: float) -> bool:
        expiry = self.settings.session_expiry
        return expiry is not None and self.idle_since is not None and self.idle_since + expiry <= now

    def next_due(self) -> float | None:
        """The earliest time any of the session's queues needs attention."""
        settings = self.settings
        candidates: list[float] = []
        if (delivery := next(iter(self.retry_queue), None)) is not None:
            candidates.append(delivery.due)
        if (message := next(iter(self.messages.values()), None)) is not None:
            candidates.append(message.expires_at)
        if (subscriber := next(iter(self.detached), None)) is not None:
            candidates.append(subscriber.detached_at + settings.message_expiry_time)
        if self.idle_since is not None and settings.session_expiry is not None:
            candidates.append(self.idle_since + settings.session_expiry)
        return min(candidates, default=None)

    def run_timers(self, now: float) -> None:
        """Expire messages and detached subscribers, then re-send what fell due (in that order, so an
        expired message is never retried)."""
        self._expire_messages(now)
        self._expire_detached(now)
        self._retry_due(now)

    def _expire_messages(self, now: float) -> None:
        messages = self.messages
        while messages:
            message = next(iter(messages.values()))
            if message.expires_at > now:
                return
            message_id = message.publish.message_id
            given_up = 0
            for delivery in list(message.deliveries):  # the last give-up clears the list
                if delivery.subscriber.inflight.get(message_id) is delivery:
                    self._give_up(delivery, GiveUpReason.EXPIRED)
                    given_up += 1
            _log.info(
                "session %r: message %r expired un-ACKed by %d subscriber(s)", self.name, message_id, given_up
            )

    def _expire_detached(self, now: float) -> None:
        expiry = self.settings.message_expiry_time
        while self.detached:
            subscriber = next(iter(self.detached))
            # The same sum as next_due's: ``now - expiry`` can round differently and leave a due time
            # that never fires (an adapter would spin on it).
            if subscriber.detached_at + expiry > now:
                return
            self._forget_detached(subscriber)

    def _retry_due(self, now: float) -> None:
        queue = self.retry_queue
        limit = self.settings.max_retry_limit
        while queue:
            delivery = next(iter(queue))
            if delivery.due > now:
                return
            del queue[delivery]
            connection = delivery.subscriber.connection
            if connection is None or self.suspended:
                continue  # waits, un-queued: a resume or an unsuspend re-sends it
            if delivery.retries >= limit:
                self._give_up(delivery, GiveUpReason.RETRIES)
                _log.info(
                    "session %r: gave up message %r for connection %d after %d retries",
                    self.name, delivery.message.publish.message_id, connection.conn, delivery.retries,
                )  # fmt: skip
                continue
            self._resend(delivery, connection.conn, now)

    def _resend(self, delivery: _Delivery, conn: int, now: float) -> None:
        """Send ``delivery`` again, with its ``retry`` count, and queue it for the next retry."""
        delivery.retries += 1
        p = delivery.message.publish
        payload = encode_message(
            p.topic, p.data, p.hash, p.timestamp, p.message_id, p.encoding, delivery.retries
        )
        self._sink.send_payload(conn, payload)
        delivery.due = now + self.settings.retry_interval
        self.retry_queue[delivery] = None
        self._retries.value += 1

    def _resend_waiting(self, subscriber: _Subscriber, now: float, *, everything: bool) -> None:
        """Re-send ``subscriber``'s deliveries in order: all of them (resume) or those not queued."""
        assert subscriber.connection is not None
        conn = subscriber.connection.conn
        queue = self.retry_queue
        for delivery in subscriber.inflight.values():
            if delivery in queue:
                if not everything:
                    continue
                del queue[delivery]
            self._resend(delivery, conn, now)
        if subscriber.inflight:
            self._arm(now + self.settings.retry_interval)

    # -- delivery bookkeeping ----------------------------------------------------------------------------

    def _release(self, message: _Message) -> None:
        """One delivery of ``message`` is over (ACKed or given up); free the message after the last."""
        message.owed -= 1
        if not message.owed:
            del self.messages[message.publish.message_id]
            self.pending_bytes -= message.size
            # Break the message <-> delivery cycles now, so reference counting frees them at once
            # instead of leaving ~5 objects per message to the cyclic garbage collector.
            message.deliveries.clear()

    def _give_up(self, delivery: _Delivery, reason: GiveUpReason) -> None:
        del delivery.subscriber.inflight[delivery.message.publish.message_id]
        self.retry_queue.pop(delivery, None)
        self._release(delivery.message)
        self._metrics.inc("deliveries_given_up", self.name, reason.value)

    def _give_up_all(self, subscriber: _Subscriber, reason: GiveUpReason) -> None:
        count = len(subscriber.inflight)
        for delivery in list(subscriber.inflight.values()):
            self._give_up(delivery, reason)
        if count:
            _log.info("session %r: gave up %d delivery(ies) of a subscriber: %s", self.name, count, reason)

    def _give_up_oldest(self, subscriber: _Subscriber) -> None:
        self._give_up(next(iter(subscriber.inflight.values())), GiveUpReason.OVERFLOW)

    def ack(self, subscriber: _Subscriber, message_id: str) -> None:
        """Complete ``subscriber``'s own delivery of ``message_id`` (anything else is an unknown ACK)."""
        delivery = subscriber.inflight.pop(message_id, None)
        if delivery is None:
            self._acks_unknown.value += 1
            return
        self.retry_queue.pop(delivery, None)
        self._release(delivery.message)
        self._acks.value += 1

    # -- routing -----------------------------------------------------------------------------------------

    def subscribe(self, subscriber: _Subscriber, topic: str) -> None:
        subscriber.topics.add(topic)
        self.topics.setdefault(topic, {})[subscriber] = None

    def unsubscribe(self, subscriber: _Subscriber, topic: str) -> None:
        """Stop routing ``topic`` to ``subscriber``; its in-flight deliveries still await their ACKs."""
        subscriber.topics.discard(topic)
        subscribers = self.topics.get(topic)
        if subscribers is not None:
            subscribers.pop(subscriber, None)
            if not subscribers:
                del self.topics[topic]

    def _unroute(self, subscriber: _Subscriber) -> None:
        for topic in list(subscriber.topics):
            self.unsubscribe(subscriber, topic)

    def publish(self, publisher: _Subscriber, p: Publish, now: float) -> int:
        """Take responsibility for ``p`` and fan it out; returns ``deliveredTo``.

        Raises :class:`RemoteProtocolError` (with the code to refuse with) when the session is suspended
        or full. A message id already taken in this session is confirmed again without a fan-out.
        """
        message_id = p.message_id
        stored = self.messages.get(message_id)
        delivered = stored.delivered_to if stored is not None else self.dedupe.get(message_id, now)
        if delivered is not None:
            self._publish_duplicates.value += 1
            return delivered
        if self.suspended:
            raise RemoteProtocolError("the session is suspended", code=ErrorCode.SESSION_SUSPENDED)
        subscribers = self.topics.get(p.topic)
        if subscribers is None or (len(subscribers) == 1 and publisher in subscribers):
            self.dedupe.add(message_id, 0, now)
            self._publishes.value += 1
            return 0
        limit = self._limits.max_pending_bytes_per_session
        if self.pending_bytes + len(p.data) > limit:
            raise RemoteProtocolError(
                f"the session holds {self.pending_bytes} un-ACKed payload bytes (limit {limit})",
                code=ErrorCode.SESSION_FULL,
            )
        message = _Message(p, now + self.settings.message_expiry_time)
        queue_was_empty = not self.retry_queue
        slow = self._fan_out(message, publisher, subscribers, now)
        delivered = message.owed = message.delivered_to = len(message.deliveries)
        if queue_was_empty or not self.messages:  # a queue head may have moved earlier: one arm covers both
            self._arm(min(now + self.settings.retry_interval, message.expires_at))
        self.messages[message_id] = message
        self.pending_bytes += message.size
        self.dedupe.add(message_id, delivered, now)
        self._publishes.value += 1
        if slow is not None:
            reason = f"slow consumer: {self._limits.max_inflight_per_subscriber} un-ACKed messages"
            for connection in slow:
                self._disconnect(connection, CloseCode.SLOW_CONSUMER, reason, now)
        return delivered

    def _fan_out(
        self, message: _Message, publisher: _Subscriber, subscribers: dict[_Subscriber, None], now: float
    ) -> list[_Connection] | None:
        """Record a delivery per subscriber and send the frame, encoded once, to every connected one.

        Returns the connections to close under the DISCONNECT slow-consumer policy (their new
        delivery is recorded but not sent); closing them is left to the caller, after the message is
        stored, because a close gives up deliveries and must not change ``subscribers`` under this loop.
        """
        p = message.publish
        message_id = p.message_id
        frame = encode_text_frame(
            encode_message(p.topic, p.data, p.hash, p.timestamp, message_id, p.encoding)
        )
        queue = self.retry_queue
        due = now + self.settings.retry_interval
        cap = self._limits.max_inflight_per_subscriber
        deliveries = message.deliveries
        send_frame = self._sink.send_frame
        slow: list[_Connection] | None = None
        sent = 0
        for subscriber in subscribers:
            if subscriber is publisher:
                continue
            inflight = subscriber.inflight
            connection = subscriber.connection
            delivery = _Delivery(message, subscriber, due)
            deliveries.append(delivery)
            if len(inflight) >= cap:
                if connection is not None and self._policy is SlowConsumerPolicy.DISCONNECT:
                    self._metrics.inc("slow_consumers", self.name, SlowConsumerPolicy.DISCONNECT.value)
                    inflight[message_id] = delivery
                    if slow is None:
                        slow = []
                    slow.append(connection)
                    continue
                if connection is not None:
                    self._metrics.inc("slow_consumers", self.name, SlowConsumerPolicy.DROP_OLDEST.value)
                self._give_up_oldest(subscriber)
            inflight[message_id] = delivery
            if connection is not None:
                send_frame(connection.conn, frame)
                queue[delivery] = None
                sent += 1
        if sent:
            self._deliveries.value += sent
        return slow

    # -- subscribers and connections -----------------------------------------------------------------------

    def attach(self, connection: _Connection, client_id: str | None, now: float) -> None:
        """Make ``connection`` a member, with a new subscriber or the detached one of ``client_id``.

        A resumed subscriber gets all its in-flight deliveries again at once, in order, as retries.
        """
        self.connections[connection] = None
        self.idle_since = None
        connection.session = self
        subscriber = self.clients.get(client_id) if client_id is not None else None
        if subscriber is None:
            subscriber = _Subscriber(connection, client_id)
            if client_id is not None:
                self.clients[client_id] = subscriber
            connection.subscriber = subscriber
            return
        assert subscriber.connection is None, "the broker disconnects the previous connection first"
        del self.detached[subscriber]
        subscriber.connection = connection
        connection.subscriber = subscriber
        self._metrics.inc("subscribers_resumed", self.name)
        self._resend_waiting(subscriber, now, everything=True)

    def connection_gone(self, connection: _Connection, now: float) -> None:
        """``connection`` left: detach its resumable subscriber, or drop an anonymous one."""
        del self.connections[connection]
        subscriber = connection.subscriber
        assert subscriber is not None
        if subscriber.client_id is None:
            self._unroute(subscriber)
            self._give_up_all(subscriber, GiveUpReason.DISCONNECTED)
        else:
            self._detach(subscriber, now)
        if not self.connections:
            self._start_idle(now)

    def _detach(self, subscriber: _Subscriber, now: float) -> None:
        subscriber.connection = None
        subscriber.detached_at = now
        self.detached[subscriber] = None
        while len(subscriber.inflight) > self._limits.max_inflight_per_subscriber:
            self._give_up_oldest(subscriber)
        if len(self.detached) > self._limits.max_detached_per_session:
            self._forget_detached(next(iter(self.detached)))
        self._arm(now + self.settings.message_expiry_time)

    def _forget_detached(self, subscriber: _Subscriber) -> None:
        del self.detached[subscriber]
        assert subscriber.client_id is not None
        del self.clients[subscriber.client_id]
        self._unroute(subscriber)
        self._give_up_all(subscriber, GiveUpReason.DETACHED)

    def set_suspended(self, suspended: bool, now: float) -> None:
        """Suspend (deliveries wait) or resume (re-send whatever waited, in order)."""
        was_suspended, self.suspended = self.suspended, suspended
        if was_suspended and not suspended:
            for connection in self.connections:
                assert connection.subscriber is not None
                self._resend_waiting(connection.subscriber, now, everything=False)

    def stats(self) -> SessionStats:
        subscribers = [c.subscriber for c in self.connections if c.subscriber is not None]
        subscribers.extend(self.detached)
        return SessionStats(
            connections=len(self.connections),
            subscribers=len(subscribers),
            detached_subscribers=len(self.detached),
            stored_messages=len(self.messages),
            inflight_deliveries=sum(len(s.inflight) for s in subscribers),
            pending_bytes=self.pending_bytes,
            suspended=self.suspended,
        )


class Broker:
    """Sessions, connections and everything between them; see the module docstring.

    Protocol faults of the peer never raise out of :meth:`handle_frame`: they are answered (an ``error``
    frame or a ``*_response`` with ``success: false``), counted in ``protocol_errors{code}`` and logged at
    DEBUG. Misuse by the caller (a connection id opened twice, a bad ``create_session`` argument) raises
    :class:`~fastport_core.errors.LocalProtocolError`.
    """

    def __init__(
        self,
        config: ServerConfig,
        sink: Sink,
        *,
        metrics: Metrics | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._config = config
        self._sink = sink
        self.metrics = metrics if metrics is not None else Metrics()
        self._random = random
        self._sessions: dict[str, _Session] = {}
        self._connections: dict[int, _Connection] = {}
        self._context = _Context(config, sink, self.metrics, self._disconnect)
        self._deadlines = self._context.deadlines
        self._throttle = AuthThrottle(
            config.auth_throttle_base, config.auth_throttle_max, config.limits.max_throttled_peers
        )
        self._decoy: PasswordHash | None = None
        self._busy = False
        """Inside an entry point that talks to the sink: a re-entrant ``connection_closed`` must wait."""
        self._deferred_closes: list[int] = []
        """Connections the sink reported closed while busy; forgotten when the running call ends."""

    # -- connection lifecycle ------------------------------------------------------------------------------

    def connection_opened(self, conn: int, now: float, peer: str = "") -> None:
        """A WebSocket connection is open; it has ``handshake_timeout`` seconds to ``init`` (else 4005).

        ``peer`` is the address failed inits are throttled by (the empty string throttles nothing: the
        per-connection limit and the init deadline still apply).
        """
        if conn in self._connections:
            raise LocalProtocolError(f"connection {conn} is already open")
        if len(self._connections) >= self._config.limits.max_connections:
            self._sink.close(conn, CloseCode.POLICY_VIOLATION, "the server is at its connection limit")
            return
        connection = _Connection(conn, peer)
        self._connections[conn] = connection
        self._deadlines.arm(connection, now + self._config.handshake_timeout)

    def connection_closed(self, conn: int, now: float) -> None:
        """The transport is gone (idempotent; a no-op for a connection the broker already closed).

        Called by the sink from inside a broker call, it takes effect when that call ends, so that no
        table changes under a loop that is walking it (a fan-out, a resume, a retry round).
        """
        if self._busy:
            self._deferred_closes.append(conn)
            return
        connection = self._connections.get(conn)
        if connection is not None:
            self._forget(connection, now)

    def _end_call(self, now: float) -> None:
        """Leave a sink-calling entry point: apply the closes the sink reported meanwhile."""
        self._busy = False
        while self._deferred_closes:
            self.connection_closed(self._deferred_closes.pop(), now)

    def _forget(self, connection: _Connection, now: float) -> None:
        del self._connections[connection.conn]
        self._deadlines.cancel(connection)
        if connection.session is not None:
            connection.session.connection_gone(connection, now)

    def _disconnect(self, connection: _Connection, code: CloseCode, reason: str, now: float) -> None:
        """Forget ``connection`` (as if it closed), then ask the sink to close it."""
        self._forget(connection, now)
        _log.info("closing connection %d: %s (%d)", connection.conn, reason, code)
        self._sink.close(connection.conn, code, reason)

    # -- frames --------------------------------------------------------------------------------------------

    def handle_frame(self, conn: int, frame: ClientFrame, now: float) -> None:
        """Act on one parsed client frame; every answer goes through the sink.

        Frames for a connection the broker does not know (it closed it, e.g. a slow consumer, and the
        server core still had input from it) are dropped.
        """
        connection = self._connections.get(conn)
        if connection is None:
            return
        session = connection.session
        subscriber = connection.subscriber
        self._busy = True
        try:
            if session is None or subscriber is None:
                if isinstance(frame, Init):
                    self._on_init(connection, frame, now)
                else:
                    self._error(connection, ErrorCode.NOT_INITIALISED, "send init first")
            elif isinstance(frame, Publish):
                try:
                    delivered = session.publish(subscriber, frame, now)
                except RemoteProtocolError as refusal:
                    self._refuse_publish(connection, session, frame, refusal)
                else:
                    self._sink.send_payload(conn, _encode_publish_ok(frame.message_id, delivered))
            elif isinstance(frame, Ack):
                session.ack(subscriber, frame.message_id)
            elif isinstance(frame, Subscribe):
                self._on_subscribe(connection, session, subscriber, frame.topic)
            elif isinstance(frame, Unsubscribe):
                session.unsubscribe(subscriber, frame.topic)
                self._sink.send_payload(conn, encode(UnsubscribeResponse(True, frame.topic)))
            else:  # a second Init: a connection belongs to one session for its whole life
                self._error(connection, ErrorCode.ALREADY_INITIALISED, f"already in session {session.name!r}")
        finally:
            self._end_call(now)

    def _count_refusal(self, connection: _Connection, code: ErrorCode, message: str) -> None:
        self.metrics.inc("protocol_errors", code.value)
        _log.debug("connection %d: %s: %s", connection.conn, code, message)

    def _error(self, connection: _Connection, code: ErrorCode, message: str) -> None:
        self._count_refusal(connection, code, message)
        self._sink.send_payload(connection.conn, encode_error(RemoteProtocolError(message, code=code)))

    def _refuse_publish(
        self, connection: _Connection, session: _Session, frame: Publish, refusal: RemoteProtocolError
    ) -> None:
        code = refusal.code
        self._count_refusal(connection, code, refusal.message)
        self.metrics.inc("publishes_refused", session.name, code.value)
        response = PublishResponse(False, frame.message_id, error=refusal.message, code=code)
        self._sink.send_payload(connection.conn, encode(response))

    def _on_subscribe(
        self, connection: _Connection, session: _Session, subscriber: _Subscriber, topic: str
    ) -> None:
        limit = self._config.limits.max_subscriptions_per_connection
        if topic not in subscriber.topics and len(subscriber.topics) >= limit:
            code = ErrorCode.TOO_MANY_SUBSCRIPTIONS
            message = f"this connection already holds {limit} subscriptions"
            self._count_refusal(connection, code, message)
            response = SubscribeResponse(False, topic, error=message, code=code)
        else:
            session.subscribe(subscriber, topic)
            response = SubscribeResponse(True, topic)
        self._sink.send_payload(connection.conn, encode(response))

    # -- init and authentication ---------------------------------------------------------------------------

    def _on_init(self, connection: _Connection, frame: Init, now: float) -> None:
        peer = connection.peer
        if peer and (retry_at := self._throttle.retry_at(peer, now)) is not None:
            message = f"too many failed attempts: retry in {retry_at - now:.1f} s"
            self._refuse_auth(connection, ErrorCode.AUTH_THROTTLED, message, now)
            return
        session = self._sessions.get(frame.session_name)
        if not self._check_password(session, frame.password):
            if peer:
                self._throttle.record_failure(peer, now)
            _log.info("connection %d from %r: failed init into %r", connection.conn, peer, frame.session_name)
            self._refuse_auth(connection, ErrorCode.AUTH_FAILED, "unknown session or wrong password", now)
            return
        assert session is not None
        if session.suspended:
            self._refuse_init(connection, ErrorCode.SESSION_SUSPENDED, "the session is suspended")
            return
        resumed = session.clients.get(frame.client_id) if frame.client_id is not None else None
        replaced = resumed.connection if resumed is not None else None
        limit = self._config.limits.max_connections_per_session
        if len(session.connections) - (replaced is not None) >= limit:
            self._refuse_init(
                connection, ErrorCode.TOO_MANY_CONNECTIONS, f"the session holds {limit} connections"
            )
            return
        if replaced is not None:
            self._disconnect(replaced, CloseCode.REPLACED, "another connection resumed this clientId", now)
        self._deadlines.cancel(connection)
        self.metrics.inc("inits", session.name)
        self._sink.send_payload(connection.conn, encode(InitResponse(True, session.name)))
        session.attach(connection, frame.client_id, now)

    def _check_password(self, session: _Session | None, password: str) -> bool:
        """Verify against the session's hash, or pay the same scrypt against a decoy for an unknown name,
        so that timing does not tell which sessions exist."""
        if session is not None:
            return session.password.verify(password)
        if self._decoy is None:
            self._decoy = self._hash(base64.b64encode(self._random(SECRET_KEY_BYTES)).decode("ascii"))
        self._decoy.verify(password)
        return False

    def _refuse_init(self, connection: _Connection, code: ErrorCode, message: str) -> None:
        self._count_refusal(connection, code, message)
        self.metrics.inc("auth_failures", code.value)
        self._sink.send_payload(connection.conn, encode(InitResponse(False, error=message, code=code)))

    def _refuse_auth(self, connection: _Connection, code: ErrorCode, message: str, now: float) -> None:
        """A refusal that counts towards ``auth_max_failures`` on this connection (then: close 1008)."""
        self._refuse_init(connection, code, message)
        connection.auth_failures += 1
        if connection.auth_failures >= self._config.auth_max_failures:
            self._disconnect(connection, CloseCode.POLICY_VIOLATION, "too many failed init attempts", now)

    # -- time ----------------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` must next be called (``None``: nothing is scheduled)."""
        ours = self._deadlines.next()
        throttle = self._throttle.next_deadline()
        if ours is None or throttle is None:
            return throttle if ours is None else ours
        return min(ours, throttle)

    def handle_timeout(self, now: float) -> None:
        """Do whatever fell due: init deadlines, retries, expiries, idle sessions, throttle resets."""
        self._throttle.handle_timeout(now)
        self._busy = True
        try:
            for key in self._deadlines.pop_due(now):
                if isinstance(key, _Connection):
                    if self._connections.get(key.conn) is key:
                        self._disconnect(key, CloseCode.HANDSHAKE_TIMEOUT, "no successful init in time", now)
                elif self._sessions.get(key.name) is key:
                    self._on_session_due(key, now)
        finally:
            self._end_call(now)

    def _on_session_due(self, session: _Session, now: float) -> None:
        if session.idle_expired(now):
            self._drop(session, "expired", CloseCode.SESSION_EXPIRED)
            return
        session.run_timers(now)
        due = session.next_due()
        if due is None:
            self._deadlines.cancel(session)
        else:
            self._deadlines.arm(session, due)

    # -- sessions ------------------------------------------------------------------------------------------

    def _hash(self, secret: str) -> PasswordHash:
        return PasswordHash.create(secret, n=self._config.password_hash_cost, random=self._random)

    def create_session(
        self,
        name: str,
        password: str,
        now: float,
        settings: SessionSettings | None = None,
        *,
        secret_key: str | None = None,
    ) -> str:
        """Create a session; returns its secret key (generated unless given), which drop and suspend need.

        Raises :class:`SessionExistsError` for a taken name and :class:`LocalProtocolError` for an empty
        or too long name, password or secret key, or when the server holds ``max_sessions`` sessions.
        """
        limits = self._config.limits
        _check_length("session name", name, limits.max_session_name_length)
        _check_length("password", password, limits.max_password_length)
        if secret_key is not None:
            _check_length("secret key", secret_key, limits.max_password_length)
        if name in self._sessions:
            raise SessionExistsError(f"session {name!r} already exists")
        if len(self._sessions) >= limits.max_sessions:
            raise LocalProtocolError(
                f"the server already holds its maximum of {limits.max_sessions} sessions"
            )
        if secret_key is None:
            secret_key = base64.urlsafe_b64encode(self._random(SECRET_KEY_BYTES)).rstrip(b"=").decode("ascii")
        self._sessions[name] = _Session(
            name,
            self._hash(password),
            self._hash(secret_key),
            settings if settings is not None else self._config.default_session_settings,
            context=self._context,
            now=now,
        )
        self.metrics.inc("sessions_created")
        _log.info("session %r created", name)
        return secret_key

    def _existing(self, name: str) -> _Session:
        session = self._sessions.get(name)
        if session is None:
            raise UnknownSessionError(f"no session named {name!r}")
        return session

    def _authorised(self, name: str, password: str, secret_key: str) -> _Session:
        session = self._existing(name)
        # Both checks always run (``&``, not ``and``), so the answer does not tell which one failed.
        if not (session.password.verify(password) & session.secret.verify(secret_key)):
            raise AccessDeniedError(f"wrong password or secret key for session {name!r}")
        return session

    def drop_session(self, name: str, password: str, secret_key: str, now: float) -> None:
        """Drop a session: close its connections with 4001 and free all its state and metrics series."""
        self._drop(self._authorised(name, password, secret_key), "dropped", CloseCode.SESSION_DROPPED)

    def _drop(self, session: _Session, reason: str, code: CloseCode) -> None:
        del self._sessions[session.name]
        self._deadlines.cancel(session)
        connections = list(session.connections)
        for connection in connections:
            del self._connections[connection.conn]
            self._deadlines.cancel(connection)
        self.metrics.forget_session(session.name)
        self.metrics.inc("sessions_dropped", reason)
        _log.info("session %r %s (%d connection(s) closed)", session.name, reason, len(connections))
        for connection in connections:
            self._sink.close(connection.conn, code, f"session {reason}")

    def drop_session_as_admin(self, name: str, now: float) -> None:
        """:meth:`drop_session` for a caller with admin rights (the web console): no session secrets."""
        self._drop(self._existing(name), "dropped", CloseCode.SESSION_DROPPED)

    def suspend_session(self, name: str, password: str, secret_key: str, suspend: bool, now: float) -> None:
        """Suspend a session (no new inits, no delivery, publishes refused) or resume it."""
        self._set_suspended(self._authorised(name, password, secret_key), suspend, now)

    def suspend_session_as_admin(self, name: str, suspend: bool, now: float) -> None:
        """:meth:`suspend_session` for a caller with admin rights (the web console): no session secrets."""
        self._set_suspended(self._existing(name), suspend, now)

    def _set_suspended(self, session: _Session, suspend: bool, now: float) -> None:
        name = session.name
        self._busy = True
        try:
            session.set_suspended(suspend, now)
        finally:
            self._end_call(now)
        _log.info("session %r %s", name, "suspended" if suspend else "resumed")

    def session_names(self) -> list[str]:
        return sorted(self._sessions)

    def stats(self) -> BrokerStats:
        per_session = {name: session.stats() for name, session in self._sessions.items()}
        values = per_session.values()
        return BrokerStats(
            sessions=len(per_session),
            connections=len(self._connections),
            subscribers=sum(s.subscribers for s in values),
            stored_messages=sum(s.stored_messages for s in values),
            inflight_deliveries=sum(s.inflight_deliveries for s in values),
            pending_bytes=sum(s.pending_bytes for s in values),
            throttled_peers=len(self._throttle),
            per_session=per_session,
        )


def _check_length(what: str, value: str, limit: int) -> None:
    if not value or len(value) > limit:
        raise LocalProtocolError(f"{what} must be 1 to {limit} characters, got {len(value)}")
