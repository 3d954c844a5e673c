"""The client core with topic filters and tokens (DESIGN §10), against the scripted server of test_client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fastport_core.client import AuthRefused, ClientState, Connected, Disconnected, GaveUp, MessageReceived
from fastport_core.errors import LocalProtocolError

from .test_client import (
    SESSION,
    T0,
    FakeServer,
    connect,
    deliver,
    make_client,
    ready,
    sealed_message,
    subscribe,
    wait_for_reconnect,
)


def test_a_filter_subscription_receives_matching_messages_once() -> None:
    client, server = ready()
    subscribe(client, server, "sensors/+/temp", "sensors/#")
    assert client.subscriptions_for("sensors/1/temp") == ["sensors/+/temp", "sensors/#"]
    assert client.subscriptions_for("sensors") == ["sensors/#"]
    assert client.subscriptions_for("other") == []
    events = deliver(client, server, sealed_message("sensors/1/temp", "21.5"))
    assert [type(event) for event in events] == [MessageReceived]
    assert deliver(client, server, sealed_message("other", "x", "m2")) == []  # ACKed, not handed out
    assert [frame["messageId"] for frame in server.of_type("ack")] == ["m1", "m2"]


def test_unsubscribing_a_filter_stops_it_and_malformed_ones_fail_locally() -> None:
    client, server = ready()
    subscribe(client, server, "a/+")
    client.unsubscribe("a/+")
    assert client.subscriptions_for("a/b") == []
    for bad in ["a/#/b", "a+", "#a"]:
        with pytest.raises(LocalProtocolError):
            client.subscribe(bad)
    with pytest.raises(LocalProtocolError, match="may not contain"):
        client.publish("a/+", "x", now=T0, timestamp=1)


def test_password_or_token_exactly_one() -> None:
    with pytest.raises(LocalProtocolError):
        make_client(password=None)
    with pytest.raises(LocalProtocolError):
        make_client(token="t")  # the password is still there
    with pytest.raises(LocalProtocolError):
        make_client(password=None, token="")


def test_a_static_token_is_sent_instead_of_the_password() -> None:
    client, server = make_client(password=None, token="tok-1"), FakeServer()
    assert connect(client, server) == [Connected(SESSION)]
    assert server.of_type("init") == [
        # An explicit client id asks for a persistent subscriber, whatever the credential.
        {"type": "init", "sessionName": SESSION, "clientId": "client-1", "persistent": True, "token": "tok-1"}
    ]


def test_the_token_provider_is_called_for_every_connection() -> None:
    tokens: Iterator[str] = iter(["tok-1", "tok-2"])
    client = make_client(password=None, token=lambda: next(tokens))
    first = FakeServer()
    connect(client, first)
    assert first.of_type("init") == [
        # An explicit client id asks for a persistent subscriber, whatever the credential.
        {"type": "init", "sessionName": SESSION, "clientId": "client-1", "persistent": True, "token": "tok-1"}
    ]
    client.receive_data(first.close(4007, "the token expired"), T0)
    assert isinstance(client.events()[-1], Disconnected)
    reconnect_at = wait_for_reconnect(client)
    second = FakeServer()
    connect(client, second, reconnect_at)
    assert second.of_type("init")[0]["token"] == "tok-2"


def test_an_expired_token_is_retried_with_a_provider_and_fatal_without() -> None:
    expired = {"success": False, "error": "the token has expired", "code": "token_expired"}
    static = make_client(password=None, token="old")
    events = connect(static, FakeServer(init_answer=expired))
    assert events[0] == AuthRefused("the token has expired", "token_expired") and isinstance(
        events[1], GaveUp
    )
    provided = make_client(password=None, token=lambda: "old")
    events = connect(provided, FakeServer(init_answer=expired))
    assert events[0] == AuthRefused("the token has expired", "token_expired")
    assert isinstance(events[1], Disconnected) and provided.state is ClientState.WAITING


def test_a_failing_provider_fails_only_that_attempt() -> None:
    calls: list[int] = []

    def provider() -> str:
        calls.append(1)
        raise RuntimeError("backend down")

    client = make_client(password=None, token=provider)
    events = connect(client, FakeServer())
    assert len(calls) == 1
    assert isinstance(events[-1], Disconnected) and "backend down" in events[-1].reason
    assert client.state is ClientState.WAITING
