"""A bounded soak (issue 8.3): publishers and resumable subscribers through a proxy that cuts every
connection at random; at the end every confirmed message reached every resumable subscriber's application
exactly once. A few seconds by default; ``FASTPORT_SOAK_SECONDS`` makes the faulty phase longer."""

from __future__ import annotations

import contextlib
import os
import random

import anyio
import pytest

from fastport_anyio import Client, Message, Server, connect
from fastport_core.config import ClientConfig, Limits, ServerConfig
from fastport_core.crypto import generate_key
from tests.proxy import Proxy

from .conftest import SESSIONS

pytestmark = pytest.mark.anyio

KEY = generate_key()
CONFIG = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.1)
SECONDS = float(os.environ.get("FASTPORT_SOAK_SECONDS", "3"))
PUBLISHERS = 2
SUBSCRIBERS = 3
MAX_PUBLISHES = 100_000
"""Bound on each publisher's loop, whatever ``SECONDS`` says."""
SERVER_CONFIG = ServerConfig(password_hash_cost=2**4, limits=Limits(max_inflight_per_subscriber=4))
"""A window of 4, so subscribers away for a cut fall behind it (before issue 8.3: the excess was lost)."""


async def test_every_confirmed_message_reaches_every_resumable_subscriber_once(anyio_backend: str) -> None:
    async with Server("127.0.0.1", 0, config=SERVER_CONFIG, sessions=SESSIONS) as server:
        await _soak(server)


async def _soak(server: Server) -> None:
    rng = random.Random(8_3)
    proxy = Proxy(server.port)
    received: dict[str, list[str]] = {f"sub-{i}": [] for i in range(SUBSCRIBERS)}
    confirmed: list[str] = []
    changed = anyio.Event()

    def client(client_id: str | None = None) -> Client:
        return connect(
            proxy.url, session="alpha", password="alpha-password", key=KEY, config=CONFIG, client_id=client_id
        )

    with anyio.fail_after(SECONDS + 60), contextlib.closing(proxy):
        async with contextlib.AsyncExitStack() as stack:
            for name, got in received.items():
                subscriber = await stack.enter_async_context(client(name))

                def on_message(message: Message, got: list[str] = got) -> None:
                    nonlocal changed
                    got.append(message.message_id)
                    changed.set()
                    changed = anyio.Event()

                await subscriber.subscribe("soak", on_message)
            publishers = [await stack.enter_async_context(client()) for _ in range(PUBLISHERS)]
            done = anyio.Event()

            async def publish(index: int) -> None:
                deadline = anyio.current_time() + SECONDS
                for n in range(MAX_PUBLISHES):
                    if anyio.current_time() >= deadline:
                        break
                    confirmed.append(await publishers[index].publish("soak", f"p{index}-{n}", timeout=30))

            async def kill() -> None:
                while not done.is_set():
                    await anyio.sleep(rng.uniform(0.1, 0.8))  # the fault schedule, not a wait
                    proxy.cut()

            async with anyio.create_task_group() as faults:
                faults.start_soon(kill)
                async with anyio.create_task_group() as producers:
                    for index in range(PUBLISHERS):
                        producers.start_soon(publish, index)
                done.set()
                faults.cancel_scope.cancel()
            want = set(confirmed)
            assert want
            while not all(want <= set(got) for got in received.values()):
                await changed.wait()
    for name, got in received.items():
        assert len(got) == len(set(got)), f"{name} saw a message twice"
        assert set(got) == want, f"{name} missed {len(want - set(got))} confirmed message(s)"
