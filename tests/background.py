"""A real anyio server in a background thread, for tests whose client is not on the server's event loop.

The server runs in an anyio blocking portal (its own thread and event loop), on 127.0.0.1 and a port the
OS chose; :meth:`ServerHandle.restart` brings it back on the same port with the same sessions. Both the
blocking client's tests and the contract suite (which drives the async client from a portal of its own)
use it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio.from_thread

from fastport_anyio.server import Server, SessionSpec, serve
from fastport_core.admin import AdminCredentials
from fastport_core.config import ServerConfig

SESSION = "threads"
PASSWORD = "threads-password"
WAIT = 10.0
"""Upper bound on any wait for something that should happen within milliseconds (a failing test, not a
passing one, pays it)."""

T = TypeVar("T")


def make_server_config(**overrides: Any) -> ServerConfig:
    """Server settings for tests: cheap password hashing (scrypt's default cost takes tens of ms)."""
    return ServerConfig(password_hash_cost=2**4, **overrides)


class ServerHandle:
    """An anyio server running in a blocking portal; restartable on the same port."""

    def __init__(
        self,
        portal: anyio.from_thread.BlockingPortal,
        config: ServerConfig,
        ssl_context: Any = None,
        *,
        sessions: Sequence[SessionSpec] = (SessionSpec(SESSION, PASSWORD),),
        admin: AdminCredentials | None = None,
    ) -> None:
        self._portal = portal
        self._config = config
        self._ssl_context = ssl_context
        self._sessions = tuple(sessions)
        self._admin = admin
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
            sessions=self._sessions,
            admin=self._admin,
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

    def call(self, function: Callable[[Server], T]) -> T:
        """Run ``function(server)`` on the server's event loop (to read its state without a race)."""
        server = self._server
        assert server is not None
        return self._portal.call(lambda: function(server))

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{'wss' if self._ssl_context else 'ws'}://127.0.0.1:{self._port}"


def in_thread(function: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``function`` in a thread; the list receives its result or the exception it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(function())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome
