"""The contract suite's fixtures: every test runs against the async client (asyncio and trio) and the
blocking client, through one blocking *driver* interface.

The server runs in a background thread (:mod:`tests.background`) and faults come from the shared proxy
(:mod:`tests.proxy`). The blocking client is its own driver. The async client runs in a blocking portal
of the backend under test (its own thread and event loop); :class:`AsyncDriver` forwards each call there
and turns its :class:`~fastport_anyio.MessageStream` into a blocking iterator, so a test reads the same
whichever client it drives. Handlers and callbacks run on the client's own tasks or threads and record
into thread-safe :class:`Collector` objects that tests wait on (bounded, never a sleep).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Generic, TypeVar

import anyio.from_thread
import pytest

import fastport_anyio
import fastport_threads
from fastport_core.client_api import ConnectionState, Message, StateChange
from fastport_core.config import ClientConfig
from fastport_core.crypto import generate_key
from tests.background import PASSWORD, SESSION, WAIT, ServerHandle, make_server_config
from tests.proxy import Proxy

T = TypeVar("T")

CLIENTS = ("asyncio", "trio", "threads")
FAST = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.2, connect_timeout=5.0)
"""Reconnects within milliseconds, so the fault tests are fast (the policy itself is tested in the core)."""
KEY = generate_key()


class Collector(Generic[T]):
    """Items recorded by callbacks on any thread; :meth:`wait_for` waits (bounded) for enough of them."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = threading.Condition()

    def __call__(self, item: T) -> None:
        with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    def wait_until(self, predicate: Callable[[list[T]], bool]) -> list[T]:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.items), WAIT), self.items
            return list(self.items)

    def wait_for(self, count: int) -> list[T]:
        return self.wait_until(lambda items: len(items) >= count)


class States(Collector[StateChange]):
    def wait_state(self, state: ConnectionState, *, after: int = 0) -> None:
        self.wait_until(lambda items: any(change.state is state for change in items[after:]))


class SyncStream:
    """An async :class:`~fastport_anyio.MessageStream` as a blocking iterator (the driver's view)."""

    def __init__(
        self, portal: anyio.from_thread.BlockingPortal, stream: fastport_anyio.MessageStream
    ) -> None:
        self._portal = portal
        self._stream = stream

    @property
    def buffered(self) -> int:
        return self._stream.buffered

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> Message:
        try:
            return self._portal.call(self._stream.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._portal.call(self._stream.aclose)

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncDriver:
    """The async client, driven from the test's thread through a portal; same methods as the blocking one."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, client: fastport_anyio.Client) -> None:
        self._portal = portal
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute
        return lambda *args, **kwargs: self._portal.call(functools.partial(attribute, *args, **kwargs))

    @contextmanager
    def subscription(self, topic: str, **kwargs: Any) -> Iterator[SyncStream]:
        with self._portal.wrap_async_context_manager(self._client.subscription(topic, **kwargs)) as stream:
            yield SyncStream(self._portal, stream)

    def messages(self, topic: str, timeout: float | None = None, **kwargs: Any) -> SyncStream:
        stream = self._portal.call(functools.partial(self._client.messages, topic, timeout, **kwargs))
        return SyncStream(self._portal, stream)


Opener = Callable[..., Any]
"""``open_client(url, **connect_keywords)``: a connected client (a driver), closed after the test."""


@pytest.fixture(scope="session")
def server_portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal() as portal:
        yield portal


@pytest.fixture(scope="session")
def client_portals() -> Iterator[dict[str, anyio.from_thread.BlockingPortal]]:
    with ExitStack() as stack:
        yield {
            backend: stack.enter_context(anyio.from_thread.start_blocking_portal(backend))
            for backend in ("asyncio", "trio")
        }


@pytest.fixture
def server(server_portal: anyio.from_thread.BlockingPortal) -> Iterator[ServerHandle]:
    handle = ServerHandle(server_portal, make_server_config())
    yield handle
    handle.stop()


@pytest.fixture
def start_server(server_portal: anyio.from_thread.BlockingPortal) -> Iterator[Callable[..., ServerHandle]]:
    """A factory for servers with their own config or TLS, stopped at the end of the test."""
    handles: list[ServerHandle] = []

    def start(config: Any = None, ssl_context: Any = None) -> ServerHandle:
        handle = ServerHandle(server_portal, config or make_server_config(), ssl_context)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture
def proxy(server: ServerHandle) -> Iterator[Proxy]:
    relay = Proxy(server.port)
    yield relay
    relay.close()


@pytest.fixture(params=CLIENTS)
def client_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def open_client(
    client_kind: str, client_portals: dict[str, anyio.from_thread.BlockingPortal]
) -> Iterator[Opener]:
    with ExitStack() as stack:

        def open_(url: str, **kwargs: Any) -> Any:
            options: dict[str, Any] = {"session": SESSION, "password": PASSWORD, "key": KEY, "config": FAST}
            options.update(kwargs)
            if client_kind == "threads":
                return stack.enter_context(fastport_threads.connect(url, **options))
            portal = client_portals[client_kind]
            client = fastport_anyio.connect(url, **options)
            stack.enter_context(portal.wrap_async_context_manager(client))
            return AsyncDriver(portal, client)

        yield open_
