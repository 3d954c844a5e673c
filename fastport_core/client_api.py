"""What an application sees of a client, whichever adapter runs it (anyio tasks or threads).

Both adapters hand the application the same :class:`Message`, report the same :class:`ConnectionState`
changes and raise the same errors (:mod:`fastport_core.errors`), so code can move between the async and
the blocking client, and a ``Message`` is one class however it was received. This module also holds the
parsed :class:`Endpoint` of a ``ws://`` / ``wss://`` URL and every error description the clients give
(one wording, one place); :mod:`.client_app` makes the decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final
from urllib.parse import urlsplit

from .client import AuthRefused, SubscribeRefused
from .errors import AuthenticationError, ErrorCode, LocalProtocolError, SubscribeRefusedError

__all__ = [
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_TIMEOUT",
    "ConnectionState",
    "Endpoint",
    "Message",
    "StateChange",
    "auth_error",
    "describe_error",
    "parse_url",
    "subscribe_refused_error",
]

DEFAULT_TIMEOUT: Final = 30.0
"""Default bound (seconds) on waiting for a server confirmation, connected or not."""
DEFAULT_MAX_BUFFER: Final = 1000
"""Default number of messages a subscription buffers for a consumer that is busy."""


@dataclass(frozen=True, slots=True)
class Message:
    """A received, verified and decrypted message.

    ``payload`` is ``str`` or ``bytes``, as it was published; ``timestamp`` is the publisher's wall clock
    in integer milliseconds since the epoch (authenticated by the ``authenticated`` suite).
    """

    topic: str
    payload: str | bytes
    message_id: str
    timestamp: int


class ConnectionState(Enum):
    """The connection as the application sees it (the core's finer states map onto these)."""

    CONNECTING = "connecting"
    """The first connection is being made (``connect`` has not returned yet)."""
    CONNECTED = "connected"
    """Authenticated: publishes and messages flow."""
    RECONNECTING = "reconnecting"
    """The connection was lost; the client dials again by itself (publishes wait meanwhile)."""
    CLOSED = "closed"
    """Closed by the application or given up for good; nothing more will happen."""


@dataclass(frozen=True, slots=True)
class StateChange:
    """Passed to ``on_state_change`` callbacks.

    ``reason`` says why the connection ended (empty when connected); ``reconnect_at`` is the adapter's
    monotonic time of the next attempt while ``RECONNECTING``.
    """

    state: ConnectionState
    reason: str = ""
    reconnect_at: float | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to dial, and what the upgrade request names (``Host`` header and request target)."""

    host: str
    port: int
    tls: bool
    host_header: str
    target: str


def parse_url(url: str) -> Endpoint:
    """``ws://host[:port][/path]`` or ``wss://...`` → an :class:`Endpoint`; a clear error otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError) as exc:
        raise LocalProtocolError(f"invalid url {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise LocalProtocolError(f"url must start with ws:// or wss://, got {url!r}")
    host = parts.hostname
    if not host:
        raise LocalProtocolError(f"url has no host: {url!r}")
    tls = scheme == "wss"
    default_port = 443 if tls else 80
    port = default_port if port is None else port
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == default_port else f"{shown_host}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(host, port, tls, host_header, target)


def auth_error(event: AuthRefused) -> AuthenticationError:
    """The typed error a refused ``init`` becomes for the application.

    The wording follows the code: a suspended session or a throttled client did nothing wrong with its
    credentials, so only the other refusals blame them.
    """
    code = next((known for known in ErrorCode if known.value == event.code), ErrorCode.AUTH_FAILED)
    if code is ErrorCode.SESSION_SUSPENDED:
        text = f"the session is suspended: {event.error}"
    elif code is ErrorCode.AUTH_THROTTLED:
        text = f"the server throttles this client's logins: {event.error}"
    elif code is ErrorCode.TOO_MANY_CONNECTIONS:
        text = f"the session has too many connections: {event.error}"
    else:
        text = f"the server refused the session credentials: {event.error}"
    return AuthenticationError(text, code=code)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed dial, read or write, for logs and :class:`ConnectError` messages.

    ``OSError`` strings can be empty, SSL ones verbose, and anyio wraps the dial's real failure as the
    cause: both adapters describe their transport failures here.
    """
    # Duck-typed so the core needs no ssl import: ssl.SSLCertVerificationError and ssl.SSLError.
    if verify_message := getattr(exc, "verify_message", None):
        return f"TLS certificate verification failed: {verify_message}"
    if type(exc).__module__ == "ssl" and isinstance(exc, OSError):
        return f"TLS error: {getattr(exc, 'reason', None) or exc}"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({describe_error(cause)})"
    return text


def subscribe_refused_error(event: SubscribeRefused) -> SubscribeRefusedError:
    """The typed error a refused ``subscribe`` becomes for the application."""
    return SubscribeRefusedError(
        f"the server refused the subscription to {event.topic!r}: {event.error}",
        topic=event.topic,
        code=event.code,
    )
