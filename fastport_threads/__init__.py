"""fastport's blocking, thread-safe client: ``with fastport_threads.connect(url, ...) as client:``.

See :mod:`fastport_threads.client` for the thread model and ``docs/clients.md`` for a guide.
"""

from .client import (
    Client,
    ClientClosedError,
    ConnectError,
    ConnectionState,
    Message,
    MessageStream,
    PublishRefusedError,
    PublishTimeoutError,
    StateChange,
    SubscribeRefusedError,
    SubscribeTimeoutError,
    connect,
)

__all__ = [
    "Client",
    "ClientClosedError",
    "ConnectError",
    "ConnectionState",
    "Message",
    "MessageStream",
    "PublishRefusedError",
    "PublishTimeoutError",
    "StateChange",
    "SubscribeRefusedError",
    "SubscribeTimeoutError",
    "connect",
]
