"""Fixtures for the blocking client: a real anyio server in a background thread, and a TCP relay.

The server runs in an anyio blocking portal (its own thread and event loop), on 127.0.0.1 and a port the
OS chose; :meth:`ServerHandle.restart` brings it back on the same port with the same sessions. The
:class:`Relay` sits between a client and the server so a test can cut the connection, or silently drop
what the server sends, without touching either side's internals.
"""

from __future__ import annotations

import functools
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import anyio.from_thread
import pytest

from fastport_anyio.server import Server, SessionSpec, serve
from fastport_core.config import ClientConfig, ServerConfig
from fastport_core.crypto import generate_key
from fastport_threads import ConnectionState, StateChange

SESSION = "threads"
PASSWORD = "threads-password"
WAIT = 10.0
"""Upper bound on any wait for something that should happen within milliseconds (a failing test, not a
passing one, pays it)."""

FAST_CLIENT = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.2, connect_timeout=5.0)
"""Reconnects within milliseconds, so the reconnection tests are fast."""


class ServerHandle:
    """An anyio server running in a blocking portal; restartable on the same port."""

    def __init__(
        self, portal: anyio.from_thread.BlockingPortal, config: ServerConfig, ssl_context: Any = None
    ) -> None:
        self._portal = portal
        self._config = config
        self._ssl_context = ssl_context
        self._port = 0
        self._server: Server | None = None
        self._future: Future[Any] | None = None
        self.start()

    def start(self) -> None:
        run = functools.partial(
            serve,
            "127.0.0.1",
            self._port,
            config=self._config,
            sessions=[SessionSpec(SESSION, PASSWORD)],
            ssl_context=self._ssl_context,
            shutdown_timeout=1.0,
        )
        self._future, self._server = self._portal.start_task(run)
        self._port = self._server.port

    def stop(self) -> None:
        if self._server is not None and self._future is not None:
            self._portal.call(self._server.shutdown)
            self._future.result(WAIT)
            self._server = None

    def restart(self) -> None:
        """Stop, then listen again on the same port, with the same sessions (a fresh broker)."""
        self.stop()
        self.start()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{'wss' if self._ssl_context else 'ws'}://127.0.0.1:{self._port}"


def make_server_config(**overrides: Any) -> ServerConfig:
    """Server settings for tests: cheap password hashing (scrypt's default cost takes tens of ms)."""
    return ServerConfig(password_hash_cost=2**4, **overrides)


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


class Relay:
    """A TCP relay (one thread) from a local port to the server; the test can cut it or blackhole it.

    ``blackhole_downstream`` drops what the server sends (a client then sees no confirmations and no
    messages while its own frames still reach the server); ``blackhole_upstream`` drops what the client
    sends; :meth:`cut` closes every relayed connection; while ``refuse`` is set, new connections are
    closed as soon as they are accepted (as is one the server refuses).
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.blackhole_downstream = False
        self.blackhole_upstream = False
        self.refuse = False
        self._peers: dict[socket.socket, socket.socket] = {}
        self._downstream: set[socket.socket] = set()  # sockets connected to the server
        self._requests: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="test-relay", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Close every relayed connection (both sides), and wait until it is done."""
        self._request("cut")

    def close(self) -> None:
        self._request("stop")
        self._thread.join(WAIT)

    def _request(self, what: str) -> None:
        done = threading.Event()
        with self._lock:
            self._requests.append((what, done))
        self._wake_w.send(b"x")
        assert done.wait(WAIT)

    def _drop(self, sock: socket.socket) -> None:
        other = self._peers.pop(sock, None)
        for one in (sock, other):
            if one is not None:
                self._peers.pop(one, None)
                self._downstream.discard(one)
                self._selector.unregister(one)
                one.close()

    def _run(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        self._wake_r.recv(1024)
                        with self._lock:
                            requests, self._requests = self._requests, []
                        for what, done in requests:
                            for one in list(self._peers):
                                if one in self._peers:
                                    self._drop(one)
                            done.set()
                            if what == "stop":
                                return
                    elif sock is self._listener:
                        client, _ = self._listener.accept()
                        if self.refuse:
                            client.close()
                            continue
                        try:
                            upstream = socket.create_connection(self._target)
                        except OSError:
                            client.close()
                            continue
                        self._peers[client], self._peers[upstream] = upstream, client
                        self._downstream.add(upstream)
                        self._selector.register(client, selectors.EVENT_READ)
                        self._selector.register(upstream, selectors.EVENT_READ)
                    elif sock in self._peers:
                        assert isinstance(sock, socket.socket)
                        try:
                            data = sock.recv(65536)
                        except OSError:
                            data = b""
                        if not data:
                            self._drop(sock)
                        elif sock in self._downstream:
                            if not self.blackhole_downstream:
                                self._peers[sock].sendall(data)
                        elif not self.blackhole_upstream:
                            self._peers[sock].sendall(data)
        finally:
            for one in list(self._peers):
                one.close()
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()


@pytest.fixture
def relay(server: ServerHandle) -> Iterator[Relay]:
    relay = Relay(server.port)
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
