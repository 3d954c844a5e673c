"""The streams path's cheap write, behind one function that says when it does not apply.

:func:`direct_send`: a non-blocking ``send`` on the socket under a plain TCP stream, so that a write the
kernel takes at once costs no task switch (a trickle of messages paid one per write otherwise; measured in
docs/operations.md, "The adapter"). It reaches below anyio's public API, so it lives here, apart from the
server's logic, with a canary test (``tests/anyio/test_adapter_paths.py``) that fails if the path silently
stops being used. (On asyncio, plain TCP connections do not use the streams path at all: they are
:class:`~fastport_anyio.link.Link` protocols, whose transport writes at once by itself.)
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["direct_send"]


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
