"""The whole server core in memory: CPU µs per 1:1 message and per fan-out delivery, no sockets at all.

Not a test (speed is never asserted): run it by hand, ``.venv/bin/python benchmarks/core_bench.py``, to see
regressions of the core apart from IO. It drives :class:`~fastport_core.server.ServerCore` exactly as an
adapter does (bytes in, one buffer per dirty connection out) with client frames encoded and masked
beforehand, so the figures are the server's own work: frame decoding and unmasking, JSON parsing, routing,
delivery bookkeeping, encoding, ACK processing.

``--batch`` is how many publishes arrive in one received chunk (100 models a publisher with a window of
100 unconfirmed publishes under load; 1 models trickling traffic, the worst case: no coalescing).
"""

from __future__ import annotations

import argparse
import time

import orjson

from fastport_core.config import ServerConfig
from fastport_core.frames import Opcode, encode_frame
from fastport_core.handshake import ClientHandshake
from fastport_core.server import ServerCore

DATA = "A" * 24 + ":" + "B" * 344  # a 256-byte plaintext, encrypted: base64(iv):base64(ciphertext)
HASH = "v1:" + "0" * 64


def _client_frame(obj: dict[str, object]) -> bytes:
    return encode_frame(Opcode.TEXT, orjson.dumps(obj), mask=True)


def _connect(core: ServerCore, *frames: bytes) -> int:
    conn = core.open_connection(0.0, "127.0.0.1")
    handshake = ClientHandshake("localhost", "/")
    core.receive_data(conn, handshake.request, 0.0)
    assert handshake.receive_data(core.data_to_send(conn)) is not None
    core.receive_data(conn, b"".join(frames), 0.0)
    core.data_to_send(conn)
    return conn


def run(subscribers: int, messages: int, batch: int) -> float:
    """Server-core CPU µs per published message, each delivered to ``subscribers`` who all ACK it."""
    core = ServerCore(ServerConfig(password_hash_cost=2, ping_interval=None))
    core.create_session("bench", "pw", 0.0)
    init = _client_frame({"type": "init", "sessionName": "bench", "password": "pw"})
    publisher = _connect(core, init)
    subscribe = _client_frame({"type": "subscribe", "topic": "t"})
    subs = [_connect(core, init, subscribe) for _ in range(subscribers)]
    core.take_dirty()
    chunks = []
    for first in range(0, messages, batch):
        ids = [f"m{i}" for i in range(first, min(first + batch, messages))]
        publishes = b"".join(
            _client_frame({"type": "publish", "topic": "t", "data": DATA, "hash": HASH,
                           "timestamp": 1_764_000_000_000, "messageId": i})
            for i in ids
        )  # fmt: skip
        acks = b"".join(_client_frame({"type": "ack", "topic": "t", "messageId": i}) for i in ids)
        chunks.append((publishes, acks))
    receive, take_dirty, data_to_send = core.receive_data, core.take_dirty, core.data_to_send
    start = time.process_time()
    for publishes, acks in chunks:
        receive(publisher, publishes, 1.0)
        for conn in take_dirty():
            data_to_send(conn)
        for conn in subs:
            receive(conn, acks, 1.0)
        take_dirty()
    elapsed = time.process_time() - start
    stats = core.stats()
    assert stats.inflight_deliveries == 0 and stats.stored_messages == 0, "every delivery must be ACKed"
    return elapsed / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--fanout", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    args = parser.parse_args()
    print("| scenario | batch | server-core µs per message | µs per delivery |")
    print("| --- | --- | --- | --- |")
    for batch in (100, 1):
        one = min(run(1, args.messages, batch) for _ in range(args.rounds))
        fan = min(run(args.fanout, args.messages // args.fanout * 2, batch) for _ in range(args.rounds))
        print(f"| 1 → 1 | {batch} | {one:.1f} | {one:.1f} |")
        print(f"| 1 → {args.fanout} | {batch} | {fan:.1f} | {fan / args.fanout:.1f} |")


if __name__ == "__main__":
    main()
