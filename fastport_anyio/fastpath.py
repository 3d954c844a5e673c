"""The adapter's two cheap IO paths, each behind one function that says when it does not apply.

Both exist because they were measured (docs/operations.md, "The adapter"), and both reach below anyio's
public API, so they live here, apart from the server's logic, each with a canary test
(``tests/anyio/test_adapter_paths.py``) that fails if the path silently stops being used:

* :func:`direct_send`: a non-blocking ``send`` on the socket under a plain TCP stream, so that a write the
  kernel takes at once costs no task switch (a trickle of messages paid one per write otherwise).
* :func:`feed_by_callback`: on asyncio, a plain TCP connection's transport hands each chunk it reads to a
  callback, instead of anyio's ``receive`` resuming and pausing the transport around every read (an
  ``epoll_ctl`` add and delete per read, a queue and an event: in trickling traffic that cost more than
  the core's work for the message, ``benchmarks/io_probe.py``). This one uses anyio's *private*
  ``_transport`` / ``_protocol`` of its asyncio socket stream, checked for the expected shape first.

Either returns "not applicable" (``None``, or at once) on trio, for TLS streams, on uvloop or non-POSIX
systems, or if anyio's internals change shape; the server then uses the plain anyio path.
"""

from __future__ import annotations

import asyncio
import os
import socket
from asyncio.trsock import TransportSocket
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["direct_send", "fed_by_callback", "feed_by_callback"]


def direct_send(tcp: anyio.abc.SocketStream) -> Callable[[bytes], int] | None:
    """A non-blocking ``send(data) -> bytes sent`` on the socket under ``tcp``, or ``None`` if unsafe.

    The stdlib socket under trio (EBADF once closed); under asyncio's selector loop the socket's descriptor
    (``fileno()`` reads the live socket, -1 once closed, so a write never reaches a recycled descriptor;
    and anyio's ``send`` returns only once the transport's buffer is empty, so no bytes of ours wait in
    it). ``None`` for e.g. uvloop's pseudo-socket, whose descriptor number outlives the socket.
    """
    try:
        raw: Any = tcp.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return None
    if isinstance(raw, socket.socket):
        return raw.send
    if isinstance(raw, TransportSocket) and os.name == "posix":
        fileno = raw.fileno
        return lambda data: os.write(fileno(), data)
    return None


class _Feed(asyncio.Protocol):
    """The protocol a connection's transport calls while it is fed by callback.

    Each chunk read goes to ``on_data``; the rest (end of stream, connection lost, write flow control) goes
    to anyio's protocol (``inner``), so anyio's ``send`` still waits for the transport's buffer to drain and
    its ``receive`` sees the end of the stream.
    """

    __slots__ = ("error", "inner", "on_data", "transport")

    def __init__(
        self, inner: asyncio.Protocol, transport: asyncio.Transport, on_data: Callable[[bytes], None]
    ) -> None:
        self.inner = inner
        self.transport = transport
        self.on_data = on_data
        self.error: Exception | None = None
        """What ``on_data`` raised (a bug): reading stops and :func:`feed_by_callback` raises it."""

    def data_received(self, data: bytes) -> None:
        try:
            self.on_data(bytes(data))  # the same object for bytes; a copy of a proactor's bytearray
        except Exception as exc:
            self.error = exc
            self.transport.pause_reading()
            self.inner.read_event.set()  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _anyio_transport(stream: anyio.abc.ByteStream) -> tuple[asyncio.Transport, Any] | None:
    """The asyncio transport and anyio protocol under a plain anyio TCP stream, or ``None`` (trio, TLS, or
    an anyio whose asyncio stream is not shaped as expected)."""
    transport = getattr(stream, "_transport", None)
    inner = getattr(stream, "_protocol", None)
    if (
        isinstance(transport, asyncio.Transport)
        and isinstance(inner, asyncio.Protocol)
        and isinstance(getattr(inner, "read_queue", None), deque)
        and isinstance(getattr(inner, "read_event", None), asyncio.Event)
        and hasattr(inner, "is_at_eof")
    ):
        return transport, inner
    return None


async def feed_by_callback(stream: anyio.abc.ByteStream, on_data: Callable[[bytes], None]) -> None:
    """Hand every chunk ``stream`` reads to ``on_data``, from the transport's callback, until it ends.

    Returns at once, having read nothing, when the path does not apply (see the module docstring): the
    caller then reads with ``stream.receive``. Either way, once this returns, ``stream.receive`` sees the end
    of the stream (anyio's protocol got it) or whatever comes next: anyio's protocol is put back, with
    reading paused, on return or cancellation, so ``on_data`` is never called after that. What ``on_data``
    raised (a bug) stops reading and is raised here.
    """
    found = _anyio_transport(stream)
    if found is None:
        return
    transport, inner = found
    queue: deque[bytes] = inner.read_queue
    while queue:  # what anyio's protocol read before this ran (the opening request, often)
        on_data(queue.popleft())
    if inner.is_at_eof or transport.is_closing():
        return  # receive() reports it
    inner.read_event.clear()
    feed = _Feed(inner, transport, on_data)
    transport.set_protocol(feed)
    try:
        transport.resume_reading()
        await inner.read_event.wait()
    finally:
        transport.pause_reading()
        transport.set_protocol(inner)
    if feed.error is not None:
        raise feed.error


def fed_by_callback(stream: anyio.abc.ByteStream) -> bool:
    """Whether :func:`feed_by_callback` is feeding ``stream`` right now (for the canary test)."""
    found = _anyio_transport(stream)
    return found is not None and isinstance(found[0].get_protocol(), _Feed)
