"""``fastport serve --cluster`` as real processes over a real NATS, with ``kill -9`` (issue 10, item 5).

A real ``nats-server -js`` (tests/nats_support.py) and three fastport nodes, each a subprocess of
``python -m fastport_anyio serve --cluster``, driven by hand-written protocol clients. A node serving a
resumable subscriber is killed with SIGKILL mid-stream and the subscriber resumes on another node; NATS
itself is killed and restarted; nothing a publisher saw confirmed is lost. The kill points come from a
seeded generator, so a failure is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import orjson
import pytest

from tests.nats_support import NatsServer, free_port

from .conftest import TIMEOUT, RawClient, http_request, publish_frame
from .test_durable_process import (
    AUTH,
    Broker,
    broker,
    member,
    publish_until_killed,
    receive_acking,
    serve_command,
)
from .test_durable_process import CONFIG as DURABLE_CONFIG

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

# The durable tests' config, with a short retryInterval: JetStream hands a killed node's deliveries on
# after one retry interval.
CONFIG = (
    DURABLE_CONFIG
    + """
[defaults]
retryInterval = 1000
"""
)


def node(tmp_path: Path, nats: NatsServer) -> AbstractAsyncContextManager[Broker]:
    """One ``fastport serve --cluster`` process, once it listens."""
    return broker(tmp_path, "--cluster", nats.url, config=CONFIG)


@asynccontextmanager
async def cluster(tmp_path: Path, nats: NatsServer, count: int = 3) -> AsyncIterator[list[Broker]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(node(tmp_path, nats)) for _ in range(count)]


async def test_kill_9_of_the_subscribers_node_loses_no_confirmed_message(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    rng = random.Random(10)
    ids = [f"m{i}" for i in range(200)]
    async with cluster(tmp_path, nats_server) as (first, second, third):
        sub = await member(second.port, clientId="dev")
        assert (await sub.subscribe("t"))["success"] is True
        delivered: set[str] = set()
        async with anyio.create_task_group() as task_group:

            async def read_until_killed() -> None:
                delivered.update(await receive_acking(sub, set(ids)))

            task_group.start_soon(read_until_killed)
            # The publisher's node stays up; the subscriber's is killed mid-stream.
            kill_after = rng.randrange(40, 160)
            confirmed = await publish_until_killed(_Killing(second, first.port), ids, kill_after)
        await sub.aclose()
        assert len(confirmed) == len(ids)  # the publisher's node never went away
        assert delivered and confirmed - delivered  # killed mid-stream indeed
        # Resumed on the third node: the un-ACKed deliveries come back (within one retryInterval).
        async with await member(third.port, clientId="dev") as again:
            delivered |= set(await receive_acking(again, confirmed - delivered))
    missing = confirmed - delivered
    assert not missing, sorted(missing)


class _Killing(Broker):
    """Publishes go to ``port``; "kill" kills ``victim`` (publish_until_killed's hook)."""

    def __init__(self, victim: Broker, port: int) -> None:
        super().__init__(victim.process, port)
        self._victim = victim

    async def kill(self) -> None:
        await self._victim.kill()


async def test_kill_9_of_nats_loses_no_confirmed_message_and_the_cluster_recovers(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with cluster(tmp_path, nats_server, 2) as (first, second):
        async with await member(second.port, clientId="dev") as sub:
            assert (await sub.subscribe("t"))["success"] is True
        confirmed: set[str] = set()
        async with await member(first.port) as pub:
            for i in range(20):
                assert (await pub.request(publish_frame("t", "x", f"a{i}")))["success"] is True
                confirmed.add(f"a{i}")
            await anyio.to_thread.run_sync(nats_server.kill)
            with anyio.fail_after(TIMEOUT):  # the node notices at once; a load balancer polls this
                while (status := await http_request(first.port, "GET", "/healthz"))[0] != 503:
                    await anyio.sleep(0.05)
            assert orjson.loads(status[2])["status"] == "cluster_unavailable"
            answer = await pub.request(publish_frame("t", "x", "during"))
            assert answer["success"] is False and answer["code"] == "cluster_unavailable"
            await anyio.to_thread.run_sync(nats_server.start)
            with anyio.fail_after(TIMEOUT):
                while (await http_request(first.port, "GET", "/healthz"))[0] != 200:
                    await anyio.sleep(0.05)
            for i in range(20):
                assert (await pub.request(publish_frame("t", "x", f"b{i}")))["success"] is True
                confirmed.add(f"b{i}")
        async with await member(second.port, clientId="dev") as sub:
            delivered = set(await receive_acking(sub, confirmed))
    assert confirmed <= delivered, sorted(confirmed - delivered)


async def test_sessions_live_in_the_cluster_not_in_a_node(tmp_path: Path, nats_server: NatsServer) -> None:
    async with node(tmp_path, nats_server) as first:
        body = orjson.dumps({"sessionName": "fleet", "password": "fleet-password"})
        status, _, _ = await http_request(first.port, "POST", "/api/createSession", body=body, headers=AUTH)
        assert status == 200
        await first.kill()  # at once: the 200 promised the cluster has it
    await anyio.to_thread.run_sync(nats_server.restart)  # and NATS too
    async with node(tmp_path, nats_server) as later, await RawClient.connect(later.port) as client:
        assert (await client.init("fleet", "fleet-password"))["success"] is True


async def test_a_node_that_cannot_reach_nats_exits_2_with_one_line(tmp_path: Path) -> None:
    argv, env = serve_command(tmp_path, CONFIG, "--cluster", f"nats://127.0.0.1:{free_port()}")
    with anyio.fail_after(TIMEOUT):
        result = await anyio.run_process(argv, env=env, check=False)
    assert result.returncode == 2
    assert b"cannot join the cluster: cannot reach NATS" in result.stderr
