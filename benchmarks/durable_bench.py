"""The durable broker under load, side by side with the in-memory one and with the Node model of the original.

Run by hand, never from the test suite (speed is never asserted)::

    .venv/bin/python benchmarks/durable_bench.py           # ~3 min: 1 → 1 and 1 → 50, window 100, 3 rounds
    .venv/bin/python benchmarks/durable_bench.py --quick   # small counts, one round: ~40 s

Three servers run at once, pinned to CPU 0 like ``benchmarks/run.py``'s (whose machinery this reuses):
``fastport serve`` in memory, ``fastport serve --store`` on a fresh SQLite file in a temporary folder, and
the Node model of the original (which keeps nothing on disk). Every subscriber connects with a ``clientId``
(resumable: what a durable broker stores deliveries for), on all three. Each scenario is measured once
per server per round, the order rotating every round; the table gives per-server medians and the ratios
of medians measured in the same rounds.

Measured per server: confirmed publishes per second, server CPU per message (1 → 1) and per delivery
(1 → 50), summed over the server process's threads (the store's writer thread included), and the p50/p99
publish-to-confirmation latency the publisher saw (for the durable server it includes the commit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import run
from run import MAIN, ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()

    def start(workdir: Path, node: str, servers: list[ServerProcess]) -> None:
        for folder, store in (("memory", None), ("durable", workdir / "store.db")):
            (workdir / folder).mkdir()
            servers.append(run.start_fastport(workdir / folder, args.backend, store))
        servers.append(run.start_node(node, workdir))

    run.three_way_main(args, start, ("in-memory", "durable", "Node"), MAIN, extra={"resumable": True})


if __name__ == "__main__":
    main()
