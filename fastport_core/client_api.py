"""What an application sees of a client, whichever adapter runs it (anyio tasks or threads).

Both adapters hand the application the same :class:`Message`, report the same :class:`ConnectionState`
changes and raise the same errors (:mod:`fastport_core.errors`), so code can move between the async and
the blocking client, and a ``Message`` is one class however it was received. This module also holds what
both adapters need to start a connection: the parsed :class:`Endpoint` of a ``ws://`` / ``wss://`` URL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from .client import (
    AuthRefused,
    ClientCore,
    ClientEvent,
    PublishConfirmed,
    PublishRefused,
    SubscribeConfirmed,
    SubscribeRefused,
)
from .config import ClientConfig
from .crypto import SuiteName
from .errors import (
    AuthenticationError,
    ErrorCode,
    LocalProtocolError,
    PublishRefusedError,
    SubscribeRefusedError,
)

__all__ = [
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_TIMEOUT",
    "Answer",
    "ConnectionState",
    "Endpoint",
    "Message",
    "StateChange",
    "auth_error",
    "make_client_core",
    "parse_url",
    "settle_answers",
    "subscribe_refused_error",
]

T = TypeVar("T")

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


def make_client_core(
    url: str,
    *,
    session: str,
    password: str | None,
    key: str | bytes,
    suite: SuiteName,
    config: ClientConfig,
    client_id: str | None,
    tls_context_given: bool,
    token: str | Callable[[], str] | None = None,
) -> tuple[Endpoint, ClientCore]:
    """What both adapters do with ``connect``'s arguments before any IO: parse the URL, refuse a TLS
    context for a plain ``ws://`` URL (it would be silently ignored), and build the :class:`ClientCore`
    (which checks the key and suite). Raises :class:`LocalProtocolError` for any of them."""
    endpoint = parse_url(url)
    if tls_context_given and not endpoint.tls:
        raise LocalProtocolError(f"ssl_context was given for a plain ws:// url ({url!r}): use wss://")
    core = ClientCore(
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
    return endpoint, core


def auth_error(event: AuthRefused) -> AuthenticationError:
    """The typed error a refused ``init`` becomes for the application."""
    code = next((known for known in ErrorCode if known.value == event.code), ErrorCode.AUTH_FAILED)
    return AuthenticationError(f"the server refused the session credentials: {event.error}", code=code)


class _Flag(Protocol):
    """The adapter's own one-shot event (``anyio.Event``, ``threading.Event``): set once, then seen set."""

    def set(self) -> None: ...
    def is_set(self) -> bool: ...


class Answer(Generic[T]):
    """One caller waiting for the server's answer (a publish or subscribe confirmation): a flag and a slot.

    Each adapter subclasses it with its own flag type and its own way to wait; resolving and failing,
    and which core event settles which answer (:func:`settle_answers`), are the same for both.
    """

    __slots__ = ("_flag", "error", "result")

    def __init__(self, flag: _Flag) -> None:
        self._flag = flag
        self.result: T | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._flag.is_set()

    def resolve(self, result: T) -> None:
        if not self._flag.is_set():
            self.result = result
            self._flag.set()

    def fail(self, error: BaseException) -> None:
        if not self._flag.is_set():
            self.error = error
            self._flag.set()


def subscribe_refused_error(event: SubscribeRefused) -> SubscribeRefusedError:
    """The typed error a refused ``subscribe`` becomes for the application."""
    return SubscribeRefusedError(
        f"the server refused the subscription to {event.topic!r}: {event.error}",
        topic=event.topic,
        code=event.code,
    )


def settle_answers(
    event: ClientEvent,
    publishes: Mapping[str, Answer[str]],
    subscribes: Mapping[str, Sequence[Answer[None]]],
) -> bool:
    """Resolve or fail the answers a publish/subscribe outcome concerns; ``False`` for any other event.

    A refused subscription only fails its answers here: what else it ends (iterators, callbacks) is the
    adapter's business.
    """
    match event:
        case PublishConfirmed():
            if (answer := publishes.get(event.message_id)) is not None:
                answer.resolve(event.message_id)
        case PublishRefused():
            if (answer := publishes.get(event.message_id)) is not None:
                answer.fail(
                    PublishRefusedError(
                        f"the server refused publish {event.message_id}: {event.error}",
                        message_id=event.message_id,
                        code=event.code,
                    )
                )
        case SubscribeConfirmed():
            for waiter in subscribes.get(event.topic, ()):
                waiter.resolve(None)
        case SubscribeRefused():
            error = subscribe_refused_error(event)
            for waiter in subscribes.get(event.topic, ()):
                waiter.fail(error)
        case _:
            return False
    return True
