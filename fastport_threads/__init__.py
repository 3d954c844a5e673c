"""fastport's blocking, thread-safe client: ``with fastport_threads.connect(url, ...) as client:``.

The same names, keywords and behaviour as the async client in :mod:`fastport_anyio` (docs/clients.md).
"""

from fastport_core.client import IntegrityFailure
from fastport_core.client_api import ConnectionState, Message, StateChange
from fastport_core.config import ClientConfig
from fastport_core.errors import (
    AuthenticationError,
    ClientClosedError,
    ConnectError,
    FastportError,
    InvalidKeyError,
    LocalProtocolError,
    PublishRefusedError,
    PublishTimeoutError,
    SubscribeRefusedError,
    SubscribeTimeoutError,
)  # fmt: skip

from .client import Client, MessageStream, connect

__all__ = [
    "AuthenticationError", "Client", "ClientClosedError", "ClientConfig", "ConnectError", "ConnectionState",
    "FastportError", "IntegrityFailure", "InvalidKeyError", "LocalProtocolError", "Message", "MessageStream",
    "PublishRefusedError", "PublishTimeoutError", "StateChange", "SubscribeRefusedError",
    "SubscribeTimeoutError", "connect",
]  # fmt: skip
