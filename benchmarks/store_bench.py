"""The SQLite store's cost per committed message or delivery (fastport_anyio/store.py), no broker, no sockets.

Not a test (speed is never asserted): run it by hand, ``.venv/bin/python benchmarks/store_bench.py``. It
commits hand-made batches, as the server's writer thread would, to a fresh store in a temporary directory
and prints the CPU time of the committing thread (Python and SQLite; what durable mode adds to the
server's CPU) and the wall time (which adds the fsync of each commit under ``synchronous=FULL``), per
message, and per delivery where a message has several.

Scenarios:

* **1:1, resumable subscriber**: each message is a message, a delivery and a dedupe entry in one batch,
  and the delivery's ACK (a delivery deletion, which deletes the message) in the next batch: the whole
  life of a message that was not ACKed before its batch was taken;
* **fan-out 1 → 50**: the same with 50 resumable subscribers (a message, its 50 deliveries and its dedupe
  entry in one batch), the 50 ACKs in the next batch, or half of them in each of the next two (the
  message stays stored, owing the other half, for one commit);
* **coalesced**: only the dedupe entry (the message was published and ACKed between two batches, the
  common case under load).

``--batch`` sizes are messages per commit (1: trickling traffic, one fsync per message; 100: load).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastport_anyio.store import SqliteStore
from fastport_core.storage import DeliveryKey, DeliveryRecord, MessageRecord, PublishRecord, StoreBatch

DATA = "A" * 24 + ":" + "B" * 344  # a 256-byte plaintext, encrypted: base64(iv):base64(ciphertext)
HASH = "v1:" + "0" * 64
FAN_OUT = 50
BatchMaker = Callable[[int, int, float], StoreBatch]
"""``(first, count, now)``: the batch storing messages ``first``..``first + count - 1``."""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    make: BatchMaker
    deliveries: int
    """Deliveries per message (the per-delivery figure divides by it; 0: none)."""


def _message(mid: str, seq: int, now: float) -> MessageRecord:
    return MessageRecord("bench", mid, seq, "site/1/temp", DATA, HASH, 1700, "text", now + 300, 1000)


def fanned_out(clients: int, ack_batches: int) -> BatchMaker:
    """Each message delivered to ``clients`` subscribers; client ``c``'s ACKs arrive ``c % ack_batches + 1``
    batches later (all in the next batch with ``ack_batches`` = 1)."""
    subscribers = [f"sub{c}" for c in range(clients)]

    def make(first: int, count: int, now: float) -> StoreBatch:
        ids = [f"m{i}" for i in range(first, first + count)]
        dropped: list[DeliveryKey] = []
        for back in range(1, ack_batches + 1):
            acked = range(max(0, first - back * count), max(0, first - (back - 1) * count))
            late = subscribers[back - 1 :: ack_batches]
            dropped += [("bench", f"m{i}", sub) for i in acked for sub in late]
        return StoreBatch(
            first,
            messages=[_message(mid, first + n, now) for n, mid in enumerate(ids)],
            deliveries=[
                DeliveryRecord("bench", mid, sub, first + n, 0)
                for n, mid in enumerate(ids)
                for sub in subscribers
            ],
            deliveries_dropped=dropped,
            publishes=[PublishRecord("bench", mid, clients, now) for mid in ids],
        )

    return make


def coalesced(first: int, count: int, now: float) -> StoreBatch:
    return StoreBatch(
        first, publishes=[PublishRecord("bench", f"m{i}", 1, now) for i in range(first, first + count)]
    )


SCENARIOS = (
    Scenario("1:1, resumable subscriber", fanned_out(1, 1), 1),
    Scenario(f"fan-out 1 → {FAN_OUT}, ACKs in the next batch", fanned_out(FAN_OUT, 1), FAN_OUT),
    Scenario(f"fan-out 1 → {FAN_OUT}, ACKs over the next two", fanned_out(FAN_OUT, 2), FAN_OUT),
    Scenario("coalesced (dedupe only)", coalesced, 0),
)


def run(
    make: BatchMaker, batch: int, messages: int, synchronous: Literal["FULL", "NORMAL"]
) -> tuple[float, float]:
    """(CPU µs, wall µs) per message committing ``messages`` in batches of ``batch``."""
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteStore.open(Path(directory) / "bench.db", synchronous=synchronous)
        now = time.time()
        batches = [make(first, batch, now) for first in range(0, messages, batch)]
        cpu, wall = time.thread_time(), time.perf_counter()
        for one in batches:
            store.commit([one])
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        store.close()
    return cpu / messages * 1e6, wall / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000, help="messages per batch size and scenario")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    args = parser.parse_args()
    print(f"synchronous={args.synchronous}, {args.messages} messages, best of {args.rounds}")
    print("| scenario | batch | CPU µs per message | CPU µs per delivery | wall µs per message |")
    print("| --- | --- | --- | --- | --- |")
    for scenario in SCENARIOS:
        for batch in (1, 10, 100):
            # Batches of one pay an fsync each: fewer of them keep the run to a few seconds.
            messages = max(batch, args.messages // 10 if batch == 1 else args.messages)
            results = [run(scenario.make, batch, messages, args.synchronous) for _ in range(args.rounds)]
            cpu = min(r[0] for r in results)
            wall = min(r[1] for r in results)
            per_delivery = f"{cpu / scenario.deliveries:.2f}" if scenario.deliveries else "-"
            print(f"| {scenario.name} | {batch} | {cpu:.1f} | {per_delivery} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
