"""A bounded soak: publishers and resumable subscribers through a proxy that cuts every connection at
random, one subscriber whose handler is slow (its client pauses reading), and bad input from other peers
mixed in. At the end every confirmed message reached every resumable subscriber's application exactly
once, and then the broker holds nothing for them any more (no stored message, no delivery in flight or
in a backlog, no pending bytes). A few seconds by default; ``FASTPORT_SOAK_SECONDS`` makes the faulty
phase longer."""

from __future__ import annotations

import contextlib
import os
import random

import anyio
import pytest

from fastport_anyio import Client, Message, Server, connect
from fastport_core.config import ClientConfig, Limits, ServerConfig, SessionSettings
from fastport_core.crypto import generate_key
from tests.proxy import Proxy

from .conftest import SESSIONS, RawClient

pytestmark = pytest.mark.anyio

KEY = generate_key()
CONFIG = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.1)
SLOW_HANDLER = 0.002
"""Seconds the slow subscriber's handler takes per message: with max_buffer=2 its client stops reading."""
BAD_INPUTS = ["not json", "[1, 2]", '{"type": "nope"}', '{"type": "publish", "topic": "soak"}']
SECONDS = float(os.environ.get("FASTPORT_SOAK_SECONDS", "3"))
PUBLISHERS = 2
SUBSCRIBERS = 3
MAX_PUBLISHES = 100_000
"""Bound on each publisher's loop, whatever ``SECONDS`` says."""
SERVER_CONFIG = ServerConfig(
    password_hash_cost=2**4,
    limits=Limits(max_inflight_per_subscriber=4),
    default_session_settings=SessionSettings(retry_interval=0.2),
)
"""A window of 4, so subscribers away for a cut fall behind it (before issue 8.3: the excess was lost); a
short retry interval, so an ACK lost in a cut is made good quickly once the cuts stop."""


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
            for index, (name, got) in enumerate(received.items()):
                subscriber = await stack.enter_async_context(client(name))
                slow = index == 0

                async def on_message(message: Message, got: list[str] = got, slow: bool = slow) -> None:
                    nonlocal changed
                    if slow:
                        await anyio.sleep(SLOW_HANDLER)  # a slow application, not a wait for something
                    got.append(message.message_id)
                    changed.set()
                    changed = anyio.Event()

                await subscriber.subscribe("soak", on_message, max_buffer=2 if slow else 100)
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

            async def bad_peers() -> None:
                """Peers that send garbage (straight to the server): each gets its answer, nothing breaks."""
                for n in range(10_000):
                    if done.is_set():
                        return
                    async with await RawClient.connect(server.port) as raw:
                        assert (await raw.init("alpha", "alpha-password"))["success"] is True
                        await raw.send_text(BAD_INPUTS[n % len(BAD_INPUTS)])
                        assert (await raw.receive())["type"] in ("error", "publish_response")
                        await raw.send_bytes(b"\x00binary")
                        assert (await raw.receive())["code"] == "binary_not_supported"

            async with anyio.create_task_group() as faults:
                faults.start_soon(kill)
                faults.start_soon(bad_peers)
                async with anyio.create_task_group() as producers:
                    for index in range(PUBLISHERS):
                        producers.start_soon(publish, index)
                done.set()
                # kill and bad_peers see done and end by themselves (cancelling a raw peer mid-handshake
                # would leak its socket)
            want = set(confirmed)
            assert want
            while not all(want <= set(got) for got in received.values()):
                await changed.wait()
            # An ACK lost in a cut is made good by the server's next retry (deduplicated by the client, and
            # ACKed again): then the broker holds nothing any more. Its state has no event to wait on.
            while server.core.stats().stored_messages:
                await anyio.sleep(0.01)
            stats = server.core.stats()  # nothing left for anyone: no delivery in flight or backlogged
            assert (stats.inflight_deliveries, stats.backlogged_deliveries, stats.pending_bytes) == (0, 0, 0)
    for name, got in received.items():
        assert len(got) == len(set(got)), f"{name} saw a message twice"
        assert set(got) == want, f"{name} missed {len(want - set(got))} confirmed message(s)"
    assert server.core.metrics.value("internal_errors") == 0
