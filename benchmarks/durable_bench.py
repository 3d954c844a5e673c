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
import contextlib
import os
import statistics
import tempfile
from pathlib import Path
from typing import Final

import run
from run import DASH, FULL, MAIN, QUICK, TIMES, Measurement, Mode, ServerProcess

SERVERS: Final = ("fastport", "fastport-durable", "node")
ROUNDS_FULL: Final = 3


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(results: list[Measurement]) -> str:
    lines = [
        "| scenario | server | msg/s | server µs per msg | per delivery | confirm p50 ms | confirm p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in MAIN:
        for name in SERVERS:
            ok = [m for m in results if m.scenario == scenario.key and m.server == name and m.ok]
            if not ok:
                lines.append(f"| {scenario.label} | {name} | failed | | | | |")
                continue
            p50 = _median([m.publisher.get("confirm_us", {}).get("p50", float("nan")) for m in ok]) / 1000
            p99 = _median([m.publisher.get("confirm_us", {}).get("p99", float("nan")) for m in ok]) / 1000
            rate = _median([m.msg_per_s for m in ok])
            per_message = _median([m.us_per_message for m in ok])
            per_delivery = _median([m.us_per_delivery for m in ok])
            lines.append(
                f"| {scenario.label} | {name} | {rate:,.0f} | {per_message:.1f} | {per_delivery:.1f} "
                f"| {p50:.2f} | {p99:.2f} |"
            )
    lines += [
        "",
        "| scenario | durable / in-memory CPU | durable / Node CPU | in-memory / Node CPU |",
        "| --- | --- | --- | --- |",
    ]
    for scenario in MAIN:
        per = {
            name: [
                m.us_per_delivery for m in results if m.scenario == scenario.key and m.server == name and m.ok
            ]
            for name in SERVERS
        }
        if not all(per.values()):
            continue
        memory, durable, node = (_median(per[name]) for name in SERVERS)
        ranges = {name: (min(v), max(v)) for name, v in per.items()}
        lines.append(
            f"| {scenario.label} | {durable / memory:.2f}{TIMES} | {durable / node:.2f}{TIMES} "
            f"| {memory / node:.2f}{TIMES} |"
        )
        lines.append(
            "| (ranges, µs per delivery) | "
            + " | ".join(f"{name} {lo:.1f}{DASH}{hi:.1f}" for name, (lo, hi) in ranges.items())
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    mode: Mode = QUICK if args.quick else FULL
    rounds = 1 if args.quick else ROUNDS_FULL
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {run.LOAD_CPU})
    node = run.ensure_node_model()
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="fastport-durable-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "memory").mkdir()
        (workdir / "durable").mkdir()
        servers: list[ServerProcess] = []
        try:
            servers.append(run.start_fastport(workdir / "memory", args.backend))
            servers.append(run.start_fastport(workdir / "durable", args.backend, store=workdir / "store.db"))
            servers.append(run.start_node(node, workdir))
            run.warm_up(servers, mode)
            for rep in range(rounds):
                order = servers[rep % 3 :] + servers[: rep % 3]
                for scenario in MAIN:
                    for server in order:
                        m = run.measure(server, scenario, mode, rep, extra={"resumable": True})
                        run._print_measurement(m)
                        results.append(m)
        finally:
            for server in servers:
                server.stop()
    print("\n" + table(results) + "\n", flush=True)


if __name__ == "__main__":
    main()
