"""Fixtures for the blocking client: a real anyio server in a background thread (:mod:`tests.background`),
and the shared fault-injecting proxy (:mod:`tests.proxy`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio.from_thread
import pytest

from fastport_core.config import ClientConfig, ServerConfig
from fastport_core.crypto import generate_key
from fastport_threads import ConnectionState, StateChange
from tests.background import PASSWORD, SESSION, WAIT, ServerHandle, make_server_config
from tests.proxy import Proxy

__all__ = ["PASSWORD", "SESSION", "WAIT", "ServerHandle", "make_server_config"]

FAST_CLIENT = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.2, connect_timeout=5.0)
"""Reconnects within milliseconds, so the reconnection tests are fast."""


@pytest.fixture(scope="session")
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal() as portal:
        yield portal


@pytest.fixture
def server(portal: anyio.from_thread.BlockingPortal) -> Iterator[ServerHandle]:
    handle = ServerHandle(portal, make_server_config())
    yield handle
    handle.stop()


@pytest.fixture
def start_server(portal: anyio.from_thread.BlockingPortal) -> Iterator[Callable[..., ServerHandle]]:
    """A factory for servers with their own config or TLS, stopped at the end of the test."""
    handles: list[ServerHandle] = []

    def start(config: ServerConfig | None = None, ssl_context: Any = None) -> ServerHandle:
        handle = ServerHandle(portal, config or make_server_config(), ssl_context)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="session")
def key() -> str:
    return generate_key()


@pytest.fixture
def relay(server: ServerHandle) -> Iterator[Proxy]:
    relay = Proxy(server.port)
    yield relay
    relay.close()


class States:
    """Records a client's state changes, so a test can wait for one (e.g. back to CONNECTED)."""

    def __init__(self) -> None:
        self.changes: list[StateChange] = []
        self._changed = threading.Condition()

    def __call__(self, change: StateChange) -> None:
        with self._changed:
            self.changes.append(change)
            self._changed.notify_all()

    def wait_for(self, state: ConnectionState, *, count: int = 1) -> None:
        """Wait until ``state`` was entered ``count`` times in all."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.count(state) >= count, WAIT), self.changes

    def count(self, state: ConnectionState) -> int:
        return sum(1 for change in self.changes if change.state is state)
