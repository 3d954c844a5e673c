"""Typed errors, split by whose fault they are.

Following h11, every failure is either a :class:`LocalProtocolError` (this side misused the API: a bad key,
a topic that is too long, publishing on a closed client) or a :class:`RemoteProtocolError` (the peer sent
something we cannot honour). A remote error carries what the core needs to answer it without guessing: the
:class:`ErrorCode` for the ``error`` frame and, when the fault is fatal to the connection, the WebSocket
:class:`CloseCode` to close with. The core turns remote errors into frames or closes; they never escape
``receive_data``.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = [
    "AuthenticationError",
    "ClientClosedError",
    "CloseCode",
    "ConnectError",
    "ErrorCode",
    "FastportError",
    "IntegrityError",
    "InvalidKeyError",
    "LocalProtocolError",
    "PublishRefusedError",
    "PublishTimeoutError",
    "RemoteProtocolError",
    "SubscribeRefusedError",
    "SubscribeTimeoutError",
]


class ErrorCode(StrEnum):
    """The ``code`` field of an ``error`` frame (and of a refused ``*_response``).

    Each member carries its meaning in ``doc``, from which ``docs/protocol.md`` is generated.
    """

    doc: str

    def __new__(cls, value: str, doc: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member

    INVALID_JSON = "invalid_json", "The text frame is not a JSON object."
    INVALID_FRAME = (
        "invalid_frame",
        "A field is missing, has the wrong type, or is empty where it must not be.",
    )
    UNKNOWN_TYPE = "unknown_type", "The ``type`` field names no frame of the protocol."
    BINARY_NOT_SUPPORTED = (
        "binary_not_supported",
        "A WebSocket binary frame arrived; v1 speaks JSON text frames only.",
    )
    NOT_INITIALISED = "not_initialised", "A frame other than ``init`` arrived before a successful ``init``."
    ALREADY_INITIALISED = (
        "already_initialised",
        "A second ``init`` on a connection: a connection belongs to one session for its whole life.",
    )
    AUTH_FAILED = "auth_failed", "Unknown session or wrong password (deliberately not told apart)."
    AUTH_THROTTLED = "auth_throttled", "Too many failed ``init`` attempts: wait before trying again."
    SESSION_SUSPENDED = (
        "session_suspended",
        "The session exists but is suspended: no new connections, no delivery.",
    )
    TOO_LONG = (
        "too_long",
        "A topic, message id, session name or password exceeds its configured length limit.",
    )
    TOO_MANY_SUBSCRIPTIONS = (
        "too_many_subscriptions",
        "The connection already holds its maximum number of subscriptions.",
    )
    TOO_MANY_CONNECTIONS = (
        "too_many_connections",
        "The session already holds its maximum number of connections.",
    )
    SESSION_FULL = "session_full", "Accepting the publish would exceed the session's pending-bytes limit."
    SERVER_BUSY = (
        "server_busy",
        "Too many password verifications are queued (``max_pending_verifications``): retry shortly.",
    )
    STORE_UNAVAILABLE = (
        "store_unavailable",
        "The broker cannot write its store (a full disk, an I/O error): nothing was accepted; retry shortly.",
    )
    CLUSTER_UNAVAILABLE = (
        "cluster_unavailable",
        "The cluster node has lost its engine (NATS): nothing was accepted; retry shortly, here or on "
        "another node.",
    )
    INVALID_TOPIC = (
        "invalid_topic",
        "A publish topic holds ``+`` or ``#``, which only subscription filters may use.",
    )
    INVALID_FILTER = (
        "invalid_filter",
        "A malformed topic filter: ``+`` and ``#`` must each be a whole level, ``#`` only the last one.",
    )
    INVALID_TOKEN = (
        "invalid_token",
        "The ``init`` token does not verify for the session (malformed, forged, another algorithm, no "
        "``exp``, bad claims, not yet valid), or names an unknown session.",
    )
    TOKEN_EXPIRED = "token_expired", "The ``init`` token's ``exp`` has passed: mint a fresh one."
    CLIENT_ID_MISMATCH = "client_id_mismatch", "The token binds another ``clientId`` (its ``sub`` claim)."
    NOT_ALLOWED = (
        "not_allowed",
        "The connection's token does not grant this publish topic or subscription filter.",
    )


class CloseCode(IntEnum):
    """WebSocket close codes the core sends (RFC 6455 §7.4 plus the private 4000-4999 range)."""

    doc: str

    def __new__(cls, value: int, doc: str) -> CloseCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member

    NORMAL = 1000, "Normal closure (the client closed, or answered our close)."
    GOING_AWAY = 1001, "Server shutdown."
    PROTOCOL_ERROR = (
        1002,
        "A WebSocket framing rule was broken (unmasked client frame, bad opcode, bad control frame...).",
    )
    INVALID_PAYLOAD = 1007, "A text frame that is not valid UTF-8."
    POLICY_VIOLATION = 1008, "Repeated authentication failures."
    MESSAGE_TOO_BIG = (
        1009,
        "A message over the configured maximum size, or in more frames than ``max_fragments_per_message`` "
        "(refused from the frame header, before it is buffered).",
    )
    INTERNAL_ERROR = 1011, "A bug in the server: it closed rather than guess (logged)."
    SESSION_DROPPED = 4001, "The session was dropped by its owner."
    SLOW_CONSUMER = 4002, "The subscriber fell behind past its in-flight or output-buffer bound."
    REPLACED = 4003, "Another connection resumed this connection's ``clientId``."
    KEEPALIVE_TIMEOUT = 4004, "The peer did not answer a ping in time."
    HANDSHAKE_TIMEOUT = 4005, "The connection did not authenticate in time."
    SESSION_EXPIRED = 4006, "The session expired (idle past its ``sessionExpiry``)."
    TOKEN_EXPIRED = 4007, "The token the connection authenticated with expired: re-``init`` with a fresh one."
    TOKEN_REVOKED = 4008, "The session's token key was rotated: tokens signed with the old key are void."


class FastportError(Exception):
    """Base of every error fastport raises."""


class LocalProtocolError(FastportError):
    """This side used the API wrongly (bad argument, wrong state). Fix the calling code."""


class InvalidKeyError(LocalProtocolError, ValueError):
    """An encryption key that is not 32 bytes of base64 (or raw bytes)."""


class RemoteProtocolError(FastportError):
    """The peer sent something that cannot be honoured.

    ``code`` is what an ``error`` frame answers with; ``close_code``, when set, means the connection cannot
    continue and must be closed with that code (the message becomes the close reason).
    """

    def __init__(
        self, message: str, *, code: ErrorCode = ErrorCode.INVALID_FRAME, close_code: CloseCode | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.close_code = close_code


class IntegrityError(RemoteProtocolError):
    """A received message failed MAC verification, hash check or decryption.

    It is raised by the crypto suites on the receiving client and turned by the client core into an
    integrity event; the message never reaches the application.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.INVALID_FRAME)


class AuthenticationError(RemoteProtocolError):
    """The server refused ``init`` (wrong password, unknown or suspended session, throttled)."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.AUTH_FAILED) -> None:
        super().__init__(message, code=code)


# -- raised by the clients (both adapters) ------------------------------------------------------------


class ConnectError(FastportError, ConnectionError):
    """The first connection of a client failed (unreachable server, TLS, handshake, timeout).

    Later outages never raise this: the client reconnects by itself.
    """


class ClientClosedError(FastportError):
    """The client is closed (by its ``close``, or it gave up reconnecting), so the operation cannot complete.

    ``__cause__`` holds what made it give up, when that was not the application's ``close``."""


class PublishTimeoutError(FastportError, TimeoutError):
    """No confirmation within ``timeout``. The publish is no longer retried, but the server may have it."""

    def __init__(self, message: str, *, message_id: str) -> None:
        super().__init__(message)
        self.message_id = message_id


class SubscribeTimeoutError(FastportError, TimeoutError):
    """No confirmation of a subscription within ``timeout``; the subscription was withdrawn."""


class PublishRefusedError(FastportError):
    """The server refused a publish (e.g. ``session_full``); ``code`` is the protocol's error code."""

    def __init__(self, message: str, *, message_id: str, code: str | None) -> None:
        super().__init__(message)
        self.message_id = message_id
        self.code = code


class SubscribeRefusedError(FastportError):
    """The server refused a subscription (e.g. ``too_many_subscriptions``)."""

    def __init__(self, message: str, *, topic: str, code: str | None) -> None:
        super().__init__(message)
        self.topic = topic
        self.code = code
