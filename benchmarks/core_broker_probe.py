"""Broker-only cost of the hot path (publish → fan-out → ACK), without sockets, frames parsing or JSON in.

Not a test: a probe to run by hand (``.venv/bin/python benchmarks/core_broker_probe.py``) when touching
``fastport_core/broker.py``. Its output is cleared unread, so the numbers are the broker's own time:
routing, delivery bookkeeping, the one ``message`` encoding per publish and the ``publish_response``.

Prints µs per 1:1 message (publish + ACK) and the extra µs per additional fan-out delivery (each
subscriber ACKs), the best of several rounds.
"""

from __future__ import annotations

import argparse
import time

from fastport_core.broker import Broker
from fastport_core.config import ServerConfig
from fastport_core.protocol import Ack, Init, Publish, Subscribe

DATA = "A" * 44 + ":" + "B" * 64  # the size of a small encrypted payload (iv:ciphertext, base64)
HASH = "v1:" + "0" * 64


def per_message_us(subscribers: int, messages: int) -> float:
    """Broker µs per published message with ``subscribers`` subscribers, each ACKing every message."""
    broker = Broker(ServerConfig(password_hash_cost=2))
    broker.create_session("bench", "pw", 0.0)
    for conn in range(subscribers + 1):
        broker.connection_opened(conn, 0.0)
        broker.handle_packet(conn, Init("bench", "pw"), 0.0)
        if conn:
            broker.handle_packet(conn, Subscribe("t"), 0.0)
    publishes = [Publish("t", DATA, HASH, 1_700_000_000_000, f"m{i}") for i in range(messages)]
    acks = [Ack("t", f"m{i}") for i in range(messages)]
    receivers = range(1, subscribers + 1)
    handle = broker.handle_packet
    clear = broker.output.clear  # the answers are data; the server core would apply them
    clear()
    start = time.process_time()  # CPU time: steadier than wall time on a shared machine
    for publish, ack in zip(publishes, acks, strict=True):
        handle(0, publish, 1.0)
        for conn in receivers:
            handle(conn, ack, 1.0)
        clear()
    elapsed = time.process_time() - start
    assert broker.stats().stored_messages == 0
    return elapsed / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fan-out", type=int, default=10)
    args = parser.parse_args()
    one = min(per_message_us(1, args.messages) for _ in range(args.rounds))
    many = min(per_message_us(args.fan_out, args.messages // 4) for _ in range(args.rounds))
    extra = (many - one) / (args.fan_out - 1)
    print(f"1:1 message (publish + ack):        {one:6.2f} µs")
    print(f"1:{args.fan_out} message (publish + {args.fan_out} acks):  {many:6.2f} µs")
    print(f"per additional fan-out delivery:     {extra:6.2f} µs (send + its ack)")


if __name__ == "__main__":
    main()
