"""The compiled core (``FASTPORT_COMPILE=1``) side by side with the interpreted one and the Node model.

Run by hand, never from the test suite (speed is never asserted)::

    .venv/bin/python benchmarks/compiled_bench.py           # ~5 min: main scenarios and window 1, 3 rounds
    .venv/bin/python benchmarks/compiled_bench.py --quick   # small counts, one round
    .venv/bin/python benchmarks/compiled_bench.py --store   # both fastport servers durable (issue 9)

It builds a wheel with the compiled core first (~40 s, :func:`run.build_compiled`), then runs three
servers at once, pinned to CPU 0 like ``benchmarks/run.py``'s: ``fastport serve`` from this checkout
(interpreted), the same from the compiled wheel, and the Node model of the original. Each scenario is
measured once per server per round, the order rotating every round; the table gives per-server medians
and the ratios of medians measured in the same rounds. With ``--store`` both fastport servers keep a
store and every subscriber is resumable (the Node model keeps nothing, as in durable_bench.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

import run
from run import MAIN, TRICKLE, ServerProcess

SCENARIOS: Final = (*MAIN, *(s for s in TRICKLE if s.key in ("1to1_w1", "1to50_w1")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--store", action="store_true", help="both fastport servers durable")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()

    def start(workdir: Path, node: str, servers: list[ServerProcess]) -> None:
        compiled = run.build_compiled(workdir)
        for folder, core in (("interpreted", None), ("compiled", compiled)):
            (workdir / folder).mkdir()
            store = workdir / folder / "store.db" if args.store else None
            servers.append(run.start_fastport(workdir / folder, args.backend, store, compiled=core))
        servers.append(run.start_node(node, workdir))

    extra = {"resumable": True} if args.store else None
    run.three_way_main(args, start, ("interpreted", "compiled", "Node"), SCENARIOS, extra)


if __name__ == "__main__":
    main()
