"""The async client against the real server on loopback, on asyncio and trio.

Connection faults are made by the shared :class:`tests.proxy.Proxy`. The behaviour both clients share is
in the contract suite (tests/contract); what stays here is specific to the async client or its wire. No test sleeps to wait
for something it can await; the few sleeps let time pass on purpose (a quiet period for keepalive).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import pytest

from fastport_anyio import (
    Client,
    ConnectError,
    ConnectionState,
    Message,
    Server,
    StateChange,
    connect,
)
from fastport_core.client import IntegrityFailure
from fastport_core.config import ClientConfig
from fastport_core.crypto import AuthenticatedSuite, SuiteName, generate_key
from fastport_core.errors import InvalidKeyError, LocalProtocolError
from tests.certificates import make_certificate
from tests.proxy import Proxy

from .conftest import FAST_CONFIG, SESSIONS, TIMEOUT, RawClient, publish_frame

pytestmark = pytest.mark.anyio

KEY = generate_key()
FAST_RECONNECT = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.1)
"""Reconnect within ~0.1 s so fault tests are quick (the policy itself is tested in the core)."""

T = TypeVar("T")


def alpha(url: str, *, suite: SuiteName = "authenticated", config: ClientConfig = FAST_RECONNECT) -> Client:
    return connect(url, session="alpha", password="alpha-password", key=KEY, suite=suite, config=config)


class Collector(Generic[T]):
    """Items appended by callbacks, and a way to await "at least n of them"."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = anyio.Event()

    def add(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> list[T]:
        while len(self.items) < count:
            await self._changed.wait()
        return self.items

    async def wait_until(self, predicate: Callable[[list[T]], bool]) -> None:
        while not predicate(self.items):
            await self._changed.wait()


def states_of(client: Client) -> Collector[StateChange]:
    states: Collector[StateChange] = Collector()
    client.on_state_change(states.add)
    return states


async def wait_state(states: Collector[StateChange], state: ConnectionState, *, after: int = 0) -> None:
    await states.wait_until(lambda items: any(change.state is state for change in items[after:]))


# --------------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("suite", ["authenticated", "legacy"])
@pytest.mark.parametrize("payload", ["héllo, wörld ✓", b"\x00\xffbinary\n"], ids=["str", "bytes"])
async def test_round_trip(server: Server, suite: SuiteName, payload: str | bytes) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            alpha(server.url, suite=suite) as publisher,
            alpha(server.url, suite=suite) as subscriber,
            subscriber.subscription("room") as messages,
        ):
            message_id = await publisher.publish("room", payload)
            message = await messages.receive()
    assert message == Message("room", payload, message_id, message.timestamp)
    assert type(message.payload) is type(payload)
    assert abs(message.timestamp - time.time() * 1000) < 60_000


async def test_sync_and_async_handlers(server: Server) -> None:
    sync_seen: Collector[Message] = Collector()
    async_seen: Collector[Message] = Collector()

    async def on_async(message: Message) -> None:
        await anyio.lowlevel.checkpoint()
        async_seen.add(message)

    with anyio.fail_after(TIMEOUT):
        async with alpha(server.url) as publisher, alpha(server.url) as subscriber:
            await subscriber.subscribe("events", sync_seen.add)
            await subscriber.subscribe("events", on_async)
            sent = [await publisher.publish("events", f"e{i}") for i in range(3)]
            await sync_seen.wait_for(3)
            await async_seen.wait_for(3)
    assert [m.message_id for m in sync_seen.items] == sent
    assert [m.message_id for m in async_seen.items] == sent


async def test_fan_out_to_twenty_subscribers(server: Server) -> None:
    seen: Collector[tuple[int, str]] = Collector()

    def record(index: int) -> Callable[[Message], None]:
        return lambda message: seen.add((index, message.message_id))

    with anyio.fail_after(TIMEOUT):
        async with AsyncExitStack() as stack:
            publisher = await stack.enter_async_context(alpha(server.url))
            for index in range(20):
                subscriber = await stack.enter_async_context(alpha(server.url))
                await subscriber.subscribe("all", record(index))
            sent = [await publisher.publish("all", f"broadcast {n}") for n in range(3)]
            await seen.wait_for(60)
    assert sorted(seen.items) == sorted((i, message_id) for i in range(20) for message_id in sent)


async def test_sessions_are_isolated(server: Server) -> None:
    # Same key and the legacy suite (which binds no session into its tag): a leak would be delivered.
    beta = connect(server.url, session="beta", password="beta-password", key=KEY, suite="legacy")
    with anyio.fail_after(TIMEOUT):
        async with (
            alpha(server.url, suite="legacy") as alpha_subscriber,
            alpha(server.url, suite="legacy") as alpha_publisher,
            beta as beta_publisher,
            alpha_subscriber.subscription("shared-name") as messages,
        ):
            await beta_publisher.publish("shared-name", "for beta only")
            marker = await alpha_publisher.publish("shared-name", "for alpha")
            # The server routes at publish time and writes per connection in order: a leaked beta
            # message would arrive before the alpha marker.
            first = await messages.receive()
    assert first.message_id == marker
    assert first.payload == "for alpha"
    assert alpha_subscriber.integrity_failures == 0


# --------------------------------------------------------------------------------------------------------
# Connecting and configuration errors.


async def test_configuration_errors_raise_before_any_io(anyio_backend: str) -> None:
    with pytest.raises(InvalidKeyError, match="fastport keygen"):
        connect("ws://127.0.0.1:1", session="s", password="p", key="too-short")
    with pytest.raises(LocalProtocolError, match="ws:// or wss://"):
        connect("http://127.0.0.1:1", session="s", password="p", key=KEY)
    with pytest.raises(LocalProtocolError, match="unknown crypto suite"):
        connect("ws://127.0.0.1:1", session="s", password="p", key=KEY, suite="rot13")  # type: ignore[arg-type]


async def test_bad_topic_raises_locally(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with alpha(server.url) as client:
            with pytest.raises(LocalProtocolError, match="longer than"):
                await client.publish("x" * 1000, "payload")
            with pytest.raises(LocalProtocolError, match="non-empty"):
                await client.subscribe("", print)


# --------------------------------------------------------------------------------------------------------
# Faults: cut connections, outages, restarts.


async def test_publisher_cut_resends_and_nothing_is_duplicated(server: Server) -> None:
    proxy = Proxy(server.port)
    with anyio.fail_after(TIMEOUT), contextlib.closing(proxy):
        async with (
            alpha(server.url) as subscriber,
            alpha(proxy.url) as publisher,
            subscriber.subscription("t") as messages,
        ):
            states = states_of(publisher)
            proxy.freeze_downstream()  # the server gets the publish; its confirmation is lost
            result: dict[str, str] = {}

            async def publish() -> None:
                result["id"] = await publisher.publish("t", "exactly once")

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(publish)
                delivered = await messages.receive()  # the server has it and fanned it out
                assert "id" not in result
                proxy.cut()  # the publisher reconnects and re-sends the same message id
            await wait_state(states, ConnectionState.RECONNECTING)
            marker = await publisher.publish("t", "marker")
            after = await messages.receive()
    assert result["id"] == delivered.message_id
    assert delivered.payload == "exactly once"
    assert after.message_id == marker  # the re-sent publish was confirmed, not fanned out again


# --------------------------------------------------------------------------------------------------------
# Integrity, slow consumers, closing.


async def test_tampered_message_raises_an_integrity_event_and_is_not_delivered(server: Server) -> None:
    suite = AuthenticatedSuite(KEY)
    timestamp = int(time.time() * 1000)
    failures: Collector[IntegrityFailure] = Collector()

    def frame(message_id: str, *, tamper: bool) -> dict[str, Any]:
        sealed = suite.seal(
            session="alpha", topic="t", message_id=message_id, timestamp=timestamp, payload="genuine"
        )
        iv, _, ciphertext = sealed.data.partition(":")
        flipped = ("A" if ciphertext[0] != "A" else "B") + ciphertext[1:]
        body = publish_frame(
            "t", f"{iv}:{flipped}" if tamper else sealed.data, message_id, timestamp=timestamp
        )
        return body | {"hash": sealed.hash}

    with anyio.fail_after(TIMEOUT):
        async with alpha(server.url) as subscriber, await RawClient.connect(server.port) as raw:
            subscriber.on_integrity_failure(failures.add)
            assert (await raw.init("alpha", "alpha-password"))["success"] is True
            async with subscriber.subscription("t") as messages:
                assert (await raw.request(frame("forged", tamper=True)))["success"] is True
                await failures.wait_for(1)
                assert (await raw.request(frame("real", tamper=False)))["success"] is True
                message = await messages.receive()
    assert failures.items[0].message_id == "forged"
    assert "authentication failed" in failures.items[0].reason
    assert subscriber.integrity_failures == 1
    assert (message.message_id, message.payload) == ("real", "genuine")


async def test_slow_handler_does_not_stall_other_traffic_or_keepalive(server: Server) -> None:
    # Keepalive far tighter than the test: a reader stalled behind the handler would miss the pongs and
    # the client would drop its connection (RECONNECTING) within 0.45 s.
    keepalive = ClientConfig(ping_interval=0.05, ping_timeout=0.4)
    release = anyio.Event()
    slow_started = anyio.Event()
    slow_seen: Collector[Message] = Collector()

    async def slow(message: Message) -> None:
        slow_started.set()
        await release.wait()
        slow_seen.add(message)

    with anyio.fail_after(TIMEOUT):
        async with alpha(server.url) as publisher, alpha(server.url, config=keepalive) as subscriber:
            states = states_of(subscriber)
            await subscriber.subscribe("slow", slow)
            async with subscriber.subscription("fast") as fast:
                await publisher.publish("slow", "s1")
                await publisher.publish("slow", "s2")
                await slow_started.wait()
                await anyio.sleep(0.8)  # a quiet period of many ping intervals, handler still blocked
                for i in range(5):
                    await publisher.publish("fast", f"f{i}")
                    assert (await fast.receive()).payload == f"f{i}"
                # The slow subscriber's own publishes are confirmed meanwhile too.
                await subscriber.publish("elsewhere", "still publishing")
                assert states.items == []  # never left CONNECTED
                release.set()
                await slow_seen.wait_for(2)
    assert [m.payload for m in slow_seen.items] == ["s1", "s2"]


async def test_close_leaves_no_task_and_no_connection(server: Server) -> None:
    before = {task.id for task in anyio.get_running_tasks()}
    with anyio.fail_after(TIMEOUT):
        async with alpha(server.url) as publisher, alpha(server.url) as subscriber:
            await subscriber.subscribe("t", lambda message: None)
            async with subscriber.subscription("t") as messages:
                await publisher.publish("t", "x")
                await messages.receive()
            assert len({task.id for task in anyio.get_running_tasks()} - before) > 0
        left = [task.name for task in anyio.get_running_tasks() if task.id not in before]
        assert [name for name in left if "server" not in name] == []  # the server ends its own later
        assert publisher.state is ConnectionState.CLOSED
        for _ in range(200):  # the server notices the closes on its own schedule
            if server.core.stats().connections == 0:
                break
            await anyio.sleep(0.01)
        assert server.core.stats().connections == 0


async def test_async_chat_example_runs(server: Server, anyio_backend: str) -> None:
    root = Path(__file__).resolve().parents[2]
    environment = os.environ | {
        "FASTPORT_URL": server.url,
        "FASTPORT_SESSION": "alpha",
        "FASTPORT_PASSWORD": "alpha-password",
        "FASTPORT_KEY": KEY,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(root / "examples" / "async_chat.py"), anyio_backend]
    with anyio.fail_after(TIMEOUT):
        result = await anyio.run_process(command, env=environment, check=False)
    assert result.returncode == 0, result.stderr.decode()
    output = result.stdout.decode()
    assert "bob answered \"you said 'hello'\"" in output
    assert "bob answered 'got 6 bytes'" in output
    assert "integrity failures seen by alice: 0" in output


# --------------------------------------------------------------------------------------------------------
# TLS.


async def test_wss_round_trip_and_certificate_check(anyio_backend: str, tmp_path: Path) -> None:
    cert_path, key_path = make_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    client_context = ssl.create_default_context(cafile=str(cert_path))
    with anyio.fail_after(TIMEOUT):
        async with Server(
            "127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, ssl_context=server_context
        ) as server:
            assert server.url.startswith("wss://")

            def tls_client() -> Client:
                return connect(
                    server.url,
                    session="alpha",
                    password="alpha-password",
                    key=KEY,
                    ssl_context=client_context,
                )

            async with (
                tls_client() as publisher,
                tls_client() as subscriber,
                subscriber.subscription("s") as messages,
            ):
                big = os.urandom(200_000)  # many TLS records in one WebSocket message
                message_id = await publisher.publish("s", big)
                message = await messages.receive()
            # The default context trusts the system's CAs only, not our self-signed certificate.
            with pytest.raises(ConnectError, match="certificate"):
                async with alpha(server.url):
                    pytest.fail("connected without trusting the certificate")
    assert (message.message_id, message.payload) == (message_id, big)
