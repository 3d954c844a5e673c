"""The broker: sessions, routing, per-subscriber delivery state, retries, expiry and limits (DESIGN §3).

Theory of operation
-------------------
The broker is pure routing and bookkeeping. The server core parses each client frame into a
:mod:`~fastport_core.protocol` event and calls :meth:`Broker.handle_packet`. The broker's answer is *data*:
it appends what must happen (these frame bytes to connection X, close Y with code Z, connection W is now
initialised) to :attr:`Broker.output`, and the server core applies that queue after each call (the h11 /
aioquic pattern: no callback from the broker into the server). It never sees a socket or a clock: every
entry point takes ``now``, and :meth:`Broker.next_deadline` / :meth:`Broker.handle_timeout` drive
everything that happens later.

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

Closing: when the broker closes a connection (auth failures, slow consumer, replaced, session dropped) it
forgets it first and then queues the close, so a later ``connection_closed`` from the server core is a
no-op, and no frame for that connection is ever queued after its close. Because the output is data, the
server core can only report a close (say, an output buffer that overflowed while it applied a fan-out)
*between* broker calls: no table ever changes under a loop that is walking it, with no re-entrancy guard.
"""

from __future__ import annotations

import base64
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, cast

import orjson

from .accounting import message_size
from .auth import AuthThrottle, PasswordCheck, PasswordHash
from .config import ServerConfig, SessionSettings, SlowConsumerPolicy
from .dedupe import DedupeWindow
from .errors import CloseCode, ErrorCode, LocalProtocolError, RemoteProtocolError
from .frames import encode_text_frame
from .metrics import Metrics
from .peers import throttle_key
from .protocol import (
    Ack,
    ClientPacket,
    Encoding,
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
from .storage import (
    BacklogRequest,
    DeliveryRecord,
    Journal,
    MessageRecord,
    Presence,
    PublishRecord,
    SessionRecord,
    Snapshot,
    StoreBatch,
    SubscriberRecord,
)
from .timers import Deadlines
from .tokens import TokenScope, decode_token_key, verify_token
from .topics import TopicTrie, check_filter, check_topic, filter_matches, has_wildcard

__all__ = [
    "AccessDeniedError",
    "Broker",
    "BrokerOutput",
    "BrokerStats",
    "ClusterUnavailableError",
    "GiveUpReason",
    "SessionExistsError",
    "SessionStats",
    "StoreUnavailableError",
    "UnknownSessionError",
]

_log = logging.getLogger(__name__)

SECRET_KEY_BYTES: Final = 32
"""Random bytes in a generated secret key (shown once, base64url without padding: 43 characters)."""
_UNBOUNDED: Final = 1 << 62
"""The byte credit of an anonymous subscriber: its window is bounded by count only (its policy)."""
TOKEN_KEY_BYTES: Final = 32
"""Random bytes in a session's token key (the HS256 key of its tokens; shown as standard base64)."""


class BrokerOutput:
    """What the broker decided, as data; the server core applies it after every broker call, then clears it.

    Plain lists, appended to on the hot path (a fan-out appends the *same* encoded frame object once per
    subscriber: one encoding per publish, DESIGN §6.3). Applying ``frames`` before ``closes`` keeps each
    connection's order, because the broker forgets a connection before it queues its close and so never
    queues a frame for it afterwards.
    """

    __slots__ = ("backlog_requests", "closes", "confirmations", "frames", "initialised", "verifications")

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        """``(conn, encoded unmasked WebSocket text frame)``, in the order they must be sent."""
        self.confirmations: list[tuple[int, bytes]] = []
        """With a store only: frames that promise durability (a successful ``publish_response``,
        ``ack_received``), to send once everything the broker journalled so far is committed."""
        self.closes: list[tuple[int, CloseCode, str]] = []
        """``(conn, code, reason)``: start the closing handshake (the broker has already forgotten it)."""
        self.initialised: list[int] = []
        """Connections whose ``init`` succeeded: their handshake deadline and pre-init accounting end."""
        self.backlog_requests: list[BacklogRequest] = []
        """With a store only: pages of resumable subscribers' stored backlogs to read (after the batches
        taken so far commit); each answer comes back through :meth:`Broker.backlog_loaded`."""
        self.verifications: list[PasswordCheck] = []
        """Password checks to run off the core's thread (only with ``offload_verification``); each result
        comes back through :meth:`Broker.verification_done`."""

    def __bool__(self) -> bool:
        return bool(
            self.frames
            or self.closes
            or self.initialised
            or self.verifications
            or self.confirmations
            or self.backlog_requests
        )

    def clear(self) -> None:
        self.frames.clear()
        self.confirmations.clear()
        self.backlog_requests.clear()
        self.closes.clear()
        self.initialised.clear()
        self.verifications.clear()


class SessionExistsError(LocalProtocolError):
    """``create_session`` with a name that is taken."""


class UnknownSessionError(LocalProtocolError):
    """A session operation named no existing session."""


class AccessDeniedError(LocalProtocolError):
    """A session operation with a wrong password or secret key."""


class StoreUnavailableError(LocalProtocolError):
    """A session operation while the store cannot be written (it would not survive a restart)."""


class ClusterUnavailableError(StoreUnavailableError):
    """The node cannot reach the cluster's engine: the same refusal, named for what operators look at."""


class GiveUpReason(StrEnum):
    """The ``reason`` label of ``deliveries_given_up``: why a delivery was abandoned un-ACKed."""

    RETRIES = "retries"
    """Re-sent ``max_retry_limit`` times without an ACK."""
    EXPIRED = "expired"
    """The message outlived its session's ``message_expiry_time``."""
    OVERFLOW = "overflow"
    """Its anonymous subscriber held ``max_inflight_per_subscriber`` deliveries and the oldest made room; or,
    under ``drop_oldest``, a full session gave up a resumable subscriber's oldest backlogged delivery."""
    DISCONNECTED = "disconnected"
    """Its subscriber's connection closed and had no ``clientId`` to resume with."""
    DETACHED = "detached"
    """Its resumable subscriber stayed without a connection too long, or was evicted by a newer one."""
    RELEASED = "released"
    """Its resumable subscriber's peer closed cleanly (a Close frame) without asking to be ``persistent``."""
    SCOPE = "scope"
    """Its resumable subscriber was resumed with a token that does not grant the message's topic."""


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
    backlogged_deliveries: int = 0
    """Deliveries waiting beyond their resumable subscriber's window (not sent yet)."""


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
    backlogged_deliveries: int = 0


def _encode_publish_ok(message_id: str, delivered_to: int | None) -> bytes:
    """``encode(PublishResponse(True, message_id, delivered_to))`` without the generic encoder (hot path).

    Byte-identical to the generic encoding (a test pins that); ~0.6 µs instead of ~3.5 µs. ``None``
    leaves ``deliveredTo`` out (an optional field): a cluster node does not know the count.
    """
    if delivered_to is None:
        return orjson.dumps({"type": "publish_response", "success": True, "messageId": message_id})
    return orjson.dumps(
        {"type": "publish_response", "success": True, "messageId": message_id, "deliveredTo": delivered_to}
    )


def _encode_ack_received(message_id: str, topic: str) -> bytes:
    """``encode(AckReceived(message_id, topic))`` without the generic encoder: one per settled message.

    Byte-identical to the generic encoding (a test pins that).
    """
    return orjson.dumps({"type": "ack_received", "messageId": message_id, "topic": topic})


class _Message:
    """A published message, stored once per session until no subscriber owes an ACK for it."""

    __slots__ = (
        "delivered_to",
        "deliveries",
        "expires_at",
        "frame_size",
        "owed",
        "publish",
        "publisher",
        "saved",
        "seq",
        "size",
    )

    def __init__(self, publish: Publish, expires_at: float, publisher: _Connection | None) -> None:
        self.publish = publish
        self.publisher = publisher
        """Who gets ``ack_received`` once the message is settled (the latest connection that published it)."""
        self.size = message_size(publish)
        """What the message is charged against ``max_pending_bytes_per_session`` (:mod:`.accounting`)."""
        self.expires_at = expires_at
        self.deliveries: list[_Delivery] = []
        """Every delivery made (ACKed ones included); expiry walks it to find those still owed."""
        self.owed = 0
        """Deliveries still in some subscriber's ``inflight``; the message is freed when it reaches 0."""
        self.delivered_to = 0
        self.frame_size = 0
        """Bytes of its encoded ``message`` frame: what one delivery costs its subscriber's byte window."""
        self.saved = False
        """A taken store batch wrote it (the store deletes it once no delivery refers to it)."""
        self.seq = 0
        """Its place in publish order in the store (given when a batch first writes it)."""


class _Delivery:
    """One (message, subscriber) pair awaiting the subscriber's ACK."""

    __slots__ = ("due", "message", "retries", "saved", "subscriber")

    def __init__(self, message: _Message, subscriber: _Subscriber, due: float) -> None:
        self.message = message
        self.subscriber = subscriber
        self.saved = False
        """A taken store batch wrote it (a resumable subscriber's delivery) and none deleted it since."""
        self.retries = 0
        self.due = due
        """When the next re-send is due; meaningful while the delivery is in the retry queue."""


class _Subscriber:
    """What receives messages: a connection's, or a ``clientId``'s across connections (resumable)."""

    __slots__ = (
        "backlog",
        "client_id",
        "connection",
        "credit",
        "cursor",
        "detached_at",
        "inflight",
        "loading",
        "persistent",
        "saved",
        "session",
        "spilled",
        "spilled_bytes",
        "topics",
    )

    def __init__(
        self,
        session: _Session,
        connection: _Connection | None,
        client_id: str | None,
        persistent: bool,
        window: int,
    ) -> None:
        self.session = session
        self.client_id = client_id
        self.saved = False
        """A taken store batch wrote it (resumable subscribers only) and none deleted it since."""
        self.spilled = 0
        """With a store: deliveries recorded only in the store while it was away (at most; a store may
        have expired some), read back page by page when it resumes, after its ``inflight`` and ``backlog``."""
        self.spilled_bytes = 0
        self.cursor = 0
        """The highest message ``seq`` read back from its stored backlog so far."""
        self.loading = False
        """A page of its stored backlog has been asked for and not delivered yet."""
        self.persistent = persistent
        """Kept across a clean close too (``init``'s ``persistent``; the latest resuming ``init`` decides)."""
        self.connection: _Connection | None = connection
        """``None`` while a resumable subscriber is detached."""
        self.detached_at = 0.0
        self.topics: set[str] = set()
        self.inflight: dict[str, _Delivery] = {}
        """Un-ACKed deliveries in its window (sent, or re-sent on resume), by message id, oldest first."""
        self.backlog: OrderedDict[str, _Delivery] = OrderedDict()
        """A resumable subscriber's deliveries beyond its window: never sent yet, not retried; they move
        into ``inflight`` (and are sent), oldest first, as ACKs free the window."""
        self.credit = window if client_id is not None else _UNBOUNDED
        """Bytes its window may still take (``_Session.window_bytes`` minus the ``frame_size`` of each
        delivery in ``inflight``); an anonymous subscriber's window is bounded by count only."""


class _Connection:
    """A transport connection as the broker sees it: unauthenticated until a successful ``init``."""

    __slots__ = ("auth_failures", "conn", "peer", "scope", "session", "subscriber", "verifying")

    def __init__(self, conn: int, peer: str) -> None:
        self.conn = conn
        self.peer = peer
        self.session: _Session | None = None
        self.subscriber: _Subscriber | None = None
        self.auth_failures = 0
        self.verifying: tuple[PasswordCheck, Init] | None = None
        """The ``init`` whose password check runs off the core's thread, and that check."""
        self.scope: TokenScope | None = None
        """What the token this connection authenticated with grants; ``None``: the password (everything)."""


class _Context:
    """What the broker shares with each of its sessions."""

    __slots__ = ("config", "deadlines", "disconnect", "journal", "metrics", "output", "settled", "shared")

    def __init__(
        self,
        config: ServerConfig,
        output: BrokerOutput,
        metrics: Metrics,
        disconnect: Callable[[_Connection, CloseCode, str, float], None],
        journal: Journal | None,
        *,
        shared: bool = False,
    ) -> None:
        self.config = config
        self.journal = journal
        """Changes to durable state since the last store batch; ``None``: the broker runs in memory."""
        self.shared = shared
        """A shared engine (a cluster) holds messages and resumable subscribers: see :class:`Broker`."""
        self.output = output
        self.metrics = metrics
        self.deadlines: Deadlines[_Session | _Connection] = Deadlines()
        """Keys: a session (its retry, expiry and idle timers) or a connection (its token's expiry)."""
        self.disconnect = disconnect
        """Forget a connection, then close it (the broker owns the connection table)."""
        self.settled: list[tuple[_Connection, str, str]] | None = (
            [] if config.send_ack_received and not shared else None
        )
        """``ack_received`` frames owed to publishers: (publisher, message id, topic), queued at the end of
        the running entry point (so always after the ``publish_response``); ``None``: turned off (or a
        cluster node, which cannot know when every node's subscribers ACKed)."""


class _Session:
    """One virtual broker: its routing table and the delivery state of its messages.

    It queues its frames on the broker's output and counts into the metrics itself, but closing a
    connection is the broker's business (``_Context.disconnect``), because the broker owns the connection
    table.
    """

    __slots__ = (
        "_acks",
        "_acks_unknown",
        "_deadlines",
        "_deliveries",
        "_disconnect",
        "_frames",
        "_journal",
        "_limits",
        "_metrics",
        "_page",
        "_policy",
        "_publish_duplicates",
        "_publishes",
        "_requests",
        "_retries",
        "_settled",
        "_shared",
        "_starved",
        "clients",
        "connections",
        "dedupe",
        "detached",
        "filters",
        "idle_since",
        "messages",
        "name",
        "password",
        "pending_bytes",
        "retry_queue",
        "saved",
        "secret",
        "settings",
        "suspended",
        "token_key",
        "topics",
        "window_bytes",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        password: PasswordHash,
        secret: PasswordHash,
        settings: SessionSettings,
        *,
        token_key: bytes,
        context: _Context,
        now: float,
    ) -> None:
        self.name = name
        self.password = password
        self.secret = secret
        self.token_key = token_key
        """The raw HS256 key of the session's tokens (an HMAC key: the server must hold it in clear)."""
        self.settings = settings
        config = context.config
        self._limits = config.limits
        self._policy = config.slow_consumer_policy
        self._frames = context.output.frames
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
        self._settled = context.settled
        self._journal = context.journal
        self._shared = context.shared
        self.saved = False
        """A taken store batch wrote it and none deleted it since."""
        self.suspended = False
        self.connections: dict[_Connection, None] = {}
        self.topics: dict[str, dict[_Subscriber, None]] = {}
        """Exact topics (the fast path: one dict lookup per publish)."""
        self.filters: TopicTrie[_Subscriber] = TopicTrie()
        """Subscriptions with a wildcard (``+``, ``#``), matched only while there are any."""
        self.messages: OrderedDict[str, _Message] = OrderedDict()
        self.pending_bytes = 0
        self.retry_queue: OrderedDict[_Delivery, None] = OrderedDict()
        self.clients: dict[str, _Subscriber] = {}
        self.detached: OrderedDict[_Subscriber, None] = OrderedDict()
        self.dedupe: DedupeWindow[str, int] = DedupeWindow(self._limits.dedupe_window, ttl=config.dedupe_ttl)
        self.idle_since: float | None = None
        self.window_bytes = self._limits.max_output_buffer // 2
        """The byte window of a resumable subscriber: frame bytes it may hold sent and un-ACKed. Half the
        output bound, so a resume or a round of retries never overflows its connection's buffer (4002)."""
        self._starved: dict[_Subscriber, None] = {}
        self._page = self._limits.max_inflight_per_subscriber
        """Deliveries read back from the store at a time (a window's worth)."""
        self._requests = context.output.backlog_requests
        """Subscribers with a backlog whose window a give-up freed: filled again after the timers ran."""
        self._start_idle(now)

    # -- timers --------------------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        self._deadlines.arm_earlier(self, when)

    def _start_idle(self, now: float) -> None:
        # A cluster node cannot tell that the session is idle on every node: it never expires one.
        if self.settings.session_expiry is not None and not self._shared:
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
        self._feed_starved(now)

    def _feed_starved(self, now: float) -> None:
        starved = self._starved
        while starved:
            subscriber = next(iter(starved))
            del starved[subscriber]
            self._feed(subscriber, now)

    def _expire_messages(self, now: float) -> None:
        messages = self.messages
        while messages:
            message = next(iter(messages.values()))
            if message.expires_at > now:
                return
            message_id = message.publish.message_id
            given_up = 0
            for delivery in list(message.deliveries):  # the last give-up clears the list
                if _holds(delivery, message_id):
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
        # One encoding per (message, retry count) for the whole round: the subscribers a message went to
        # together are re-sent together, and share one frame (as the first send does) instead of holding
        # a copy each in their output buffers.
        frames: dict[tuple[str, int], bytes] = {}
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
            self._resend(delivery, connection.conn, now, frames)

    def _resend(
        self, delivery: _Delivery, conn: int, now: float, frames: dict[tuple[str, int], bytes] | None = None
    ) -> None:
        """Send ``delivery`` again, with its ``retry`` count, and queue it for the next retry.

        ``frames`` caches the encoded frames of the running retry round, shared by its subscribers.
        """
        delivery.retries += 1
        if self._journal is not None and delivery.subscriber.client_id is not None:
            self._journal.put(delivery)  # its retry count survives a restart
        p = delivery.message.publish
        key = (p.message_id, delivery.retries)
        frame = frames.get(key) if frames is not None else None
        if frame is None:
            frame = encode_text_frame(
                encode_message(
                    p.topic, p.data, p.hash, p.timestamp, p.message_id, p.encoding, delivery.retries
                )
            )
            if frames is not None:
                frames[key] = frame
        self._frames.append((conn, frame))
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
        self._feed(subscriber, now)

    def _feed(self, subscriber: _Subscriber, now: float) -> None:
        """Send ``subscriber``'s backlog, oldest first, as far as its window has room (count and bytes).

        Only while it can be sent: a detached subscriber or a suspended session keeps its backlog, and a
        resume or an unsuspend feeds it. A window that is empty takes one delivery whatever its size.
        """
        backlog = subscriber.backlog
        connection = subscriber.connection
        if connection is None or self.suspended:
            return
        if subscriber.spilled and not subscriber.loading and len(backlog) <= self._page // 2:
            self._read_back(subscriber)
        if not backlog:
            return
        inflight = subscriber.inflight
        cap = self._limits.max_inflight_per_subscriber
        due = now + self.settings.retry_interval
        queue = self.retry_queue
        send = self._frames.append
        sent = 0
        while backlog:
            message_id, delivery = next(iter(backlog.items()))
            message = delivery.message
            if message.expires_at <= now:  # read back from the store after its expiry: never sent
                self._give_up(delivery, GiveUpReason.EXPIRED)
                continue
            if inflight and (len(inflight) >= cap or subscriber.credit < message.frame_size):
                break
            del backlog[message_id]
            inflight[message_id] = delivery
            subscriber.credit -= message.frame_size
            p = message.publish
            send((connection.conn, encode_text_frame(
                encode_message(p.topic, p.data, p.hash, p.timestamp, message_id, p.encoding, delivery.retries)
            )))  # fmt: skip
            delivery.due = due
            queue[delivery] = None
            sent += 1
        if sent:
            self._deliveries.value += sent
            self._arm(due)

    def _read_back(self, subscriber: _Subscriber) -> None:
        """Ask for the next page of ``subscriber``'s stored backlog (see :meth:`load_backlog`)."""
        assert subscriber.client_id is not None
        subscriber.loading = True
        self._requests.append(BacklogRequest(self.name, subscriber.client_id, subscriber.cursor, self._page))

    def load_backlog(
        self,
        subscriber: _Subscriber,
        rows: list[tuple[MessageRecord, int]],
        complete: bool,
        offset: float,
        now: float,
    ) -> None:
        """A page of ``subscriber``'s stored backlog, oldest first: into its backlog, then fed as usual.

        A message still held in memory for other subscribers is shared; any other is held again for as
        long as this delivery is owed (charged to the session's pending bytes like any message).
        ``complete``: the store has nothing more for it.
        """
        subscriber.loading = False
        inflight, backlog = subscriber.inflight, subscriber.backlog
        armed = bool(self.messages)
        for record, retries in rows:
            subscriber.cursor = max(subscriber.cursor, record.seq)
            message_id = record.message_id
            if message_id in inflight or message_id in backlog:
                continue  # still in memory from before it went away
            message = self.messages.get(message_id)
            if message is None:
                message = _stored_message(record, offset)
                self.messages[message_id] = message
                self.pending_bytes += message.size
            delivery = _Delivery(message, subscriber, now)
            delivery.retries = retries
            delivery.saved = True
            message.deliveries.append(delivery)
            message.owed += 1
            backlog[message_id] = delivery
            subscriber.spilled = max(0, subscriber.spilled - 1)
            subscriber.spilled_bytes = max(0, subscriber.spilled_bytes - message.size)
        if complete:
            subscriber.spilled = subscriber.spilled_bytes = 0
        if not armed and (due := self.next_due()) is not None:
            self._arm(due)
        self._feed(subscriber, now)

    # -- delivery bookkeeping ----------------------------------------------------------------------------

    def _release(self, message: _Message) -> None:
        """One delivery of ``message`` is over (ACKed or given up); free the message after the last."""
        message.owed -= 1
        if not message.owed:
            del self.messages[message.publish.message_id]
            self.pending_bytes -= message.size
            if self._settled is not None and message.publisher is not None:
                self._settled.append((message.publisher, message.publish.message_id, message.publish.topic))
            # Break the message <-> delivery cycles now, so reference counting frees them at once
            # instead of leaving ~5 objects per message to the cyclic garbage collector.
            message.deliveries.clear()

    def _give_up(self, delivery: _Delivery, reason: GiveUpReason) -> None:
        subscriber = delivery.subscriber
        message_id = delivery.message.publish.message_id
        if subscriber.inflight.get(message_id) is delivery:
            del subscriber.inflight[message_id]
            subscriber.credit += delivery.message.frame_size
            if subscriber.backlog or subscriber.spilled:
                self._starved[subscriber] = None
        else:
            del subscriber.backlog[message_id]
        if self._journal is not None and subscriber.client_id is not None:
            self._journal.drop(delivery, delivery.saved)
        self.retry_queue.pop(delivery, None)
        self._release(delivery.message)
        self._metrics.inc("deliveries_given_up", self.name, reason.value)

    def _give_up_all(self, subscriber: _Subscriber, reason: GiveUpReason) -> None:
        if subscriber.spilled:  # the store deletes them with the subscriber
            self._metrics.inc("deliveries_given_up", self.name, reason.value, amount=subscriber.spilled)
        count = len(subscriber.inflight) + len(subscriber.backlog) + subscriber.spilled
        subscriber.spilled = subscriber.spilled_bytes = 0
        # The backlog first, so that emptying the window does not make the subscriber look starved.
        for delivery in [*subscriber.backlog.values(), *subscriber.inflight.values()]:
            self._give_up(delivery, reason)
        if count:
            _log.info("session %r: gave up %d delivery(ies) of a subscriber: %s", self.name, count, reason)

    def _give_up_oldest(self, subscriber: _Subscriber) -> None:
        self._give_up(next(iter(subscriber.inflight.values())), GiveUpReason.OVERFLOW)

    def ack(self, subscriber: _Subscriber, message_id: str, now: float) -> None:
        """Complete ``subscriber``'s own delivery of ``message_id`` (anything else is an unknown ACK, a
        backlogged delivery included: it was never sent), and send from its backlog into the freed slot."""
        delivery = subscriber.inflight.pop(message_id, None)
        if delivery is None:
            self._acks_unknown.value += 1
            return
        self.retry_queue.pop(delivery, None)
        subscriber.credit += delivery.message.frame_size
        if self._journal is not None and subscriber.client_id is not None:
            self._journal.drop(delivery, delivery.saved)
        self._release(delivery.message)
        self._acks.value += 1
        if subscriber.backlog or subscriber.spilled:
            self._feed(subscriber, now)

    # -- routing -----------------------------------------------------------------------------------------

    def subscribe(self, subscriber: _Subscriber, topic: str) -> None:
        """Route ``topic`` (a topic, or a well-formed filter) to ``subscriber``."""
        subscriber.topics.add(topic)
        if self._journal is not None and subscriber.client_id is not None:
            self._journal.put(subscriber)
            if self._shared:
                return  # the engine picks its messages (its topics are in the record), not the routing
        if has_wildcard(topic):
            self.filters.add(topic, subscriber)
        else:
            self.topics.setdefault(topic, {})[subscriber] = None

    def unsubscribe(self, subscriber: _Subscriber, topic: str) -> None:
        """Stop routing ``topic`` (spelled as subscribed) to ``subscriber``; its in-flight deliveries still
        await their ACKs."""
        subscriber.topics.discard(topic)
        if self._journal is not None and subscriber.client_id is not None:
            self._journal.put(subscriber)
            if self._shared:
                return
        if has_wildcard(topic):
            self.filters.discard(topic, subscriber)
            return
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
            if stored is not None:
                stored.publisher = publisher.connection  # a re-sent publish: it gets the ack_received
            else:
                self._settle_now(publisher, p)  # settled already: it may have missed the ack_received
            return delivered
        if self.suspended:
            raise RemoteProtocolError("the session is suspended", code=ErrorCode.SESSION_SUSPENDED)
        if self._shared:
            return self._hand_over(publisher, p, now)
        subscribers = self._subscribers_of(p.topic)
        if subscribers is None or (len(subscribers) == 1 and publisher in subscribers):
            self.dedupe.add(message_id, 0, now)
            if self._journal is not None:
                self._journal.publishes.append((self, message_id, 0, now))
            self._publishes.value += 1
            self._settle_now(publisher, p)
            return 0
        message = _Message(p, now + self.settings.message_expiry_time, publisher.connection)
        self._check_room(message, shed=True)
        try:
            self._deliver(message, publisher, subscribers, now)
        finally:
            delivered = message.delivered_to
            self.dedupe.add(message_id, delivered, now)
            if self._journal is not None:
                self._journal.publishes.append((self, message_id, delivered, now))
            self._publishes.value += 1
        return delivered

    def _subscribers_of(self, topic: str) -> dict[_Subscriber, None] | None:
        """Who a message on ``topic`` goes to: one entry per subscriber, however many of its filters (and
        its topic) match."""
        subscribers = self.topics.get(topic)
        if self.filters:
            matched = self.filters.match(topic)
            if matched:
                if subscribers is not None:
                    matched.update(subscribers)
                subscribers = matched
        return subscribers

    def _check_room(self, message: _Message, *, shed: bool) -> None:
        """Refuse ``message`` with ``session_full`` if the session's pending bytes have no room for it
        (after shedding backlogs, with ``shed``: see :meth:`_shed_backlogs`)."""
        limit = self._limits.max_pending_bytes_per_session
        if self.pending_bytes + message.size > limit and not (
            shed and self._shed_backlogs(limit - message.size)
        ):
            raise RemoteProtocolError(
                f"the session holds {self.pending_bytes} bytes of un-ACKed messages (limit {limit})",
                code=ErrorCode.SESSION_FULL,
            )

    def _deliver(
        self,
        message: _Message,
        publisher: _Subscriber | None,
        subscribers: dict[_Subscriber, None],
        now: float,
    ) -> None:
        """Fan ``message`` out to ``subscribers`` (but its ``publisher``) and hold it while any ACK is owed;
        sets ``message.delivered_to``."""
        if not self.retry_queue or not self.messages:  # a queue head may move earlier: one arm covers both
            self._arm(min(now + self.settings.retry_interval, message.expires_at))
        slow: list[_Connection] = []
        spilled = 0
        try:
            spilled = self._fan_out(message, publisher, subscribers, slow, now)
        finally:
            # Commit what the fan-out recorded, even if it stopped half-way (a bug, contained by the server
            # core): every delivery in ``message.deliveries`` is already in its subscriber's ``inflight``,
            # so the message is stored owing exactly that many ACKs, or not at all. Deliveries recorded only
            # in the store (``spilled``) count as delivered but hold nothing in memory.
            owed = message.owed = len(message.deliveries)
            message.delivered_to = owed + spilled
            if spilled:
                message.publisher = None  # settled only once the away subscribers ACK: no ack_received
            if owed:
                self.messages[message.publish.message_id] = message
                self.pending_bytes += message.size
            elif not spilled and publisher is not None:
                self._settle_now(publisher, message.publish)
            if (journal := self._journal) is not None:
                for delivery in message.deliveries:
                    if delivery.subscriber.client_id is not None:
                        journal.deliver(delivery)
            if slow:
                reason = f"slow consumer: {self._limits.max_inflight_per_subscriber} un-ACKed messages"
                for connection in slow:
                    self._disconnect(connection, CloseCode.SLOW_CONSUMER, reason, now)

    # -- a shared engine (DESIGN §8) ------------------------------------------------------------------------

    def _hand_over(self, publisher: _Subscriber, p: Publish, now: float) -> int:
        """Shared mode: the engine takes the message (confirmed once it has it) and feeds it back to every
        node, this one included, which fans it out then (:meth:`feed`). The ``publish_response`` leaves
        ``deliveredTo`` out: no node knows the other nodes' subscribers."""
        assert self._journal is not None
        message = _Message(p, now + self.settings.message_expiry_time, None)
        self._check_room(message, shed=False)
        self.dedupe.add(p.message_id, 0, now)
        self._journal.outgoing.append((publisher, message))
        self._publishes.value += 1
        return 0

    def feed(self, record: MessageRecord, origin: _Connection | None, offset: float, now: float) -> None:
        """A message the shared engine stored (published on any node): fan it out to this node's
        subscribers but its publisher (``origin``, when it published here). Resumable subscribers are not
        routed in shared mode: the engine delivers their messages (:meth:`deliver_engine`)."""
        message = _stored_message(record, offset)
        if message.expires_at <= now:
            return
        subscribers = self._subscribers_of(record.topic)
        if not subscribers:
            return
        publisher = origin.subscriber if origin is not None and origin.session is self else None
        self._deliver(message, publisher, subscribers, now)

    def deliver_engine(
        self, subscriber: _Subscriber, rows: list[tuple[MessageRecord, int]], offset: float, now: float
    ) -> list[str]:
        """Deliveries the engine hands this node for resumable ``subscriber``, oldest first, as
        ``(message, retries so far)``: into its backlog and fed as its window allows. Returns the ids of
        those it does not take (no subscription or token grants their topic): the engine counts them done.
        A message it holds already (the engine delivers again what is un-ACKed) is not sent twice."""
        connection = subscriber.connection
        scope = connection.scope if connection is not None else None
        taken: list[tuple[MessageRecord, int]] = []
        refused: list[str] = []
        for row in rows:
            topic = row[0].topic
            wanted = topic in subscriber.topics or any(
                has_wildcard(f) and filter_matches(f, topic) for f in subscriber.topics
            )
            if wanted and (scope is None or scope.may_subscribe(topic)):
                taken.append(row)
            else:
                refused.append(row[0].message_id)
        if taken:
            self.load_backlog(subscriber, taken, True, offset, now)
        return refused

    def _hand_back(self, subscriber: _Subscriber) -> None:
        """Shared mode: a resumable subscriber's connection is gone. Its un-ACKed deliveries stay the
        engine's (another node, or this one again, gets them when it resumes): forget them here unACKed."""
        assert self._journal is not None and subscriber.client_id is not None
        del self.clients[subscriber.client_id]
        for delivery in [*subscriber.backlog.values(), *subscriber.inflight.values()]:
            self.retry_queue.pop(delivery, None)
            self._release(delivery.message)
        subscriber.backlog.clear()
        subscriber.inflight.clear()
        self._journal.presence.append((self, subscriber.client_id, False, 0.0))

    def _shed_backlogs(self, room: int) -> bool:
        """The session is full: under DROP_OLDEST, give up (``overflow``) the backlogged deliveries of the
        oldest messages that have any, until ``pending_bytes`` is at most ``room``; whether it now is.

        A resumable subscriber's backlog is bounded by the session's pending bytes and message expiry.
        Under DISCONNECT nothing is given up: the publish is refused with ``session_full`` and publishers
        wait for the subscribers (nothing confirmed is lost). A message's bytes are freed once no
        subscriber owes it any more; deliveries in a window are never shed (they may be on the wire).
        Only runs when the session is full under DROP_OLDEST, so walking the messages is acceptable.
        """
        if self._policy is not SlowConsumerPolicy.DROP_OLDEST:
            return False
        subscribers = [c.subscriber for c in self.connections if c.subscriber is not None]
        if not any(subscriber.backlog for subscriber in [*subscribers, *self.detached]):
            return False
        shed = 0
        for message in list(self.messages.values()):
            message_id = message.publish.message_id
            for delivery in [d for d in message.deliveries if d.subscriber.backlog.get(message_id) is d]:
                self._give_up(delivery, GiveUpReason.OVERFLOW)
                shed += 1
            if self.pending_bytes <= room:
                break
        if shed:
            _log.info("session %r is full: gave up %d backlogged delivery(ies)", self.name, shed)
        return self.pending_bytes <= room

    def _settle_now(self, publisher: _Subscriber, p: Publish) -> None:
        """Owe ``ack_received`` for a message that has no delivery left to wait for."""
        if self._settled is not None and publisher.connection is not None:
            self._settled.append((publisher.connection, p.message_id, p.topic))

    def _fan_out(
        self,
        message: _Message,
        publisher: _Subscriber | None,
        subscribers: dict[_Subscriber, None],
        slow: list[_Connection],
        now: float,
    ) -> int:
        """Record a delivery per subscriber and queue the frame, encoded once, for every connected one;
        returns how many were recorded only in the store (:meth:`_spill`).

        Adds to ``slow`` the connections to close under the DISCONNECT slow-consumer policy (their new
        delivery is recorded but not sent); closing them is left to the caller, after the message is
        stored, because a close gives up deliveries and must not change ``subscribers`` under this loop.
        A delivery joins ``message.deliveries`` only once it is in its subscriber's ``inflight``, so the
        caller can commit whatever was recorded if this loop stops half-way.
        """
        p = message.publish
        message_id = p.message_id
        frame = encode_text_frame(
            encode_message(p.topic, p.data, p.hash, p.timestamp, message_id, p.encoding)
        )
        size = message.frame_size = len(frame)
        queue = self.retry_queue
        due = now + self.settings.retry_interval
        cap = self._limits.max_inflight_per_subscriber
        deliveries = message.deliveries
        send = self._frames.append
        journal = self._journal
        sent = spilled = 0
        for subscriber in subscribers:
            if subscriber is publisher:
                continue
            inflight = subscriber.inflight
            connection = subscriber.connection
            if journal is not None and (connection is None or subscriber.spilled):
                # Away (or still reading back what it missed): its delivery goes to the store only.
                spilled += self._spill(message, subscriber, journal)
                continue
            delivery = _Delivery(message, subscriber, due)
            if (
                len(inflight) >= cap or subscriber.credit < size or subscriber.backlog
            ) and self._beyond_window(delivery, slow):
                continue
            inflight[message_id] = delivery
            subscriber.credit -= size
            deliveries.append(delivery)
            if connection is not None:
                send((connection.conn, frame))
                queue[delivery] = None
                sent += 1
        if sent:
            self._deliveries.value += sent
        return spilled

    def _spill(self, message: _Message, subscriber: _Subscriber, journal: Journal) -> int:
        """Record ``subscriber``'s delivery of ``message`` in the store only (1), or give it up (0) when its
        stored backlog is at ``max_backlog_bytes``. Only a resumable subscriber is ever away."""
        if subscriber.spilled_bytes + message.size > self._limits.max_backlog_bytes:
            self._metrics.inc("deliveries_given_up", self.name, GiveUpReason.OVERFLOW.value)
            return 0
        subscriber.spilled += 1
        subscriber.spilled_bytes += message.size
        journal.spills.append((subscriber, message))
        return 1

    def _beyond_window(self, delivery: _Delivery, slow: list[_Connection]) -> bool:
        """A delivery for a subscriber whose window is full (or that has a backlog): ``True`` if it was
        recorded here, ``False`` if the caller still records and sends it (after any room was made).

        A resumable subscriber's delivery waits in its backlog (in order: behind any backlog), unless its
        window is empty (a message larger than the byte window still goes, alone). An anonymous one's
        meets the slow-consumer policy: under DISCONNECT it is recorded but not sent and the connection
        goes to ``slow``; under DROP_OLDEST its oldest delivery is given up to make room.
        """
        subscriber = delivery.subscriber
        message = delivery.message
        message_id = message.publish.message_id
        if subscriber.client_id is not None:
            if not subscriber.backlog and not subscriber.inflight:
                return False
            subscriber.backlog[message_id] = delivery
            message.deliveries.append(delivery)
            return True
        connection = subscriber.connection
        assert connection is not None, "only a resumable subscriber outlives its connection"
        if self._policy is SlowConsumerPolicy.DISCONNECT:
            self._metrics.inc("slow_consumers", self.name, SlowConsumerPolicy.DISCONNECT.value)
            subscriber.inflight[message_id] = delivery
            subscriber.credit -= message.frame_size
            message.deliveries.append(delivery)
            slow.append(connection)
            return True
        self._metrics.inc("slow_consumers", self.name, SlowConsumerPolicy.DROP_OLDEST.value)
        self._give_up_oldest(subscriber)
        return False

    # -- subscribers and connections -----------------------------------------------------------------------

    def attach(self, connection: _Connection, client_id: str | None, persistent: bool, now: float) -> None:
        """Make ``connection`` a member, with a new subscriber or the detached one of ``client_id``.

        A resumed subscriber gets all its in-flight deliveries again at once, in order, as retries; the
        resuming ``init``'s ``persistent`` replaces the one it was created with.
        """
        self.connections[connection] = None
        self.idle_since = None
        connection.session = self
        subscriber = self.clients.get(client_id) if client_id is not None else None
        if subscriber is None:
            subscriber = _Subscriber(self, connection, client_id, persistent, self.window_bytes)
            if client_id is not None:
                self.clients[client_id] = subscriber
                if self._shared:
                    # The engine keeps it (it may have for a while: what it waits for, its topics) and
                    # delivers its messages here from now on; a release deletes it (``saved``).
                    assert self._journal is not None
                    subscriber.saved = True
                    self._journal.presence.append((self, client_id, True, now))
                elif self._journal is not None:
                    self._journal.put(subscriber)
            connection.subscriber = subscriber
            return
        assert subscriber.connection is None, "the broker disconnects the previous connection first"
        del self.detached[subscriber]
        subscriber.connection = connection
        if subscriber.persistent != persistent and self._journal is not None:
            self._journal.put(subscriber)
        subscriber.persistent = persistent
        connection.subscriber = subscriber
        self._metrics.inc("subscribers_resumed", self.name)
        if connection.scope is not None:
            self._restrict(subscriber, connection.scope)
        self._resend_waiting(subscriber, now, everything=True)

    def _restrict(self, subscriber: _Subscriber, scope: TokenScope) -> None:
        """A token resumed ``subscriber``: keep only what the token grants (its subscriptions and waiting
        deliveries were made by whoever held the ``clientId`` before, perhaps with the password)."""
        for topic in [topic for topic in subscriber.topics if not scope.may_subscribe(topic)]:
            self.unsubscribe(subscriber, topic)
        for delivery in [*subscriber.inflight.values(), *subscriber.backlog.values()]:
            if not scope.may_subscribe(delivery.message.publish.topic):
                self._give_up(delivery, GiveUpReason.SCOPE)

    def connection_gone(self, connection: _Connection, now: float, clean: bool) -> None:
        """``connection`` left: detach its resumable subscriber, or drop an anonymous one.

        A resumable subscriber whose peer closed ``clean`` (sent a Close frame: it meant to leave) is
        released at once unless it asked to be ``persistent`` (DESIGN §3.10); one whose connection was lost
        (EOF, reset, keepalive, a close the server started) is detached, so a reconnect resumes it.
        """
        del self.connections[connection]
        subscriber = connection.subscriber
        assert subscriber is not None
        client_id = subscriber.client_id
        if client_id is None:
            self._unroute(subscriber)
            self._give_up_all(subscriber, GiveUpReason.DISCONNECTED)
        elif clean and not subscriber.persistent:
            self._forget_client(subscriber)
            self._give_up_all(subscriber, GiveUpReason.RELEASED)
        elif self._shared:
            self._hand_back(subscriber)
        else:
            self._detach(subscriber, now)
        if not self.connections:
            self._start_idle(now)

    def _detach(self, subscriber: _Subscriber, now: float) -> None:
        subscriber.connection = None
        subscriber.detached_at = now
        self.detached[subscriber] = None
        if len(self.detached) > self._limits.max_detached_per_session:
            self._forget_detached(next(iter(self.detached)))
        self._arm(now + self.settings.message_expiry_time)

    def _forget_detached(self, subscriber: _Subscriber) -> None:
        del self.detached[subscriber]
        self._forget_client(subscriber)
        self._give_up_all(subscriber, GiveUpReason.DETACHED)

    def _forget_client(self, subscriber: _Subscriber) -> None:
        """A resumable subscriber ends: no ``init`` resumes its ``clientId`` any more."""
        assert subscriber.client_id is not None
        del self.clients[subscriber.client_id]
        self._unroute(subscriber)
        if self._journal is not None:
            self._journal.drop(subscriber, subscriber.saved)
            if self._shared:
                self._journal.presence.append((self, subscriber.client_id, False, 0.0))

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
            backlogged_deliveries=sum(len(s.backlog) + s.spilled for s in subscribers),
        )


class Broker:
    """Sessions, connections and everything between them; see the module docstring.

    Protocol faults of the peer never raise out of :meth:`handle_packet`: they are answered (an ``error``
    frame or a ``*_response`` with ``success: false``), counted in ``protocol_errors{code}`` and logged at
    DEBUG. Misuse by the caller (a connection id opened twice, a bad ``create_session`` argument) raises
    :class:`~fastport_core.errors.LocalProtocolError`.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        metrics: Metrics | None = None,
        random: Callable[[int], bytes] = os.urandom,
        offload_verification: bool = False,
        durable: bool = False,
        shared: bool = False,
    ) -> None:
        """``durable``: a store keeps the broker's state; the broker journals every change to it (see
        :meth:`take_store_batch`) and queues frames that promise durability on ``output.confirmations``.

        ``shared`` (implies ``durable``): this broker is one node of several over a shared engine (a
        cluster, DESIGN §8). Sessions are the engine's (changes go out in store batches and come back from
        every node through :meth:`engine_session`); a publish is handed to the engine
        (``StoreBatch.outgoing``) and confirmed once it has it, and every node fans out what the engine
        feeds it (:meth:`engine_messages`); a resumable subscriber's messages and un-ACKed deliveries
        live in the engine, which delivers them to the node it is connected to
        (:meth:`engine_deliveries`); an ACK goes back as ``StoreBatch.deliveries_dropped``."""
        durable = durable or shared
        self._shared = shared
        self._config = config
        self._offload = offload_verification
        """Queue scrypt checks on :attr:`output` (``verifications``) instead of running them inline."""
        self._verifying = 0
        """Checks queued and not yet answered through :meth:`verification_done` (bounded)."""
        self.output = BrokerOutput()
        """What the broker decided since the caller last applied and cleared it (:class:`BrokerOutput`)."""
        self._frames = self.output.frames
        self.metrics = metrics if metrics is not None else Metrics()
        self._random = random
        self._sessions: dict[str, _Session] = {}
        self._connections: dict[int, _Connection] = {}
        self._journal = Journal() if durable else None
        self._confirm = self.output.confirmations if durable else self.output.frames
        """Where a successful ``publish_response`` and ``ack_received`` go (held until durable, or not)."""
        self._store_ok = True
        """``False`` while the store cannot be written: publishes and session changes are refused."""
        self._context = _Context(
            config, self.output, self.metrics, self._disconnect, self._journal, shared=shared
        )
        self.unavailable_code = ErrorCode.CLUSTER_UNAVAILABLE if shared else ErrorCode.STORE_UNAVAILABLE
        """What a publish is refused with while the store (or the cluster's engine) cannot take changes."""
        self._deadlines = self._context.deadlines
        self._throttle = AuthThrottle(
            config.auth_throttle_base,
            config.auth_throttle_max,
            config.limits.max_throttled_peers,
            budget=config.auth_failure_budget,
            window=config.auth_throttle_window,
        )
        self._decoy: PasswordHash | None = None
        self._message_seq = 0
        """The last ``seq`` given to a stored message (publish order across restarts)."""
        self._epoch_offset = 0.0
        """Wall-clock seconds minus ``now`` (see :meth:`set_wall_clock`); tokens' ``exp`` are wall-clock."""

    @property
    def throttle(self) -> AuthThrottle:
        """The failed-login throttle, shared with the admin API (one mechanism, one set of deadlines)."""
        return self._throttle

    def set_wall_clock(self, epoch: float, now: float) -> None:
        """Tell the broker that the wall clock (seconds since the epoch) read ``epoch`` at ``now``.

        Token expiry (``exp``) is wall-clock time while ``now`` is the adapter's monotonic clock, and the
        core reads no clock: the adapter calls this at start (and may again, say per connection, to follow
        clock adjustments). Until then ``now`` is taken as wall-clock time.
        """
        self._epoch_offset = epoch - now

    # -- the store (DESIGN §7; see fastport_core.storage) ----------------------------------------------------

    def set_store_available(self, available: bool) -> None:
        """The store failed a commit (``False``: refuse publishes and session changes with
        ``store_unavailable`` until it works again) or committed again (``True``)."""
        if available != self._store_ok:
            _log.warning(
                "the store is %s", "writable again" if available else "unavailable: refusing publishes"
            )
        self._store_ok = available

    @property
    def store_available(self) -> bool:
        """Whether the store takes commits (always, in memory); ``/healthz`` reports it."""
        return self._store_ok

    def _check_store(self) -> None:
        if not self._store_ok:
            if self._shared:
                raise ClusterUnavailableError("the node has lost the cluster's engine: retry shortly")
            raise StoreUnavailableError("the broker cannot write its store: retry shortly")

    def journal_seq(self) -> int:
        """The number of the last batch :meth:`take_store_batch` returned (0: none yet, or no store)."""
        return self._journal.taken if self._journal is not None else 0

    def session_changes(self) -> int:
        """How many session-level changes (create, drop, suspend, keys) were journalled so far."""
        return self._journal.changes if self._journal is not None else 0

    def store_pending(self) -> bool:
        """Whether changes wait in the journal for :meth:`take_store_batch`."""
        return bool(self._journal)

    def group_commit_due(self, delay: float) -> float | None:
        """When a store writer under load should take the next batch: ``delay`` after the oldest publish
        it would confirm, if a delivery of the batch still awaits an ACK that would spare writing it;
        the oldest publish's time (due already) if none does; ``None`` if no publish awaits a commit."""
        journal = self._journal
        if journal is None or not journal.publishes:
            return None
        oldest: float = journal.publishes[0][3]
        return oldest + delay if journal.fresh else oldest

    def take_store_batch(self) -> StoreBatch | None:
        """The net change to durable state since the previous batch (``None``: nothing, or no store).

        Objects of a session dropped meanwhile are left out: the session's deletion covers them.
        """
        journal = self._journal
        if not journal:
            return None
        assert journal is not None
        journal.taken += 1
        batch = StoreBatch(journal.taken)
        sessions = self._sessions
        offset = self._epoch_offset
        shared = self._shared
        deliveries = batch.deliveries
        dropped = batch.deliveries_dropped
        for obj, put in journal.changed.items():
            # The per-delivery branch runs once per delivery of a fan-out: exact type tests and records
            # built by ``tuple.__new__`` (a NamedTuple's own ``__new__`` is a Python-level function).
            if type(obj) is _Delivery:
                subscriber = obj.subscriber
                session = subscriber.session
                name = session.name
                if sessions.get(name) is not session or (put and shared):
                    continue  # the engine counts its own deliveries: it is only told about ACKs
                message = obj.message
                client_id = subscriber.client_id
                assert client_id is not None
                if put:
                    if not message.saved:
                        self._save_message(batch, name, message, offset)
                    obj.saved = True
                    deliveries.append(
                        _new_tuple(
                            DeliveryRecord,
                            (name, message.publish.message_id, client_id, message.seq, obj.retries),
                        )
                    )
                else:
                    obj.saved = False
                    dropped.append((name, message.publish.message_id, client_id))
            elif type(obj) is _Subscriber:
                session = obj.session
                client_id = obj.client_id
                if sessions.get(session.name) is not session or client_id is None:
                    continue
                obj.saved = put
                if put:
                    record = SubscriberRecord(
                        session.name, client_id, obj.persistent, tuple(sorted(obj.topics))
                    )
                    batch.subscribers.append(record)
                else:
                    batch.subscribers_dropped.append((session.name, client_id))
            else:
                assert isinstance(obj, _Session)
                obj.saved = put
                if not put:
                    batch.sessions_dropped.append(obj.name)
                elif sessions.get(obj.name) is obj:
                    batch.sessions.append(_session_record(obj))
        journal.changed.clear()
        journal.fresh.clear()
        for owner, stored in journal.spills:
            subscriber = cast(_Subscriber, owner)
            message = cast(_Message, stored)
            session = subscriber.session
            client_id = subscriber.client_id
            assert client_id is not None
            if sessions.get(session.name) is not session or session.clients.get(client_id) is not subscriber:
                continue  # gone meanwhile: its deletion covers its stored backlog
            if not message.saved:
                self._save_message(batch, session.name, message, offset)
            batch.deliveries.append(
                DeliveryRecord(session.name, message.publish.message_id, client_id, message.seq, 0)
            )
        journal.spills.clear()
        for owner, message_id, delivered, at in journal.publishes:
            session = cast(_Session, owner)
            if sessions.get(session.name) is session:
                batch.publishes.append(PublishRecord(session.name, message_id, delivered, at + offset))
        journal.publishes.clear()
        if self._shared:
            self._take_shared(journal, batch, offset)
        return batch

    def _take_shared(self, journal: Journal, batch: StoreBatch, offset: float) -> None:
        sessions = self._sessions
        for owner, stored in journal.outgoing:
            publisher = cast(_Subscriber, owner)
            message = cast(_Message, stored)
            session = publisher.session
            if sessions.get(session.name) is session:
                conn = publisher.connection.conn if publisher.connection is not None else 0
                batch.outgoing.append((self._numbered(session.name, message, offset), conn))
        journal.outgoing.clear()
        for owner, client_id, arrived, at in journal.presence:
            session = cast(_Session, owner)
            if sessions.get(session.name) is session:
                batch.presence.append(Presence(session.name, client_id, at + offset if arrived else None))
        journal.presence.clear()

    def _save_message(self, batch: StoreBatch, session: str, message: _Message, offset: float) -> None:
        message.saved = True
        batch.messages.append(self._numbered(session, message, offset))

    def _numbered(self, session: str, message: _Message, offset: float) -> MessageRecord:
        """``message``'s record, with the next ``seq`` (publish order across the broker's life)."""
        self._message_seq += 1
        message.seq = self._message_seq
        return _message_record(session, message, offset)

    def backlog_loaded(
        self, request: BacklogRequest, rows: list[tuple[MessageRecord, int]], now: float
    ) -> None:
        """The answer to ``request`` (from ``output.backlog_requests``): the page, oldest first, each row a
        stored message and its retry count. Ignored if the subscriber is gone or was replaced meanwhile."""
        session = self._sessions.get(request.session)
        subscriber = session.clients.get(request.client_id) if session is not None else None
        if session is None or subscriber is None or not subscriber.loading:
            return
        session.load_backlog(subscriber, rows, len(rows) < request.limit, self._epoch_offset, now)
        self._queue_settled()

    def restore(self, snapshot: Snapshot, now: float) -> None:
        """Load what a store held (at start, before any connection; after :meth:`set_wall_clock`).

        Every resumable subscriber comes back detached, its stored backlog counted but left in the store:
        a resume reads it back page by page, oldest first, paced by its window, with the retry counts
        (expired messages are given up as they are read). The dedupe windows come back whole.
        """
        if self._journal is None:
            raise LocalProtocolError("restore() needs a durable broker")
        offset = self._epoch_offset
        sessions: dict[str, _Session] = {}
        for record in snapshot.sessions:
            sessions[record.name] = self._sessions[record.name] = self._restored(record, now)
        subscribers: dict[tuple[str, str], _Subscriber] = {}
        for sub in snapshot.subscribers:
            if (owner := sessions.get(sub.session)) is None:
                continue
            subscriber = _Subscriber(owner, None, sub.client_id, sub.persistent, owner.window_bytes)
            subscriber.saved = True
            subscriber.detached_at = now
            owner.clients[sub.client_id] = subscriber
            owner.detached[subscriber] = None
            for topic in sub.topics:
                owner.subscribe(subscriber, topic)
            subscribers[sub.session, sub.client_id] = subscriber
        for backlog in snapshot.backlogs:
            if (waiting := subscribers.get((backlog.session, backlog.client_id))) is not None:
                waiting.spilled, waiting.spilled_bytes = backlog.deliveries, backlog.size
        self._message_seq = max(self._message_seq, snapshot.last_seq)
        for published in snapshot.publishes:
            if (target := sessions.get(published.session)) is not None:
                target.dedupe.add(published.message_id, published.delivered_to, published.at - offset)
        for session in sessions.values():
            if (due := session.next_due()) is not None:
                self._deadlines.arm_earlier(session, due)
        _log.info(
            "restored %d session(s), %d resumable subscriber(s) with %d stored delivery(ies)",
            len(sessions), len(subscribers), sum(s.spilled for s in subscribers.values()),
        )  # fmt: skip

    # -- a shared engine (``shared``; DESIGN §8) ----------------------------------------------------------

    def engine_messages(self, messages: list[tuple[MessageRecord, int]], now: float) -> None:
        """Messages the engine stored, in its order, each with the connection id that published it on this
        node (0: another node): every node fans each out to its own subscribers. One of a session this node
        does not know (yet, or any more) is skipped."""
        offset = self._epoch_offset
        connections = self._connections
        for record, origin in messages:
            session = self._sessions.get(record.session)
            if session is not None:
                session.feed(record, connections.get(origin) if origin else None, offset, now)
        self._queue_settled()

    def engine_deliveries(
        self, session_name: str, client_id: str, rows: list[tuple[MessageRecord, int]], now: float
    ) -> list[str] | None:
        """The engine's deliveries for a resumable subscriber this node serves (``StoreBatch.presence``),
        oldest first, as ``(message, retries so far)``. ``None``: it is not served here any more (hand them
        back); else the ids it does not take, which the engine counts done (see
        :meth:`_Session.deliver_engine`)."""
        session = self._sessions.get(session_name)
        subscriber = session.clients.get(client_id) if session is not None else None
        if session is None or subscriber is None or subscriber.connection is None:
            return None
        refused = session.deliver_engine(subscriber, rows, self._epoch_offset, now)
        self._queue_settled()
        return refused

    def engine_subscriptions(self, session_name: str, client_id: str, topics: list[str]) -> None:
        """What a resumable subscriber had subscribed to, as the engine kept it: it resumed here, and its
        subscriptions come back (those its token still grants; those it made meanwhile stay)."""
        session = self._sessions.get(session_name)
        subscriber = session.clients.get(client_id) if session is not None else None
        if session is None or subscriber is None or subscriber.connection is None:
            return
        for topic in topics:  # what the token or the limit no longer allows stays out
            if self._subscribe_refusal(subscriber.connection, subscriber, topic) is None:
                session.subscribe(subscriber, topic)
        if topics:  # the engine had kept it: a resume (a new subscriber has nothing kept)
            self.metrics.inc("subscribers_resumed", session_name)

    def engine_client_claimed(self, session_name: str, client_id: str, now: float) -> None:
        """A connection on another node resumed ``client_id``: close the one here with 4003, as a second
        connection resuming it here would (its un-ACKed deliveries go back to the engine)."""
        session = self._sessions.get(session_name)
        subscriber = session.clients.get(client_id) if session is not None else None
        if subscriber is not None and subscriber.connection is not None:
            reason = "another connection resumed this clientId (on another node)"
            self._disconnect(subscriber.connection, CloseCode.REPLACED, reason, now)

    def engine_session(self, record: SessionRecord, now: float) -> None:
        """A session as the engine holds it (created or changed on any node, this one included): create it
        here or bring it in line. A rotated token key closes the connections its old tokens opened."""
        session = self._sessions.get(record.name)
        if session is None:
            session = self._sessions[record.name] = self._restored(record, now)
            _log.info("session %r joined from the cluster", record.name)
            return
        session.saved = True
        password, secret = record.password_hash, record.secret_hash
        if session.password.encode() != password:
            session.password = PasswordHash.decode(password)
        if session.secret.encode() != secret:
            session.secret = PasswordHash.decode(secret)
        session.settings = record.settings
        if session.token_key != record.token_key:
            session.token_key = record.token_key
            self._close_token_connections(session, now)
        if session.suspended != record.suspended:
            session.set_suspended(record.suspended, now)
            state = "suspended" if record.suspended else "resumed"
            _log.info("session %r %s (by a node of the cluster)", record.name, state)
        self._queue_settled()

    def engine_session_dropped(self, name: str, now: float) -> None:
        """The session was dropped on some node: drop it here too (its connections close with 4001)."""
        session = self._sessions.get(name)
        if session is not None:
            self._drop(session, "dropped", CloseCode.SESSION_DROPPED, journal=False)

    def _restored(self, record: SessionRecord, now: float) -> _Session:
        session = _Session(
            record.name,
            PasswordHash.decode(record.password_hash),
            PasswordHash.decode(record.secret_hash),
            record.settings,
            token_key=record.token_key,
            context=self._context,
            now=now,
        )
        session.suspended = record.suspended
        session.saved = True
        return session

    # -- connection lifecycle ------------------------------------------------------------------------------

    def connection_opened(self, conn: int, now: float, peer: str = "") -> None:
        """A WebSocket connection is open and may ``init``.

        ``peer`` is the client's address failed inits are throttled by (with the session name; an IPv6
        address by its /64, see :func:`~fastport_core.peers.throttle_key`). The empty string throttles
        nothing: the per-connection limit still applies. The deadline for a successful ``init`` is the
        server core's (it runs from the accept, so it covers TLS and the HTTP upgrade too); the broker
        reports each success in :attr:`BrokerOutput.initialised`.
        """
        if conn in self._connections:
            raise LocalProtocolError(f"connection {conn} is already open")
        if len(self._connections) >= self._config.limits.max_connections:
            self.output.closes.append(
                (conn, CloseCode.POLICY_VIOLATION, "the server is at its connection limit")
            )
            return
        self._connections[conn] = _Connection(conn, peer)

    def connection_closed(self, conn: int, now: float, *, clean: bool = False) -> None:
        """The transport is gone (idempotent; a no-op for a connection the broker already closed).

        ``clean``: the peer ended it with a WebSocket Close frame (it meant to leave), which releases a
        subscriber that is not ``persistent``; otherwise the connection was lost and a resumable
        subscriber waits for its reconnection (:meth:`_Session.connection_gone`).
        """
        connection = self._connections.get(conn)
        if connection is not None:
            self._forget(connection, now, clean)  # giving up its deliveries may settle messages
            self._queue_settled()

    def _queue_settled(self) -> None:
        """End of an entry point: queue the ``ack_received`` frames it settled, after its other answers."""
        settled = self._context.settled
        if settled:
            connections = self._connections
            for publisher, message_id, topic in settled:
                # Only to a publisher still connected (it may have gone, or been replaced meanwhile).
                if connections.get(publisher.conn) is publisher:
                    self._confirm.append(
                        (publisher.conn, encode_text_frame(_encode_ack_received(message_id, topic)))
                    )
            settled.clear()

    def _forget(self, connection: _Connection, now: float, clean: bool = False) -> None:
        del self._connections[connection.conn]
        if connection.scope is not None:
            self._deadlines.cancel(connection)
        if connection.session is not None:
            connection.session.connection_gone(connection, now, clean)

    def _disconnect(self, connection: _Connection, code: CloseCode, reason: str, now: float) -> None:
        """Forget ``connection`` (as if it were lost), then queue its close."""
        self._forget(connection, now)
        _log.info("closing connection %d: %s (%d)", connection.conn, reason, code)
        self.output.closes.append((connection.conn, code, reason))

    def is_initialised(self, conn: int) -> bool:
        """Whether ``conn`` completed a successful ``init`` (and is still known to the broker)."""
        connection = self._connections.get(conn)
        return connection is not None and connection.session is not None

    # -- frames --------------------------------------------------------------------------------------------

    def handle_packet(self, conn: int, packet: ClientPacket, now: float) -> None:
        """Act on one parsed client packet; every answer is queued on :attr:`output`.

        Frames for a connection the broker does not know (it closed it, e.g. a slow consumer, and the
        server core still had input from it) are dropped.
        """
        connection = self._connections.get(conn)
        if connection is None:
            return
        session = connection.session
        subscriber = connection.subscriber
        if session is None or subscriber is None:
            if isinstance(packet, Init):
                self._on_init(connection, packet, now)
            else:
                self._error(connection, ErrorCode.NOT_INITIALISED, "send init first")
        elif isinstance(packet, Publish):
            try:
                if not self._store_ok:
                    raise RemoteProtocolError(
                        "the broker cannot store the message now: retry shortly", code=self.unavailable_code
                    )
                if connection.scope is not None or has_wildcard(packet.topic):
                    _check_publish(connection.scope, packet.topic)
                delivered = session.publish(subscriber, packet, now)
            except RemoteProtocolError as refusal:
                self._refuse_publish(connection, session, packet, refusal)
            else:
                count = None if self._shared else delivered
                self._confirm.append((conn, encode_text_frame(_encode_publish_ok(packet.message_id, count))))
        elif isinstance(packet, Ack):
            session.ack(subscriber, packet.message_id, now)
        elif isinstance(packet, Subscribe):
            self._on_subscribe(connection, session, subscriber, packet.topic)
        elif isinstance(packet, Unsubscribe):
            session.unsubscribe(subscriber, packet.topic)
            self._send(conn, encode(UnsubscribeResponse(True, packet.topic)))
        else:  # a second Init: a connection belongs to one session for its whole life
            self._error(connection, ErrorCode.ALREADY_INITIALISED, f"already in session {session.name!r}")
        self._queue_settled()

    def _send(self, conn: int, payload: bytes) -> None:
        """Queue one JSON payload for ``conn``, as a text frame."""
        self._frames.append((conn, encode_text_frame(payload)))

    def _count_refusal(self, connection: _Connection, code: ErrorCode, message: str) -> None:
        self.metrics.inc("protocol_errors", code.value)
        _log.debug("connection %d: %s: %s", connection.conn, code, message)

    def _error(self, connection: _Connection, code: ErrorCode, message: str) -> None:
        self._count_refusal(connection, code, message)
        self._send(connection.conn, encode_error(RemoteProtocolError(message, code=code)))

    def _refuse_publish(
        self, connection: _Connection, session: _Session, packet: Publish, refusal: RemoteProtocolError
    ) -> None:
        code = refusal.code
        self._count_refusal(connection, code, refusal.message)
        self.metrics.inc("publishes_refused", session.name, code.value)
        response = PublishResponse(False, packet.message_id, error=refusal.message, code=code)
        self._send(connection.conn, encode(response))

    def _on_subscribe(
        self, connection: _Connection, session: _Session, subscriber: _Subscriber, topic: str
    ) -> None:
        refusal = self._subscribe_refusal(connection, subscriber, topic)
        if refusal is not None:
            self._count_refusal(connection, refusal.code, refusal.message)
            response = SubscribeResponse(False, topic, error=refusal.message, code=refusal.code)
        else:
            session.subscribe(subscriber, topic)
            response = SubscribeResponse(True, topic)
        self._send(connection.conn, encode(response))

    def _subscribe_refusal(
        self, connection: _Connection, subscriber: _Subscriber, topic: str
    ) -> RemoteProtocolError | None:
        """Why ``subscriber`` may not subscribe to ``topic`` (its token, the per-connection limit), if so."""
        limit = self._config.limits.max_subscriptions_per_connection
        refusal = _check_subscribe(connection.scope, topic)
        if refusal is None and topic not in subscriber.topics and len(subscriber.topics) >= limit:
            refusal = RemoteProtocolError(
                f"this connection already holds {limit} subscriptions", code=ErrorCode.TOO_MANY_SUBSCRIPTIONS
            )
        return refusal

    # -- init and authentication ---------------------------------------------------------------------------

    def _on_init(self, connection: _Connection, packet: Init, now: float) -> None:
        # Failures count per address *and* session: a client mistyping one session's password must not
        # lock anyone out of another (the address alone is shared behind a NAT).
        key = self._throttle_key(connection, packet)
        connection.scope = None  # an earlier refused init may have left one
        if key is not None and (retry_at := self._throttle.retry_at(key, now)) is not None:
            message = f"too many failed attempts: retry in {retry_at - now:.1f} s"
            self._refuse_auth(connection, ErrorCode.AUTH_THROTTLED, message, now)
            return
        session = self._sessions.get(packet.session_name)
        if packet.token is not None:
            refusal = self._check_token(connection, session, packet, now)
            if refusal is None:
                assert session is not None
                self._admit(connection, session, packet, now)
                return
            if key is not None and refusal.code is ErrorCode.INVALID_TOKEN:
                self._throttle.record_failure(key, now)
            _log.info(
                "connection %d from %r: token refused: %s", connection.conn, connection.peer, refusal.message
            )
            self._refuse_auth(connection, refusal.code, refusal.message, now)
            return
        password = packet.password or ""
        password_hash = session.password if session is not None else self._decoy_hash()
        if session is not None and password_hash.verify_cached(password):
            self._admit(connection, session, packet, now)
        elif not self._offload:
            ok = password_hash.verify(password)  # the decoy too: the same scrypt either way
            self._verified(connection, packet, ok and session is not None, now)
        elif self._verifying >= self._config.limits.max_pending_verifications:
            message = "too many logins are being verified: retry shortly"
            self._refuse_init(connection, ErrorCode.SERVER_BUSY, message)
        else:
            # scrypt would stall every connection: the adapter runs it in a worker and reports back.
            check = PasswordCheck(connection.conn, password_hash, password)
            self._verifying += 1
            connection.verifying = (check, packet)
            self.output.verifications.append(check)

    @staticmethod
    def _throttle_key(connection: _Connection, packet: Init) -> tuple[str, str, str] | None:
        peer = connection.peer
        return ("init", packet.session_name, throttle_key(peer)) if peer else None

    def is_verifying(self, conn: int) -> bool:
        """Whether ``conn``'s ``init`` waits for its password check (:meth:`verification_done`)."""
        connection = self._connections.get(conn)
        return connection is not None and connection.verifying is not None

    def verification_done(self, check: PasswordCheck, ok: bool, now: float) -> None:
        """The result of a check from ``output.verifications``: finish (or refuse) its ``init``.

        Ignored if its connection is gone or the check is not the one it waits for. A session dropped
        meanwhile makes the check fail; one whose password changed meanwhile (dropped and created again, or
        written by another node of a cluster) is checked again, against its current password.
        """
        self._verifying -= 1
        connection = self._connections.get(check.conn)
        if connection is None or connection.verifying is None or connection.verifying[0] is not check:
            return
        packet = connection.verifying[1]
        connection.verifying = None
        session = self._sessions.get(packet.session_name)
        if session is not None and session.password is not check.password_hash:
            # The session's password hash changed during the check (another node of a cluster wrote the
            # session, perhaps with the same password under another salt): check again against it.
            again = PasswordCheck(connection.conn, session.password, packet.password or "")
            self._verifying += 1
            connection.verifying = (again, packet)
            self.output.verifications.append(again)
            return
        ok = ok and session is not None
        if ok:
            check.password_hash.remember(packet.password or "")
        self._verified(connection, packet, ok, now)

    def _verified(self, connection: _Connection, packet: Init, ok: bool, now: float) -> None:
        session = self._sessions.get(packet.session_name)
        if not ok or session is None:
            peer = connection.peer
            key = self._throttle_key(connection, packet)
            if key is not None:
                self._throttle.record_failure(key, now)
            _log.info(
                "connection %d from %r: failed init into %r", connection.conn, peer, packet.session_name
            )
            self._refuse_auth(connection, ErrorCode.AUTH_FAILED, "unknown session or wrong password", now)
            return
        self._admit(connection, session, packet, now)

    def _admit(self, connection: _Connection, session: _Session, packet: Init, now: float) -> None:
        """The password is right: the remaining ``init`` checks (suspended, connection limit), then join."""
        if session.suspended:
            self._refuse_init(connection, ErrorCode.SESSION_SUSPENDED, "the session is suspended")
            return
        if self._shared and packet.client_id is not None and not self._store_ok:
            # Its state lives in the engine, which this node cannot reach: another node can serve it.
            self._refuse_init(connection, ErrorCode.CLUSTER_UNAVAILABLE, "the node has lost the cluster")
            return
        resumed = session.clients.get(packet.client_id) if packet.client_id is not None else None
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
        if connection.scope is not None:  # closed at the token's exp (4007), on the core's clock
            self._deadlines.arm(connection, connection.scope.expires_at - self._epoch_offset)
        self.metrics.inc("inits", session.name)
        self._send(connection.conn, encode(InitResponse(True, session.name)))
        self.output.initialised.append(connection.conn)
        session.attach(connection, packet.client_id, packet.persistent, now)

    def _check_token(
        self, connection: _Connection, session: _Session | None, packet: Init, now: float
    ) -> RemoteProtocolError | None:
        """Verify ``packet.token`` for ``session`` and keep its scope on ``connection``; or why not.

        An unknown session gets the answer a forged token gets, so tokens do not tell which names exist.
        """
        assert packet.token is not None
        if packet.password is not None:
            return RemoteProtocolError("send password or token, not both", code=ErrorCode.INVALID_FRAME)
        if session is None:
            return RemoteProtocolError(
                "the token does not verify for this session", code=ErrorCode.INVALID_TOKEN
            )
        try:
            scope = verify_token(
                packet.token, session.token_key, now + self._epoch_offset, session=session.name
            )
        except RemoteProtocolError as exc:
            return exc
        if scope.client_id is not None and packet.client_id != scope.client_id:
            message = f"the token binds clientId {scope.client_id!r}"
            return RemoteProtocolError(message, code=ErrorCode.CLIENT_ID_MISMATCH)
        connection.scope = scope
        return None

    def _decoy_hash(self) -> PasswordHash:
        """What an unknown session name is verified against (the same scrypt, always failing), so that
        timing does not tell which sessions exist."""
        if self._decoy is None:
            self._decoy = self._hash(base64.b64encode(self._random(SECRET_KEY_BYTES)).decode("ascii"))
        return self._decoy

    def _refuse_init(self, connection: _Connection, code: ErrorCode, message: str) -> None:
        self._count_refusal(connection, code, message)
        self.metrics.inc("auth_failures", code.value)
        self._send(connection.conn, encode(InitResponse(False, error=message, code=code)))

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
        """Do whatever fell due: retries, expiries, idle sessions, throttle resets.

        A bug in one session's timers is contained to that session: logged with its traceback, counted
        in ``internal_errors``, and the session tried again one ``retry_interval`` later (not at once, so a
        bug that repeats cannot make the adapter spin), while every other due session still runs.
        """
        self._throttle.handle_timeout(now)
        for key in self._deadlines.pop_due(now):
            if isinstance(key, _Connection):
                if self._connections.get(key.conn) is key and key.session is not None:
                    self._disconnect(key, CloseCode.TOKEN_EXPIRED, "the token expired", now)
                continue
            session = key
            if self._sessions.get(session.name) is not session:
                continue
            try:
                self._on_session_due(session, now)
            except Exception:
                _log.exception("session %r: internal error in its timers; retrying them later", session.name)
                self.metrics.inc("internal_errors")
                self._deadlines.arm_earlier(session, now + session.settings.retry_interval)
        self._queue_settled()

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
        token_key: str | None = None,
    ) -> str:
        """Create a session; returns its secret key (generated unless given), which drop and suspend need.

        ``token_key`` (base64 of 32 bytes; generated unless given, read it with :meth:`token_key`) signs the
        session's scoped tokens.

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
        key = self._random(TOKEN_KEY_BYTES) if token_key is None else decode_token_key(token_key)
        if secret_key is None:
            secret_key = base64.urlsafe_b64encode(self._random(SECRET_KEY_BYTES)).rstrip(b"=").decode("ascii")
        self._check_store()
        self._sessions[name] = session = _Session(
            name,
            self._hash(password),
            self._hash(secret_key),
            settings if settings is not None else self._config.default_session_settings,
            token_key=key,
            context=self._context,
            now=now,
        )
        if self._journal is not None:
            self._journal.put(session)
            self._journal.changes += 1
        self.metrics.inc("sessions_created")
        _log.info("session %r created", name)
        return secret_key

    def configure_session(
        self,
        name: str,
        password: str,
        now: float,
        settings: SessionSettings | None = None,
        *,
        secret_key: str | None = None,
        token_key: str | None = None,
    ) -> None:
        """:meth:`create_session`, or bring an existing (restored) session in line with its configuration.

        A session the config file defines and the store restored keeps its messages and subscribers; the
        file decides its password and settings, and its secret and token keys where the file gives them.
        """
        session = self._sessions.get(name)
        if session is None:
            self.create_session(name, password, now, settings, secret_key=secret_key, token_key=token_key)
            return
        limits = self._config.limits
        _check_length("password", password, limits.max_password_length)
        if not session.password.verify(password):
            session.password = self._hash(password)
        if secret_key is not None and not session.secret.verify(secret_key):
            _check_length("secret key", secret_key, limits.max_password_length)
            session.secret = self._hash(secret_key)
        if token_key is not None:
            session.token_key = decode_token_key(token_key)
        session.settings = settings if settings is not None else self._config.default_session_settings
        if self._journal is not None:
            self._journal.put(session)

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

    def token_key(self, name: str) -> str:
        """The session's token key, base64 (for the ``createSession`` answer)."""
        session = self._sessions.get(name)
        if session is None:
            raise UnknownSessionError(f"no session named {name!r}")
        return base64.b64encode(session.token_key).decode("ascii")

    def rotate_token_key(self, name: str, password: str, secret_key: str, now: float) -> str:
        """Replace the session's token key with a fresh one (returned, base64): tokens signed with the old
        key no longer ``init``, and connections that authenticated with one are closed with 4008."""
        session = self._authorised(name, password, secret_key)
        self._check_store()
        session.token_key = self._random(TOKEN_KEY_BYTES)
        if self._journal is not None:
            self._journal.put(session)
            self._journal.changes += 1
        closed = self._close_token_connections(session, now)
        self._queue_settled()  # their deliveries were given up
        self.metrics.inc("token_key_rotations", name)
        _log.info("session %r: token key rotated (%d token connection(s) closed)", name, closed)
        return base64.b64encode(session.token_key).decode("ascii")

    def _close_token_connections(self, session: _Session, now: float) -> int:
        """The session's token key changed: close (4008) the connections its old tokens opened; how many."""
        holders = [connection for connection in session.connections if connection.scope is not None]
        for connection in holders:
            self._disconnect(connection, CloseCode.TOKEN_REVOKED, "the session's token key was rotated", now)
        return len(holders)

    def drop_session(self, name: str, password: str, secret_key: str, now: float) -> None:
        """Drop a session: close its connections with 4001 and free all its state and metrics series."""
        session = self._authorised(name, password, secret_key)
        self._check_store()
        self._drop(session, "dropped", CloseCode.SESSION_DROPPED)

    def _drop(self, session: _Session, reason: str, code: CloseCode, *, journal: bool = True) -> None:
        del self._sessions[session.name]
        if self._journal is not None and journal:
            self._journal.drop(session, session.saved)
            self._journal.changes += 1
        self._deadlines.cancel(session)
        connections = list(session.connections)
        for connection in connections:
            del self._connections[connection.conn]
            if connection.scope is not None:
                self._deadlines.cancel(connection)
        self.metrics.forget_session(session.name)
        self.metrics.inc("sessions_dropped", reason)
        _log.info("session %r %s (%d connection(s) closed)", session.name, reason, len(connections))
        closes = self.output.closes
        for connection in connections:
            closes.append((connection.conn, code, f"session {reason}"))

    def drop_session_as_admin(self, name: str, now: float) -> None:
        """:meth:`drop_session` for a caller with admin rights (the web console): no session secrets."""
        self._check_store()
        self._drop(self._existing(name), "dropped", CloseCode.SESSION_DROPPED)

    def suspend_session(self, name: str, password: str, secret_key: str, suspend: bool, now: float) -> None:
        """Suspend a session (no new inits, no delivery, publishes refused) or resume it."""
        self._set_suspended(self._authorised(name, password, secret_key), suspend, now)

    def suspend_session_as_admin(self, name: str, suspend: bool, now: float) -> None:
        """:meth:`suspend_session` for a caller with admin rights (the web console): no session secrets."""
        self._set_suspended(self._existing(name), suspend, now)

    def _set_suspended(self, session: _Session, suspend: bool, now: float) -> None:
        self._check_store()
        if self._journal is not None and session.suspended != suspend:
            self._journal.put(session)
            self._journal.changes += 1
        name = session.name
        session.set_suspended(suspend, now)  # resuming may close slow consumers, settling messages
        self._queue_settled()
        _log.info("session %r %s", name, "suspended" if suspend else "resumed")

    def session_names(self) -> list[str]:
        return sorted(self._sessions)

    def session_settings(self, name: str) -> SessionSettings | None:
        """The session's delivery settings (``None``: no such session)."""
        session = self._sessions.get(name)
        return session.settings if session is not None else None

    def health(self) -> tuple[int, int]:
        """``(sessions, connections)`` in O(1), for ``/healthz`` (:meth:`stats` walks every session)."""
        return len(self._sessions), len(self._connections)

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
            backlogged_deliveries=sum(s.backlogged_deliveries for s in values),
        )


def _session_record(session: _Session) -> SessionRecord:
    return SessionRecord(
        session.name,
        session.password.encode(),
        session.secret.encode(),
        session.token_key,
        session.settings,
        session.suspended,
    )


_new_tuple: Final = tuple.__new__
"""Builds a NamedTuple record from a tuple of its fields in one C call (hot path of a store batch)."""


def _message_record(session: str, message: _Message, offset: float) -> MessageRecord:
    p = message.publish
    return _new_tuple(
        MessageRecord,
        (
            session, p.message_id, message.seq, p.topic, p.data, p.hash, p.timestamp, p.encoding,
            message.expires_at + offset, message.size,
        ),
    )  # fmt: skip


def _stored_message(record: MessageRecord, offset: float) -> _Message:
    """A message read back from the store (no publisher: nobody waits for its ``ack_received``)."""
    encoding = _encoding(record.encoding)
    publish = Publish(record.topic, record.data, record.hash, record.timestamp, record.message_id, encoding)
    message = _Message(publish, record.expires_at - offset, None)
    message.saved = True
    message.seq = record.seq
    payload = encode_message(
        record.topic, record.data, record.hash, record.timestamp, record.message_id, encoding
    )
    message.frame_size = len(encode_text_frame(payload))
    return message


def _encoding(value: str) -> Encoding:
    if value not in ("text", "binary"):
        raise ValueError(f"unknown message encoding {value!r} in the store")
    return cast(Encoding, value)


def _holds(delivery: _Delivery, message_id: str) -> bool:
    """Whether ``delivery`` (of ``message_id``) is still owed: in its subscriber's window or backlog."""
    subscriber = delivery.subscriber
    return subscriber.inflight.get(message_id) is delivery or subscriber.backlog.get(message_id) is delivery


def _check_publish(scope: TokenScope | None, topic: str) -> None:
    """Raise the refusal of a publish to ``topic``: a wildcard in it, or outside the token's scope."""
    check_topic(topic)
    if scope is not None and not scope.may_publish(topic):
        raise RemoteProtocolError(
            f"the token does not grant publishing to {topic[:64]!r}", code=ErrorCode.NOT_ALLOWED
        )


def _check_subscribe(scope: TokenScope | None, topic_filter: str) -> RemoteProtocolError | None:
    """Why subscribing to ``topic_filter`` is refused (malformed, or outside the token's scope), if it is."""
    try:
        check_filter(topic_filter)
    except RemoteProtocolError as exc:
        return exc
    if scope is not None and not scope.may_subscribe(topic_filter):
        message = f"the token does not grant subscribing to {topic_filter[:64]!r}"
        return RemoteProtocolError(message, code=ErrorCode.NOT_ALLOWED)
    return None


def _check_length(what: str, value: str, limit: int) -> None:
    if not value or len(value) > limit:
        raise LocalProtocolError(f"{what} must be 1 to {limit} characters, got {len(value)}")
