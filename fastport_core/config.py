"""Every tunable of the core, with the defaults a production broker starts from.

Values are plain frozen dataclasses so a config file, environment variables and command-line flags can all
be layered into them by the adapters, and so one value can be shared by every connection without copying.
Durations are seconds (floats) inside the core; the admin API and config file speak the original
fastPort's milliseconds and convert at the edge (:meth:`SessionSettings.from_wire`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

from .errors import LocalProtocolError
from .peers import TrustedProxies

__all__ = [
    "DEFAULT_DEDUPE_TTL",
    "ClientConfig",
    "Limits",
    "ServerConfig",
    "SessionSettings",
    "SlowConsumerPolicy",
]


class SlowConsumerPolicy(StrEnum):
    """What happens to an anonymous subscriber (no ``clientId``) that reaches ``max_inflight_per_subscriber``
    un-ACKed deliveries, and to resumable subscribers' backlogs when their session's pending bytes are full.

    A resumable subscriber (``clientId``) is never closed or trimmed for its window: deliveries beyond it
    wait in its backlog and are sent as it ACKs."""

    DISCONNECT = "disconnect"
    """Close an anonymous subscriber with 4002 (its deliveries are given up and counted); a full session
    refuses publishes (``session_full``) until resumable subscribers' backlogs drain or expire."""
    DROP_OLDEST = "drop_oldest"
    """Give up an anonymous subscriber's oldest un-ACKed delivery (counted) to make room for the new one;
    a full session gives up the oldest backlogged deliveries of the largest backlog to make room."""


DEFAULT_DEDUPE_TTL = 600.0
"""The server's default ``dedupe_ttl``: ``ClientConfig.publish_give_up_after`` must stay below it, so a
client never re-sends a publish after a default server may have forgotten its id (docs/clients.md)."""


def _require_positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value <= 0:
            # The field's name is what a config file key or a keyword argument calls it: no class prefix.
            raise LocalProtocolError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Delivery settings of one session (a virtual broker), fixed when it is created."""

    retry_interval: float = 5.0
    """Seconds between re-sends of a delivery its subscriber has not ACKed."""
    max_retry_limit: int = 10
    """Re-sends after the first send before the delivery is given up (and counted)."""
    message_expiry_time: float = 300.0
    """Seconds after which an un-ACKed message is given up for every subscriber (and counted)."""
    session_expiry: float | None = None
    """Seconds a session may stay without any connection before it is dropped; ``None``: never."""

    def __post_init__(self) -> None:
        _require_positive(self, "retry_interval", "message_expiry_time", "session_expiry")
        if self.max_retry_limit < 0:
            raise LocalProtocolError(f"max_retry_limit must be >= 0, got {self.max_retry_limit!r}")

    #: Wire names (milliseconds, as the original admin API) → field names (seconds).
    WIRE_FIELDS: ClassVar[Mapping[str, str]] = {
        "retryInterval": "retry_interval",
        "maxRetryLimit": "max_retry_limit",
        "messageExpiryTime": "message_expiry_time",
        "sessionExpiry": "session_expiry",
    }

    #: Wire name → what its number counts, for messages in the user's units.
    WIRE_UNITS: ClassVar[Mapping[str, str]] = {
        "retryInterval": "milliseconds",
        "maxRetryLimit": "re-sends",
        "messageExpiryTime": "milliseconds",
        "sessionExpiry": "milliseconds",
    }

    @classmethod
    def from_wire(
        cls,
        values: Mapping[str, Any],
        *,
        base: SessionSettings | None = None,
        names: Mapping[str, str] | None = None,
    ) -> SessionSettings:
        """Build settings from admin-API / config-file values (durations in milliseconds).

        Raises :class:`LocalProtocolError` naming the offending value as the user typed it and in its unit
        (``retryInterval must be a positive number of milliseconds, got -5``): the wire name, or
        ``names[wire_name]`` when the values came from elsewhere (the CLI passes its flags,
        ``--retry-interval``). Callers that got the values from the network turn it into a 400 answer.
        """
        start = base or cls()
        changes: dict[str, Any] = {}
        for wire_name, attr in cls.WIRE_FIELDS.items():
            if wire_name not in values or values[wire_name] is None:
                continue
            raw = values[wire_name]
            label = (names or {}).get(wire_name, wire_name)
            unit = cls.WIRE_UNITS[wire_name]
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise LocalProtocolError(f"{label} must be a number of {unit}, got {type(raw).__name__}")
            if attr == "max_retry_limit":
                if raw < 0 or raw != int(raw):
                    raise LocalProtocolError(f"{label} must be a whole number of {unit} >= 0, got {raw!r}")
                changes[attr] = int(raw)
            elif raw <= 0:
                raise LocalProtocolError(f"{label} must be a positive number of {unit}, got {raw!r}")
            else:
                changes[attr] = raw / 1000.0
        return cls(**{f.name: changes.get(f.name, getattr(start, f.name)) for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep any input from growing the server without limit (docs/operations.md, "Limits")."""

    max_message_size: int = 1024 * 1024
    """Bytes of one WebSocket message (after reassembly); larger ones close the connection with 1009."""
    max_fragments_per_message: int = 1024
    """WebSocket frames one message may be cut into; the frame past it closes the connection with 1009 (a
    stream of empty continuation frames would otherwise cost work and memory without bound)."""
    max_topic_length: int = 256
    """Characters of a topic; longer ones are refused with ``too_long``."""
    max_message_id_length: int = 128
    """Characters of a ``messageId`` (and of a ``clientId``); longer ones are refused with ``too_long``."""
    max_session_name_length: int = 128
    """Characters of a session name."""
    max_password_length: int = 1024
    """Characters of a session password."""
    max_token_length: int = 4096
    """Characters of an ``init`` token (a JWT grows with its lists of topic filters)."""
    max_hash_length: int = 256
    """Characters of a publish's ``hash`` (the integrity tag the server relays)."""
    max_subscriptions_per_connection: int = 1000
    """Topics one connection may subscribe; more are refused with ``too_many_subscriptions``."""
    max_connections_per_session: int = 10_000
    """Initialised connections one session may hold; further inits are refused. A session is one
    application's tenant: this bounds what one tenant can take of ``max_connections`` (docs/operations.md,
    "Limits": sizing)."""
    max_inflight_per_subscriber: int = 1000
    """Un-ACKed deliveries sent to one subscriber (its window). Past it an anonymous subscriber meets the
    slow-consumer policy; a resumable one's (``clientId``) deliveries wait in its backlog and are sent as it
    ACKs (its window is also bounded to half ``max_output_buffer`` of frame bytes)."""
    max_pending_bytes_per_session: int = 64 * 1024 * 1024
    """Bytes of un-ACKed messages a session may hold: each message's topic, id, hash and data in UTF-8 plus
    a fixed 512 bytes of bookkeeping (``accounting.MESSAGE_OVERHEAD``); a publish past it is refused with
    ``session_full``."""
    max_backlog_bytes: int = 256 * 1024 * 1024
    """With a store: bytes of messages (charged as ``max_pending_bytes_per_session`` counts them) a resumable
    subscriber that is away may accumulate in the store; past it its new deliveries are given up
    (``overflow``). A day of one 1-KiB message a second is ~130 MiB. In memory, its backlog is bounded by the
    session's pending bytes instead."""
    max_output_buffer: int = 16 * 1024 * 1024
    """Bytes queued for one connection and not yet taken by the adapter; past it: close with 4002."""
    max_total_output_buffer: int = 256 * 1024 * 1024
    """Bytes queued on all connections together and not yet taken by the adapter; past it the connection
    with the largest buffer is closed with 4002 (again, until the total fits), rather than refusing
    publishes: the peer that does not read pays, not the publishers."""
    max_sessions: int = 10_000
    """Sessions the server holds; ``createSession`` past it is refused."""
    max_connections: int = 50_000
    """Transport connections the server holds; past it new ones are closed at once. Each idle connection
    costs a few KiB of server memory (docs/performance.md, "Idle connections") and one file descriptor:
    the process's descriptor limit (``ulimit -n``) must be above this for the bound to be the one that
    applies."""
    max_pending_verifications: int = 128
    """Password verifications (scrypt) queued for the adapter's worker threads at once; past it an ``init``
    that needs one is refused with ``server_busy`` (transient: the client retries)."""
    max_uninitialised_per_address: int = 64
    """Connections one peer address (IPv6: one /64) may hold that have not completed a successful ``init``
    (TLS, HTTP upgrade or admin requests included); past it new ones from it are closed at once. A trusted
    proxy (``trusted_proxies``) is exempt: it carries many clients."""
    dedupe_window: int = 10_000
    """Recent message ids remembered per session (server) or per client (client) to drop duplicates."""
    max_detached_per_session: int = 1000
    """Resumable subscribers (``clientId``) a session keeps while they have no connection; past it the one
    detached longest is forgotten (its deliveries given up, reason ``detached``)."""
    max_throttled_peers: int = 10_000
    """Peer addresses the failed-auth throttle remembers; past it the one whose last failure is oldest is
    forgotten."""
    max_http_body: int = 64 * 1024
    """Bytes of an admin API request body; larger ones are refused with 413 before they are read."""
    max_http_header: int = 16 * 1024
    """Bytes of an HTTP request head; larger ones are refused with 431."""
    max_http_pipeline: int = 32
    """HTTP requests answered from one read; a client that pipelined more gets those answers and then its
    connection is closed (it reconnects for the rest), so one read cannot buy unbounded work."""

    def __post_init__(self) -> None:
        _require_positive(self, *(f.name for f in fields(self)))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the server core needs besides its sessions."""

    limits: Limits = field(default_factory=Limits)
    default_session_settings: SessionSettings = field(default_factory=SessionSettings)
    slow_consumer_policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT
    """What happens to an anonymous subscriber at ``max_inflight_per_subscriber``, and to resumable
    subscribers' backlogs in a session whose pending bytes are full (``disconnect`` or ``drop_oldest``)."""
    ping_interval: float | None = 20.0
    """Seconds of silence after which the server pings a connection; ``None`` disables keepalive."""
    ping_timeout: float = 20.0
    """Seconds a pinged connection has to send anything before it is dropped."""
    handshake_timeout: float = 10.0
    """Seconds from accept (TLS included) a new connection has to complete the HTTP upgrade and a successful
    ``init``: an absolute deadline, not reset by received bytes (an idle admin keep-alive connection gets
    this long again after each answered request)."""
    write_timeout: float = 30.0
    """Seconds one write to a connection may stay blocked (its peer does not read) before the connection is
    dropped (4002)."""
    auth_max_failures: int = 3
    """Failed ``init`` attempts on one connection before it is closed with 1008."""
    auth_failure_budget: int = 5
    """Failed logins (``init`` per address and session, admin API per address) allowed per
    ``auth_throttle_window`` before any delay: throttling targets guessing, not a user who mistypes."""
    auth_throttle_window: float = 60.0
    """Seconds over which ``auth_failure_budget`` refills; an address without a failure for this long is
    forgotten."""
    auth_throttle_base: float = 0.5
    """First delay (seconds) an address must wait once past its failure budget; doubles per failure."""
    auth_throttle_max: float = 30.0
    """Longest throttle delay (seconds)."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or CIDR networks of reverse proxies (e.g. ``("10.0.0.0/8", "::1")``). Only a connection
    from one of them may name the client's address in ``Forwarded`` / ``X-Forwarded-For``, which is then
    what auth throttling counts by. Empty: the headers are ignored."""
    send_ack_received: bool = True
    """Send the publisher ``ack_received`` once every delivery of its message is ACKed or given up (the
    original fastPort Dart client re-sends a publish until then); ``False`` turns the frame off."""
    dedupe_ttl: float = DEFAULT_DEDUPE_TTL
    """Seconds a published message id stays in the session's dedupe window (also bounded by count)."""
    group_commit_delay: float = 0.002
    """With a store (durable mode): how long, at most, a commit waits after the oldest publish it would
    confirm for the ACKs of the deliveries it would write (an ACK that comes first spares writing the
    delivery, and its message, at all). More spares more disk writes when subscribers are slower to ACK,
    and delays ``publish_response`` by as much; 0 commits at once. No effect without a store."""
    password_hash_cost: int = 2**14
    """scrypt's N for session passwords and secret keys (a power of two; r=8, p=1). Doubling it doubles the
    time and memory of one verification (2**14: ~16 MiB and tens of ms). Lower it only in tests."""

    def __post_init__(self) -> None:
        _require_positive(
            self, "ping_interval", "ping_timeout", "handshake_timeout", "write_timeout", "auth_max_failures",
            "auth_throttle_base", "auth_throttle_max", "auth_throttle_window", "dedupe_ttl",
        )  # fmt: skip
        if self.auth_failure_budget < 0:
            raise LocalProtocolError(f"auth_failure_budget must be >= 0, got {self.auth_failure_budget!r}")
        if not 0 <= self.group_commit_delay < math.inf:  # NaN too
            raise LocalProtocolError(
                f"group_commit_delay must be a finite number >= 0, got {self.group_commit_delay!r}"
            )
        TrustedProxies(self.trusted_proxies)  # refuses an entry that is not an address or network
        cost = self.password_hash_cost
        if cost < 2 or cost & (cost - 1):
            raise LocalProtocolError(f"password_hash_cost must be a power of two >= 2, got {cost!r}")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Client-side timing and bounds; the same object drives the async and the threaded client."""

    publish_retry_interval: float = 5.0
    """Seconds before an unconfirmed publish is sent again on the same connection."""
    ping_interval: float | None = 20.0
    """Seconds of silence after which the client pings the server; ``None`` disables keepalive."""
    ping_timeout: float = 20.0
    """Seconds a pinged server has to send anything before the client drops the connection and reconnects."""
    connect_timeout: float = 10.0
    """Seconds from opening a socket to a successful ``init_response``."""
    reconnect_initial_delay: float = 0.5
    """Cap of the first reconnect delay (seconds); it doubles per failed attempt (full jitter below it)."""
    reconnect_max_delay: float = 30.0
    """Largest reconnect delay cap (seconds)."""
    reconnect_give_up_after: float | None = None
    """Seconds of continuous failure after which the client stops reconnecting; ``None``: never."""
    dedupe_window: int = 10_000
    """Message ids remembered to hand each message to the application once (redeliveries are ACKed again)."""
    max_message_size: int = 1024 * 1024
    """Bytes of one WebSocket message, both ways: larger received ones close the connection, larger
    publishes are refused at once (the server would close on every resend)."""
    max_pending_publishes: int = 10_000
    """Unconfirmed publishes held for resending; past it ``publish`` raises instead of growing."""
    publish_give_up_after: float = 300.0
    """Seconds after its first send that an unconfirmed publish stops being re-sent and fails with
    ``PublishTimeoutError``, whatever its ``timeout``: below the server's ``dedupe_ttl`` (600 s by default),
    so a re-send always reaches a server that still remembers the id and never fans it out twice."""
    ack_when_consumed: bool = False
    """``False`` (the default): a message is ACKed on receipt. ``True``: only once every handler it went to
    returned (a handler that raises leaves it un-ACKed: the server delivers it again) and every iterator
    took it, so a crash while handling it does not lose it (docs/clients.md, "Delivery guarantees")."""
    retry_first_connect: bool = False
    """``False`` (the default): ``connect`` raises at once if the *first* connection fails (a wrong URL or
    password shows at start-up instead of hiding behind retries). ``True``: the first connection is retried
    like any reconnection, and ``connect`` waits (up to ``reconnect_give_up_after``) for it."""

    def __post_init__(self) -> None:
        _require_positive(
            self, "publish_retry_interval", "ping_interval", "ping_timeout", "connect_timeout",
            "reconnect_initial_delay", "reconnect_max_delay", "reconnect_give_up_after", "dedupe_window",
            "max_message_size", "max_pending_publishes", "publish_give_up_after",
        )  # fmt: skip
        if self.publish_give_up_after >= DEFAULT_DEDUPE_TTL:
            raise LocalProtocolError(
                f"publish_give_up_after must be below the server's dedupe_ttl ({DEFAULT_DEDUPE_TTL:g} s), "
                f"got {self.publish_give_up_after!r}: a later re-send could be fanned out twice"
            )
