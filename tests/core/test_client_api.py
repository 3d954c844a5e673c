"""The application-facing pieces both client adapters share."""

from __future__ import annotations

from typing import Any

import pytest

from fastport_core.client import (
    AuthRefused,
    ClientState,
    Connected,
    PublishConfirmed,
    PublishRefused,
    SubscribeConfirmed,
    SubscribeRefused,
)
from fastport_core.client_api import Answer, Endpoint, auth_error, make_client_core, parse_url, settle_answers
from fastport_core.config import ClientConfig
from fastport_core.crypto import generate_key
from fastport_core.errors import ErrorCode, LocalProtocolError, PublishRefusedError, SubscribeRefusedError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://127.0.0.1:3000", Endpoint("127.0.0.1", 3000, False, "127.0.0.1:3000", "/")),
        (
            "wss://broker.example.com/ws?x=1",
            Endpoint("broker.example.com", 443, True, "broker.example.com", "/ws?x=1"),
        ),
        ("ws://host", Endpoint("host", 80, False, "host", "/")),
        ("WS://[::1]:8080/", Endpoint("::1", 8080, False, "[::1]:8080", "/")),
    ],
)
def test_urls_become_endpoints(url: str, expected: Endpoint) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["http://host", "host:3000", "ws://", "ws://host:99999", "ws://host:abc"])
def test_bad_urls_are_local_errors_naming_the_url(url: str) -> None:
    with pytest.raises(LocalProtocolError, match="url"):
        parse_url(url)


def test_a_refused_init_becomes_a_typed_authentication_error() -> None:
    error = auth_error(AuthRefused("wrong password", "auth_failed"))
    assert error.code is ErrorCode.AUTH_FAILED
    assert "wrong password" in str(error)
    assert auth_error(AuthRefused("slow down", "auth_throttled")).code is ErrorCode.AUTH_THROTTLED
    assert auth_error(AuthRefused("?", "from_the_future")).code is ErrorCode.AUTH_FAILED


class _Flag:
    def __init__(self) -> None:
        self.flag = False

    def set(self) -> None:
        self.flag = True

    def is_set(self) -> bool:
        return self.flag


def test_answers_are_settled_once_by_the_events_that_concern_them() -> None:
    publish: Answer[str] = Answer(_Flag())
    refused: Answer[str] = Answer(_Flag())
    subscribe: Answer[None] = Answer(_Flag())
    publishes = {"m1": publish, "m2": refused}
    subscribes = {"t": [subscribe]}
    assert settle_answers(PublishConfirmed("m1", 3), publishes, subscribes)
    assert settle_answers(PublishRefused("m2", "no", "not_allowed"), publishes, subscribes)
    assert settle_answers(SubscribeRefused("t", "too many", "too_many_subscriptions"), publishes, subscribes)
    assert settle_answers(SubscribeConfirmed("t"), publishes, subscribes)  # too late: the first answer stands
    assert settle_answers(PublishConfirmed("unknown", 1), publishes, subscribes)
    assert not settle_answers(Connected("demo"), publishes, subscribes)
    assert publish.done and publish.result == "m1" and publish.error is None
    assert isinstance(refused.error, PublishRefusedError) and refused.error.code == "not_allowed"
    assert isinstance(subscribe.error, SubscribeRefusedError) and subscribe.error.topic == "t"
    assert subscribe.result is None


def test_a_tls_context_for_a_plain_url_is_refused_before_any_io() -> None:
    common: dict[str, Any] = {"session": "s", "password": "p", "key": generate_key(), "suite": "authenticated",
                              "config": ClientConfig(), "client_id": None}  # fmt: skip
    with pytest.raises(LocalProtocolError, match="wss://"):
        make_client_core("ws://127.0.0.1:3000", tls_context_given=True, **common)
    endpoint, core = make_client_core("wss://example.com/x", tls_context_given=True, **common)
    assert endpoint.tls and core.state is ClientState.DISCONNECTED
