"""Server CPU per read + write on loopback, by I/O style: what a trickle of messages costs the adapter.

Not a test (speed is never asserted); run by hand when working on ``fastport_anyio/server.py``::

    .venv/bin/python benchmarks/io_probe.py [--round-trips 20000]

Each style is a tiny echo server in its own process, pinned to CPU 0; a client on CPU 1 sends one 64-byte
message, waits for the echo, and repeats (one message per wake-up: the trickle case, where nothing is
batched). The figure is the server's CPU time (utime + stime) per round trip, i.e. one read and one write
plus the event loop's wake-up, with no protocol work at all. It isolates what DESIGN §6 found not to
matter under load but which dominates sparse traffic:

* ``anyio-asyncio``: ``await stream.receive()`` / ``await stream.send()`` on anyio's asyncio backend (what
  the adapter does). anyio resumes reading before each wait and pauses it after (an ``epoll_ctl`` add
  and delete per read, plus the selector's bookkeeping), and wakes the reading task through an event.
* ``anyio-asyncio-direct``: the same reads, but the write is a plain non-blocking ``os.write`` on the
  socket's descriptor (the adapter's direct write path).
* ``asyncio-protocol``: an :class:`asyncio.Protocol` whose ``data_received`` writes the answer at once:
  the descriptor stays registered, no task switch, no future.
* ``anyio-trio``: ``stream.receive()`` / ``stream.send()`` on anyio's trio backend.
* ``node-net``: Node's ``net`` module echoing (``socket.on('data', d => socket.write(d))``), the floor any
  Node server, the original included, is built on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

import anyio

STYLES = ("anyio-asyncio", "anyio-asyncio-direct", "asyncio-protocol", "anyio-trio", "node-net")
NODE_ECHO = """
require('net').createServer((socket) => {
  socket.setNoDelay(true);
  socket.on('data', (data) => socket.write(data));
  socket.on('error', () => {});
}).listen(Number(process.argv[1]), '127.0.0.1');
"""
MESSAGE = b"x" * 64


async def _anyio_server(port: int, direct: bool) -> None:
    async def handle(stream: Any) -> None:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        fileno = raw.fileno
        async with stream:
            while True:
                try:
                    data = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                if direct:
                    os.write(fileno(), data)
                else:
                    await stream.send(data)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    await listener.serve(handle)


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _protocol_server(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def serve(style: str, port: int) -> None:
    if style == "asyncio-protocol":
        asyncio.run(_protocol_server(port))
    else:
        backend = "trio" if style == "anyio-trio" else "asyncio"
        anyio.run(_anyio_server, port, style == "anyio-asyncio-direct", backend=backend)


def _cpu(pid: int) -> float:
    return time.clock_gettime((~pid << 3) | 2)  # the process CPU clock: utime + stime, ns resolution


def probe(style: str, round_trips: int) -> float:
    """Server CPU µs per round trip for ``style``."""
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    command = [sys.executable, __file__, "--serve", style, "--port", str(port)]
    if style == "node-net":
        command = ["node", "-e", NODE_ECHO, str(port)]
    server = subprocess.Popen(
        command,
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),  # noqa: PLW1509 - this script has one thread
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with client:
            for _ in range(1000):  # warm-up
                client.sendall(MESSAGE)
                client.recv(65536)
            start = _cpu(server.pid)
            for _ in range(round_trips):
                client.sendall(MESSAGE)
                received = client.recv(65536)
                while len(received) < len(MESSAGE):
                    received += client.recv(65536)
            used = _cpu(server.pid) - start
    finally:
        server.kill()
        server.wait()
    return used / round_trips * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds per style")
    parser.add_argument("--serve", choices=STYLES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    os.sched_setaffinity(0, {1})
    print("| server I/O style | server CPU µs per read + write (best of rounds) |")
    print("| --- | ---: |")
    for style in STYLES:
        best = min(probe(style, args.round_trips) for _ in range(args.rounds))
        print(f"| {style} | {best:.1f} |", flush=True)


if __name__ == "__main__":
    main()
