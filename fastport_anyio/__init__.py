"""fastport over anyio (asyncio or trio): the server, the async client and the ``fastport`` command.

Public names (README.md, "Layout"): :func:`serve` / :class:`Server` run a broker; :func:`connect` /
``Client`` are the async client, with the same names as :mod:`fastport_threads` (docs/clients.md). Each
group is imported on its own lines so the two can be edited independently.
"""

from fastport_core.client import IntegrityFailure
from fastport_core.client_api import ConnectionState, Message, StateChange
from fastport_core.config import ClientConfig
from fastport_core.config_file import ServerSettings, SessionSpec
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
)

from .client import Client, MessageStream, connect
from .cluster import ClusterError, ClusterOptions, NatsCluster
from .server import Server, serve
from .store import SqliteStore, StoreError, StoreReport, StoreUnavailable

__all__ = [
    "AuthenticationError",
    "Client",
    "ClientClosedError",
    "ClientConfig",
    "ClusterError",
    "ClusterOptions",
    "ConnectError",
    "ConnectionState",
    "FastportError",
    "IntegrityFailure",
    "InvalidKeyError",
    "LocalProtocolError",
    "Message",
    "MessageStream",
    "NatsCluster",
    "PublishRefusedError",
    "PublishTimeoutError",
    "Server",
    "ServerSettings",
    "SessionSpec",
    "SqliteStore",
    "StateChange",
    "StoreError",
    "StoreReport",
    "StoreUnavailable",
    "SubscribeRefusedError",
    "SubscribeTimeoutError",
    "connect",
    "serve",
]
