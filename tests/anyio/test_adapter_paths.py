"""Canaries for what the adapter's cheap paths rely on: they fail if a path silently stops being used."""

from __future__ import annotations

import anyio
import pytest

from fastport_anyio import Server
from fastport_anyio.fastpath import fed_by_callback

from .conftest import TIMEOUT


async def test_the_adapter_clock_is_anyios_clock(server: Server) -> None:
    """The core's deadlines are compared with anyio's cancel scopes: same clock on both backends."""
    before = anyio.current_time()
    now = server._now()
    after = anyio.current_time()
    assert before <= now <= after


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_plain_tcp_is_fed_by_callback_then_handed_back(server: Server) -> None:
    """On asyncio a plain TCP connection is read by the transport's callback (``feed_by_callback``); at
    the end of the stream anyio's protocol gets its transport back."""
    with anyio.fail_after(TIMEOUT):
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        while not server._connections:
            await anyio.sleep(0.01)
        (connection,) = server._connections.values()
        while not fed_by_callback(connection.tcp):
            await anyio.sleep(0.01)
        await stream.send_eof()
        while server._connections:
            await anyio.sleep(0.01)
        assert not fed_by_callback(connection.tcp)
        await stream.aclose()


async def test_plain_tcp_connections_write_directly(server: Server) -> None:
    """On both backends a plain TCP connection gets the non-blocking direct write (``direct_send``)."""
    with anyio.fail_after(TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", server.port):
            while not server._connections or next(iter(server._connections.values())).stream is None:
                await anyio.sleep(0.01)
            (connection,) = server._connections.values()
            assert connection.direct is not None
