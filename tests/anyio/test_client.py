"""The async client against the real server on loopback, on asyncio and trio.

Connection faults are made by :class:`Proxy`, a TCP relay between a client and the server that a test can
cut, make refuse new connections, or *freeze* in one direction (it stops forwarding, so the peer sees a
valid prefix of the stream: an ACK or a ``publish_response`` that never arrives). No test sleeps to wait
for something it can await; the few sleeps let time pass on purpose (a quiet period for keepalive).
"""

from __future__ import annotations

import functools
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

import fastport_anyio.client as client_module
from fastport_anyio import (
    Client,
    ClientClosedError,
    ConnectError,
    ConnectionState,
    Message,
    PublishTimeoutError,
    Server,
    StateChange,
    SubscribeTimeoutError,
    connect,
    serve,
)
from fastport_anyio.config_file import load_settings
from fastport_core.client import IntegrityFailure
from fastport_core.config import ClientConfig
from fastport_core.crypto import AuthenticatedSuite, SuiteName, generate_key
from fastport_core.errors import AuthenticationError, InvalidKeyError, LocalProtocolError
from tests.certificates import make_certificate

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


class _Pipe:
    """One proxied connection; a frozen direction stops forwarding for good (the peer keeps a prefix)."""

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.frozen_up = False
        self.frozen_down = False


class Proxy:
    """A TCP relay to the server that tests can cut, freeze (one direction) or make refuse connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refusing = False
        self._pipes: set[_Pipe] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Close every proxied connection now (both sockets), as a network failure would."""
        for pipe in tuple(self._pipes):
            pipe.scope.cancel()

    def freeze_upstream(self) -> None:
        """Stop forwarding client → server on the live connections (ACKs, publishes get lost)."""
        for pipe in self._pipes:
            pipe.frozen_up = True

    def freeze_downstream(self) -> None:
        """Stop forwarding server → client on the live connections (confirmations get lost)."""
        for pipe in self._pipes:
            pipe.frozen_down = True

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if self.refusing:
                return
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
            except OSError:
                return
            async with upstream:
                with anyio.CancelScope() as scope:
                    pipe = _Pipe(scope)
                    self._pipes.add(pipe)
                    try:
                        async with anyio.create_task_group() as task_group:
                            task_group.start_soon(self._relay, client, upstream, pipe, False)
                            task_group.start_soon(self._relay, upstream, client, pipe, True)
                    finally:
                        self._pipes.discard(pipe)

    async def _relay(
        self, source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream, pipe: _Pipe, downstream: bool
    ) -> None:
        try:
            async for chunk in source:
                if not (pipe.frozen_down if downstream else pipe.frozen_up):
                    await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        pipe.scope.cancel()  # one direction ended: end the connection


@asynccontextmanager
async def proxy_to(port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as task_group:
        proxy.port = int(listener.extra(SocketAttribute.local_port))
        task_group.start_soon(listener.serve, proxy.handle)
        yield proxy
        task_group.cancel_scope.cancel()


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


async def test_subscription_iterates_in_publish_order(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            alpha(server.url) as publisher,
            alpha(server.url) as subscriber,
            subscriber.subscription("feed") as messages,
        ):
            sent = [await publisher.publish("feed", f"item {i}") for i in range(25)]
            received: list[str] = []
            async for message in messages:
                received.append(message.message_id)
                if len(received) == len(sent):
                    break
    assert received == sent


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


async def test_handler_exception_is_logged_and_delivery_goes_on(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    seen: Collector[str | bytes] = Collector()

    def handler(message: Message) -> None:
        seen.add(message.payload)
        if message.payload == "boom":
            raise ValueError("handler bug")

    with anyio.fail_after(TIMEOUT):
        async with alpha(server.url) as publisher, alpha(server.url) as subscriber:
            await subscriber.subscribe("t", handler)
            await publisher.publish("t", "boom")
            await publisher.publish("t", "fine")
            await seen.wait_for(2)
    assert seen.items == ["boom", "fine"]
    assert "handler for topic 't' raised" in caplog.text


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


async def test_unsubscribe_ends_iterators_and_handlers(server: Server) -> None:
    seen: Collector[Message] = Collector()
    with anyio.fail_after(TIMEOUT):
        async with alpha(server.url) as publisher, alpha(server.url) as subscriber:
            await subscriber.subscribe("t", seen.add)
            async with subscriber.subscription("t") as messages:
                await publisher.publish("t", "one")
                await seen.wait_for(1)
                assert (await messages.receive()).payload == "one"
                await subscriber.unsubscribe("t")
                with pytest.raises(StopAsyncIteration):
                    await messages.receive()
            # Still subscribed to something else on the same connection: "t" must not come back.
            async with subscriber.subscription("other") as others:
                await publisher.publish("t", "two")
                await publisher.publish("other", "marker")
                assert (await others.receive()).payload == "marker"
    assert [m.payload for m in seen.items] == ["one"]


# --------------------------------------------------------------------------------------------------------
# Connecting and configuration errors.


async def test_wrong_password_raises_authentication_error(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(AuthenticationError, match="refused the session credentials"):
            async with connect(server.url, session="alpha", password="wrong", key=KEY):
                pytest.fail("connected with a wrong password")
        with pytest.raises(AuthenticationError):
            async with connect(server.url, session="no-such-session", password="x", key=KEY):
                pytest.fail("connected to an unknown session")


async def test_unreachable_server_raises_connect_error(anyio_backend: str) -> None:
    with anyio.fail_after(TIMEOUT):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(SocketAttribute.local_port)
        await listener.aclose()  # nothing listens there any more
        with pytest.raises(ConnectError, match=f"cannot connect to ws://127.0.0.1:{port}"):
            async with alpha(f"ws://127.0.0.1:{port}"):
                pytest.fail("connected to a closed port")


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


async def test_publish_while_disconnected_waits_and_is_delivered(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            proxy_to(server.port) as proxy,
            alpha(server.url) as subscriber,
            alpha(proxy.url) as publisher,
            subscriber.subscription("t") as messages,
        ):
            states = states_of(publisher)
            proxy.refusing = True
            proxy.cut()
            await wait_state(states, ConnectionState.RECONNECTING)
            result: dict[str, Any] = {}
            publishing = anyio.Event()

            async def publish() -> None:
                assert publisher.state is ConnectionState.RECONNECTING
                mark = len(states.items)
                publishing.set()
                result["id"] = await publisher.publish("t", "written during the outage")
                result["reconnected"] = any(c.state is ConnectionState.CONNECTED for c in states.items[mark:])

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(publish)
                await publishing.wait()  # publish() is waiting for a confirmation now
                assert publisher.pending_publishes == 1
                proxy.refusing = False  # the publisher comes back by itself
            message = await messages.receive()
    assert result["reconnected"] is True
    assert message.message_id == result["id"]
    assert message.payload == "written during the outage"


async def test_publish_timeout_stops_the_retry(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with proxy_to(server.port) as proxy, alpha(proxy.url) as publisher:
            states = states_of(publisher)
            proxy.refusing = True
            proxy.cut()
            await wait_state(states, ConnectionState.RECONNECTING)
            with pytest.raises(PublishTimeoutError, match="not confirmed within") as caught:
                await publisher.publish("t", "never confirmed", timeout=0.2)
            assert isinstance(caught.value, TimeoutError)
            assert publisher.pending_publishes == 0


async def test_subscribe_while_disconnected_times_out_and_withdraws(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with proxy_to(server.port) as proxy, alpha(proxy.url) as client:
            states = states_of(client)
            proxy.refusing = True
            proxy.cut()
            await wait_state(states, ConnectionState.RECONNECTING)
            with pytest.raises(SubscribeTimeoutError, match="not confirmed within"):
                await client.subscribe("t", print, timeout=0.2)
            with pytest.raises(SubscribeTimeoutError):
                async with client.subscription("t", timeout=0.2):
                    pytest.fail("entered an unconfirmed subscription")


async def test_giving_up_fails_waiting_calls_and_iterators(server: Server) -> None:
    config = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.05, reconnect_give_up_after=0.3)
    with anyio.fail_after(TIMEOUT):
        async with proxy_to(server.port) as proxy, alpha(proxy.url, config=config) as client:
            states = states_of(client)
            async with client.subscription("t") as messages:
                proxy.refusing = True
                proxy.cut()
                with pytest.raises(ClientClosedError, match="gave up") as caught:
                    await client.publish("t", "never", timeout=None)
                await wait_state(states, ConnectionState.CLOSED)
                with pytest.raises(ClientClosedError, match="gave up"):
                    await messages.receive()
            with pytest.raises(ClientClosedError, match="closed"):
                await client.publish("t", "later")
    assert "giving up after" in str(caught.value)
    assert client.state is ConnectionState.CLOSED


async def test_subscriber_cut_mid_stream_receives_everything_exactly_once(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            proxy_to(server.port) as proxy,
            alpha(server.url) as publisher,
            alpha(proxy.url) as subscriber,
            subscriber.subscription("stream") as messages,
        ):
            states = states_of(subscriber)
            sent = [await publisher.publish("stream", f"m{i}") for i in range(5)]
            got = [await messages.receive() for _ in range(5)]
            # The subscriber's ACKs stop reaching the server: what it receives now, the server will
            # send again after the reconnection, and the client must not hand it over twice.
            proxy.freeze_upstream()
            sent += [await publisher.publish("stream", f"m{i}") for i in range(5, 10)]
            got += [await messages.receive() for _ in range(5)]
            proxy.refusing = True
            proxy.cut()
            await wait_state(states, ConnectionState.RECONNECTING)
            # Published during the gap: the server keeps them for the detached subscriber.
            sent += [await publisher.publish("stream", f"m{i}") for i in range(10, 15)]
            mark = len(states.items)
            proxy.refusing = False
            await wait_state(states, ConnectionState.CONNECTED, after=mark)
            got += [await messages.receive() for _ in range(5)]
            marker = await publisher.publish("stream", "end")
            last = await messages.receive()
    assert [m.message_id for m in got] == sent
    assert [m.payload for m in got] == [f"m{i}" for i in range(15)]
    assert last.message_id == marker  # nothing was delivered twice before it


async def test_publisher_cut_resends_and_nothing_is_duplicated(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            proxy_to(server.port) as proxy,
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


async def test_clients_come_back_after_a_server_restart(anyio_backend: str, tmp_path: Path) -> None:
    config_file = tmp_path / "fastport.toml"
    config_file.write_text(
        '[server]\npassword_hash_cost = 16\n\n[[sessions]]\nname = "alpha"\npassword = "alpha-password"\n',
        encoding="utf-8",
    )
    settings = load_settings(config_file, environ={})
    start_server = functools.partial(serve, config=settings.config, sessions=settings.sessions)
    seen: Collector[Message] = Collector()
    with anyio.fail_after(TIMEOUT):
        # The servers run in tasks of their own so that the clients can outlive the first one.
        async with anyio.create_task_group() as servers:
            first: Server = await servers.start(start_server, "127.0.0.1", 0)
            async with alpha(first.url) as subscriber, alpha(first.url) as publisher:
                subscriber_states, publisher_states = states_of(subscriber), states_of(publisher)
                await subscriber.subscribe("t", seen.add)
                await publisher.publish("t", "before")
                await seen.wait_for(1)
                await first.shutdown()  # closes every connection with 1001
                await wait_state(subscriber_states, ConnectionState.RECONNECTING)
                await wait_state(publisher_states, ConnectionState.RECONNECTING)
                marks = len(subscriber_states.items), len(publisher_states.items)
                second: Server = await servers.start(start_server, "127.0.0.1", first.port)
                await wait_state(subscriber_states, ConnectionState.CONNECTED, after=marks[0])
                await wait_state(publisher_states, ConnectionState.CONNECTED, after=marks[1])
                # A confirmed subscription on the same connection proves the automatic re-subscription
                # of "t" (sent first, answered first) is in place before we publish.
                async with subscriber.subscription("barrier"):
                    pass
                await publisher.publish("t", "after")
                await seen.wait_for(2)
            await second.shutdown()
    assert [m.payload for m in seen.items] == ["before", "after"]


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


async def test_full_subscription_buffer_applies_backpressure_without_loss(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tiny inbox too, so the reader really stops reading the socket.
    monkeypatch.setattr(client_module, "_INBOX_HIGH_WATER", 2)
    with anyio.fail_after(TIMEOUT):
        async with (
            alpha(server.url) as publisher,
            alpha(server.url) as subscriber,
            subscriber.subscription("burst", max_buffer=2) as messages,
        ):
            # Every publish is confirmed by the server even though the subscriber is not consuming.
            sent = [await publisher.publish("burst", f"b{i}") for i in range(30)]
            assert messages.buffered <= 2
            received = [await messages.receive() for _ in range(30)]
    assert [m.message_id for m in received] == sent


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
            if server.core.broker.stats().connections == 0:
                break
            await anyio.sleep(0.01)
        assert server.core.broker.stats().connections == 0


async def test_close_fails_waiters_and_later_calls(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with proxy_to(server.port) as proxy, alpha(proxy.url) as client:
            states = states_of(client)
            async with client.subscription("t") as messages:
                proxy.refusing = True
                proxy.cut()
                await wait_state(states, ConnectionState.RECONNECTING)
                errors: list[BaseException] = []

                async def publish() -> None:
                    try:
                        await client.publish("t", "pending")
                    except ClientClosedError as exc:
                        errors.append(exc)

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(publish)
                    await anyio.lowlevel.checkpoint()
                    await client.close()
                await client.close()  # idempotent
                with pytest.raises(StopAsyncIteration):
                    await messages.receive()
            with pytest.raises(ClientClosedError):
                await client.publish("t", "late")
    assert len(errors) == 1
    assert client.state is ConnectionState.CLOSED


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
