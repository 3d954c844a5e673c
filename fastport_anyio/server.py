"""The anyio server: sockets, tasks and the clock around :class:`~fastport_core.server.ServerCore`.

This module decides nothing about the protocol. It moves bytes and time into the core and bytes out of it,
exactly as the core's module docstring says an adapter must, on asyncio or trio alike:

* **Accept.** Each accepted socket is registered with the core at once (``open_connection``), *before*
  its TLS handshake, so the core's absolute handshake deadline covers TLS, the HTTP upgrade and ``init``
  together; the core may refuse it on the spot (its connection limits).
* **Two paths per connection.** On asyncio (the selector loop or uvloop), a plain TCP connection is an
  :class:`asyncio.Protocol` (:class:`~fastport_anyio.link.Link`): the transport calls the core for each
  chunk it reads and reports blocked and drained writes; no task, no event, no cancel scope per connection
  (memory and wake-ups: docs/performance.md). Everywhere else (trio, TLS) a connection is served through
  anyio's streams: one task per connection reads (``receive(65536)``) and calls ``core.receive_data``,
  and a writer task (below) does the writes that wait. Both paths behave the same; what follows says how.
* **Timer.** The adapter's one timer runs ``core.handle_timeout(now)`` at ``core.next_deadline()``: on
  asyncio a ``loop.call_at`` handle, on trio a task that sleeps. Handshake, keepalive, close, write and
  shutdown deadlines are all the core's. After every input call the adapter compares the core's next
  deadline with the one the timer is set for and moves it only if the new one is earlier: an
  unconditional wake-up per input would cost a task switch (trio) or a timer handle (asyncio) per
  message.
* **Writes.** After *every* core call the adapter drains ``core.take_dirty()``: each dirty connection's
  ``core.data_to_send(conn)`` (everything the call queued for it, one buffer) goes out in one
  non-blocking send, and what the socket does not take at once goes to that connection's writer task,
  the only code that waits on its socket. A write that waits is reported to the core
  (``write_blocked`` / ``write_completed``), which drops the connection if it stays blocked too long.
  See :class:`_Connection` for why this shape, and what it costs. A link's transport does the same by
  itself: it sends at once and keeps what the socket did not take, and its ``pause_writing`` /
  ``resume_writing`` are the ``write_blocked`` / ``write_completed`` reports; meanwhile new output waits
  in the core.
* **Closing.** When ``core.should_close(conn)`` is true after its bytes are out, the writer ends the
  connection: the socket is half-closed and drained for a moment (a *lingering close*, so that a peer
  that was still sending gets our Close frame instead of a TCP reset), closed, and ``connection_lost`` is
  called. When ``core.should_abort(conn)`` is true (a blocked write past its deadline, the end of the
  shutdown grace period, a handshake deadline during TLS), the connection's tasks are cancelled at once
  (a link's transport is aborted). A link's lingering close is ``write_eof`` and a timer.

Time is the event loop's monotonic clock, the one ``anyio.current_time()`` reads (so the core's deadlines
agree with anyio's cancel scopes and sleeps), called directly: see :func:`_loop_clock`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from importlib import resources
from importlib.resources.abc import Traversable
from types import TracebackType
from typing import Any, Final, cast

import anyio
import anyio.abc
import anyio.to_thread
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSStream

from fastport_core.admin import AdminCredentials
from fastport_core.auth import PasswordCheck
from fastport_core.config import ServerConfig
from fastport_core.config_file import SessionSpec
from fastport_core.server import ServerCore

from .durability import Backend, Store, StoreWriter, ThreadedStore
from .fastpath import direct_send, running_backend
from .link import Link

__all__ = ["Server", "SessionSpec", "serve"]

logger = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 65536
"""Bytes asked of the socket per read: one read usually holds every frame a busy peer has pipelined, and
the core handles a whole chunk per call (the coalescing of DESIGN §6 works per chunk). (A
:class:`~fastport_anyio.link.Link`'s chunk is what asyncio's transport reads at once: up to 256 KiB.)"""

CLOSE_LINGER: Final = 2.0
"""Seconds the lingering close of a socket may take, once the core has forgotten its connection (socket
cleanup only: every protocol timer, the last write's included, is the core's)."""

VERIFY_WORKERS: Final = 2
"""Worker threads that run password checks (scrypt) at once, off the event loop (the machine's cores are
shared with the loop itself; the core bounds the queue behind them, ``max_pending_verifications``)."""

_ACCEPT_BACKOFF: Final = 0.1
"""Pause after an accept failure caused by resource exhaustion (out of file descriptors), which would
otherwise be retried in a busy loop."""

_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_STREAM_ERRORS: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ssl.SSLError,
    OSError,
)
"""What a dying connection raises on read or write; each just ends that connection."""


class _Connection:
    """One accepted socket: its core id, its streams, and the state of its write path.

    The write path, and why it is shaped so. A read on connection A can produce output for any other
    connection B (a publish fans out), and DESIGN §6 requires that A's read loop never waits on B's
    socket: a subscriber that stops reading must not stall its publishers. After every core call,
    :meth:`Server._flush` takes each dirty connection's bytes (one buffer: everything the call queued
    for it) and

    1. **writes them directly** with one non-blocking ``send`` on the socket when nothing of this
       connection is in flight (``busy`` false, no ``pending`` bytes). The kernel takes all of it in the
       common case and no task switch happens at all; whatever it does not take becomes ``pending``;
    2. otherwise, or for the rest, **wakes the connection's writer task** (``wake``), which sends with
       ``await stream.send(...)`` and so is the only code that ever waits on this socket. While it waits
       (``busy``), new output stays in the core, which bounds it (``max_output_buffer``), and the core's
       write deadline runs (``write_blocked``): past it the core says ``should_abort`` and the adapter
       cancels the connection's tasks. When the send returns, the writer takes everything queued
       meanwhile in one buffer (so a slow peer gets larger, fewer writes) and loops.

    Memory per connection is thus one in-flight buffer plus the core's bounded queue.

    Why the direct write, measured on loopback (2 CPUs; server CPU per message under a Python load
    generator; docs/operations.md, "The adapter"): with every write handed to the writer task, one
    request/response at a time cost ~300-330 µs per message on both backends, because a trickle of
    messages paid a task switch per write; the direct write brings it to ~180-220 µs. Under pipelined
    load both designs cost the same (~35-50 µs per 1:1 message, ~12-20 µs per fan-out delivery), since
    each write already carried many frames. A third design, the reader writing only its *own*
    connection's answers inline, saved less (0-25 %) and needed two tasks to hand one stream back and
    forth.

    The direct write needs a plain TCP socket it can write to without the event loop's help
    (:func:`~fastport_anyio.fastpath.direct_send`). TLS streams use the writer task for everything. (On
    asyncio, plain TCP connections are :class:`~fastport_anyio.link.Link` protocols instead, whose
    transport does the same: it sends at once, and keeps and sends what the kernel did not take.)
    """

    __slots__ = ("busy", "direct", "id", "pending", "scope", "stream", "tcp", "wake")

    def __init__(self, conn: int, tcp: anyio.abc.SocketStream) -> None:
        self.id = conn
        self.tcp = tcp
        """The TCP stream (under the TLS stream for ``wss://``), for the lingering close."""
        self.stream: anyio.abc.ByteStream | None = None
        """What the WebSocket bytes go through (the TLS stream for ``wss://``); ``None`` during TLS."""
        self.direct: Callable[[bytes], int] | None = None
        self.pending = b""
        """Bytes taken from the core that the direct write could not place; the writer sends them next."""
        self.wake = anyio.Event()
        self.busy = False
        """The writer is inside ``stream.send``."""
        self.scope = anyio.CancelScope()
        """Around everything the connection's task does: cancelled when the core says to drop it now."""


def _loop_clock() -> Callable[[], float]:
    """The running event loop's clock as a plain function: what ``anyio.current_time()`` returns, without its
    per-call backend look-up (~1.5 µs a call against ~0.1 µs for ``loop.time``; a call per read).

    The backend is found as anyio finds it (sniffio when installed, else asyncio), so the core's deadlines
    stay on the clock of anyio's cancel scopes and ``sleep_until``: asyncio's ``loop.time()`` on asyncio,
    ``trio.current_time()`` (trio's own clock, not ``time.monotonic()``) on trio.
    """
    if running_backend() == "trio":
        import trio

        return trio.current_time
    return asyncio.get_running_loop().time


class Server:
    """A running broker: ``async with Server(...) as server:`` listens, serves, and stops gracefully.

    ``port=0`` binds any free port; :attr:`port` is the one bound. ``sessions`` are created before the
    socket is bound (a bad one raises :class:`~fastport_core.errors.LocalProtocolError` and nothing
    listens). ``admin=None`` turns the admin API off. ``ssl_context`` makes every connection TLS
    (``wss://``, ``https://``). Leaving the block, or :meth:`shutdown`, stops the server gracefully:
    it stops accepting, closes every WebSocket with 1001, and the core drops whatever is left
    ``shutdown_timeout`` seconds later.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 3000,
        *,
        config: ServerConfig | None = None,
        sessions: Sequence[SessionSpec] = (),
        admin: AdminCredentials | None = None,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float = 5.0,
        store: Store | None = None,
        cluster: Backend | None = None,
    ) -> None:
        """``store``: keep the state in this store (``--store``); ``cluster``: run as a node of this
        cluster (``--cluster``, :class:`~fastport_anyio.cluster.NatsCluster`); neither: in memory."""
        if store is not None and cluster is not None:
            raise ValueError("a server keeps its state in a store or in a cluster, not both")
        backend = ThreadedStore(store) if store is not None else cluster
        self.core = ServerCore(
            config,
            admin_credentials=admin,
            offload_verification=True,
            web_files=web_files(),
            secure_cookies=ssl_context is not None,
            console_history=True,
            durable=backend is not None,
            cluster=backend is not None and backend.shared,
        )
        self._backend = backend
        self._store_writer: StoreWriter | None = None
        self._verify_limiter = anyio.CapacityLimiter(VERIFY_WORKERS)
        self.host = host
        self._requested_port = port
        self._sessions = tuple(sessions)
        self._admin_on = admin is not None
        self._ssl_context = ssl_context
        self._shutdown_timeout = shutdown_timeout
        self._connections: dict[int, _Connection | Link] = {}
        self._listeners: list[anyio.abc.SocketListener] = []
        self._protocol_servers: list[asyncio.AbstractServer] = []
        """asyncio's servers accepting :class:`Link` connections on :attr:`_listeners`' sockets (asyncio,
        plain TCP); empty when the listeners' accept loops run instead."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The running asyncio loop (``None`` on trio): its ``call_at`` is the timer, and plain TCP
        connections are :class:`Link` protocols on it."""
        self._timer_handle: asyncio.TimerHandle | None = None
        self._lingering: set[Link] = set()
        """Links the core has forgotten, in their lingering close: dropped when the server stops (as the
        streams path's lingering closes are cancelled with its task group)."""
        self._exit_stack: AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._accept_scopes: list[anyio.CancelScope] = []
        self._timer_at = math.inf
        self._timer_wake = anyio.Event()
        self._closing = False
        self._all_closed = anyio.Event()
        self._stopped = anyio.Event()
        self._port: int | None = None
        self._now: Callable[[], float] = anyio.current_time
        """The event loop's clock (:func:`_loop_clock`, chosen once the loop runs)."""

    # -- public ----------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port bound (the real one when ``port=0`` was asked for)."""
        if self._port is None:
            raise RuntimeError("the server is not listening yet: use it inside 'async with'")
        return self._port

    @property
    def url(self) -> str:
        """``ws://host:port`` (``wss://`` with TLS), for log lines and clients."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self._ssl_context else 'ws'}://{host}:{self.port}"

    async def __aenter__(self) -> Server:
        self._now = _loop_clock()
        now = self._now()
        self.core.set_wall_clock(time.time(), now)  # token expiry is wall-clock time
        if self._backend is not None:
            self._store_writer = StoreWriter(self.core, self._backend, self._now, self._flush)
            self.core.restore(await self._backend.load(), now)
        for spec in self._sessions:
            self.core.broker.configure_session(
                spec.name,
                spec.password,
                now,
                spec.settings,
                secret_key=spec.secret_key,
                token_key=spec.token_key,
            )
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self._requested_port)
        # One per address the host resolves to; create_tcp_listener only makes socket listeners.
        self._listeners = [cast(anyio.abc.SocketListener, one) for one in listener.listeners]
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._close_listeners)
            self._port = int(listener.extra(SocketAttribute.local_port))
            if running_backend() == "asyncio":
                self._loop = asyncio.get_running_loop()
            outer = await stack.enter_async_context(anyio.create_task_group())
            self._task_group = await outer.start(self._host)
            if self._loop is not None:
                self._reschedule()  # arms the call_at timer (on trio, the timer task runs already)
                if self._ssl_context is None:
                    await self._serve_links()
            self._exit_stack = stack.pop_all()
        self._log_start()
        return self

    async def _host(self, *, task_status: anyio.abc.TaskStatus[anyio.abc.TaskGroup]) -> None:
        """Run the timer, the accept loops and every connection in a task group shielded from outside
        cancellation: cancelling the code inside ``async with Server`` (or ``serve``) must still let
        :meth:`shutdown` close each connection with 1001. Only :meth:`shutdown` cancels this group."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as task_group:
                if self._loop is None:
                    task_group.start_soon(self._run_timer)
                if self._store_writer is not None:
                    task_group.start_soon(self._store_writer.run)
                if self._backend is not None:
                    task_group.start_soon(self._backend.serve, self.core, self._now, self._flush)
                if self._loop is None or self._ssl_context is not None:
                    for socket_listener in self._listeners:
                        task_group.start_soon(self._accept_loop, socket_listener, task_group)
                task_status.started(task_group)
                await anyio.sleep_forever()  # the group stays open for password checks until shutdown

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        """Stop gracefully (shielded, bounded by ``shutdown_timeout``), even when cancelled."""
        assert self._exit_stack is not None
        with anyio.CancelScope(shield=True):
            await self.shutdown()
        return await self._exit_stack.__aexit__(exc_type, exc, tb)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, close every connection with 1001 and return once they are gone.

        Clients get ``timeout`` seconds (default ``shutdown_timeout``) to answer the close; then the core
        aborts the remaining connections. A second call waits for the first, shortening its grace period
        to its own ``timeout`` (a second Ctrl-C means "now").
        """
        grace = self._shutdown_timeout if timeout is None else timeout
        if self._closing:
            self.core.shutdown(self._now(), grace)  # the core only ever shortens the grace period
            self._flush()
            await self._stopped.wait()
            return
        self._closing = True
        logger.info("shutting down: closing %d connection(s)", len(self._connections))
        for scope in self._accept_scopes:
            scope.cancel()
        for protocol_server in self._protocol_servers:
            protocol_server.close()
        await self._close_listeners()
        self.core.shutdown(self._now(), grace)
        self._flush()
        if self._connections:
            await self._all_closed.wait()
        for link in list(self._lingering):
            link.abort()
        self._timer_at = -math.inf  # no timer from now on
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()  # the timer task on trio, the store writer between commits
        if self._store_writer is not None:
            await self._store_writer.finish()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`shutdown` has finished (from any task)."""
        await self._stopped.wait()

    # -- the adapter's three duties --------------------------------------------------------------------

    def _flush(self) -> None:
        """After every core call: write each dirty connection's bytes, or hand them to its writer."""
        core = self.core
        for check in core.take_verifications():
            assert self._task_group is not None
            self._task_group.start_soon(self._verify, check)
        if self._store_writer is not None and core.store_ready(self._now()):
            self._store_writer.wake()
        while dirty := core.take_dirty():  # forgetting a connection (a link's close) may dirty others
            self._flush_connections(dirty)
        self._reschedule()

    def _flush_connections(self, dirty: list[int]) -> None:
        core = self.core
        for conn in dirty:
            connection = self._connections.get(conn)
            if connection is None:
                continue
            if type(connection) is Link:
                self._pump(connection)
                continue
            assert isinstance(connection, _Connection)
            if connection.stream is None or connection.busy or connection.pending:
                # TLS handshake in progress (nothing to write yet), or the writer takes the new bytes when
                # its send returns. Either way, the core may want the connection gone now.
                if core.should_abort(conn) or (connection.stream is None and core.should_close(conn)):
                    connection.scope.cancel()
                continue
            direct = connection.direct
            if direct is not None:
                data = core.data_to_send(conn)
                if data:
                    try:
                        sent = direct(data)
                    except OSError:  # full (BlockingIOError), or broken: the writer finds out which
                        sent = 0
                    if sent < len(data):
                        connection.pending = data[sent:]
                        core.write_blocked(conn, self._now())
                        connection.wake.set()
                        continue
                if not core.should_close(conn):
                    continue
            if core.should_abort(conn):
                connection.scope.cancel()
            else:
                connection.wake.set()

    def _reschedule(self) -> None:
        """Wake the timer if the core's next deadline is now earlier than the one it sleeps towards."""
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            if self._loop is None:
                self._timer_wake.set()
            else:
                if self._timer_handle is not None:
                    self._timer_handle.cancel()
                self._timer_at = deadline
                self._timer_handle = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        """The timer on asyncio: a ``call_at`` handle, moved by :meth:`_reschedule` (no task, so a deadline
        that moves earlier, e.g. a delivery's first retry when every earlier one was ACKed, costs a heap
        push instead of a task switch). Re-armed by the flush."""
        self._timer_handle = None
        self._timer_at = math.inf
        self.core.handle_timeout(self._now())
        self._flush()

    async def _run_timer(self) -> None:
        """The timer on trio: a task sleeping until the core's next deadline, woken when it moves earlier."""
        core = self.core
        while True:
            deadline = core.next_deadline()
            self._timer_at = math.inf if deadline is None else deadline
            self._timer_wake = wake = anyio.Event()
            with anyio.CancelScope(deadline=self._timer_at):
                await wake.wait()
            now = self._now()
            if now >= self._timer_at:
                self._timer_at = math.inf
                core.handle_timeout(now)
                self._flush()

    async def _verify(self, check: PasswordCheck) -> None:
        """Run one password check (scrypt) in a worker thread, so it stalls no connection; the core decides
        what the result means."""
        ok = await anyio.to_thread.run_sync(check.run, limiter=self._verify_limiter)
        self.core.verification_done(check, ok, self._now())
        self._flush()

    async def _writer(self, connection: _Connection, stop: anyio.CancelScope) -> None:
        """Send what the direct write could not, one buffer per wake-up; end the connection when told.

        Every send is reported to the core (``write_blocked`` before, ``write_completed`` after), whose
        write deadline ends a send the peer never drains (``should_abort``, then this task is cancelled).
        """
        core = self.core
        conn = connection.id
        stream = connection.stream
        assert stream is not None
        try:
            while True:
                await connection.wake.wait()
                connection.wake = anyio.Event()
                while data := connection.pending + core.data_to_send(conn):
                    connection.pending = b""
                    connection.busy = True
                    core.write_blocked(conn, self._now())
                    self._reschedule()
                    await stream.send(data)
                    core.write_completed(conn, self._now())
                    connection.busy = False
                if core.should_close(conn):
                    return
        except _STREAM_ERRORS as exc:
            logger.debug("connection %d: write failed: %r", conn, exc)
        finally:
            connection.busy = False
            connection.pending = b""
            stop.cancel()  # the reader too: the connection is over

    async def _read(self, connection: _Connection) -> None:
        core = self.core
        conn = connection.id
        now = self._now
        flush = self._flush
        stream = connection.stream
        assert stream is not None

        receive = stream.receive
        while True:
            try:
                data = await receive(RECEIVE_SIZE)
            except _STREAM_ERRORS as exc:
                if not isinstance(exc, anyio.EndOfStream):
                    logger.debug("connection %d: read failed: %r", conn, exc)
                data = b""
            core.receive_data(conn, data, now())
            flush()
            if not data:
                return  # the core closes the connection now; the writer sends what is left, then stops

    # -- links: asyncio, plain TCP (fastport_anyio.link) -----------------------------------------------

    async def _serve_links(self) -> None:
        """Accept on every listener's socket with asyncio's own accept loop, each connection a :class:`Link`
        (the socket stays the listener's: closing the listeners closes it)."""
        loop = self._loop
        assert loop is not None
        for listener in self._listeners:
            sock = listener.extra(SocketAttribute.raw_socket)
            accepting = await loop.create_server(lambda: Link(self), sock=sock, backlog=65536)
            self._protocol_servers.append(accepting)

    def _link_made(self, link: Link, peer: str) -> None:
        core = self.core
        now = self._now()
        core.set_wall_clock(time.time(), now)  # follows adjustments of the wall clock
        conn = core.open_connection(now, peer)
        if core.should_close(conn):  # refused at once (its connection limits, a shutdown)
            core.connection_lost(conn, now)
            link.abort()
            self._flush()
            return
        link.id = conn
        self._connections[conn] = link
        self._flush()

    def _link_input(self, link: Link, data: bytes) -> None:
        try:
            self.core.receive_data(link.id, data, self._now())
            self._flush()
        except Exception:
            # A bug (the core promises never to raise for input): it costs this connection, not the server.
            logger.exception("connection %d: unexpected error; dropping the connection", link.id)
            if link.id:
                self._link_end(link, polite=False)
            else:
                link.abort()

    def _link_blocked(self, link: Link) -> None:
        """The transport kept bytes the socket did not take (called from ``link.write``, within a flush,
        which then reschedules the timer for the write deadline)."""
        self.core.write_blocked(link.id, self._now())

    def _link_drained(self, link: Link) -> None:
        """The transport's bytes are all out: send what the core queued meanwhile, or end the connection."""
        self.core.write_completed(link.id, self._now())
        self._pump(link)
        self._flush()

    def _link_lost(self, link: Link) -> None:
        """The socket died (a reset, an error) while the core still knew its connection."""
        self._forget(link)
        self._flush()

    def _pump(self, link: Link) -> None:
        """A dirty link: write the core's bytes (unless a write is blocked: they wait in the core), then
        end the connection if the core says so."""
        core = self.core
        conn = link.id
        if not link.blocked:
            data = core.data_to_send(conn)
            if data:
                link.write(data)
        if core.should_abort(conn):
            self._link_end(link, polite=False)
        elif not link.blocked and core.should_close(conn):
            self._link_end(link, polite=not self._closing)

    def _link_end(self, link: Link, *, polite: bool) -> None:
        """The core forgets the connection, then the socket is closed politely (lingering) or dropped."""
        self._forget(link)
        if polite:
            assert self._loop is not None
            self._lingering.add(link)
            link.close_politely(self._loop, CLOSE_LINGER)
        else:
            link.abort()

    def _link_gone(self, link: Link) -> None:
        """A forgotten link's socket is closed (its lingering close is over)."""
        self._lingering.discard(link)

    def _forget(self, link: Link) -> None:
        conn = link.id
        link.id = 0
        del self._connections[conn]
        self.core.connection_lost(conn, self._now())
        if self._closing and not self._connections:
            self._all_closed.set()

    # -- connections -----------------------------------------------------------------------------------

    async def _accept_loop(self, listener: anyio.abc.SocketListener, task_group: anyio.abc.TaskGroup) -> None:
        with anyio.CancelScope() as scope:
            self._accept_scopes.append(scope)
            while True:
                try:
                    stream = await listener.accept()
                except anyio.ClosedResourceError:
                    return
                except OSError as exc:
                    if exc.errno in _RESOURCE_ERRNOS:
                        logger.warning("cannot accept connections: %s; retrying", exc)
                        await anyio.sleep(_ACCEPT_BACKOFF)
                    else:  # e.g. ECONNABORTED: that peer gave up while queued; the next one may not
                        logger.debug("accept failed: %s", exc)
                    continue
                task_group.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, tcp: anyio.abc.SocketStream) -> None:
        core = self.core
        peer = _peer_address(tcp)
        now = self._now()
        core.set_wall_clock(time.time(), now)  # follows adjustments of the wall clock
        conn = core.open_connection(now, peer)  # before TLS: the handshake deadline covers it
        connection = _Connection(conn, tcp)
        self._connections[conn] = connection
        finished = False
        try:
            with connection.scope:
                self._flush()  # the core may have refused it at once (its connection limits, a shutdown)
                stream = await self._tls_handshake(tcp, peer) if self._ssl_context is not None else tcp
                if stream is not None:
                    connection.stream = stream
                    connection.direct = direct_send(tcp) if stream is tcp else None
                    async with anyio.create_task_group() as task_group:
                        task_group.start_soon(self._writer, connection, task_group.cancel_scope)
                        self._flush()  # anything the core decided during the TLS handshake
                        await self._read(connection)
                    finished = core.should_close(conn) and not core.should_abort(conn)
        except Exception:
            # A bug (the core promises never to raise for input): it costs this connection, not the
            # server and everyone on it. Logged with its traceback, loudly.
            logger.exception("connection %d (%s): unexpected error; dropping the connection", conn, peer)
        finally:
            # The core forgets the connection first (no await before it, so even a cancelled task gets
            # here); only the socket's own cleanup follows.
            del self._connections[conn]
            core.connection_lost(conn, self._now())
            self._flush()
            if self._closing and not self._connections:
                self._all_closed.set()
            try:
                if finished and not self._closing:
                    await self._linger(connection)
            finally:
                await anyio.aclose_forcefully(connection.tcp)

    async def _tls_handshake(self, tcp: anyio.abc.SocketStream, peer: str) -> TLSStream | None:
        """The server side of TLS, or ``None`` if it failed. Its deadline is the core's handshake deadline,
        which cancels the connection's scope."""
        assert self._ssl_context is not None
        try:
            # standard_compatible=False: a peer's EOF without close_notify is a plain end of stream
            # (the WebSocket Close frame already marks the end of the data), and closing never waits
            # on the peer; the polite close_notify exchange is done, bounded, by _linger.
            return await TLSStream.wrap(
                tcp, server_side=True, ssl_context=self._ssl_context, standard_compatible=False
            )
        except _STREAM_ERRORS as exc:
            logger.debug("TLS handshake with %s failed: %r", peer, exc)
            return None

    @staticmethod
    async def _linger(connection: _Connection) -> None:
        """End the connection politely, in at most :data:`CLOSE_LINGER` seconds: TLS ``close_notify``
        (answered by the peer's), then a TCP half-close, then read until the peer's EOF.

        Closing a socket with unread input makes the kernel answer with a reset, which can destroy our
        last bytes (a Close frame, a 400 answer) before the peer reads them: a peer still sending (the
        rest of an oversized message, say) would see "connection reset" instead of the close code.
        """
        with anyio.move_on_after(CLOSE_LINGER):
            try:
                if isinstance(connection.stream, TLSStream):
                    await connection.stream.unwrap()
                await connection.tcp.send_eof()
                while await connection.tcp.receive(RECEIVE_SIZE):
                    pass
            except _STREAM_ERRORS:
                pass

    async def _close_listeners(self) -> None:
        for listener in self._listeners:
            await anyio.aclose_forcefully(listener)

    def _log_start(self) -> None:
        logger.info("fastport listening on %s", self.url)
        if self._admin_on:
            logger.info("admin API enabled at %s/api/ (/metrics and /healthz too)", _http_url(self.url))
            logger.info("web console at %s/admin/", _http_url(self.url))
        else:
            logger.info(
                "admin API disabled: set --admin-user/--admin-password or "
                "FASTPORT_ADMIN_USER/FASTPORT_ADMIN_PASSWORD"
            )
        logger.info("playground at %s/playground/", _http_url(self.url))
        if self._sessions:
            names = ", ".join(spec.name for spec in self._sessions)
            logger.info("%d session(s) loaded: %s", len(self._sessions), names)
        else:
            logger.info("no sessions loaded: declare them in a config file or create them via the admin API")


def web_files() -> dict[str, bytes]:
    """The web console's files shipped in this package (``fastport_anyio/web``), by relative path.

    Read with ``importlib.resources`` so that they are found in a wheel, a zip or a source checkout alike;
    the core maps them to URLs and serves them (:mod:`fastport_core.console`).
    """

    def walk(folder: Traversable, prefix: str) -> Iterator[tuple[str, bytes]]:
        for entry in folder.iterdir():
            if entry.is_dir():
                yield from walk(entry, f"{prefix}{entry.name}/")
            elif not entry.name.startswith("."):
                yield f"{prefix}{entry.name}", entry.read_bytes()

    return dict(walk(resources.files("fastport_anyio").joinpath("web"), ""))


def _http_url(ws_url: str) -> str:
    return "http" + ws_url[2:]


def _peer_address(stream: anyio.abc.SocketStream) -> str:
    """The peer's IP address (the key of the core's auth throttling), or ``""`` if unknown."""
    try:
        address: Any = stream.extra(SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return ""
    return str(address[0]) if isinstance(address, tuple) else str(address)


async def serve(
    host: str = "127.0.0.1",
    port: int = 3000,
    *,
    config: ServerConfig | None = None,
    sessions: Sequence[SessionSpec] = (),
    admin: AdminCredentials | None = None,
    ssl_context: ssl.SSLContext | None = None,
    shutdown_timeout: float = 5.0,
    store: Store | None = None,
    cluster: Backend | None = None,
    task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a broker until cancelled or until :meth:`Server.shutdown` is called.

    ``await task_group.start(serve, "127.0.0.1", 0)`` returns the :class:`Server` once it listens (its
    :attr:`Server.port` is the bound port). Cancellation stops it gracefully too (see :class:`Server`).
    """
    async with Server(
        host,
        port,
        config=config,
        sessions=sessions,
        admin=admin,
        ssl_context=ssl_context,
        shutdown_timeout=shutdown_timeout,
        store=store,
        cluster=cluster,
    ) as server:
        task_status.started(server)
        await server.wait_stopped()
