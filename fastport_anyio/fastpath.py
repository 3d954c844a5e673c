"""What the adapter needs from below anyio's public API, kept here, apart from the server's logic.

:func:`running_backend` finds the running async library as anyio does. :func:`threadsafe_caller` gives
the loop's non-blocking "call this soon" for other threads (the store's thread, durability.py), which anyio
only offers as a blocking call.

:func:`direct_send`: a non-blocking ``send`` on the socket under a plain TCP stream, so that a write the
kernel takes at once costs no task switch (a trickle of messages paid one per write otherwise; measured in
docs/operations.md, "The adapter"). It reaches below anyio's public API, so it lives here, apart from the
server's logic, with a canary test (``tests/anyio/test_adapter_paths.py``) that fails if the path silently
stops being used. (On asyncio, plain TCP connections do not use the streams path at all: they are
:class:`~fastport_anyio.link.Link` protocols, whose transport writes at once by itself.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

try:
    import sniffio
except ImportError:  # pragma: no cover - anyio then assumes asyncio too
    sniffio = None  # type: ignore[assignment]

__all__ = ["direct_send", "running_backend", "threadsafe_caller"]


def running_backend() -> str:
    """The running async library, as anyio finds it (sniffio when installed, else asyncio)."""
    return "asyncio" if sniffio is None else str(sniffio.current_async_library())


def threadsafe_caller() -> Callable[[Callable[[], object]], object]:
    """For the running event loop: ``soon(f)`` runs ``f()`` in the loop's thread soon, callable from any
    thread and without waiting (asyncio's ``call_soon_threadsafe``, trio's ``run_sync_soon``). anyio's own
    ``from_thread.run_sync`` blocks the calling thread until the loop has run the function."""
    if running_backend() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe


def direct_send(tcp: anyio.abc.SocketStream) -> Callable[[bytes], int] | None:
    """A non-blocking ``send(data) -> bytes sent`` on the socket under ``tcp``, or ``None`` if unsafe.

    The stdlib socket under trio (EBADF once closed, so a write never reaches a recycled descriptor).
    ``None`` elsewhere: asyncio's transport socket (and uvloop's pseudo-socket, whose descriptor number
    outlives the socket) must be written through the transport, which may hold bytes of its own.
    """
    try:
        raw: Any = tcp.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return None
    if isinstance(raw, socket.socket):
        return raw.send
    return None
