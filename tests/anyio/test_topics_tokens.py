"""Topic filters and scoped tokens end to end: the async client and the CLI against a loopback server."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import pytest

from fastport_anyio import PublishRefusedError, Server, SubscribeRefusedError, connect
from fastport_core.crypto import generate_key
from fastport_core.errors import AuthenticationError, ErrorCode
from fastport_core.tokens import mint_token

from .conftest import TIMEOUT, RawClient

pytestmark = pytest.mark.anyio

KEY = generate_key()
ROOT = Path(__file__).resolve().parents[2]


def token_for(server: Server, *, ttl: float = 3600, **scope: object) -> str:
    key = server.core.broker.token_key("alpha")
    return mint_token(key, expires_at=time.time() + ttl, session="alpha", **scope)  # type: ignore[arg-type]


async def test_filters_route_matching_topics_to_a_subscription(server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            connect(server.url, session="alpha", password="alpha-password", key=KEY) as subscriber,
            connect(server.url, session="alpha", password="alpha-password", key=KEY) as publisher,
            subscriber.subscription("sensors/+/temp") as temperatures,
            subscriber.subscription("sensors/#") as everything,
        ):
            for topic in ["sensors/1/hum", "sensors/1/temp", "other", "sensors/2/temp"]:
                await publisher.publish(topic, topic)
            assert [(await temperatures.receive()).payload for _ in range(2)] == [
                "sensors/1/temp",
                "sensors/2/temp",
            ]
            assert [(await everything.receive()).payload for _ in range(3)] == [
                "sensors/1/hum", "sensors/1/temp", "sensors/2/temp",
            ]  # fmt: skip
        async with await RawClient.connect(server.port) as raw:
            await raw.init("alpha", "alpha-password")
            answer = await raw.request(
                {
                    "type": "publish",
                    "topic": "a/+",
                    "data": "d",
                    "hash": "h",
                    "timestamp": 1,
                    "messageId": "x",
                }
            )
            assert answer["success"] is False and answer["code"] == ErrorCode.INVALID_TOPIC
            answer = await raw.subscribe("a/#/b")
            assert answer["success"] is False and answer["code"] == ErrorCode.INVALID_FILTER


async def test_a_token_client_is_held_to_its_scope(server: Server) -> None:
    token = token_for(server, publish=["cmd/+"], subscribe=["sensors/#"])
    with anyio.fail_after(TIMEOUT):
        async with (
            connect(server.url, session="alpha", token=token, key=KEY) as holder,
            connect(server.url, session="alpha", password="alpha-password", key=KEY) as other,
            other.subscription("cmd/#") as commands,
            holder.subscription("sensors/+/temp") as temperatures,
        ):
            await holder.publish("cmd/1", "go")
            assert (await commands.receive()).payload == "go"
            with pytest.raises(PublishRefusedError) as refused:
                await holder.publish("alarms/1", "no")
            assert refused.value.code == ErrorCode.NOT_ALLOWED
            with pytest.raises(SubscribeRefusedError) as refused_subscription:
                await holder.subscribe("#", lambda message: None)
            assert refused_subscription.value.code == ErrorCode.NOT_ALLOWED
            await other.publish("sensors/3/temp", "19")
            assert (await temperatures.receive()).payload == "19"


async def test_a_forged_or_expired_token_cannot_connect(server: Server) -> None:
    forged = mint_token(generate_key(), expires_at=time.time() + 60, session="alpha")
    expired = token_for(server, ttl=-10)
    # Expired first: a forged token also counts towards the peer's auth throttle.
    for token, code in ((expired, ErrorCode.TOKEN_EXPIRED), (forged, ErrorCode.INVALID_TOKEN)):
        with anyio.fail_after(TIMEOUT), pytest.raises(AuthenticationError) as refused:
            async with connect(server.url, session="alpha", token=token, key=KEY):
                pass
        assert refused.value.code == code


async def test_a_connection_closed_at_exp_reconnects_with_a_fresh_token_from_the_provider(
    server: Server,
) -> None:
    minted: list[str] = []
    renewed = anyio.Event()

    def provider() -> str:
        # A token that expires about a second from now (exp is whole seconds).
        minted.append(token_for(server, ttl=1.5, subscribe=["t"], publish=["t"]))
        if len(minted) == 2:
            renewed.set()
        return minted[-1]

    with anyio.fail_after(TIMEOUT):
        async with (
            connect(server.url, session="alpha", token=provider, key=KEY) as holder,
            connect(server.url, session="alpha", password="alpha-password", key=KEY) as other,
            holder.subscription("t") as messages,
        ):
            await renewed.wait()  # the server closed the first connection at exp (4007)
            await other.publish("t", "after renewal")  # the re-subscription is confirmed once it arrives
            assert (await messages.receive()).payload == "after renewal"
    assert server.core.metrics.value("connections_closed", "4007") >= 1


async def test_token_mint_and_sub_with_a_filter_as_processes(server: Server) -> None:
    token_key = server.core.broker.token_key("alpha")
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "FASTPORT_TOKEN_KEY": token_key,
    }
    environment.pop("FASTPORT_PASSWORD", None)
    mint = [
        sys.executable, "-m", "fastport_anyio", "token", "mint", "--session", "alpha", "--sub", "cli-1",
        "--subscribe", "sensors/#", "--ttl", "1h",
    ]  # fmt: skip
    with anyio.fail_after(TIMEOUT):
        minted = await anyio.run_process(mint, env=environment, check=False)
    assert minted.returncode == 0, minted.stderr.decode()
    token = minted.stdout.decode().strip()

    bad = await anyio.run_process([*mint[:-2], "--ttl", "soon"], env=environment, check=False)
    assert bad.returncode == 2

    sub_environment = environment | {
        "FASTPORT_URL": server.url, "FASTPORT_SESSION": "alpha", "FASTPORT_KEY": KEY, "FASTPORT_TOKEN": token,
    }  # fmt: skip
    command = [sys.executable, "-m", "fastport_anyio", "sub", "--count", "1", "-v", "sensors/+/temp"]
    # The token binds clientId cli-1 but `sub` uses a random one: refused with client_id_mismatch.
    with anyio.fail_after(TIMEOUT):
        mismatch = await anyio.run_process(command, env=sub_environment, check=False)
    assert mismatch.returncode == 1 and b"binds clientId 'cli-1'" in mismatch.stderr

    minted = await anyio.run_process(
        [m for m in mint if m not in ("--sub", "cli-1")], env=environment, check=False
    )
    sub_environment["FASTPORT_TOKEN"] = minted.stdout.decode().strip()
    with anyio.fail_after(TIMEOUT):
        async with (
            await anyio.open_process(command, env=sub_environment) as process,
            connect(server.url, session="alpha", password="alpha-password", key=KEY) as publisher,
        ):
            assert process.stderr is not None and process.stdout is not None
            status = await process.stderr.receive()
            assert b"subscribed to 'sensors/+/temp'" in status, status
            await publisher.publish("sensors/1/hum", "55")
            await publisher.publish("sensors/1/temp", "21.5")
            output = b""
            while b"\n" not in output:
                output += await process.stdout.receive()
            assert await process.wait() == 0
    assert output.decode() == "sensors/1/temp 21.5\n"
