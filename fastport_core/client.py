"""The client core: one sans-IO object that is a fastport client for its whole life, across reconnections.

Theory of operation
-------------------
A :class:`ClientCore` holds everything that must survive a broken connection: the subscribed topics, the
publishes the server has not confirmed yet (in the order they were made), the window of message ids
already handed to the application, and the reconnect policy (:mod:`.backoff`). It drives one transport
connection at a time, through the opening handshake (:mod:`.handshake`), the WebSocket layer
(:mod:`.websocket`: framing, ping/pong keepalive, the closing handshake) and the JSON protocol
(:mod:`.protocol`); the payloads are sealed and opened by an envelope suite (:mod:`.crypto`).

The adapter (anyio or threads) only moves bytes and time, and follows the state:

* ``DISCONNECTED``: no transport, dial now: call :meth:`~ClientCore.start_connection`, then open the socket.
* ``CONNECTING`` / ``INITIALISING`` / ``READY``: a transport is open; feed it with
  :meth:`~ClientCore.receive_data`, write :meth:`~ClientCore.data_to_send`, report a failure with
  :meth:`~ClientCore.connection_lost`.
* ``WAITING``: no transport; :meth:`~ClientCore.handle_timeout` moves to ``DISCONNECTED`` at
  :meth:`~ClientCore.reconnect_at`.
* ``CLOSED``: the end; once :meth:`~ClientCore.should_close_transport` is true nothing more will happen.

Every transition is a row of :data:`TRANSITIONS` (the docs print that table), and every time-driven action
(keepalive, connect timeout, publish retries, the reconnect time) is behind :meth:`~ClientCore.next_deadline`
and :meth:`~ClientCore.handle_timeout`. What the application must see comes out of
:meth:`~ClientCore.events` as frozen dataclasses.

Delivery semantics (docs/clients.md, "Delivery guarantees")
----------------------------------------------------------
* A publish stays in the pending table until its ``publish_response``: it is sent when the client is
  ``READY``, re-sent every ``publish_retry_interval`` while connected, and re-sent after every reconnection,
  always with the same ``messageId`` (the server's dedupe window turns a duplicate into a second
  confirmation). The application stops waiting with :meth:`~ClientCore.cancel_publish`; the server may
  still have received it.
* A publish the server refuses for a passing reason (``session_suspended``, ``session_full``) stays pending
  and is retried like an unanswered one; only other refusals end it with ``PublishRefused``.
* A publish is re-sent for at most ``publish_give_up_after`` seconds after its first send (then
  :class:`PublishExpired`): below the server's ``dedupe_ttl``, so no re-send reaches a server that forgot
  its id and would fan it out a second time.
* A ``message`` is ACKed every time it arrives (so the server stops re-sending it), but handed to the
  application only once per ``(topic, messageId)`` within a bounded window: at least once on the wire,
  once to the application. A message that fails verification is ACKed and counted, never delivered.
* With ``ack_when_consumed``, a message handed over is ACKed only by :meth:`~ClientCore.finish_message`
  (the application is done with it); re-sends meanwhile are dropped un-ACKed, and one the application
  failed on is forgotten, so the server's next re-send is handed over again: at least once to the
  application.

Refused ``init``
----------------
A wrong password or unknown session does not get better by retrying, and retrying would only trip the
server's auth throttle, so such a refusal is fatal: :class:`AuthRefused` then :class:`GaveUp`, state
``CLOSED``. Only refusals that are transient by definition (``auth_throttled``, ``session_suspended``,
``too_many_connections``, and ``token_expired`` when the token comes from a provider, which is asked
again for every connection) are retried with the usual backoff (and ``reconnect_give_up_after``). An
``error`` frame answering ``init`` (the server could not even parse it, e.g. a password over its limit)
counts as a refusal too: it is the only frame the client has sent on that connection.

Tokens
------
``token=`` replaces ``password=``: a str, or a zero-argument callable that returns one and is called for
every connection's ``init``, so an application can hand out fresh tokens as old ones expire. A connection
the server closes because its token expired (4007) or its key was rotated (4008) reconnects as any lost
connection does, with a new ``init`` (and so a new token from the provider). A provider that raises fails
that connection attempt (retried with backoff).

Filters
-------
A subscription may be a topic filter (``+``, ``#``; see :mod:`~fastport_core.topics`). A message is
handed to the application once, whatever number of this client's subscriptions match it;
:meth:`ClientCore.subscriptions_for` tells the adapters which subscriptions it belongs to.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final

from .backoff import Backoff
from .config import ClientConfig, Limits
from .dedupe import DedupeWindow
from .errors import CloseCode, ErrorCode, IntegrityError, LocalProtocolError, RemoteProtocolError
from .handshake import ClientHandshake
from .keys import SuiteName
from .metrics import Metrics
from .protocol import (
    Ack,
    ErrorPacket,
    Init,
    InitResponse,
    MessagePacket,
    Publish,
    PublishResponse,
    Subscribe,
    SubscribeResponse,
    Unsubscribe,
    UnsubscribeResponse,
    encode,
    parse_server_packet,
)
from .timers import Deadlines
from .topics import check_filter, filter_matches, has_wildcard
from .websocket import TextMessage, WebSocket, WebSocketState

__all__ = [
    "TRANSITIONS",
    "AuthRefused",
    "ClientCore",
    "ClientEvent",
    "ClientInput",
    "ClientState",
    "Connected",
    "Disconnected",
    "GaveUp",
    "IntegrityFailure",
    "MessageReceived",
    "PublishConfirmed",
    "PublishExpired",
    "PublishRefused",
    "ServerError",
    "SubscribeConfirmed",
    "SubscribeRefused",
    "Token",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# States and transitions.

_TRANSIENT_REFUSALS: Final = frozenset(
    {
        ErrorCode.SESSION_SUSPENDED.value,
        ErrorCode.SESSION_FULL.value,
        ErrorCode.STORE_UNAVAILABLE.value,
        ErrorCode.CLUSTER_UNAVAILABLE.value,
    }
)
"""``publish_response`` refusals that pass by themselves: the publish is retried, not failed."""


class ClientState(Enum):
    """Where the client is in its life; the adapter's only question is "do I dial, wait, or stop?"."""

    DISCONNECTED = "disconnected"
    """No transport: the adapter calls ``start_connection`` and dials now (the initial state)."""
    CONNECTING = "connecting"
    """The upgrade request is queued or sent; waiting for ``101 Switching Protocols``."""
    INITIALISING = "initialising"
    """The WebSocket is open and ``init`` sent; waiting for ``init_response``."""
    READY = "ready"
    """Authenticated: subscriptions and publishes flow."""
    WAITING = "waiting"
    """A connection failed; the adapter dials again at ``reconnect_at()`` (``handle_timeout`` says when)."""
    CLOSED = "closed"
    """Closed by the application, refused for good, or given up. Nothing will be dialled again."""


class ClientInput(Enum):
    """What moves the client from one state to another (the middle column of :data:`TRANSITIONS`)."""

    START_CONNECTION = "`start_connection()`"
    UPGRADED = "`101 Switching Protocols` (then `init` is sent)"
    INIT_ACCEPTED = "`init_response` success"
    CONNECTION_FAILED = (
        "connection failed: EOF, `connection_lost()`, keepalive or connect timeout, closed by the server, "
        "upgrade refused, transient `init` refusal"
    )
    GIVE_UP = "fatal `init` refusal, close 4003 (client id taken over), `reconnect_give_up_after` reached"
    RECONNECT_DUE = "`handle_timeout()` at `reconnect_at()`"
    CLOSE = "`close()`"


_S = ClientState
_I = ClientInput
_CONNECTED_STATES: Final = frozenset({_S.CONNECTING, _S.INITIALISING, _S.READY})

TRANSITIONS: Final[Mapping[tuple[ClientState, ClientInput], ClientState]] = {
    (_S.DISCONNECTED, _I.START_CONNECTION): _S.CONNECTING,
    (_S.WAITING, _I.START_CONNECTION): _S.CONNECTING,
    (_S.CONNECTING, _I.UPGRADED): _S.INITIALISING,
    (_S.INITIALISING, _I.INIT_ACCEPTED): _S.READY,
    **{(state, _I.CONNECTION_FAILED): _S.WAITING for state in _S if state in _CONNECTED_STATES},
    **{(state, _I.GIVE_UP): _S.CLOSED for state in _S if state in _CONNECTED_STATES},
    (_S.WAITING, _I.RECONNECT_DUE): _S.DISCONNECTED,
    **{(state, _I.CLOSE): _S.CLOSED for state in _S if state is not _S.CLOSED},
}
"""Every legal ``(state, input) -> next state``; anything else is a :class:`LocalProtocolError`.

Iteration order is the order the docs print (the dict comprehensions follow :class:`ClientState`'s order).
"""

_RETRYABLE_INIT_REFUSALS: Final = frozenset(
    {
        ErrorCode.AUTH_THROTTLED,
        ErrorCode.SESSION_SUSPENDED,
        ErrorCode.TOO_MANY_CONNECTIONS,
        ErrorCode.SERVER_BUSY,
        ErrorCode.CLUSTER_UNAVAILABLE,
    }
)
"""``init`` refusals that may succeed later without any change on the client's side."""

_MAX_TIMESTAMP: Final = 2**53 - 1
"""JavaScript's ``Number.MAX_SAFE_INTEGER``: other clients parse JSON numbers as doubles."""

_TOPIC_LIMITS: Final = Limits()
"""Protocol v1's default bounds. Checking topics against them locally turns what a default server would
answer with an uncorrelated ``error`` frame (so a publish would be retried forever) into an immediate
:class:`LocalProtocolError`."""


# --------------------------------------------------------------------------------------------------------
# Events for the application.


@dataclass(frozen=True, slots=True)
class Connected:
    """``init`` succeeded; the topics were re-subscribed and the pending publishes re-sent."""

    session: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection (or an attempt) failed; the client dials again at ``reconnect_at`` (monotonic)."""

    reason: str
    reconnect_at: float


@dataclass(frozen=True, slots=True)
class GaveUp:
    """The client stopped for good (state ``CLOSED``); unconfirmed publishes are abandoned."""

    reason: str


@dataclass(frozen=True, slots=True)
class AuthRefused:
    """The server refused ``init``; followed by :class:`Disconnected` (transient) or :class:`GaveUp`."""

    error: str
    code: str | None


@dataclass(frozen=True, slots=True)
class SubscribeConfirmed:
    topic: str


@dataclass(frozen=True, slots=True)
class SubscribeRefused:
    """The server refused a subscription; the topic is no longer subscribed (nor re-subscribed)."""

    topic: str
    error: str
    code: str | None


@dataclass(frozen=True, slots=True)
class PublishConfirmed:
    """The server took responsibility for the message (it reached ``delivered_to`` subscribers)."""

    message_id: str
    delivered_to: int


@dataclass(frozen=True, slots=True)
class PublishRefused:
    message_id: str
    error: str
    code: str | None


@dataclass(frozen=True, slots=True)
class PublishExpired:
    """``publish_give_up_after`` passed since the publish was first sent: it is no longer re-sent (a later
    re-send could reach a server that forgot its id, and be fanned out twice). It may have been delivered."""

    message_id: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A verified, decrypted message, handed over once; ``payload`` is ``str`` or ``bytes`` as published."""

    topic: str
    payload: str | bytes
    message_id: str
    timestamp: int


@dataclass(frozen=True, slots=True)
class IntegrityFailure:
    """A received message failed verification or decryption: ACKed and counted, not delivered."""

    topic: str
    message_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``error`` frame: the server could not honour something this client sent. Not fatal."""

    error: str
    code: str


ClientEvent = (
    Connected
    | Disconnected
    | GaveUp
    | AuthRefused
    | SubscribeConfirmed
    | SubscribeRefused
    | PublishConfirmed
    | PublishRefused
    | PublishExpired
    | MessageReceived
    | IntegrityFailure
    | ServerError
)


# --------------------------------------------------------------------------------------------------------
# The core.


def _check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not topic:
        raise LocalProtocolError(f"topic must be a non-empty str, got {topic!r}")
    if len(topic) > _TOPIC_LIMITS.max_topic_length:
        raise LocalProtocolError(f"topic is longer than {_TOPIC_LIMITS.max_topic_length} characters")
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError("topic is not valid Unicode (it holds a lone surrogate)") from None


def _check_timestamp(timestamp: int) -> None:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise LocalProtocolError(f"timestamp must be an int of milliseconds in [0, 2**53), not {timestamp!r}")


Token = str | Callable[[], str]
"""A scoped token for ``init`` (instead of the password), or a zero-argument callable that returns a fresh
one for each connection: the client then re-``init``s by itself when its token expires (close 4007)."""


class ClientCore:
    """A fastport client without IO: bytes, time and application calls in; bytes, deadlines and events out.

    ``key`` is the shared end-to-end key (base64 ``str`` or 32 raw bytes) and is required: payloads are
    always sealed by ``suite``. ``host`` and ``target`` are the upgrade request's ``Host`` header and path.
    ``client_id`` (default: a random one) is sent in every ``init`` so a server can resume this subscriber's
    deliveries after a reconnection; an explicit one also asks for a persistent subscriber (``persistent``
    in ``init``: kept after a clean close, like MQTT's persistent session). ``rng`` only draws reconnect
    jitter (inject one for reproducible tests).
    Configuration errors (bad key, suite, host or target) raise here, not on the first connection.
    """

    def __init__(
        self,
        *,
        session: str,
        password: str | None = None,
        token: Token | None = None,
        key: str | bytes,
        suite: SuiteName = "authenticated",
        host: str,
        target: str = "/",
        config: ClientConfig | None = None,
        client_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(session, str) or not session:
            raise LocalProtocolError("session must be a non-empty str")
        if (password is None) == (token is None):
            raise LocalProtocolError("give password= or token= (exactly one)")
        if password is not None and not isinstance(password, str):
            raise LocalProtocolError("password must be a str")
        if token is not None and not (callable(token) or (isinstance(token, str) and token)):
            raise LocalProtocolError(
                "token must be a non-empty str or a zero-argument callable returning one"
            )
        if client_id is not None and (not isinstance(client_id, str) or not client_id):
            raise LocalProtocolError("client_id must be a non-empty str (or None for a random one)")
        from .crypto import make_suite  # here: the server, which imports this module, never encrypts

        self._suite = make_suite(suite, key)
        ClientHandshake(host, target)  # a throwaway request: a bad host or target fails now, not at dial time
        self._host = host
        self._target = target
        self._config = config = config if config is not None else ClientConfig()
        self._session = session
        self._client_id = client_id if client_id is not None else uuid.uuid4().hex
        # An explicit client id is a request for a persistent subscriber (DESIGN §3.10): the server keeps it
        # after a clean close. A random one is a clean session, released when the client closes.
        self._persistent = client_id is not None
        self._password = password
        self._token = token
        self._backoff = Backoff.from_config(config, rng)
        self.metrics = Metrics()
        """Counters of what this client dropped: integrity failures, invalid or binary server frames."""

        self._state = _S.DISCONNECTED
        self._topics: dict[str, None] = {}  # an ordered set: re-subscribed in subscription order
        self._filters: dict[str, None] = {}  # the subscriptions of _topics that hold a wildcard
        # Topics whose last request to any server was a subscribe: what a server that resumes our client id
        # may still route to us. Those no longer in _topics are unsubscribed after the next init.
        self._server_topics: dict[str, None] = {}
        self._pending: dict[str, bytes] = {}  # messageId -> encoded publish packet, in publish order
        self._seen: DedupeWindow[tuple[str, str], bool] = DedupeWindow(config.dedupe_window)
        # ack_when_consumed: messages handed to the application and not yet finished (finish_message). Kept
        # apart from the window, which could evict them: a redelivery of one is neither ACKed nor handed out.
        self._handling: set[tuple[str, str]] = set()
        self._give_up: Deadlines[str] = Deadlines()  # messageId -> first send + publish_give_up_after
        self._events: list[ClientEvent] = []
        self._out = bytearray()  # bytes not owned by a live WebSocket: the upgrade request, a last Close

        # The current transport (at most one of handshake / ws is set) and its timers.
        self._handshake: ClientHandshake | None = None
        self._ws: WebSocket | None = None
        self._connect_deadline: float | None = None
        self._retries: Deadlines[str] = Deadlines()
        self._outstanding: Counter[str] = Counter()  # topic -> (un)subscribe requests awaiting an answer
        self._reconnect_at: float | None = None

    # -- views -------------------------------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def session(self) -> str:
        return self._session

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def topics(self) -> tuple[str, ...]:
        """Subscribed topics, in subscription order (the order they are re-subscribed in)."""
        return tuple(self._topics)

    @property
    def pending_publishes(self) -> tuple[str, ...]:
        """Message ids of the unconfirmed publishes, in publish order (the order they are re-sent in)."""
        return tuple(self._pending)

    def subscriptions_for(self, topic: str) -> list[str]:
        """The subscriptions (``topic`` itself, then matching filters) a message on ``topic`` is for."""
        found = [topic] if topic in self._topics else []
        if self._filters:
            found.extend(f for f in self._filters if filter_matches(f, topic))
        return found

    def reconnect_at(self) -> float | None:
        """When ``WAITING``: the monotonic time the adapter dials again (``handle_timeout`` fires then)."""
        return self._reconnect_at

    # -- the adapter's side ------------------------------------------------------------------------------

    def start_connection(self, now: float) -> None:
        """The adapter is dialling (call it just before opening the socket): queue the upgrade request.

        ``connect_timeout`` runs from here to a successful ``init_response``, so a dial that hangs is cut
        short by :meth:`handle_timeout` too. A dial that fails is reported with :meth:`connection_lost`.
        """
        self._move(_I.START_CONNECTION)
        self._reconnect_at = None
        self._handshake = ClientHandshake(self._host, self._target)
        self._out = bytearray(self._handshake.request)  # what an earlier transport left is not for this one
        self._connect_deadline = now + self._config.connect_timeout

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes read from the transport (``b""`` at end of file). Never raises for what the server sent."""
        if self._handshake is not None:
            self._receive_handshake(data, now)
        elif self._ws is not None:
            self._receive_websocket(self._ws, data, now)
        # else: no live transport (bytes racing a close we decided): nothing to do with them.

    def connection_lost(self, now: float, reason: str = "") -> None:
        """The transport failed or closed on its own (or the dial failed). Ignored when none is live."""
        if self._handshake is None and self._ws is None:
            return
        self._fail(now, f"connection lost: {reason}" if reason else "connection lost")

    def data_to_send(self) -> bytes:
        """Everything to write to the transport, as one buffer (empties the queue)."""
        if self._ws is not None:
            self._out += self._ws.data_to_send()
        data = bytes(self._out)
        self._out.clear()
        return data

    def should_close_transport(self) -> bool:
        """True once the current transport is finished and :meth:`data_to_send` was drained: close it.

        Also true whenever there is no live transport (``DISCONNECTED``, ``WAITING``, ``CLOSED``).
        """
        return self._handshake is None and self._ws is None and not self._out

    def events(self) -> list[ClientEvent]:
        """The events produced since the last call, in order (drains them)."""
        events = self._events
        self._events = []
        return events

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timeout` must run: keepalive or close timeout, connect timeout,
        a publish retry or give-up, or the reconnect time. ``None``: nothing is timed."""
        candidates = [self._connect_deadline, self._reconnect_at, self._retries.next(), self._give_up.next()]
        if self._ws is not None:
            candidates.append(self._ws.next_deadline())
        return min((when for when in candidates if when is not None), default=None)

    def handle_timeout(self, now: float) -> None:
        """Do what fell due at ``now``. Calling it early or repeatedly is harmless."""
        if self._ws is not None:
            self._ws.handle_timeout(now)
            self._check_websocket_closed(now)
        if self._connect_deadline is not None and now >= self._connect_deadline:
            timeout = self._config.connect_timeout
            reason = f"no successful init within connect_timeout ({timeout:g} s)"
            self._fail(now, reason, close_code=CloseCode.HANDSHAKE_TIMEOUT)
        for message_id in self._give_up.pop_due(now):  # before the retries: never re-send one past it
            if self._pending.pop(message_id, None) is not None:
                self._retries.cancel(message_id)
                logger.info("publish %r unconfirmed after publish_give_up_after: not re-sent", message_id)
                self._events.append(PublishExpired(message_id))
        if self._state is _S.READY:
            for message_id in self._retries.pop_due(now):
                self._send_publish(message_id, now)
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            self._move(_I.RECONNECT_DUE)

    # -- the application's side --------------------------------------------------------------------------

    def publish(self, topic: str, payload: str | bytes, *, now: float, timestamp: int) -> str:
        """Seal ``payload`` for ``topic`` and send it (now if ``READY``, else once connected); return its id.

        ``timestamp`` is the wall-clock time in integer milliseconds (bound by the MAC of the
        ``authenticated`` suite). The publish is re-sent until the server confirms or refuses it
        (:class:`PublishConfirmed` / :class:`PublishRefused`) or :meth:`cancel_publish` is called. Raises
        :class:`LocalProtocolError` on a closed client, a bad topic, payload or timestamp, a frame over
        ``max_message_size``, or ``max_pending_publishes`` unconfirmed publishes.
        """
        self._check_not_closed("publish")
        _check_topic(topic)
        if has_wildcard(topic):
            raise LocalProtocolError(f"a publish topic may not contain '+' or '#': {topic!r}")
        _check_timestamp(timestamp)
        limit = self._config.max_pending_publishes
        if len(self._pending) >= limit:
            raise LocalProtocolError(f"{limit} publishes are already waiting for confirmation")
        message_id = uuid.uuid4().hex
        sealed = self._suite.seal(
            session=self._session, topic=topic, message_id=message_id, timestamp=timestamp, payload=payload
        )
        packet = encode(Publish(topic, sealed.data, sealed.hash, timestamp, message_id, sealed.encoding))
        if len(packet) > self._config.max_message_size:
            # The server would close the connection (1009) and the resend after reconnecting would too.
            raise LocalProtocolError(
                f"the sealed publish is {len(packet)} bytes, over max_message_size "
                f"({self._config.max_message_size})"
            )
        self._pending[message_id] = packet
        if self._state is _S.READY:
            self._send_publish(message_id, now)
        return message_id

    def cancel_publish(self, message_id: str) -> None:
        """Stop re-sending a publish (the application gave up waiting). Unknown ids are ignored.

        The server may already have it: a cancelled publish may still be delivered.
        """
        self._pending.pop(message_id, None)
        self._retries.cancel(message_id)
        self._give_up.cancel(message_id)

    def finish_message(self, topic: str, message_id: str, *, handled: bool, now: float) -> None:
        """With ``ack_when_consumed``: the application is done with a :class:`MessageReceived`.

        ``handled``: ACK it (now if ``READY``; otherwise its next redelivery is ACKed and dropped). Not
        ``handled`` (a handler raised): forget it un-ACKed, so the server's next re-send (its retry, or the
        resume after a reconnection) is handed over again. Unknown or finished messages are ignored.
        """
        key = (topic, message_id)
        if key not in self._handling:
            return
        self._handling.remove(key)
        if handled:
            self._seen.add(key, True, now)
            if self._state is _S.READY:
                self._send(encode(Ack(topic, message_id)))

    def subscribe(self, topic: str) -> None:
        """Receive ``topic`` from now on, and after every reconnection (answer: :class:`SubscribeConfirmed`
        or :class:`SubscribeRefused`). Subscribing again re-sends the request."""
        self._check_not_closed("subscribe")
        _check_topic(topic)
        if has_wildcard(topic):
            try:
                check_filter(topic)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(exc.message) from None
            self._filters[topic] = None
        self._topics[topic] = None
        if self._state is _S.READY:
            self._send_topic_request(Subscribe(topic))

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic`` (effective at once: later messages for it are ACKed and dropped)."""
        self._check_not_closed("unsubscribe")
        if topic not in self._topics:
            return
        del self._topics[topic]
        self._filters.pop(topic, None)
        if self._state is _S.READY:
            self._send_topic_request(Unsubscribe(topic))

    def close(self, now: float) -> None:
        """Close for good: WebSocket close 1000 (waiting for the server's answer), no reconnection.

        Idempotent. Unconfirmed publishes are abandoned (the server may have some of them).
        """
        if self._state is _S.CLOSED:
            return
        self._move(_I.CLOSE)
        self._reconnect_at = None
        self._give_up = Deadlines()  # abandoned: nothing of them is due any more
        if self._ws is not None and self._ws.is_open:
            # Keep the WebSocket until the server answers (or close_timeout): closing the socket with
            # unread data could reset the connection and lose what we sent last.
            self._ws.close(CloseCode.NORMAL, "client closing", now)
            self._stop_connection_timers()
        else:
            self._drop_transport()

    # -- transport internals -----------------------------------------------------------------------------

    def _init_payload(self) -> bytes:
        """This connection's ``init``: the password, or a token (asked of the provider each time)."""
        if self._token is None:
            return encode(Init(self._session, self._password, self._client_id, self._persistent))
        token = self._token() if callable(self._token) else self._token
        if not isinstance(token, str) or not token:
            raise LocalProtocolError(
                f"the token provider returned {type(token).__name__}, not a non-empty str"
            )
        return encode(
            Init(self._session, client_id=self._client_id, persistent=self._persistent, token=token)
        )

    def _move(self, event: ClientInput) -> None:
        try:
            self._state = TRANSITIONS[self._state, event]
        except KeyError:
            raise LocalProtocolError(f"{event.value} is not possible in state {self._state.name}") from None

    def _check_not_closed(self, operation: str) -> None:
        if self._state is _S.CLOSED:
            raise LocalProtocolError(f"cannot {operation}: the client is closed")

    def _receive_handshake(self, data: bytes, now: float) -> None:
        assert self._handshake is not None
        try:
            leftover = self._handshake.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(now, f"WebSocket handshake failed: {exc.message}")
            return
        if leftover is None:
            return
        self._handshake = None
        config = self._config
        ws = self._ws = WebSocket(
            client=True,
            max_message_size=config.max_message_size,
            now=now,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        self._move(_I.UPGRADED)
        try:
            init = self._init_payload()
        except Exception as exc:  # the application's token provider: its failure fails this attempt only
            logger.warning("token provider failed: %r", exc)
            self._fail(now, f"token provider failed: {exc!r}", close_code=CloseCode.NORMAL)
            return
        ws.send_text(init)
        if leftover:
            self._receive_websocket(ws, leftover, now)

    def _receive_websocket(self, ws: WebSocket, data: bytes, now: float) -> None:
        for message in ws.receive_data(data, now):
            if self._ws is not ws or self._state not in _CONNECTED_STATES:
                break  # the connection ended (or the application closed) part-way through the chunk
            if isinstance(message, TextMessage):
                self._on_text(message.text, now)
            else:
                self.metrics.inc("binary_frames")
                logger.warning("ignoring a binary WebSocket message from the server (not part of v1)")
        self._check_websocket_closed(now)

    def _check_websocket_closed(self, now: float) -> None:
        """React to the WebSocket reaching CLOSED: server close, EOF, protocol violation, keepalive death."""
        ws = self._ws
        if ws is None or ws.state is not WebSocketState.CLOSED:
            return
        if self._state is _S.CLOSED:  # the closing handshake we started is complete
            self._drop_transport()
            return
        code = ws.close_code
        reason = f"connection closed ({code}{': ' + ws.close_reason if ws.close_reason else ''})"
        if code == CloseCode.REPLACED:
            # Someone else connected with our client id. Reconnecting would replace them in turn, and the
            # two would evict each other forever.
            self._fail(now, f"{reason}: another connection uses client id {self._client_id!r}", fatal=True)
        else:
            self._fail(now, reason)

    def _fail(self, now: float, reason: str, *, fatal: bool = False, close_code: int | None = None) -> None:
        """End the current connection; then wait for the next attempt, or give up."""
        ws = self._ws
        if ws is not None and ws.is_open and close_code is not None:
            ws.close(close_code, reason, now)  # a courtesy: the transport is closed right after it
        self._drop_transport()
        if self._state is _S.CLOSED:
            return
        if not fatal:
            reconnect_at = self._backoff.schedule(now)
            if reconnect_at is not None:
                logger.info("disconnected (%s); reconnecting in %.3f s", reason, reconnect_at - now)
                self._move(_I.CONNECTION_FAILED)
                self._reconnect_at = reconnect_at
                self._events.append(Disconnected(reason, reconnect_at))
                return
            failing_since = self._backoff.failing_since
            assert failing_since is not None  # schedule() just recorded the failure
            reason = f"{reason}; giving up after {now - failing_since:g} s of failed connections"
        # INFO, not WARNING: the application layer (client_app) reports a give-up to the application as an
        # exception or a state change, and logs it there when nobody is waiting for it.
        logger.info("giving up: %s", reason)
        self._move(_I.GIVE_UP)
        self._give_up = Deadlines()
        self._events.append(GaveUp(reason))

    def _drop_transport(self) -> None:
        """Forget the current transport, keeping a WebSocket's last bytes (a Close frame) for the adapter.

        An unsent upgrade request is discarded: the transport it was for is being closed.
        """
        if self._ws is not None:
            self._out += self._ws.data_to_send()
        elif self._handshake is not None:
            self._out.clear()
        self._handshake = None
        self._ws = None
        self._outstanding.clear()
        self._stop_connection_timers()

    def _stop_connection_timers(self) -> None:
        self._connect_deadline = None
        self._retries = Deadlines()

    # -- protocol internals ------------------------------------------------------------------------------

    def _send(self, payload: bytes) -> None:
        assert self._ws is not None
        self._ws.send_text(payload)

    def _send_publish(self, message_id: str, now: float) -> None:
        packet = self._pending.get(message_id)
        if packet is not None:
            self._send(packet)
            self._retries.arm(message_id, now + self._config.publish_retry_interval)
            self._give_up.arm_earlier(message_id, now + self._config.publish_give_up_after)  # the first send

    def _send_topic_request(self, request: Subscribe | Unsubscribe) -> None:
        topic = request.topic
        self._outstanding[topic] += 1
        if isinstance(request, Subscribe):
            self._server_topics[topic] = None
        else:
            self._server_topics.pop(topic, None)
        self._send(encode(request))

    def _answers_latest_request(self, topic: str) -> bool:
        """Count one (un)subscribe answer for ``topic``; true if no later request for it awaits an answer."""
        remaining = self._outstanding[topic] - 1
        if remaining > 0:
            self._outstanding[topic] = remaining
            return False
        del self._outstanding[topic]
        return True

    def _on_text(self, text: str, now: float) -> None:
        try:
            packet = parse_server_packet(text)
        except RemoteProtocolError as exc:
            self.metrics.inc("protocol_errors", str(exc.code))
            logger.warning("ignoring an invalid packet from the server: %s", exc.message)
            return
        if self._state is _S.INITIALISING:
            if isinstance(packet, InitResponse) and packet.success:
                self._on_ready(now)
            elif isinstance(packet, InitResponse | ErrorPacket):
                self._on_init_refused(packet.error or "init refused", packet.code, now)
            else:
                logger.warning("ignoring a %s packet received before init_response", type(packet).__name__)
            return
        match packet:
            case MessagePacket():
                self._on_message(packet, now)
            case PublishResponse():
                self._on_publish_response(packet)
            case SubscribeResponse():
                self._on_subscribe_response(packet)
            case UnsubscribeResponse():
                if not packet.success:
                    logger.info("unsubscribe from %r refused: %s", packet.topic, packet.error)
                self._answers_latest_request(packet.topic)
            case ErrorPacket():
                logger.warning("server error %s: %s", packet.code, packet.error)
                self._events.append(ServerError(packet.error, packet.code))
            case InitResponse():
                logger.warning("ignoring an init_response on an initialised connection")

    def _on_ready(self, now: float) -> None:
        self._move(_I.INIT_ACCEPTED)
        self._connect_deadline = None
        self._backoff.reset()
        logger.info("connected to session %r", self._session)
        self._events.append(Connected(self._session))
        for topic in [topic for topic in self._server_topics if topic not in self._topics]:
            self._send_topic_request(Unsubscribe(topic))
        for topic in self._topics:
            self._send_topic_request(Subscribe(topic))
        for message_id in self._pending:
            self._send_publish(message_id, now)

    def _on_init_refused(self, error: str, code: str | None, now: float) -> None:
        self._events.append(AuthRefused(error, code))
        reason = f"init refused: {error}" + (f" ({code})" if code else "")
        retryable = code in _RETRYABLE_INIT_REFUSALS or (
            code == ErrorCode.TOKEN_EXPIRED and callable(self._token)
        )
        self._fail(now, reason, fatal=not retryable, close_code=CloseCode.NORMAL)

    def _on_subscribe_response(self, packet: SubscribeResponse) -> None:
        latest = self._answers_latest_request(packet.topic)
        if packet.success:
            self._events.append(SubscribeConfirmed(packet.topic))
            return
        if latest:  # a later subscribe may still succeed: only the last answer decides
            self._topics.pop(packet.topic, None)
            self._filters.pop(packet.topic, None)
            self._server_topics.pop(packet.topic, None)
        self._events.append(SubscribeRefused(packet.topic, packet.error or "subscribe refused", packet.code))

    def _on_publish_response(self, packet: PublishResponse) -> None:
        if not packet.success and packet.code in _TRANSIENT_REFUSALS and packet.message_id in self._pending:
            # The session is suspended or full *now*: the publish stays pending and its retry timer,
            # armed when it was sent, sends it again. Failing it here would be wrong twice over: the
            # condition passes, and a retry already in flight may be accepted after this answer.
            logger.info("publish %r deferred by the server: %s", packet.message_id, packet.error)
            return
        if self._pending.pop(packet.message_id, None) is None:
            return  # cancelled, or a second confirmation of a publish we re-sent
        self._retries.cancel(packet.message_id)
        self._give_up.cancel(packet.message_id)
        if packet.success:
            self._events.append(PublishConfirmed(packet.message_id, packet.delivered_to))
        else:
            error = packet.error or "publish refused"
            self._events.append(PublishRefused(packet.message_id, error, packet.code))

    def _on_message(self, message: MessagePacket, now: float) -> None:
        key = (message.topic, message.message_id)
        if key in self._handling:
            return  # still with the application: ACKed when it is done with it (finish_message), not before
        subscribed = bool(self.subscriptions_for(message.topic))
        seen = self._seen.get(key, now)
        payload = self._open(message) if subscribed and not seen else None
        # Not handed over (a redelivery, a failed verification, an unsubscribed topic), or by default: ACKed
        # now, since the ACK is what stops the server from re-sending it. With ack_when_consumed, one for no
        # subscription is left to the server's next re-send (the application may subscribe meanwhile).
        manual = self._config.ack_when_consumed
        if not manual or (payload is None and (seen or subscribed)):
            self._send(encode(Ack(message.topic, message.message_id)))
        if payload is None:
            return
        if manual:
            self._handling.add(key)
        else:
            self._seen.add(key, True, now)
        self._events.append(MessageReceived(message.topic, payload, message.message_id, message.timestamp))

    def _open(self, message: MessagePacket) -> str | bytes | None:
        """The verified, decrypted payload; ``None`` (counted, reported) if verification fails."""
        try:
            return self._suite.open(
                session=self._session,
                topic=message.topic,
                message_id=message.message_id,
                timestamp=message.timestamp,
                data=message.data,
                hash=message.hash,
                encoding=message.encoding,
            )
        except IntegrityError as exc:
            # Not remembered as seen: a forged copy must not shadow the genuine message behind it.
            self.metrics.inc("integrity_failures")
            logger.warning(
                "message %r on %r failed verification: %s", message.message_id, message.topic, exc.message
            )
            self._events.append(IntegrityFailure(message.topic, message.message_id, exc.message))
            return None
