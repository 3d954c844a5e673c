"""The store writer (``fastport_anyio.durability.StoreWriter``) over the store's own thread, with a store
whose commit the test holds. Both backends."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import anyio
import anyio.to_thread

from fastport_anyio.durability import StoreWriter, ThreadedStore
from fastport_core.config import ServerConfig
from fastport_core.server import ServerCore
from fastport_core.storage import StoreBatch
from tests.store_model import ModelStore


class HeldStore(ModelStore):
    """Records what each commit carried (batch numbers); a commit waits for :attr:`release`."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def commit(self, batches: Sequence[StoreBatch]) -> None:
        self.started.set()
        self.release.wait(10.0)
        super().commit(batches)
        self.commits.append([batch.seq for batch in batches])


async def test_a_commit_under_way_at_shutdown_is_finished_and_never_committed_again(
    anyio_backend: str,
) -> None:
    core = ServerCore(ServerConfig(password_hash_cost=2**4), durable=True)
    store = HeldStore()
    writer = StoreWriter(core, ThreadedStore(store), anyio.current_time, lambda: None)
    core.create_session("first", "pw", 0.0)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(writer.run)
        writer.wake()
        assert await anyio.to_thread.run_sync(store.started.wait, 10.0)
        tasks.cancel_scope.cancel()  # the shutdown, while the commit is under way (it reaches the disk)
        store.release.set()
    core.create_session("second", "pw", 0.0)
    await writer.finish()
    assert store.commits == [[1], [2]]  # each batch once: the first commit's batch is not repeated
    assert {session.name for session in store.load().sessions} == {"first", "second"}
