"""The server's link to what keeps its state: group commits to a store or a cluster's engine (DESIGN §7, §8).

The sans-IO core journals every change to durable state and holds the confirmations that depend on it
(:mod:`fastport_core.storage`). This module is the adapter's half. A :class:`Backend` is what keeps the
state: an SQLite store (:class:`ThreadedStore` runs its blocking calls on a thread of its own) or a NATS
JetStream cluster (:class:`~fastport_anyio.cluster.NatsCluster`); in memory there is none. Whenever the
core has changes, the :class:`StoreWriter` takes them as a batch and commits it, one commit at a time. While
a commit runs the event loop goes on serving, and everything journalled meanwhile becomes the next batch:
the busier the broker, the more each transaction carries (group commit). When to take a batch is the
core's decision (``ServerCore.store_due``, one of its deadlines), and the server wakes the writer when it
is due: at most ``group_commit_delay`` (2 ms) after the oldest publish the batch confirms, sooner once the
deliveries it would write are ACKed. A delivery ACKed before its batch is taken is never written, nor is
its message (only the publish's dedupe entry is): a subscriber that keeps up costs the disk almost
nothing, and a publish with nothing to spare (no resumable subscriber, or every one ACKed already) is
committed at once. Once a commit returns, the core is told, and the ``publish_response`` frames that
waited for it go out.

A failed commit (a full disk, an I/O error) is retried, the same batches again, with a growing delay;
meanwhile the core refuses publishes with ``store_unavailable``. Nothing the core confirmed is ever
un-confirmed, and nothing is confirmed before it is on disk.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar, Final, Protocol, TypeVar

import anyio

from fastport_core.server import ServerCore
from fastport_core.storage import BacklogRequest, MessageRecord, Snapshot, StoreBatch

from .fastpath import threadsafe_caller

__all__ = ["Backend", "Store", "StoreWriter", "ThreadedStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_FIRST: Final = 0.1
"""Seconds before the first retry of a failed commit (doubling up to :data:`RETRY_MAX`)."""
RETRY_MAX: Final = 5.0


class Store(Protocol):
    """What the server needs of a store (:class:`~fastport_anyio.store.SqliteStore` is one).

    Its methods are called from a worker thread, one call at a time.
    """

    def load(self) -> Snapshot:
        """Everything the store holds, for :meth:`ServerCore.restore`."""
        ...

    def commit(self, batches: Sequence[StoreBatch]) -> None:
        """Make ``batches`` durable, in order, all or nothing; raise if that failed."""
        ...

    def load_backlog(
        self, session: str, client_id: str, after_seq: int, limit: int
    ) -> list[tuple[MessageRecord, int]]:
        """A page of a resumable subscriber's stored backlog (see :class:`BacklogRequest`)."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """What keeps a server's state: the three modes (in memory, a store, a cluster) share the core and
    differ only in this. The server calls :meth:`load` once, runs :meth:`serve` beside the
    :class:`StoreWriter`, which calls :meth:`commit` and :meth:`load_backlog` one at a time, and calls
    :meth:`aclose` last."""

    shared: ClassVar[bool]
    """A cluster's engine: the core runs as one of its nodes (``ServerCore(cluster=True)``)."""

    async def load(self) -> Snapshot:
        """What the core restores at start (:meth:`ServerCore.restore`)."""
        ...

    async def serve(self, core: ServerCore, now: Callable[[], float], flush: Callable[[], None]) -> None:
        """Whatever the backend does besides commits (a cluster's feeds), until cancelled; ``flush`` after
        every core call."""
        ...

    async def commit(self, batches: Sequence[StoreBatch]) -> None:
        """Make ``batches`` durable, in order; raise if that failed (the same batches come again)."""
        ...

    async def load_backlog(self, request: BacklogRequest) -> list[tuple[MessageRecord, int]]:
        """A page of a resumable subscriber's stored backlog (see :class:`BacklogRequest`)."""
        ...

    async def aclose(self) -> None: ...


class _StoreThread:
    """One long-lived thread that runs a store's blocking calls, one at a time, in order.

    anyio's ``to_thread.run_sync`` does the same job with a limiter, a worker pool and a future per call:
    ~67 µs of CPU per call against ~19 µs for a queue and a thread-safe callback (measured alone, both
    threads on one CPU), and a durable broker makes a call per commit: at a trickle, one per message.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Callable[[object], object]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` on the thread; its result, or its exception raised here. A call is never abandoned:
        cancelled meanwhile, this returns only once the call is over, and then lets the cancellation in."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="fastport-store", daemon=True)
            self._thread.start()
        done = anyio.Event()
        outcome: list[object] = []
        soon = threadsafe_caller()

        def finished(result: object) -> None:
            outcome.append(result)
            soon(done.set)

        self._jobs.put((call, finished))
        try:
            await done.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await done.wait()
            raise
        (result,) = outcome
        if isinstance(result, _Failed):
            raise result.error
        return result  # type: ignore[return-value]  # what call() returned

    def stop(self) -> None:
        """Let the thread end once the calls already queued are done."""
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, finished = job
            try:
                result: object = call()
            except BaseException as exc:  # raised in the awaiting task instead
                result = _Failed(exc)
            try:
                finished(result)
            except RuntimeError:  # the event loop is gone: nobody waits for this call any more
                logger.debug("a store call finished after its event loop closed")


class _Failed:
    """A call's exception, on its way from the store's thread to the task that awaits it."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ThreadedStore:
    """A :class:`Store` as a :class:`Backend`: its blocking calls run on one thread of its own, one at a
    time (:class:`_StoreThread`), so the event loop goes on serving while SQLite writes."""

    shared: ClassVar[bool] = False

    def __init__(self, store: Store) -> None:
        self._store = store
        self._thread = _StoreThread()

    async def load(self) -> Snapshot:
        return await self._thread.run(self._store.load)

    async def serve(self, core: ServerCore, now: Callable[[], float], flush: Callable[[], None]) -> None:
        """Nothing: a store only answers commits and reads."""

    async def commit(self, batches: Sequence[StoreBatch]) -> None:
        await self._thread.run(functools.partial(self._store.commit, batches))

    async def load_backlog(self, request: BacklogRequest) -> list[tuple[MessageRecord, int]]:
        return await self._thread.run(functools.partial(self._store.load_backlog, *request))

    async def aclose(self) -> None:
        try:
            await self._thread.run(self._store.close)
        finally:
            self._thread.stop()


class StoreWriter:
    """Commits the core's store batches in order, grouped, one commit at a time; see the module docstring.

    The server wakes it whenever the core says a batch is due (:meth:`ServerCore.store_ready`): when to
    commit is the core's decision, its deadline one of the core's timers. ``after_commit`` is the server's
    flush (the core has confirmations to send once a commit is done).
    """

    def __init__(
        self, core: ServerCore, backend: Backend, now: Callable[[], float], after_commit: Callable[[], None]
    ) -> None:
        self._core = core
        self._backend = backend
        self._now = now
        self._after_commit = after_commit
        self._wake = anyio.Event()
        self._uncommitted: list[StoreBatch] = []
        """Batches taken from the core and not yet durable (retried together after a failure)."""
        self._requests: list[BacklogRequest] = []
        """Backlog pages the core asked for and the store has not answered yet."""

    def wake(self) -> None:
        """A batch is due (or a backlog page is asked for): take it as soon as the commit in progress, if
        any, returns."""
        self._wake.set()

    async def run(self) -> None:
        """Commit whatever the core journals, until cancelled (then :meth:`finish`)."""
        delay = RETRY_FIRST
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if await self._commit():
                delay = RETRY_FIRST
                continue
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            self._wake.set()

    async def finish(self) -> None:
        """Commit what is left (at shutdown, once no connection can change anything) and close the store."""
        with anyio.CancelScope(shield=True):
            if not await self._commit():
                logger.error("the store could not be written at shutdown: the last changes are lost")
            await self._backend.aclose()

    async def _commit(self) -> bool:
        """Take the core's pending batches and commit them with any left from a failed attempt; then read
        the backlog pages the core asked for (after the commit: a page must see every stored delivery)."""
        core = self._core
        self._requests += core.take_backlog_requests()
        while (batch := core.take_store_batch()) is not None:
            self._uncommitted.append(batch)
        batches = self._uncommitted
        if batches:
            try:
                # Never cut short: a commit cancelled meanwhile (the shutdown) may reach the disk all the
                # same, and a batch committed twice can bring back a delivery ACKed in between. Shielded,
                # its outcome is known here, and finish() commits only what came after it.
                with anyio.CancelScope(shield=True):
                    await self._backend.commit(batches)
            except Exception as exc:
                logger.warning("store commit failed (%s): refusing publishes until it works again", exc)
                core.store_failed(self._now())
                self._after_commit()
                return False
            self._uncommitted = []
            core.store_committed(batches[-1].seq, self._now())
            self._after_commit()
        while self._requests:
            request = self._requests[0]
            try:
                rows = await self._backend.load_backlog(request)
            except Exception as exc:
                logger.warning("reading a stored backlog failed (%s): retrying", exc)
                return False
            del self._requests[0]
            core.backlog_loaded(request, rows, self._now())
            self._after_commit()
        return True
