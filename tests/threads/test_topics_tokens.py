"""The blocking client with topic filters and a scoped token, against a loopback server."""

from __future__ import annotations

import time

import pytest

import fastport_threads
from fastport_core.errors import ErrorCode
from fastport_core.tokens import mint_token
from fastport_threads import PublishRefusedError, SubscribeRefusedError

from .conftest import FAST_CLIENT, PASSWORD, SESSION, ServerHandle
from .test_client import Collector


def token_for(server: ServerHandle, **scope: list[str]) -> str:
    assert server._server is not None
    key = server._server.core.broker.token_key(SESSION)
    return mint_token(key, expires_at=time.time() + 3600, session=SESSION, **scope)


def test_a_token_client_with_filters(server: ServerHandle, key: str) -> None:
    calls: list[int] = []

    def provider() -> str:
        calls.append(1)
        return token_for(server, publish=["cmd/+"], subscribe=["sensors/#"])

    holder = fastport_threads.connect(
        server.url, session=SESSION, token=provider, key=key, config=FAST_CLIENT
    )
    other = fastport_threads.connect(
        server.url, session=SESSION, password=PASSWORD, key=key, config=FAST_CLIENT
    )
    try:
        temperatures, everything = Collector(), Collector()
        holder.subscribe("sensors/+/temp", temperatures)
        holder.subscribe("sensors/#", everything)
        for topic in ["sensors/1/hum", "sensors/1/temp"]:
            other.publish(topic, topic)
        assert [m.payload for m in temperatures.wait_for(1)] == ["sensors/1/temp"]
        assert [m.payload for m in everything.wait_for(2)] == ["sensors/1/hum", "sensors/1/temp"]

        commands = Collector()
        other.subscribe("cmd/#", commands)
        holder.publish("cmd/7", "go")
        assert commands.wait_for(1)[0].payload == "go"
        with pytest.raises(PublishRefusedError) as refused:
            holder.publish("alarms", "no")
        assert refused.value.code == ErrorCode.NOT_ALLOWED
        with pytest.raises(SubscribeRefusedError) as refused_subscription:
            holder.subscribe("#", lambda message: None)
        assert refused_subscription.value.code == ErrorCode.NOT_ALLOWED
        assert calls == [1]
    finally:
        holder.close()
        other.close()
