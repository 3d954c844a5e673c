"""The SQLite store's cost per committed message (fastport_anyio/store.py), no broker, no sockets.

Not a test (speed is never asserted): run it by hand, ``.venv/bin/python benchmarks/store_bench.py``. It
commits hand-made batches, as the server's writer thread would, to a fresh store in a temporary directory
and prints, per message, the CPU time of the committing thread (Python and SQLite; what durable mode adds
to the server's CPU) and the wall time (which adds the fsync of each commit under ``synchronous=FULL``).

Scenarios:

* **1:1, resumable subscriber**: each message is a message, a delivery and a dedupe entry in one batch,
  and the delivery's ACK (a delivery deletion, which deletes the message) in the next batch: the whole
  life of a message that was not ACKed before its batch was taken;
* **coalesced**: only the dedupe entry (the message was published and ACKed between two batches, the
  common case under load).

``--batch`` sizes are messages per commit (1: trickling traffic, one fsync per message; 100: load).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from fastport_anyio.store import SqliteStore
from fastport_core.storage import DeliveryRecord, MessageRecord, PublishRecord, StoreBatch

DATA = "A" * 24 + ":" + "B" * 344  # a 256-byte plaintext, encrypted: base64(iv):base64(ciphertext)
HASH = "v1:" + "0" * 64
Scenario = Callable[[int, int, float], StoreBatch]


def one_to_one(first: int, count: int, now: float) -> StoreBatch:
    """Messages ``first``..``first + count - 1`` stored, and the previous ``count`` ones ACKed."""
    ids = [f"m{i}" for i in range(first, first + count)]
    acked = [f"m{i}" for i in range(max(0, first - count), first)]
    return StoreBatch(
        first,
        messages=[
            MessageRecord("bench", mid, first + n, "site/1/temp", DATA, HASH, 1700, "text", now + 300, 1000)
            for n, mid in enumerate(ids)
        ],
        deliveries=[DeliveryRecord("bench", mid, "sub", first + n, 0) for n, mid in enumerate(ids)],
        deliveries_dropped=[("bench", mid, "sub") for mid in acked],
        publishes=[PublishRecord("bench", mid, 1, now) for mid in ids],
    )


def coalesced(first: int, count: int, now: float) -> StoreBatch:
    return StoreBatch(
        first, publishes=[PublishRecord("bench", f"m{i}", 1, now) for i in range(first, first + count)]
    )


def run(
    scenario: Scenario, batch: int, messages: int, synchronous: Literal["FULL", "NORMAL"]
) -> tuple[float, float]:
    """(CPU µs, wall µs) per message committing ``messages`` in batches of ``batch``."""
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteStore.open(Path(directory) / "bench.db", synchronous=synchronous)
        now = time.time()
        batches = [scenario(first, batch, now) for first in range(0, messages, batch)]
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
    print("| scenario | batch | CPU µs per message | wall µs per message |")
    print("| --- | --- | --- | --- |")
    for name, scenario in (("1:1, resumable subscriber", one_to_one), ("coalesced (dedupe only)", coalesced)):
        for batch in (1, 10, 100):
            # Batches of one pay an fsync each: fewer of them keep the run to a few seconds.
            messages = max(batch, args.messages // 10 if batch == 1 else args.messages)
            results = [run(scenario, batch, messages, args.synchronous) for _ in range(args.rounds)]
            cpu = min(r[0] for r in results)
            wall = min(r[1] for r in results)
            print(f"| {name} | {batch} | {cpu:.1f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
