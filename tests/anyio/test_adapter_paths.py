"""Canaries for what the adapter's cheap paths rely on: they fail if a path silently stops being used."""

from __future__ import annotations

import socket

import anyio
import pytest

from fastport_anyio import Server
from fastport_anyio.link import Link
from fastport_anyio.server import _Connection

from .conftest import FAST_CONFIG, SESSIONS, TIMEOUT, RawClient, publish_frame


async def test_the_adapter_clock_is_anyios_clock(server: Server) -> None:
    """The core's deadlines are compared with anyio's cancel scopes: same clock on both backends."""
    before = anyio.current_time()
    now = server._now()
    after = anyio.current_time()
    assert before <= now <= after


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_plain_tcp_connections_are_links_without_tasks(server: Server) -> None:
    """On asyncio a plain TCP connection is a :class:`Link` protocol: no task is started for it (so every
    asyncio-backend test of the server exercises the link path), and it is forgotten when it ends."""
    tasks_before = len(anyio.get_running_tasks())
    with anyio.fail_after(TIMEOUT):
        async with await RawClient.connect(server.port) as client:
            assert (await client.init("alpha", "alpha-password"))["success"]
            (connection,) = server._connections.values()
            assert type(connection) is Link
            assert len(anyio.get_running_tasks()) == tasks_before  # the verification thread's task is done
            assert connection.transport is not None
            sock = connection.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # no delayed-ACK stalls
        while server._connections:
            await anyio.sleep(0.01)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_plain_tcp_connections_write_directly(server: Server) -> None:
    """On trio a plain TCP connection is served through anyio's streams and gets the non-blocking direct
    write (``direct_send``)."""
    with anyio.fail_after(TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", server.port):
            while not server._connections:
                await anyio.sleep(0.01)
            (connection,) = server._connections.values()
            assert isinstance(connection, _Connection)
            while connection.stream is None:
                await anyio.sleep(0.01)
            assert connection.direct is not None


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
async def test_links_work_on_uvloop(anyio_backend: object) -> None:
    """uvloop (``fastport serve --uvloop``; in the dev extra) serves plain TCP connections as links too: its
    transports are not ``asyncio.Transport`` subclasses, so nothing may assume they are."""
    async with Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS) as server:
        with anyio.fail_after(TIMEOUT):
            async with (
                await RawClient.connect(server.port) as subscriber,
                await RawClient.connect(server.port) as publisher,
            ):
                assert (await subscriber.init("alpha", "alpha-password"))["success"]
                assert (await subscriber.subscribe("t"))["success"]
                assert (await publisher.init("alpha", "alpha-password"))["success"]
                assert (await publisher.request(publish_frame("t", "x", "m-1")))["success"]
                assert (await subscriber.receive())["messageId"] == "m-1"
                assert all(type(connection) is Link for connection in server._connections.values())
