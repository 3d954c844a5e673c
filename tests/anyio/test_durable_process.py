"""``fastport serve --store`` as a real process, killed with SIGKILL at chosen points (issue 9, item 7).

Each test starts the broker in a subprocess on a temporary SQLite store, drives it with hand-written
protocol clients (:class:`RawClient`, not ours), kills it with ``kill -9`` mid-stream, mid-resume or
mid-admin-call, starts it again on the same store and checks what the issue promises: every publish the
publisher saw confirmed reaches the resumable subscriber's application, sessions created through the admin
API and their passwords still work, and ACKs committed before a graceful stop never bring their messages
back. The kill points come from a seeded random generator, so a failure is reproducible.
"""

from __future__ import annotations

import base64
import os
import random
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson
import pytest

from .conftest import TIMEOUT, RawClient, ServerClosed, http_request, publish_frame

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
[server]
password_hash_cost = 16
ping_interval = 5

[admin]
user = "ops"
password = "ops-password"

[[sessions]]
name = "alpha"
password = "alpha-password"
"""
AUTH = {"Authorization": "Basic " + base64.b64encode(b"ops:ops-password").decode()}


class Broker:
    """One ``fastport serve --store`` process."""

    def __init__(self, process: anyio.abc.Process, port: int) -> None:
        self.process = process
        self.port = port

    async def kill(self) -> None:
        """``kill -9``: no shutdown, no last commit."""
        self.process.send_signal(signal.SIGKILL)
        with anyio.fail_after(TIMEOUT):
            await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM: the graceful stop (every connection closed, the last commit made)."""
        self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(TIMEOUT):
            assert await self.process.wait() == 0


def serve_command(tmp_path: Path, config: str, *options: str) -> tuple[list[str], dict[str, str]]:
    """``fastport serve`` with ``config`` (written to ``tmp_path``) and ``options``, and its environment."""
    path = tmp_path / "fastport.toml"
    path.write_text(config, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTPORT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "fastport_anyio", "serve", "--config", str(path), "--port", "0", *options]
    return argv, env


@asynccontextmanager
async def broker(tmp_path: Path, *options: str, config: str = CONFIG) -> AsyncIterator[Broker]:
    """A ``fastport serve`` process, once it listens; ``options`` default to ``--store`` in ``tmp_path``."""
    argv, env = serve_command(tmp_path, config, *(options or ("--store", str(tmp_path / "store.db"))))
    process = await anyio.open_process(argv, env=env, stdout=None)
    try:
        seen = bytearray()
        stderr = process.stderr
        assert stderr is not None
        with anyio.fail_after(TIMEOUT):
            while (found := re.search(rb"ws://127\.0\.0\.1:(\d+)", seen)) is None:
                seen += await stderr.receive()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(_drain, stderr)  # a full stderr pipe would stall the broker
            yield Broker(process, int(found.group(1)))
            task_group.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()


async def _drain(stream: anyio.abc.ByteReceiveStream) -> None:
    async for _chunk in stream:
        pass


async def member(port: int, **init: Any) -> RawClient:
    client = await RawClient.connect(port)
    answer = await client.request(
        {"type": "init", "sessionName": "alpha", "password": "alpha-password", **init}
    )
    assert answer["success"] is True, answer
    return client


async def publish_until_killed(server: Broker, ids: list[str], kill_after: int) -> set[str]:
    """Pipeline every publish, read confirmations, ``kill -9`` after ``kill_after`` of them; the confirmed."""
    confirmed: set[str] = set()
    async with await member(server.port) as pub:
        for message_id in ids:
            await pub.send_json(publish_frame("t", f"data of {message_id}", message_id))
        try:
            while len(confirmed) < len(ids):
                answer = await pub.receive()
                if answer["type"] == "publish_response":
                    assert answer["success"] is True, answer
                    confirmed.add(answer["messageId"])
                    if len(confirmed) == kill_after:
                        await server.kill()
        except (ServerClosed, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
    return confirmed


async def receive_acking(
    client: RawClient, until: set[str], *, ack: bool = True, stop_after: int | None = None
) -> list[str]:
    """Messages in arrival order, ACKed as they come, until every id of ``until`` arrived (or
    ``stop_after`` messages, or the connection dies)."""
    got: list[str] = []
    try:
        while not until <= set(got) and (stop_after is None or len(got) < stop_after):
            message = await client.receive()
            if message["type"] != "message":
                continue
            got.append(message["messageId"])
            if ack:
                await client.send_json({"type": "ack", "topic": "t", "messageId": message["messageId"]})
    except (ServerClosed, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        pass
    return got


async def test_kill_9_mid_stream_and_mid_resume_loses_no_confirmed_message(tmp_path: Path) -> None:
    rng = random.Random(9)
    ids = [f"m{i}" for i in range(300)]
    async with broker(tmp_path) as server, await member(server.port, clientId="dev", persistent=True) as sub:
        assert (await sub.subscribe("t"))["success"] is True
        confirmed = await publish_until_killed(server, ids, kill_after=rng.randrange(50, 250))
    assert confirmed
    delivered: set[str] = set()
    async with broker(tmp_path) as server:  # restart; the subscriber resumes, then the broker dies again
        sub = await member(server.port, clientId="dev", persistent=True)
        delivered |= set(await receive_acking(sub, confirmed, stop_after=rng.randrange(10, 40)))
        await server.kill()
        await sub.aclose()
    async with broker(tmp_path) as server, await member(server.port, clientId="dev", persistent=True) as sub:
        delivered |= set(await receive_acking(sub, confirmed - delivered))
        await server.stop()
    missing = confirmed - delivered
    assert not missing, sorted(missing)


async def test_acked_messages_do_not_come_back_after_a_graceful_restart(tmp_path: Path) -> None:
    ids = [f"m{i}" for i in range(40)]
    async with broker(tmp_path) as server, await member(server.port, clientId="dev", persistent=True) as sub:
        assert (await sub.subscribe("t"))["success"] is True
        async with await member(server.port) as pub:
            for message_id in ids:
                assert (await pub.request(publish_frame("t", "x", message_id)))["success"] is True
        acked = await receive_acking(sub, set(ids[:25]))
        assert set(acked) >= set(ids[:25])
        unacked = await receive_acking(sub, set(ids[25:]), ack=False)
        assert (await sub.subscribe("t"))["success"] is True  # the ACKs were handled before this answer
        await server.stop()
    async with broker(tmp_path) as server, await member(server.port, clientId="dev", persistent=True) as sub:
        again = await receive_acking(sub, set(unacked))
        assert set(again) == set(unacked), sorted(set(again) ^ set(unacked))
        # Nothing more: the next frame after a round trip is the answer, not a message.
        assert (await sub.subscribe("t"))["success"] is True


async def test_a_session_created_over_the_admin_api_survives_kill_9(tmp_path: Path) -> None:
    async with broker(tmp_path) as server:
        body = orjson.dumps({"sessionName": "fleet", "password": "fleet-password"})
        status, _, answer = await http_request(
            server.port, "POST", "/api/createSession", body=body, headers=AUTH
        )
        assert status == 200
        secret = orjson.loads(answer)["secretKey"]
        await server.kill()  # at once: the 200 promised a committed session
    async with broker(tmp_path) as server:
        client = await RawClient.connect(server.port)
        async with client:
            assert (await client.init("fleet", "fleet-password"))["success"] is True
        client = await RawClient.connect(server.port)
        async with client:
            assert (await client.init("fleet", "wrong"))["success"] is False
        body = orjson.dumps({"sessionName": "fleet", "password": "fleet-password", "secretKey": secret})
        status, _, _ = await http_request(server.port, "POST", "/api/dropSession", body=body, headers=AUTH)
        assert status == 200
        await server.kill()
    async with broker(tmp_path) as server:
        client = await RawClient.connect(server.port)
        async with client:
            assert (await client.init("fleet", "fleet-password"))["success"] is False


async def test_a_corrupt_store_is_a_one_line_startup_error_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "store.db").write_bytes(b"this is not an SQLite database" * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTPORT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    argv = [
        sys.executable,
        "-m",
        "fastport_anyio",
        "serve",
        "--port",
        "0",
        "--store",
        str(tmp_path / "store.db"),
    ]
    with anyio.fail_after(TIMEOUT):
        done = await anyio.run_process(argv, env=env, check=False)
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("fastport serve: ") and "store" in lines[0], lines
