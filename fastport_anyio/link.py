"""The asyncio fast path: one :class:`asyncio.Protocol` per plain TCP connection, no task per connection.

On asyncio, a connection served through anyio's streams costs two tasks (reader and writer), their cancel
scopes and task-group bookkeeping, an event per writer and anyio's own per-stream protocol, queue and event:
~3 KiB per idle connection visible to Python's allocator, and a task switch or two per message that
trickles. Here the event loop's transport calls the connection's :class:`Link` directly: ``data_received``
hands the chunk to the core, ``pause_writing`` / ``resume_writing`` are the core's ``write_blocked`` /
``write_completed``, and nothing waits anywhere. The behaviour is exactly the streams path's (see
:mod:`fastport_anyio.server`): one buffer per dirty connection written at once, what the socket does not
take kept in the transport while new output waits in the core (bounded there, with its write deadline),
the lingering close, and ``should_abort`` dropping the socket at once.

Used by :class:`~fastport_anyio.server.Server` on asyncio (the selector loop or uvloop) for plain TCP
listeners; TLS listeners and trio use the streams path. The server owns the decisions; a link only
moves bytes and events between its transport and the server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Link"]

logger = logging.getLogger(__name__)


class Link(asyncio.Protocol):
    """One accepted plain TCP connection on asyncio: its core id and the state of its transport.

    States: *open* (``id`` set, in the server's table) → *lingering* (the core forgot it; half-closed,
    reading until the peer's EOF, for a bounded time) → *gone* (transport closed). ``blocked`` is true
    while the transport holds bytes the socket did not take (its write buffer limits are 0, so
    ``pause_writing`` means exactly "a write is blocked" and ``resume_writing`` "it completed").
    """

    __slots__ = ("blocked", "id", "linger", "peer_eof", "server", "transport")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.id = 0
        """The core's connection id; 0 once the core has forgotten it."""
        self.blocked = False
        self.peer_eof = False
        self.linger: asyncio.TimerHandle | None = None

    # -- the transport's callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, hence no isinstance check).
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # asyncio sets it only for sockets made with proto=IPPROTO_TCP, and the listeners' are proto 0;
            # without it, an answer written just after another waits for the peer's delayed ACK (~40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.server._link_made(self, str(peer[0]) if isinstance(peer, tuple) else str(peer or ""))

    def data_received(self, data: bytes) -> None:
        if self.id:
            self.server._link_input(self, data)
        # lingering: the peer's last bytes are read and dropped until its EOF

    def eof_received(self) -> bool:
        self.peer_eof = True
        if self.id:
            self.server._link_input(self, b"")
        elif self.transport is not None:
            self.transport.close()  # the lingering close is over
        return True  # keep the transport: our last bytes (a Close frame) may still be going out

    def pause_writing(self) -> None:
        self.blocked = True
        if self.id:
            self.server._link_blocked(self)

    def resume_writing(self) -> None:
        self.blocked = False
        if self.id:
            self.server._link_drained(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.debug("connection %d: lost: %r", self.id, exc)
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        if self.id:
            self.server._link_lost(self)
        else:
            self.server._link_gone(self)
        self.transport = None

    # -- what the server tells it -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """One buffer: sent at once as far as the kernel takes it (``pause_writing`` if not)."""
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the socket now, abandoning whatever the transport still holds."""
        if self.transport is not None:
            self.transport.abort()

    def close_politely(self, loop: asyncio.AbstractEventLoop, linger: float) -> None:
        """The lingering close, once everything is written: half-close, read until the peer's EOF (at most
        ``linger`` seconds), close.

        Closing a socket with unread input makes the kernel answer with a reset, which can destroy our last
        bytes (a Close frame, a 400 answer) before the peer reads them.
        """
        transport = self.transport
        if transport is None:
            return
        if self.peer_eof or not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the peer is gone already
            transport.close()
            return
        self.linger = loop.call_later(linger, transport.close)
