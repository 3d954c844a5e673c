"""The store's own thread (``fastport_anyio.durability._StoreThread``): calls in order on one thread,
results and exceptions back to the awaiting task, and a call never abandoned half-way. Both backends."""

from __future__ import annotations

import threading

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from fastport_anyio.durability import _StoreThread


async def test_calls_run_in_order_on_one_thread_of_their_own(anyio_backend: str) -> None:
    worker = _StoreThread()
    seen: list[tuple[int, str]] = []

    def call(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 10

    try:
        assert [await worker.run(lambda n=n: call(n)) for n in range(5)] == [0, 10, 20, 30, 40]
    finally:
        worker.stop()
    assert [n for n, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"fastport-store"}


async def test_an_exception_is_raised_in_the_awaiting_task_and_the_thread_goes_on(anyio_backend: str) -> None:
    worker = _StoreThread()

    def broken() -> None:
        raise OSError("database or disk is full")

    try:
        with pytest.raises(OSError, match="disk is full"):
            await worker.run(broken)
        assert await worker.run(lambda: "still serving") == "still serving"
    finally:
        worker.stop()


async def test_a_cancelled_wait_returns_only_once_the_call_is_over(anyio_backend: str) -> None:
    worker = _StoreThread()
    started, release = threading.Event(), threading.Event()
    events: list[str] = []
    scope = anyio.CancelScope()

    def slow_commit() -> None:
        started.set()
        release.wait(10)
        events.append("call over")

    async def commit() -> None:
        with scope:
            await worker.run(slow_commit)
            events.append("not cancelled")  # never: the cancellation comes in once the call is over
        events.append("task returned")

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(commit)
            assert await anyio.to_thread.run_sync(started.wait, 10)
            scope.cancel()  # the commit is under way: its task must wait for it regardless
            await wait_all_tasks_blocked()
            assert events == []
            release.set()
    finally:
        worker.stop()
    assert events == ["call over", "task returned"]
