"""The blocking client against the real anyio server over loopback sockets (DESIGN §3.4, §3.9, §5).

No test sleeps to wait for something it can wait for: each waits on an Event, a Condition, a queue or the
client's own blocking calls, bounded by ``WAIT``. The only deliberate passage of time is where time is
the point (keepalive across an idle period, an iterator's idle timeout), and it is a fraction of a second.
"""

from __future__ import annotations

import gc
import os
import runpy
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import fastport_threads
from fastport_core.config import ClientConfig
from fastport_core.errors import LocalProtocolError
from fastport_threads import (
    Client,
    ClientClosedError,
    ConnectError,
    ConnectionState,
    Message,
)
from tests.certificates import make_certificate
from tests.proxy import Proxy

from .conftest import FAST_CLIENT, PASSWORD, SESSION, WAIT, ServerHandle, States, make_server_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "threaded_publish.py"


class Collector:
    """A callback that records messages and lets the test wait for a number of them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._arrived = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    def wait_for(self, count: int) -> list[Message]:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.messages) >= count, WAIT), len(self.messages)
            return list(self.messages)

    def wait_for_payload(self, payload: str | bytes) -> list[Message]:
        with self._arrived:
            arrived = self._arrived.wait_for(lambda: any(m.payload == payload for m in self.messages), WAIT)
            assert arrived, self.messages
            return list(self.messages)

    @property
    def payloads(self) -> list[str | bytes]:
        with self._arrived:
            return [message.payload for message in self.messages]


@pytest.fixture
def open_client(key: str) -> Iterator[Callable[..., Client]]:
    """``open_client(url, **kwargs)``: a connected client, closed at the end of the test."""
    clients: list[Client] = []

    def open_(url: str, **kwargs: object) -> Client:
        options: dict[str, object] = {
            "session": SESSION,
            "password": PASSWORD,
            "key": key,
            "config": FAST_CLIENT,
        }
        options.update(kwargs)
        client = fastport_threads.connect(url, **options)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield open_
    for client in clients:
        client.close()


@contextmanager
def no_new_threads() -> Iterator[None]:
    """Assert that the block leaves no thread running that it started."""
    before = set(threading.enumerate())
    yield
    left = [thread for thread in threading.enumerate() if thread not in before]
    assert not left, left


def sync_subscriptions(client: Client) -> None:
    """Return once the server has processed every (re-)subscription ``client`` sent so far.

    The server handles one connection's frames in order, so the confirmation of a new subscription
    comes after the re-subscriptions sent on reconnecting.
    """
    client.subscribe(f"sync/{time.monotonic_ns()}", lambda message: None)


# --------------------------------------------------------------------------------------------------------
# Basics.


def test_the_publisher_does_not_receive_its_own_message(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    client, other = open_client(server.url), open_client(server.url)
    with client.messages("t", timeout=0.2) as own, other.messages("t", timeout=WAIT) as others:
        message_id = client.publish("t", "x")
        assert next(others).message_id == message_id
        assert list(own) == []


def test_bad_arguments_raise_local_errors_before_any_io(key: str) -> None:
    with no_new_threads():
        with pytest.raises(LocalProtocolError, match="ws:// or wss://"):
            fastport_threads.connect("http://127.0.0.1:1", session=SESSION, password=PASSWORD, key=key)
        with pytest.raises(LocalProtocolError):
            fastport_threads.connect("ws://127.0.0.1:1", session=SESSION, password=PASSWORD, key="short")
        with pytest.raises(LocalProtocolError, match="wss://"):
            fastport_threads.connect(
                "ws://127.0.0.1:1",
                session=SESSION,
                password=PASSWORD,
                key=key,
                ssl_context=ssl.create_default_context(),
            )


# --------------------------------------------------------------------------------------------------------
# Thread safety: many threads on one client.


def test_many_threads_publishing_at_once_deliver_each_message_once_in_per_thread_order(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    threads_count, per_thread = 8, 50
    publisher, subscriber = open_client(server.url), open_client(server.url)
    received = Collector()
    subscriber.subscribe("load", received)
    with subscriber.messages("load", timeout=WAIT) as stream:
        ids: list[list[str]] = [[] for _ in range(threads_count)]
        start = threading.Barrier(threads_count)

        def publish_many(index: int) -> None:
            start.wait(WAIT)
            for sequence in range(per_thread):
                ids[index].append(publisher.publish("load", f"{index}:{sequence}"))

        workers = [threading.Thread(target=publish_many, args=(index,)) for index in range(threads_count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT * 3)
        assert not any(worker.is_alive() for worker in workers)

        total = threads_count * per_thread
        by_callback = received.wait_for(total)
        by_iterator = [next(stream) for _ in range(total)]
    for messages in (by_callback, by_iterator):
        assert len(messages) == total
        assert len({message.message_id for message in messages}) == total  # each once
        assert {message.message_id for message in messages} == {i for per in ids for i in per}
        for index in range(threads_count):  # each thread's messages in the order it published them
            mine = [
                m.payload
                for m in messages
                if isinstance(m.payload, str) and m.payload.startswith(f"{index}:")
            ]
            assert mine == [f"{index}:{sequence}" for sequence in range(per_thread)]
    assert by_callback == by_iterator


def test_subscribe_and_unsubscribe_from_many_threads(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    topics = [f"topic/{index}" for index in range(16)]
    collectors = {topic: Collector() for topic in topics}
    workers = [
        threading.Thread(target=subscriber.subscribe, args=(topic, collectors[topic])) for topic in topics
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
    for topic in topics:
        publisher.publish(topic, topic)
    for topic in topics:
        assert collectors[topic].wait_for(1)[0].payload == topic
    unsubscribers = [threading.Thread(target=subscriber.unsubscribe, args=(topic,)) for topic in topics[::2]]
    for worker in unsubscribers:
        worker.start()
    for worker in unsubscribers:
        worker.join(WAIT)
    with subscriber.messages("marker", timeout=WAIT) as marker:
        for topic in topics:
            publisher.publish(topic, topic + "/again")
        publisher.publish("marker", "end")
        assert next(marker).payload == "end"
    # The server routes in order: by the time the marker arrived, every earlier message had too.
    received = Collector()
    subscriber.subscribe("marker", received)
    publisher.publish("marker", "end2")
    received.wait_for(1)
    for index, topic in enumerate(topics):
        expected = [topic] if index % 2 == 0 else [topic, topic + "/again"]
        assert collectors[topic].payloads == expected


# --------------------------------------------------------------------------------------------------------
# Slow callbacks.


def test_a_blocked_callback_stalls_neither_other_traffic_nor_keepalive(
    start_server: Callable[..., ServerHandle], open_client: Callable[..., Client]
) -> None:
    server = start_server(make_server_config(ping_interval=0.05, ping_timeout=0.2))
    keepalive = ClientConfig(ping_interval=0.05, ping_timeout=0.2, reconnect_initial_delay=0.02)
    release, entered = threading.Event(), threading.Event()

    def blocked(message: Message) -> None:
        entered.set()
        assert release.wait(WAIT)

    publisher = open_client(server.url, config=keepalive)
    subscriber = open_client(server.url, config=keepalive)
    states = States()
    subscriber.on_state_change(states)
    subscriber.subscribe("slow", blocked)
    with subscriber.messages("fast", timeout=WAIT) as fast, subscriber.messages("idle", timeout=0.6) as idle:
        publisher.publish("slow", "stuck")
        assert entered.wait(WAIT)
        # The dispatcher thread is stuck in the callback. The connection goes on regardless:
        for index in range(20):
            assert subscriber.publish("echo", str(index), timeout=WAIT)  # confirmations arrive
            publisher.publish("fast", str(index))
            assert next(fast).payload == str(index)  # another topic's iterator is fed
        # 0.6 s of silence is twice ping_interval + ping_timeout, on both sides: only a client whose IO
        # thread answers the server's pings and sends its own survives it.
        started = time.monotonic()
        assert list(idle) == []
        assert time.monotonic() - started >= 0.6
        publisher.publish("fast", "after")
        assert next(fast).payload == "after"
    release.set()
    done = threading.Event()
    subscriber.subscribe("flush", lambda message: done.set())
    publisher.publish("flush", "x")
    assert done.wait(WAIT)
    assert states.count(ConnectionState.RECONNECTING) == 0, states.changes
    assert subscriber.state is ConnectionState.CONNECTED


def test_a_silent_server_is_detected_by_keepalive_and_the_client_reconnects(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    relay = Proxy(server.port)
    try:
        # connect_timeout: an attempt made while the relay still swallowed the answers is retried soon.
        keepalive = ClientConfig(
            ping_interval=0.05, ping_timeout=0.1, reconnect_initial_delay=0.02, connect_timeout=0.5
        )
        client = open_client(relay.url, config=keepalive)
        states = States()
        client.on_state_change(states)
        relay.freeze_downstream()  # the TCP connection stays up; the server just goes quiet
        states.wait_for(ConnectionState.RECONNECTING)
        assert "4004" in states.changes[0].reason  # the core's keepalive timeout, run by the IO thread
        states.wait_for(ConnectionState.CONNECTED)
        client.publish("t", "back")
    finally:
        relay.close()


# --------------------------------------------------------------------------------------------------------
# messages() iteration.


def test_messages_with_nothing_published_ends_after_the_timeout(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    client = open_client(server.url)
    started = time.monotonic()
    assert list(client.messages("quiet", timeout=0.1)) == []
    assert 0.1 <= time.monotonic() - started < 0.1 + WAIT


def test_an_abandoned_iterator_withdraws_its_subscription(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    publisher = open_client(server.url)
    subscriber = open_client(server.url, config=FAST_CLIENT)
    stream = subscriber.messages("dropped", max_buffer=1)
    publisher.publish("dropped", "one")
    for message in stream:
        assert message.payload == "one"
        break  # leaves the stream open and subscribed: only its garbage collection ends it
    del stream
    gc.collect()
    # With the abandoned stream's buffer (max_buffer=1) still registered, this burst would stall reading.
    with subscriber.messages("alive", timeout=WAIT) as alive:
        for index in range(20):
            publisher.publish("dropped", str(index))
        publisher.publish("alive", "yes")
        assert next(alive).payload == "yes"


# --------------------------------------------------------------------------------------------------------
# Reconnection.


# --------------------------------------------------------------------------------------------------------
# Close.


def test_close_stops_every_thread_and_is_idempotent(server: ServerHandle, key: str) -> None:
    with no_new_threads():
        client = fastport_threads.connect(server.url, session=SESSION, password=PASSWORD, key=key)
        client.subscribe("t", print)
        stream = client.messages("u")
        client.close()
        client.close()
        assert client.state is ConnectionState.CLOSED
        assert list(stream) == []
        with pytest.raises(ClientClosedError):
            client.publish("t", "x")
        with pytest.raises(ClientClosedError):
            client.subscribe("t", print)
    with (
        no_new_threads(),
        fastport_threads.connect(server.url, session=SESSION, password=PASSWORD, key=key) as client,
    ):
        client.publish("t", "x")


def test_close_from_inside_a_callback_does_not_deadlock(server: ServerHandle, key: str) -> None:
    with no_new_threads():
        publisher = fastport_threads.connect(server.url, session=SESSION, password=PASSWORD, key=key)
        subscriber = fastport_threads.connect(server.url, session=SESSION, password=PASSWORD, key=key)
        closed = threading.Event()

        def close_me(message: Message) -> None:
            subscriber.close()
            closed.set()

        subscriber.subscribe("t", close_me)
        publisher.publish("t", "bye")
        assert closed.wait(WAIT)
        assert subscriber.state is ConnectionState.CLOSED
        subscriber.close()  # from here it also joins the dispatcher thread, which has returned by now
        publisher.close()


# --------------------------------------------------------------------------------------------------------
# First connection failures.


# --------------------------------------------------------------------------------------------------------
# TLS.


def test_tls_round_trip_and_certificate_check(
    start_server: Callable[..., ServerHandle], open_client: Callable[..., Client], tmp_path: Path, key: str
) -> None:
    cert_path, key_path = make_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    server = start_server(ssl_context=server_context)
    assert server.url.startswith("wss://")
    client_context = ssl.create_default_context(cafile=str(cert_path))

    publisher = open_client(server.url, ssl_context=client_context)
    subscriber = open_client(server.url, ssl_context=client_context)
    with subscriber.messages("secure", timeout=WAIT) as stream:
        big = os.urandom(200_000)  # many TLS records in one WebSocket message
        message_id = publisher.publish("secure", big)
        message = next(stream)
    assert (message.message_id, message.payload) == (message_id, big)

    with no_new_threads(), pytest.raises(ConnectError, match="certificate"):
        fastport_threads.connect(server.url, session=SESSION, password=PASSWORD, key=key)  # system CAs


# --------------------------------------------------------------------------------------------------------
# The documented example.


def test_the_threaded_example_runs(
    server: ServerHandle, key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASTPORT_URL", server.url)
    monkeypatch.setenv("FASTPORT_SESSION", SESSION)
    monkeypatch.setenv("FASTPORT_PASSWORD", PASSWORD)
    monkeypatch.setenv("FASTPORT_KEY", key)
    with no_new_threads():
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    output = capsys.readouterr().out
    assert "sensors/temp 24.5C" in output
    assert "confirmed" in output


# --------------------------------------------------------------------------------------------------------
# Giving up, integrity.
