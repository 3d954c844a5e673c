"""The server with a store, in process (issue 9): the writer commits, restarts restore, a failing store
refuses publishes with ``store_unavailable`` until it works again. Real sockets on loopback, both backends;
the store is :class:`~tests.store_model.ModelStore` (the SQLite store is tested in test_store.py and with
real processes in test_durable_process.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.to_thread

from fastport_anyio import Server
from fastport_core.storage import StoreBatch
from tests.store_model import ModelStore

from .conftest import FAST_CONFIG, SESSIONS, RawClient, publish_frame


async def member(port: int, **init: Any) -> RawClient:
    client = await RawClient.connect(port)
    answer = await client.request(
        {"type": "init", "sessionName": "alpha", "password": "alpha-password", **init}
    )
    assert answer["success"] is True, answer
    return client


async def test_confirmed_messages_survive_a_restart_and_reach_the_resumable_subscriber(
    anyio_backend: str,
) -> None:
    store = ModelStore()
    async with Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, store=store) as server:
        sub = await member(server.port, clientId="dev", persistent=True)
        assert (await sub.subscribe("t"))["success"] is True
        await sub.aclose()  # away while the messages are published
        async with await member(server.port) as pub:
            for i in range(20):
                answer = await pub.request(publish_frame("t", f"payload {i}", f"m{i}"))
                assert answer == {
                    "type": "publish_response", "success": True, "messageId": f"m{i}", "deliveredTo": 1,
                }  # fmt: skip
                # Confirmed means committed: the store holds it already.
                assert f"m{i}" in store.message_ids
    async with (
        Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, store=store) as server,
        await member(server.port, clientId="dev", persistent=True) as sub,
    ):
        got = []
        for _ in range(20):
            message = await sub.receive()
            assert message["type"] == "message"
            got.append(message["messageId"])
            await sub.send_json({"type": "ack", "topic": "t", "messageId": message["messageId"]})
        assert got == [f"m{i}" for i in range(20)]
        # A round trip after the last ACK: the server has handled every ACK before it answers.
        assert (await sub.subscribe("t"))["success"] is True
    assert store.messages == {} and store.deliveries == {}


async def test_a_failing_store_refuses_publishes_until_it_commits_again(anyio_backend: str) -> None:
    store = ModelStore()
    async with (
        Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, store=store) as server,
        await member(server.port, clientId="dev") as sub,
    ):
        assert (await sub.subscribe("t"))["success"] is True
        async with await member(server.port) as pub:
            store.fail = True
            await pub.send_json(publish_frame("t", "x", "m1"))  # journalled; its commit fails
            message = await sub.receive()  # delivery does not wait for the disk
            assert message["messageId"] == "m1"
            assert await anyio.to_thread.run_sync(store.retried.wait, 10.0)
            answer = await pub.request(publish_frame("t", "x", "m2"))
            assert answer["code"] == "store_unavailable" and answer["success"] is False
            store.fail = False  # space was freed: the writer's retry commits m1, then it is confirmed
            with anyio.fail_after(10):
                while (answer := await pub.receive())["type"] != "publish_response":
                    pass
            assert answer["messageId"] == "m1" and answer["success"] is True
            assert "m1" in store.message_ids


class WrittenStore(ModelStore):
    """Remembers every message any commit wrote (even if a later one deleted it)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []

    def commit(self, batches: Sequence[StoreBatch]) -> None:
        super().commit(batches)
        self.written += [m.message_id for batch in batches for m in batch.messages]


@contextlib.asynccontextmanager
async def pair(
    store: ModelStore, group_commit_delay: float, **subscriber: Any
) -> AsyncIterator[tuple[RawClient, RawClient]]:
    """A server on ``store``, a publisher and a subscriber of "t" (``subscriber``: its init fields)."""
    config = dataclasses.replace(FAST_CONFIG, group_commit_delay=group_commit_delay)
    async with (
        Server("127.0.0.1", 0, config=config, sessions=SESSIONS, store=store) as server,
        await member(server.port, **subscriber) as sub,
        await member(server.port) as pub,
    ):
        assert (await sub.subscribe("t"))["success"] is True
        yield pub, sub


async def test_a_delivery_acked_before_the_group_delay_passes_is_never_written(anyio_backend: str) -> None:
    store = WrittenStore()
    # A delay no test waits out: only the ACK can let the commit go ahead.
    async with pair(store, 600.0, clientId="dev") as (pub, sub):
        await pub.send_json(publish_frame("t", "x", "m1"))
        message = await sub.receive()
        assert message["messageId"] == "m1"
        await sub.send_json({"type": "ack", "topic": "t", "messageId": "m1"})
        with anyio.fail_after(10):
            answer = await pub.receive()
        assert answer["type"] == "publish_response" and answer["success"] is True
        assert "m1" not in store.written and "m1" in {p.message_id for p in store.publishes.values()}


async def test_a_delivery_not_acked_within_the_group_delay_is_written_and_confirmed(
    anyio_backend: str,
) -> None:
    store = WrittenStore()
    async with pair(store, 0.05, clientId="dev") as (pub, sub):
        with anyio.fail_after(10):
            answer = await pub.request(publish_frame("t", "x", "m1"))  # the subscriber never ACKs
        assert answer["success"] is True and answer["deliveredTo"] == 1
        assert store.written == ["m1"] and store.message_ids == {"m1"}
        assert (await sub.receive())["messageId"] == "m1"


async def test_a_publish_with_nothing_to_spare_is_committed_without_waiting(anyio_backend: str) -> None:
    store = WrittenStore()
    async with pair(store, 600.0) as (pub, _plain):  # no clientId: its deliveries are never written
        with anyio.fail_after(10):
            for i in range(3):
                answer = await pub.request(publish_frame("t", "x", f"m{i}"))
                assert answer["success"] is True and answer["deliveredTo"] == 1
        assert store.written == []
