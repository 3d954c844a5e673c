"""fastport over anyio (asyncio or trio): the server, the async client and the ``fastport`` command.

Public names (README.md, "Layout"): :func:`serve` / :class:`Server` run a broker; :func:`connect` /
``Client`` are the async client. Each group is imported on its own lines so the two can be edited
independently.
"""

from .client import (
    Client,
    ClientClosedError,
    ConnectError,
    ConnectionState,
    Message,
    PublishRefusedError,
    PublishTimeoutError,
    StateChange,
    SubscribeRefusedError,
    SubscribeTimeoutError,
    Subscription,
    connect,
)
from .config_file import ServerSettings, SessionSpec
from .server import Server, serve

__all__ = [
    "Client",
    "ClientClosedError",
    "ConnectError",
    "ConnectionState",
    "Message",
    "PublishRefusedError",
    "PublishTimeoutError",
    "Server",
    "ServerSettings",
    "SessionSpec",
    "StateChange",
    "SubscribeRefusedError",
    "SubscribeTimeoutError",
    "Subscription",
    "connect",
    "serve",
]
