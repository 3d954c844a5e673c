"""The client contract: every behaviour an application relies on, checked for both clients on loopback.

Each test runs three times (``client_kind``): the async client on asyncio, on trio, and the blocking
client. The decisions themselves are unit-tested once in tests/core/test_client_app.py; this suite checks
that both adapters carry them out over real sockets, with faults from the shared proxy.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import orjson
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

import fastport_anyio
import fastport_threads
from fastport_core.client_api import ConnectionState, Message
from fastport_core.config import ClientConfig, Limits, SessionSettings
from fastport_core.crypto import generate_key
from fastport_core.errors import (
    AuthenticationError,
    ClientClosedError,
    ConnectError,
    LocalProtocolError,
    PublishTimeoutError,
    SubscribeRefusedError,
    SubscribeTimeoutError,
)
from tests.background import SESSION, WAIT, ServerHandle, in_thread, make_server_config
from tests.certificates import make_certificate
from tests.proxy import Proxy

from .conftest import FAST, Collector, Opener, States


def eventually(predicate: Callable[[], bool]) -> None:
    """Poll a client's counter (bounded): for views that have no event to wait on."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def states_of(client: Any) -> States:
    states = States()
    client.on_state_change(states)
    return states


def sync_subscriptions(client: Any) -> None:
    """Return once the server processed every (re-)subscription ``client`` sent so far (it answers a
    connection's frames in order)."""
    client.subscribe(f"sync/{time.monotonic_ns()}", lambda message: None)


# --------------------------------------------------------------------------------------------------------
# One public surface.


def test_both_packages_export_the_same_client_surface() -> None:
    common = {"Client", "MessageStream", "connect", "Message", "ConnectionState", "StateChange",
              "AuthenticationError", "InvalidKeyError", "ConnectError", "ClientClosedError",
              "PublishTimeoutError", "PublishRefusedError", "SubscribeTimeoutError", "SubscribeRefusedError",
              "IntegrityFailure", "ClientConfig", "LocalProtocolError", "FastportError"}  # fmt: skip
    assert common <= set(fastport_anyio.__all__) and common <= set(fastport_threads.__all__)
    for name in common - {"Client", "MessageStream", "connect"}:
        assert getattr(fastport_anyio, name) is getattr(fastport_threads, name)  # one type each
    assert inspect.signature(fastport_anyio.connect).parameters.keys() == (
        inspect.signature(fastport_threads.connect).parameters.keys()
    )

    def public(cls: type) -> dict[str, list[str]]:
        return {name: list(inspect.signature(member).parameters) if callable(member) else []
                for name, member in vars(cls).items() if not name.startswith("_")}  # fmt: skip

    assert public(fastport_anyio.Client) == public(fastport_threads.Client)
    assert public(fastport_anyio.MessageStream).keys() - {"aclose", "receive"} == (
        public(fastport_threads.MessageStream).keys() - {"close"}
    )


# --------------------------------------------------------------------------------------------------------
# Round trips.


def test_publish_and_subscribe_round_trip(server: ServerHandle, open_client: Opener) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    assert publisher.state is ConnectionState.CONNECTED
    received: Collector[Message] = Collector()
    subscriber.subscribe("sensors/temp", received)
    before = time.time_ns() // 1_000_000
    text_id = publisher.publish("sensors/temp", "24.5C")
    bytes_id = publisher.publish("sensors/temp", b"\x00\xffraw")
    first, second = received.wait_for(2)
    assert (first.topic, first.payload, first.message_id) == ("sensors/temp", "24.5C", text_id)
    assert (second.payload, second.message_id) == (b"\x00\xffraw", bytes_id)
    assert before <= first.timestamp <= time.time_ns() // 1_000_000
    assert publisher.pending_publishes == 0
    assert isinstance(first, Message)  # one Message type, whichever client received it


def test_messages_yield_in_order_then_end_after_the_idle_timeout(
    server: ServerHandle, open_client: Opener
) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    stream = subscriber.messages("ordered", timeout=0.2)
    sent = [publisher.publish("ordered", f"m{index}") for index in range(10)]
    assert [message.message_id for message in stream] == sent
    with pytest.raises(StopIteration):
        next(stream)  # ended for good


def test_the_subscription_block_withdraws_on_exit(server: ServerHandle, open_client: Opener) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    with subscriber.subscription("t") as messages:
        publisher.publish("t", "inside")
        assert next(messages).payload == "inside"
    with pytest.raises(StopIteration):
        next(messages)
    assert server.call(lambda running: running.core.broker.stats().subscribers) >= 1  # still attached
    with subscriber.messages("t", timeout=0.2) as again:  # the topic works again after withdrawal
        publisher.publish("t", "again")
        assert [message.payload for message in again] == ["again"]


def test_a_handler_that_raises_is_logged_and_delivery_goes_on(
    server: ServerHandle, open_client: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    received: Collector[Message] = Collector()

    def handler(message: Message) -> None:
        received(message)
        if message.payload == "bad":
            raise ValueError("boom")

    subscriber.subscribe("t", handler)
    publisher.publish("t", "bad")
    publisher.publish("t", "good")
    assert [message.payload for message in received.wait_for(2)] == ["bad", "good"]
    assert any("boom" in str(record.exc_info) for record in caplog.records if record.exc_info)


def test_unsubscribe_ends_streams_and_handlers(server: ServerHandle, open_client: Opener) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    handled: Collector[Message] = Collector()
    subscriber.subscribe("t", handled)
    stream = subscriber.messages("t")  # no idle timeout: only an end stops it
    reader, outcome = in_thread(lambda: [message.payload for message in stream])
    publisher.publish("t", "one")
    handled.wait_for(1)
    subscriber.unsubscribe("t")
    reader.join(WAIT)
    assert outcome and outcome[0] in (["one"], [])  # ended (what was not yet taken is dropped at once)
    with subscriber.messages("marker", timeout=WAIT) as marker:
        publisher.publish("t", "two")
        publisher.publish("marker", "end")
        assert next(marker).payload == "end"
    assert [message.payload for message in handled.items] == ["one"]


def test_bad_arguments_raise_local_errors(server: ServerHandle, open_client: Opener) -> None:
    client = open_client(server.url)
    with pytest.raises(LocalProtocolError):
        client.publish("", "x")
    with pytest.raises(LocalProtocolError):
        client.subscribe("t" * 1000, print)
    with pytest.raises(LocalProtocolError, match="max_buffer"):
        client.messages("t", max_buffer=0)


# --------------------------------------------------------------------------------------------------------
# Reconnection, resending, dedupe.


def test_reconnects_resubscribes_and_resends_unconfirmed_publishes_in_order(
    server: ServerHandle, open_client: Opener
) -> None:
    subscriber_proxy, publisher_proxy = Proxy(server.port), Proxy(server.port)
    try:
        subscriber, publisher = open_client(subscriber_proxy.url), open_client(publisher_proxy.url)
        subscriber_states, publisher_states = states_of(subscriber), states_of(publisher)
        received: Collector[Message] = Collector()
        subscriber.subscribe("t", received)
        publisher_proxy.freeze_downstream()  # the server fans them out; the confirmations are lost
        publishes = []
        for index in range(5):
            publishes.append(in_thread(functools.partial(publisher.publish, "t", f"p{index}", timeout=WAIT)))
            eventually(lambda index=index: publisher.pending_publishes >= index + 1)  # type: ignore[misc]
        assert [message.payload for message in received.wait_for(5)] == [f"p{i}" for i in range(5)]
        subscriber_proxy.cut()
        publisher_proxy.cut()
        subscriber_states.wait_state(ConnectionState.CONNECTED, after=1)
        publisher_states.wait_state(ConnectionState.CONNECTED, after=1)
        sync_subscriptions(subscriber)
        ids = []
        for thread, outcome in publishes:  # the resends were confirmed (deduped by the server)
            thread.join(WAIT)
            assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
            ids.append(outcome[0])
        publisher.publish("t", "marker")  # routed in order: a duplicate would arrive before it
        messages = received.wait_for(6)
        assert [message.payload for message in messages] == [*(f"p{i}" for i in range(5)), "marker"]
        assert [message.message_id for message in messages[:5]] == ids
        assert [change.state for change in subscriber_states.items].count(ConnectionState.RECONNECTING) == 1
    finally:
        subscriber_proxy.close()
        publisher_proxy.close()


def test_publishes_made_while_disconnected_are_sent_in_order(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    publisher, subscriber = open_client(proxy.url), open_client(server.url)
    states = states_of(publisher)
    received: Collector[Message] = Collector()
    subscriber.subscribe("t", received)
    proxy.refuse = True
    proxy.cut()
    states.wait_state(ConnectionState.RECONNECTING)
    publishes = []
    for index in range(5):
        publishes.append(in_thread(functools.partial(publisher.publish, "t", f"p{index}", timeout=WAIT)))
        eventually(lambda index=index: publisher.pending_publishes >= index + 1)  # type: ignore[misc]
    proxy.refuse = False
    states.wait_state(ConnectionState.CONNECTED, after=1)
    ids = []
    for thread, outcome in publishes:
        thread.join(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
        ids.append(outcome[0])
    assert [message.message_id for message in received.wait_for(5)] == ids


def test_a_subscriber_cut_mid_stream_gets_everything_exactly_once(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    publisher, subscriber = open_client(server.url), open_client(proxy.url)
    states = states_of(subscriber)
    with subscriber.subscription("stream") as messages:
        sent = [publisher.publish("stream", f"m{i}") for i in range(5)]
        got = [next(messages) for _ in range(5)]
        proxy.freeze_upstream()  # its ACKs are lost: the server will deliver these again after reconnecting
        sent += [publisher.publish("stream", f"m{i}") for i in range(5, 10)]
        got += [next(messages) for _ in range(5)]
        proxy.refuse = True
        proxy.cut()
        states.wait_state(ConnectionState.RECONNECTING)
        sent += [publisher.publish("stream", f"m{i}") for i in range(10, 15)]  # kept for the detached one
        proxy.refuse = False
        states.wait_state(ConnectionState.CONNECTED, after=1)
        got += [next(messages) for _ in range(5)]
        marker = publisher.publish("stream", "end")
        last = next(messages)
    assert [message.message_id for message in got] == sent
    assert last.message_id == marker  # nothing was handed over twice before it


def test_clients_come_back_after_a_server_restart(server: ServerHandle, open_client: Opener) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    publisher_states, subscriber_states = states_of(publisher), states_of(subscriber)
    received: Collector[Message] = Collector()
    subscriber.subscribe("t", received)
    publisher.publish("t", "before")
    received.wait_for(1)
    server.restart()
    for states in (publisher_states, subscriber_states):
        states.wait_state(ConnectionState.RECONNECTING)
        states.wait_state(ConnectionState.CONNECTED, after=1)
    sync_subscriptions(subscriber)
    publisher.publish("t", "after")
    assert [message.payload for message in received.wait_for(2)] == ["before", "after"]


def test_state_changes_are_reported_once_each(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    client = open_client(proxy.url)
    states = states_of(client)
    proxy.cut()
    states.wait_state(ConnectionState.CONNECTED)
    client.close()
    states.wait_state(ConnectionState.CLOSED)
    kinds = [change.state for change in states.items]
    assert kinds[0] is ConnectionState.RECONNECTING and states.items[0].reason
    assert kinds[-1] is ConnectionState.CLOSED and kinds.count(ConnectionState.CLOSED) == 1
    assert ConnectionState.CONNECTED in kinds


# --------------------------------------------------------------------------------------------------------
# Timeouts and refusals.


def test_a_publish_timeout_is_typed_and_stops_the_publish(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    client = open_client(proxy.url)
    states = states_of(client)
    proxy.refuse = True
    proxy.cut()
    states.wait_state(ConnectionState.RECONNECTING)
    with pytest.raises(PublishTimeoutError, match=r"not confirmed within 0\.2 s") as caught:
        client.publish("t", "lost", timeout=0.2)
    assert caught.value.message_id and client.pending_publishes == 0


def test_a_subscribe_timeout_withdraws_the_subscription(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    client = open_client(proxy.url)
    states = states_of(client)
    proxy.refuse = True
    proxy.cut()
    states.wait_state(ConnectionState.RECONNECTING)
    with pytest.raises(SubscribeTimeoutError):
        client.subscribe("t", print, timeout=0.1)
    with pytest.raises(SubscribeTimeoutError):
        client.messages("t", subscribe_timeout=0.1)
    proxy.refuse = False
    states.wait_state(ConnectionState.CONNECTED, after=1)
    with client.messages("u", timeout=0.2):  # the withdrawn topic is not re-subscribed: "u" works alone
        pass


def test_the_refusal_rule_a_refused_topic_fails_its_subscribers_and_spares_the_others(
    start_server: Callable[..., ServerHandle], open_client: Opener
) -> None:
    server = start_server(make_server_config(limits=Limits(max_subscriptions_per_connection=1)))
    publisher, subscriber = open_client(server.url), open_client(server.url)
    with subscriber.subscription("kept") as kept:
        with pytest.raises(SubscribeRefusedError) as caught:
            subscriber.messages("refused")
        assert caught.value.topic == "refused" and caught.value.code
        with pytest.raises(SubscribeRefusedError):
            subscriber.subscribe("refused", print)
        publisher.publish("kept", "still here")
        assert next(kept).payload == "still here"
    with subscriber.messages("refused", timeout=0.2) as now_allowed:  # "kept" was withdrawn: room again
        publisher.publish("refused", "ok")
        assert [message.payload for message in now_allowed] == ["ok"]


def test_a_wrong_password_raises_without_a_stray_warning(
    server: ServerHandle, open_client: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(AuthenticationError, match="credentials"):
        open_client(server.url, password="wrong")
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_an_unreachable_server_raises_connect_error(open_client: Opener) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
            open_client(f"ws://127.0.0.1:{port}")


def test_plain_ws_to_a_tls_port_hints_at_wss(start_server: Callable[..., ServerHandle], tmp_path: Path,
                                             open_client: Opener) -> None:  # fmt: skip
    certificate, private_key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, private_key)
    server = start_server(ssl_context=context)
    with pytest.raises(ConnectError, match="wss://"):
        open_client(server.url.replace("wss://", "ws://"))
    trusted = ssl.create_default_context(cafile=str(certificate))
    client = open_client(server.url, ssl_context=trusted)  # and wss:// works
    assert client.publish("t", "over tls")


def test_retry_first_connect_waits_for_the_server(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    proxy.refuse = True
    config = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.05, retry_first_connect=True)
    opening, outcome = in_thread(lambda: open_client(proxy.url, config=config))
    proxy.wait_accepted(2)  # refused twice, still trying
    proxy.refuse = False
    opening.join(WAIT)
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    assert outcome[0].state is ConnectionState.CONNECTED  # type: ignore[attr-defined]


def test_giving_up_fails_waiting_calls_and_streams_with_a_typed_error(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    config = ClientConfig(reconnect_initial_delay=0.02, reconnect_max_delay=0.05, reconnect_give_up_after=0.3)
    client = open_client(proxy.url, config=config)
    states = states_of(client)
    stream = client.messages("t")
    proxy.refuse = True
    proxy.cut()
    states.wait_state(ConnectionState.CLOSED)
    with pytest.raises(ClientClosedError, match="gave up"):
        next(stream)
    with pytest.raises(ClientClosedError, match="closed"):
        client.publish("t", "later")
    assert "giving up after" in states.items[-1].reason


# --------------------------------------------------------------------------------------------------------
# Backpressure and integrity.


def test_a_busy_handler_applies_backpressure_and_loses_nothing(
    server: ServerHandle, open_client: Opener, client_kind: str
) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    release = threading.Event()
    received: Collector[Message] = Collector()

    def slow_sync(message: Message) -> None:
        assert release.wait(WAIT)
        received(message)

    async def slow_async(message: Message) -> None:  # a sync handler that blocks would block the loop
        assert await anyio.to_thread.run_sync(release.wait, WAIT)
        received(message)

    slow = slow_sync if client_kind == "threads" else slow_async
    subscriber.subscribe("burst", slow, max_buffer=2)
    sent = [publisher.publish("burst", str(index)) for index in range(50)]
    release.set()
    assert [message.message_id for message in received.wait_for(50)] == sent


def test_a_full_stream_stops_reading_instead_of_buffering_everything(
    server: ServerHandle, open_client: Opener
) -> None:
    publisher, subscriber = open_client(server.url), open_client(server.url)
    payload = "x" * 2048
    with subscriber.subscription("burst", max_buffer=2) as messages:
        sent = [publisher.publish("burst", payload) for _ in range(200)]
        # Without flow control all 200 (~600 KiB) would sit in the buffer; with it, at most the mark plus
        # what one 64 KiB read completes.
        assert messages.buffered <= 2 + 65536 // 2048
        received = [next(messages).message_id for _ in range(200)]
    assert received == sent


def test_a_message_sealed_with_another_key_is_counted_and_not_delivered(
    server: ServerHandle, open_client: Opener
) -> None:
    forger, publisher = open_client(server.url, key=generate_key()), open_client(server.url)
    subscriber = open_client(server.url)
    failures: Collector[Any] = Collector()
    subscriber.on_integrity_failure(failures)
    with subscriber.subscription("t") as messages:
        forged = forger.publish("t", "forged")
        real = publisher.publish("t", "real")
        assert next(messages).message_id == real
    assert [failure.message_id for failure in failures.wait_for(1)] == [forged]
    assert subscriber.integrity_failures == 1


# --------------------------------------------------------------------------------------------------------
# At least once to the application (ack_when_consumed), and the publish give-up horizon.

CONSUMED = dataclasses.replace(FAST, ack_when_consumed=True)


def _unacked(server: ServerHandle) -> int:
    return server.call(lambda running: running.core.broker.stats().per_session[SESSION].inflight_deliveries)


@pytest.mark.parametrize("ack_when_consumed", [False, True])
def test_a_message_an_iterator_has_not_taken_is_acked_only_in_the_default_mode(
    server: ServerHandle, open_client: Opener, ack_when_consumed: bool
) -> None:
    publisher = open_client(server.url)
    subscriber = open_client(
        server.url, config=dataclasses.replace(FAST, ack_when_consumed=ack_when_consumed)
    )
    with subscriber.subscription("t") as messages:
        publisher.publish("t", "x")
        eventually(lambda: messages.buffered == 1)
        sync_subscriptions(subscriber)  # the server has read whatever the subscriber sent before
        assert _unacked(server) == (1 if ack_when_consumed else 0)
        assert next(messages).payload == "x"  # taken: ACKed
        eventually(lambda: _unacked(server) == 0)


def test_with_ack_when_consumed_a_message_whose_handler_raised_is_handed_over_again_after_a_reconnection(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    publisher, subscriber = open_client(server.url), open_client(proxy.url, config=CONSUMED)
    states = states_of(subscriber)
    received: Collector[Message] = Collector()

    def handler(message: Message) -> None:
        received(message)
        if len(received.items) == 1:
            raise ValueError("crashed while handling")

    subscriber.subscribe("t", handler)
    work, marker = publisher.publish("t", "work"), publisher.publish("t", "marker")
    received.wait_for(2)  # the handler is on "marker": it is done with "work" (un-ACKed)
    proxy.cut()
    states.wait_state(ConnectionState.CONNECTED)  # resumed: the server re-sends what was not ACKed
    assert [message.message_id for message in received.wait_for(3)] == [work, marker, work]
    eventually(lambda: _unacked(server) == 0)
    assert len(received.items) == 3


def test_with_ack_when_consumed_a_message_whose_handler_raised_is_handed_over_again_at_the_servers_retry(
    start_server: Callable[..., ServerHandle], open_client: Opener
) -> None:
    server = start_server(make_server_config(default_session_settings=SessionSettings(retry_interval=0.1)))
    publisher, subscriber = open_client(server.url), open_client(server.url, config=CONSUMED)
    attempts: Collector[Message] = Collector()

    def handler(message: Message) -> None:
        attempts(message)
        if len(attempts.items) < 3:
            raise ValueError("not yet")

    subscriber.subscribe("t", handler)
    message_id = publisher.publish("t", "work")
    assert [message.message_id for message in attempts.wait_for(3)] == [message_id] * 3
    eventually(lambda: _unacked(server) == 0)  # the third attempt returned: ACKed, no more re-sends


def test_with_ack_when_consumed_what_was_never_taken_goes_to_the_next_process_of_a_persistent_subscriber(
    start_server: Callable[..., ServerHandle], open_client: Opener
) -> None:
    server = start_server(make_server_config(default_session_settings=SessionSettings(retry_interval=0.1)))
    publisher, first = open_client(server.url), open_client(server.url, config=CONSUMED, client_id="worker")
    stream = first.messages("jobs")
    sent = publisher.publish("jobs", "job")
    eventually(lambda: stream.buffered == 1)
    first.close()  # as a crash would: never taken, so never ACKed
    second = open_client(server.url, config=CONSUMED, client_id="worker")
    with second.messages("jobs", timeout=WAIT) as jobs:  # what came before it is left to the server's retry
        assert next(jobs).message_id == sent
    eventually(lambda: _unacked(server) == 0)


def test_a_publish_is_given_up_at_publish_give_up_after_even_without_a_timeout(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    client = open_client(proxy.url, config=dataclasses.replace(FAST, publish_give_up_after=0.3))
    proxy.freeze_downstream()  # the confirmation never arrives
    with pytest.raises(PublishTimeoutError, match=r"publish_give_up_after \(0\.3 s\)") as caught:
        client.publish("t", "x", timeout=None)
    assert caught.value.message_id and client.pending_publishes == 0


# --------------------------------------------------------------------------------------------------------
# Closing.


def test_close_fails_a_waiting_publish_ends_streams_quietly_and_refuses_later_calls(
    server: ServerHandle, proxy: Proxy, open_client: Opener
) -> None:
    client = open_client(proxy.url)
    stream = client.messages("t")
    proxy.freeze_downstream()  # the publish gets no confirmation
    waiting, outcome = in_thread(lambda: client.publish("t", "x", timeout=WAIT))
    eventually(lambda: client.pending_publishes == 1)
    client.close()
    waiting.join(WAIT)
    assert len(outcome) == 1 and isinstance(outcome[0], ClientClosedError), outcome
    assert list(stream) == []  # a quiet end: the application closed it
    with pytest.raises(ClientClosedError):
        client.publish("t", "after")
    assert client.state is ConnectionState.CLOSED
    client.close()  # idempotent


# --------------------------------------------------------------------------------------------------------
# Subscriber lifecycle (DESIGN §3.10): what the client sends, at the wire.


class RawServer:
    """One WebSocket connection served by wsproto in a thread: records ``init``, accepts it, and records
    the Close frame the client sends."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self._listener.getsockname()[1]}"
        self.init: dict[str, Any] = {}
        self.close_code: int | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        ws = WSConnection(ConnectionType.SERVER)
        with connection:
            while self.close_code is None and (data := connection.recv(65536)):
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        connection.sendall(ws.send(AcceptConnection()))
                    elif isinstance(event, TextMessage):
                        self.init = orjson.loads(event.data)
                        answer = {"type": "init_response", "success": True, "sessionName": SESSION}
                        connection.sendall(ws.send(TextMessage(orjson.dumps(answer).decode())))
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                        connection.sendall(ws.send(event.response()))
        self._listener.close()

    def join(self) -> None:
        self._thread.join(WAIT)


@pytest.fixture
def raw_server() -> Iterator[RawServer]:
    raw = RawServer()
    yield raw
    raw.join()


@pytest.mark.parametrize("client_id", [None, "sensor-7"])
def test_init_asks_for_persistence_only_with_an_explicit_client_id_and_close_sends_a_close_frame(
    raw_server: RawServer, open_client: Opener, client_id: str | None
) -> None:
    client = open_client(raw_server.url, client_id=client_id)
    client.close()
    raw_server.join()
    assert raw_server.init["clientId"] == client.client_id
    assert raw_server.init.get("persistent") is (True if client_id else None)
    assert raw_server.close_code == 1000  # a clean close: the server may release a clean session at once


def _detached(server: ServerHandle) -> int:
    return server.call(lambda running: running.core.broker.stats().per_session[SESSION].detached_subscribers)


def test_a_clean_close_releases_a_clean_session_subscriber(server: ServerHandle, open_client: Opener) -> None:
    client = open_client(server.url)
    client.subscribe("t", print)
    client.close()
    eventually(lambda: server.call(lambda running: running.core.broker.stats().connections) == 0)
    assert _detached(server) == 0


def test_a_persistent_subscriber_survives_a_clean_close(server: ServerHandle, open_client: Opener) -> None:
    client = open_client(server.url, client_id="persistent-1")
    client.subscribe("t", print)
    client.close()
    eventually(lambda: server.call(lambda running: running.core.broker.stats().connections) == 0)
    assert _detached(server) == 1
