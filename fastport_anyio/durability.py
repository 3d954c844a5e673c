"""The server's link to its store: group commits on one worker thread (DESIGN §7).

The sans-IO core journals every change to durable state and holds the confirmations that depend on it
(:mod:`fastport_core.storage`). This module is the adapter's half: whenever the core has changes, the
:class:`StoreWriter` takes them as a batch and commits it in a worker thread, one commit at a time. While
a commit runs the event loop goes on serving, and everything journalled meanwhile becomes the next
batch: the busier the broker, the more each transaction carries (group commit), with no added latency
when it is idle. Under load it waits a couple of milliseconds before taking the next batch, so that more
of it is ACKed (and coalesced away) first. Once a commit returns, the core is told, and the
``publish_response`` frames that waited for it go out.

A failed commit (a full disk, an I/O error) is retried, the same batches again, with a growing delay;
meanwhile the core refuses publishes with ``store_unavailable``. Nothing the core confirmed is ever
un-confirmed, and nothing is confirmed before it is on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import anyio
import anyio.to_thread

from fastport_core.server import ServerCore
from fastport_core.storage import BacklogRequest, MessageRecord, Snapshot, StoreBatch

__all__ = ["Store", "StoreWriter"]

logger = logging.getLogger(__name__)

RETRY_FIRST: Final = 0.1
"""Seconds before the first retry of a failed commit (doubling up to :data:`RETRY_MAX`)."""
RETRY_MAX: Final = 5.0
GROUP_DELAY: Final = 0.002
"""Seconds a busy writer waits before taking the next batch (see :meth:`StoreWriter.run`): measured under
load (benchmarks/durable_bench.py), it saves ~20% of the durable mode's CPU per message at the cost of
this much confirmation latency; an idle writer does not wait."""


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


class StoreWriter:
    """Commits the core's store batches in order, grouped, on one thread; see the module docstring.

    ``after_commit`` is the server's flush (the core has confirmations to send once a commit is done).
    """

    def __init__(
        self, core: ServerCore, store: Store, now: Callable[[], float], after_commit: Callable[[], None]
    ) -> None:
        self._core = core
        self._store = store
        self._now = now
        self._after_commit = after_commit
        self._limiter = anyio.CapacityLimiter(1)
        self._wake = anyio.Event()
        self._uncommitted: list[StoreBatch] = []
        self._requests: list[BacklogRequest] = []
        """Backlog pages the core asked for and the store has not answered yet."""
        """Batches taken from the core and not yet durable (retried together after a failure)."""

    async def load(self) -> Snapshot:
        return await anyio.to_thread.run_sync(self._store.load, limiter=self._limiter)

    def wake(self) -> None:
        """The core journalled changes: commit them as soon as the commit in progress (if any) returns."""
        self._wake.set()

    async def run(self) -> None:
        """Commit whatever the core journals, until cancelled (then :meth:`finish`)."""
        delay = RETRY_FIRST
        while True:
            if self._wake.is_set():
                # Changes came in while the last commit ran: the broker is busy. Let the ACKs already on
                # their way land first, so that messages delivered and ACKed meanwhile never reach the disk.
                await anyio.sleep(GROUP_DELAY)
            else:
                await self._wake.wait()  # idle: commit as soon as anything changes
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
            await anyio.to_thread.run_sync(self._store.close, limiter=self._limiter)

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
                await anyio.to_thread.run_sync(self._store.commit, batches, limiter=self._limiter)
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
                rows = await anyio.to_thread.run_sync(
                    self._store.load_backlog, *request, limiter=self._limiter
                )
            except Exception as exc:
                logger.warning("reading a stored backlog failed (%s): retrying", exc)
                return False
            del self._requests[0]
            core.backlog_loaded(request, rows, self._now())
            self._after_commit()
        return True
