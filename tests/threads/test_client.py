"""The blocking client against the real anyio server over loopback sockets (DESIGN §3.4, §3.9, §5).

No test sleeps to wait for something it can wait for: each waits on an Event, a Condition, a queue or the
client's own blocking calls, bounded by ``WAIT``. The only deliberate passage of time is where time is
the point (keepalive across an idle period, an iterator's idle timeout), and it is a fraction of a second.
"""

from __future__ import annotations

import functools
import gc
import os
import runpy
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import fastport_threads
from fastport_core.config import ClientConfig
from fastport_core.crypto import generate_key
from fastport_core.errors import AuthenticationError, ErrorCode, LocalProtocolError
from fastport_threads import (
    Client,
    ClientClosedError,
    ConnectError,
    ConnectionState,
    Message,
    PublishTimeoutError,
)
from tests.certificates import make_certificate

from .conftest import FAST_CLIENT, PASSWORD, SESSION, WAIT, Relay, ServerHandle, States, make_server_config

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


def in_thread(function: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``function`` in a thread; the list receives its result or the exception it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(function())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


# --------------------------------------------------------------------------------------------------------
# Basics.


def test_publish_and_subscribe_round_trip(server: ServerHandle, open_client: Callable[..., Client]) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    assert publisher.state is ConnectionState.CONNECTED
    received = Collector()
    subscriber.subscribe("sensors/temp", received)
    before = time.time_ns() // 1_000_000
    text_id = publisher.publish("sensors/temp", "24.5C")
    bytes_id = publisher.publish("sensors/temp", b"\x00\xffraw")
    first, second = received.wait_for(2)
    assert (first.topic, first.payload, first.message_id) == ("sensors/temp", "24.5C", text_id)
    assert (second.payload, second.message_id) == (b"\x00\xffraw", bytes_id)
    assert isinstance(second.payload, bytes)
    assert before <= first.timestamp <= time.time_ns() // 1_000_000
    assert publisher.pending_publishes == 0


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


def test_a_bad_topic_raises_at_once(server: ServerHandle, open_client: Callable[..., Client]) -> None:
    client = open_client(server.url)
    with pytest.raises(LocalProtocolError):
        client.publish("", "x")
    with pytest.raises(LocalProtocolError):
        client.subscribe("t" * 1000, print)


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
    relay = Relay(server.port)
    try:
        # connect_timeout: an attempt made while the relay still swallowed the answers is retried soon.
        keepalive = ClientConfig(
            ping_interval=0.05, ping_timeout=0.1, reconnect_initial_delay=0.02, connect_timeout=0.5
        )
        client = open_client(relay.url, config=keepalive)
        states = States()
        client.on_state_change(states)
        relay.blackhole_downstream = True  # the TCP connection stays up; the server just goes quiet
        states.wait_for(ConnectionState.RECONNECTING)
        assert "4004" in states.changes[0].reason  # the core's keepalive timeout, run by the IO thread
        relay.blackhole_downstream = False
        states.wait_for(ConnectionState.CONNECTED)
        client.publish("t", "back")
    finally:
        relay.close()


def test_a_full_callback_queue_applies_backpressure_and_loses_nothing(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    publisher = open_client(server.url)
    subscriber = open_client(server.url, max_buffer=2)
    release = threading.Event()
    received = Collector()

    def slow(message: Message) -> None:
        assert release.wait(WAIT)
        received(message)

    subscriber.subscribe("burst", slow)
    sent = [publisher.publish("burst", str(index)) for index in range(50)]
    deadline = time.monotonic() + WAIT
    while not subscriber._paused:  # internal view: the IO thread stopped reading (bounded wait)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert len(subscriber._dispatch) < 50  # what waits is bounded by the watermark plus one read
    release.set()
    assert [message.message_id for message in received.wait_for(50)] == sent


# --------------------------------------------------------------------------------------------------------
# messages() iteration.


def test_messages_yields_in_order_then_ends_after_the_idle_timeout(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    stream = subscriber.messages("ordered", timeout=0.2)
    sent = [publisher.publish("ordered", f"m{index}") for index in range(10)]
    started = time.monotonic()
    received = list(stream)
    waited = time.monotonic() - started
    assert [message.message_id for message in received] == sent
    assert [message.payload for message in received] == [f"m{index}" for index in range(10)]
    assert 0.2 <= waited < 0.2 + WAIT
    with pytest.raises(StopIteration):
        next(stream)  # ended for good
    # Ending the iteration withdrew the subscription: a new stream sees only what comes after it.
    with subscriber.messages("ordered", timeout=0.2) as again:
        publisher.publish("ordered", "later")
        assert [message.payload for message in again] == ["later"]


def test_messages_with_nothing_published_ends_after_the_timeout(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    client = open_client(server.url)
    started = time.monotonic()
    assert list(client.messages("quiet", timeout=0.1)) == []
    assert 0.1 <= time.monotonic() - started < 0.1 + WAIT


def test_messages_ends_when_the_client_closes_or_the_topic_is_unsubscribed(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    stream = subscriber.messages("t")  # no idle timeout: only an end stops it
    arrived = threading.Event()
    subscriber.subscribe("t", lambda message: arrived.set())  # runs after the stream got the message
    publisher.publish("t", "buffered")
    assert arrived.wait(WAIT)
    subscriber.unsubscribe("t")
    assert [message.payload for message in stream] == ["buffered"]  # handed out, then the end

    blocked = subscriber.messages("v")
    reader, outcome = in_thread(lambda: list(blocked))  # waits in next(): nothing is published
    subscriber.unsubscribe("v")
    reader.join(WAIT)
    assert outcome == [[]]

    other = subscriber.messages("u")
    reader, outcome = in_thread(lambda: list(other))
    subscriber.close()
    reader.join(WAIT)
    assert outcome == [[]]


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
    assert subscriber._core.topics == ()  # internal view: the core no longer subscribes "dropped"


# --------------------------------------------------------------------------------------------------------
# Reconnection.


def test_reconnects_after_the_connection_is_cut_restoring_subscriptions_and_resending_in_order(
    server: ServerHandle, open_client: Callable[..., Client], key: str
) -> None:
    subscriber_relay, publisher_relay = Relay(server.port), Relay(server.port)
    try:
        subscriber = open_client(subscriber_relay.url)
        publisher = open_client(publisher_relay.url)
        subscriber_states, publisher_states = States(), States()
        subscriber.on_state_change(subscriber_states)
        publisher.on_state_change(publisher_states)
        received = Collector()
        subscriber.subscribe("t", received)

        # The server gets these publishes and fans them out, but their confirmations are lost.
        publisher_relay.blackhole_downstream = True
        publishes = []
        for index in range(5):
            publishes.append(in_thread(functools.partial(publisher.publish, "t", f"p{index}", timeout=WAIT)))
            deadline = time.monotonic() + WAIT
            while publisher.pending_publishes < index + 1:  # bounded: sequences the five publishes
                assert time.monotonic() < deadline
                time.sleep(0.001)
        assert [message.payload for message in received.wait_for(5)] == [f"p{i}" for i in range(5)]

        subscriber_relay.cut()
        publisher_relay.blackhole_downstream = False
        publisher_relay.cut()
        subscriber_states.wait_for(ConnectionState.CONNECTED)
        publisher_states.wait_for(ConnectionState.CONNECTED)
        sync_subscriptions(subscriber)

        ids = []
        for thread, outcome in publishes:  # the resends were confirmed (deduped by the server)
            thread.join(WAIT)
            assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
            ids.append(outcome[0])

        # The subscription was restored, and nothing was delivered twice: the server routes in order,
        # so any duplicate of p0..p4 would have arrived before this marker.
        publisher.publish("t", "marker")
        messages = received.wait_for(6)
        assert [message.payload for message in messages] == [*(f"p{i}" for i in range(5)), "marker"]
        assert [message.message_id for message in messages[:5]] == ids
        assert subscriber_states.count(ConnectionState.RECONNECTING) == 1
    finally:
        subscriber_relay.close()
        publisher_relay.close()


def test_publishes_made_while_disconnected_are_sent_in_order_after_reconnecting(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    publisher_relay = Relay(server.port)
    try:
        publisher = open_client(publisher_relay.url)
        subscriber = open_client(server.url)
        states = States()
        publisher.on_state_change(states)
        received = Collector()
        subscriber.subscribe("t", received)

        publisher_relay.refuse = True  # the server is out of reach: publishes wait in the client
        publisher_relay.cut()
        states.wait_for(ConnectionState.RECONNECTING)
        publishes = []
        for index in range(5):
            publishes.append(in_thread(functools.partial(publisher.publish, "t", f"p{index}", timeout=WAIT)))
            deadline = time.monotonic() + WAIT
            while publisher.pending_publishes < index + 1:  # bounded: sequences the five publishes
                assert time.monotonic() < deadline
                time.sleep(0.001)
        publisher_relay.refuse = False
        states.wait_for(ConnectionState.CONNECTED)

        ids = []
        for thread, outcome in publishes:
            thread.join(WAIT)
            assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
            ids.append(outcome[0])
        messages = received.wait_for(5)
        assert [message.payload for message in messages] == [f"p{i}" for i in range(5)]
        assert [message.message_id for message in messages] == ids
    finally:
        publisher_relay.close()


def test_survives_a_server_restart_and_publishes_wait_while_disconnected(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    publisher_states, subscriber_states = States(), States()
    publisher.on_state_change(publisher_states)
    subscriber.on_state_change(subscriber_states)
    received = Collector()
    subscriber.subscribe("t", received)
    publisher.publish("t", "before")
    received.wait_for(1)

    server.stop()
    publisher_states.wait_for(ConnectionState.RECONNECTING)
    subscriber_states.wait_for(ConnectionState.RECONNECTING)
    assert publisher.state is ConnectionState.RECONNECTING
    waiting, outcome = in_thread(lambda: publisher.publish("t", "while down", timeout=WAIT))
    deadline = time.monotonic() + WAIT
    while publisher.pending_publishes < 1:  # bounded: the publish is queued in the core
        assert time.monotonic() < deadline
        time.sleep(0.001)
    server.start()  # same port, same sessions, a fresh broker

    # The publish is sent once the publisher is back; the subscriber gets it if it re-subscribed first,
    # so wait for both to be back before relying on routing.
    subscriber_states.wait_for(ConnectionState.CONNECTED)
    sync_subscriptions(subscriber)
    waiting.join(WAIT)
    assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
    publisher.publish("t", "after")
    payloads = [message.payload for message in received.wait_for_payload("after")]
    assert payloads[0] == "before" and payloads[-1] == "after"
    assert set(payloads) <= {"before", "while down", "after"}
    assert len(payloads) == len(set(payloads))


def test_publish_timeout_while_disconnected_is_typed_and_cancels_the_publish(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    client = open_client(server.url)
    states = States()
    client.on_state_change(states)
    server.stop()
    states.wait_for(ConnectionState.RECONNECTING)
    started = time.monotonic()
    with pytest.raises(PublishTimeoutError) as caught:
        client.publish("t", "lost", timeout=0.1)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.message_id
    assert 0.1 <= time.monotonic() - started < WAIT
    assert client.pending_publishes == 0  # no longer retried


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


def test_close_from_another_thread_fails_a_waiting_publish(server: ServerHandle, key: str) -> None:
    with no_new_threads():
        client = fastport_threads.connect(
            server.url, session=SESSION, password=PASSWORD, key=key, config=FAST_CLIENT
        )
        states = States()
        client.on_state_change(states)
        server.stop()
        states.wait_for(ConnectionState.RECONNECTING)
        waiting, outcome = in_thread(lambda: client.publish("t", "x", timeout=WAIT))
        deadline = time.monotonic() + WAIT
        while client.pending_publishes < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        client.close()
        waiting.join(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], ClientClosedError), outcome


# --------------------------------------------------------------------------------------------------------
# First connection failures.


def test_wrong_password_raises_a_typed_error_fast(server: ServerHandle, key: str) -> None:
    with no_new_threads():
        started = time.monotonic()
        with pytest.raises(AuthenticationError) as caught:
            fastport_threads.connect(server.url, session=SESSION, password="wrong", key=key)
        assert time.monotonic() - started < 2.0
        assert caught.value.code is ErrorCode.AUTH_FAILED
        with pytest.raises(AuthenticationError):
            fastport_threads.connect(server.url, session="no such session", password=PASSWORD, key=key)


def test_an_unreachable_server_raises_connect_error(key: str) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with no_new_threads():
        with pytest.raises(ConnectError) as caught:
            fastport_threads.connect(f"ws://127.0.0.1:{port}", session=SESSION, password=PASSWORD, key=key)
        assert isinstance(caught.value, ConnectionError)
        assert "refused" in str(caught.value).lower()


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


def test_giving_up_fails_waiters_and_ends_iterators_with_a_typed_error(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    give_up = ClientConfig(
        reconnect_initial_delay=0.02, reconnect_max_delay=0.05, reconnect_give_up_after=0.2
    )
    client = open_client(server.url, config=give_up)
    states = States()
    client.on_state_change(states)
    stream = client.messages("t")
    server.stop()
    states.wait_for(ConnectionState.RECONNECTING)
    waiting, outcome = in_thread(lambda: client.publish("t", "never", timeout=WAIT))
    states.wait_for(ConnectionState.CLOSED)
    waiting.join(WAIT)
    assert len(outcome) == 1 and isinstance(outcome[0], ClientClosedError), outcome
    assert "gave up" in str(outcome[0])
    with pytest.raises(ClientClosedError, match="gave up"):
        next(stream)
    with pytest.raises(ClientClosedError):
        client.publish("t", "x")
    assert client.state is ConnectionState.CLOSED


def test_a_message_sealed_with_another_key_is_counted_not_delivered(
    server: ServerHandle, open_client: Callable[..., Client]
) -> None:
    intruder = open_client(server.url, key=generate_key())
    publisher, subscriber = open_client(server.url), open_client(server.url)
    with subscriber.messages("t", timeout=WAIT) as stream:
        intruder.publish("t", "forged")
        publisher.publish("t", "genuine")
        assert next(stream).payload == "genuine"  # the forged one, routed first, was dropped
    assert subscriber.integrity_failures == 1
