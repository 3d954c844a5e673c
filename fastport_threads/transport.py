"""The blocking client's socket: one non-blocking connection attempt, TLS in memory, owned by the IO thread.
It only moves bytes; the core (:mod:`fastport_core.client_app`) decides what, when and whether."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from enum import Enum
from typing import Final

from fastport_core.client_api import Endpoint

__all__ = ["Phase", "Transport"]

_READ_SIZE: Final = 65536
"""Bytes asked of the socket per read: a burst of frames costs one core call."""


class Phase(Enum):
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    TLS_HANDSHAKE = "tls handshake"
    OPEN = "open"


class Transport:
    """One connection attempt's socket, owned by the IO thread alone. TLS runs in memory (an ``SSLObject``
    over two ``MemoryBIO``\\ s), so plain and TLS share one non-blocking read path and one write path.
    Errors surface as ``OSError`` (``ssl.SSLError`` is one), reported to the core as a lost connection."""

    def __init__(self, endpoint: Endpoint, ssl_context: ssl.SSLContext | None) -> None:
        self._endpoint = endpoint
        self._ssl_context = ssl_context
        self.sock: socket.socket | None = None
        self.phase = Phase.RESOLVING
        self.out = bytearray()
        """Bytes for the socket (already encrypted under TLS), written when it is writable."""
        self.eof = False
        self.failed = False
        """Reported to the core as lost: no more IO on it; the next pump retires it."""
        self._held = bytearray()  # application bytes waiting for TCP (and TLS) to be up
        self._addresses: list[tuple[socket.AddressFamily, socket.SocketKind, int, tuple[object, ...]]] = []
        self._address = ""  # the one being tried, for error messages
        self._errors: list[str] = []
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()

    # -- dialling

    def dial(self) -> None:
        """Resolve the host (this blocks, outside the lock) and start a non-blocking connect."""
        endpoint = self._endpoint
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        self._addresses = [(family, kind, proto, address) for family, kind, proto, _, address in infos]
        self._connect_next()

    def _connect_next(self) -> None:
        """Start connecting to the next resolved address; raise once every address failed."""
        while self._addresses:
            family, kind, proto, address = self._addresses.pop(0)
            self._address = str(address[0])
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                self._errors.append(f"{self._address}: {exc.strerror or exc}")
                continue
            sock.setblocking(False)
            if family in (socket.AF_INET, socket.AF_INET6):
                # The core already coalesces its output into one buffer per call; Nagle would only delay it.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                self.sock = sock
                self.phase = Phase.CONNECTING
                return
            sock.close()
            self._errors.append(f"{self._address}: {os.strerror(code)}")
        endpoint = self._endpoint
        raise OSError(f"cannot connect to {endpoint.host}:{endpoint.port} ({'; '.join(self._errors)})")

    def on_connect_ready(self) -> None:
        """The socket became writable while connecting: connected, or try the next address."""
        sock = self.sock
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            sock.close()
            self.sock = None
            self._errors.append(f"{self._address}: {os.strerror(code)}")
            self._connect_next()
            return
        if self._ssl_context is None:
            self._open()
            return
        self._tls = self._ssl_context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=self._endpoint.host
        )
        self.phase = Phase.TLS_HANDSHAKE
        self._handshake()

    def _handshake(self) -> None:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            self._open()
        self._take_tls_output()

    def _open(self) -> None:
        self.phase = Phase.OPEN
        held = bytes(self._held)
        self._held.clear()
        if held:
            self.send_app(held)

    # -- data

    def send_app(self, data: bytes) -> None:
        """Queue application bytes (from the core): encrypted and queued now if open, else held."""
        if self.phase is not Phase.OPEN:
            self._held += data
        elif self._tls is None:
            self.out += data
        else:
            self._tls.write(data)
            self._take_tls_output()

    def write(self) -> None:
        """Write what the socket takes without blocking."""
        sock = self.sock
        assert sock is not None
        while self.out:
            try:
                sent = sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            del self.out[:sent]

    def read(self) -> bytes:
        """Read once; return the application bytes (possibly none). Sets :attr:`eof` at end of file."""
        sock = self.sock
        assert sock is not None
        try:
            raw = sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return b""
        if not raw:
            self.eof = True
        if self._tls is None:
            return raw
        if raw:
            self._incoming.write(raw)
        else:
            self._incoming.write_eof()
        if self.phase is Phase.TLS_HANDSHAKE:
            self._handshake()
        data = self._decrypt() if self.phase is Phase.OPEN else b""
        self._take_tls_output()
        return data

    def _decrypt(self) -> bytes:
        assert self._tls is not None
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True  # close_notify, or the TCP end of file after the last record
                break
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _take_tls_output(self) -> None:
        if self._outgoing.pending:
            self.out += self._outgoing.read()

    def close(self) -> None:
        """Close the socket after one last non-blocking write (typically our Close frame)."""
        sock = self.sock
        if sock is None:
            return
        if self.out and self.phase is Phase.OPEN and not self.failed:
            with contextlib.suppress(OSError):  # the peer is gone: nothing more to tell it
                self.write()
        sock.close()
