"""Canaries for what the adapter's cheap paths rely on: they fail if a path silently stops being used."""

from __future__ import annotations

import anyio
import pytest

import fastport_anyio.server as server_module
from fastport_anyio import Server

from .conftest import TIMEOUT


async def test_the_adapter_clock_is_anyios_clock(server: Server) -> None:
    """The core's deadlines are compared with anyio's cancel scopes: same clock on both backends."""
    before = anyio.current_time()
    now = server._now()
    after = anyio.current_time()
    assert before <= now <= after


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_plain_tcp_is_fed_by_callback_then_handed_back(server: Server) -> None:
    """On asyncio a plain TCP connection is read by the transport's callback (``_read_by_callback``); at
    the end of the stream anyio's protocol gets its transport back."""
    with anyio.fail_after(TIMEOUT):
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        while not server._connections:
            await anyio.sleep(0.01)
        (connection,) = server._connections.values()
        transport = connection.tcp._transport  # type: ignore[attr-defined]
        while not isinstance(transport.get_protocol(), server_module._Feed):
            await anyio.sleep(0.01)
        await stream.send_eof()
        while server._connections:
            await anyio.sleep(0.01)
        assert not isinstance(transport.get_protocol(), server_module._Feed)
        await stream.aclose()
