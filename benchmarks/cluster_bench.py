"""A two-node cluster over NATS JetStream under load, side by side with one in-memory and one durable node.

Run by hand, never from the test suite (speed is never asserted)::

    .venv/bin/python benchmarks/cluster_bench.py           # ~2 min: 1 → 1 and 1 → 50, window 100, 3 rounds
    .venv/bin/python benchmarks/cluster_bench.py --quick   # small counts, one round: ~30 s

What runs (all on 127.0.0.1, the servers pinned to CPU 0 and the load to CPU 1, as in
``benchmarks/run.py``, whose machinery this reuses; modelled on ``benchmarks/durable_bench.py``):

* ``fastport serve`` in memory, one process;
* ``fastport serve --store`` on a fresh SQLite file in a temporary folder, one process;
* the cluster: one ``nats-server -js`` (``tests/nats_support.py``'s :class:`NatsServer`: a free port, a
  store directory in the temporary folder; pinned to CPU 0 with the nodes, so Go sees one CPU) and two
  ``fastport serve --cluster nats://127.0.0.1:PORT`` nodes. The publisher connects to node A and every
  subscriber to node B (``loadgen.py``'s ``subscriber_port``), so each message crosses JetStream.

Every subscriber connects with a ``clientId`` (resumable: fed from a JetStream durable consumer in the
cluster), as in ``durable_bench.py``. The cluster is also measured with anonymous subscribers
(``cluster-anon``: fed from the node's feed of the session's stream), reported beside the others but kept
out of the ratios. Each scenario is measured once per configuration per round, the order rotating every
round; the tables give medians and the ratios of medians measured in the same rounds.

Measured per configuration: deliveries (and confirmed publishes) per second; fastport's CPU per message
(1 → 1) and per delivery (1 → 50), summed over the fastport processes (both nodes for the cluster, every
thread); NATS's own CPU per delivery in a column of its own (it is part of the cluster's cost, not of the
"fastport CPU" figure); p50/p99 publish-to-confirmation latency as the publisher saw it (the cluster's
includes JetStream's PubAck, the durable node's the SQLite commit) and p50/p99 publish-to-delivery latency
as the subscribers saw it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import run
from run import DASH, FULL, HOST, MAIN, QUICK, TIMES, Measurement, Mode, ServerProcess
from run import _median as median

sys.path.insert(0, str(run.ROOT))
from tests.nats_support import NatsServer

MEMORY: Final = "fastport"
DURABLE: Final = "fastport-durable"
CLUSTER: Final = "cluster"
CLUSTER_ANON: Final = "cluster-anon"
CONFIGS: Final = (MEMORY, DURABLE, CLUSTER, CLUSTER_ANON)
ROUNDS_FULL: Final = 3
CONSUMER_GAP: Final = 1.5
"""Seconds left between a cluster measurement and the previous one: a new durable consumer starts one
second (``cluster.START_MARGIN``) before its subscriber arrived, and would otherwise be handed the end of
the previous measurement's messages (same topic, another message-id prefix)."""
NATS_MARKERS: Final = ("[ERR]", "[WRN]", "[FTL]")
"""What is worth showing of NATS's log (which logs its start-up at INFO); fastport's logs are at
WARNING (``run.FASTPORT_CONFIG``), so every line of theirs is shown."""


def _cpu_clock(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (as :meth:`ServerProcess.cpu_seconds`)."""
    return time.clock_gettime((~pid << 3) | 2)


class ClusterNodes:
    """NATS and two fastport nodes, seen by :func:`run.measure` as one server (duck-typed
    :class:`ServerProcess`): the publisher's port is node A's, and the CPU figures are the sum over both
    fastport processes. NATS's CPU is read separately, through :meth:`interval`."""

    def __init__(self, nats: NatsServer, a: ServerProcess, b: ServerProcess) -> None:
        self.name = CLUSTER
        self.nats, self.a, self.b = nats, a, b
        self.port = a.port
        self.last: dict[str, float] = {}
        """NATS's and each node's CPU seconds over the last measured interval."""

    @property
    def nats_pid(self) -> int:
        assert self.nats._proc is not None
        return self.nats._proc.pid

    def cpu_seconds(self) -> float:
        return self.a.cpu_seconds() + self.b.cpu_seconds()

    def stat_seconds(self) -> tuple[float, float]:
        (ua, sa), (ub, sb) = self.a.stat_seconds(), self.b.stat_seconds()
        return ua + ub, sa + sb

    def schedstat(self) -> tuple[float, float]:
        (ra, wa), (rb, wb) = self.a.schedstat(), self.b.schedstat()
        return ra + rb, wa + wb

    @contextlib.contextmanager
    def interval(self) -> Iterator[None]:
        """``run.measure``'s ``around``: entered and left with the measured interval."""
        before = (_cpu_clock(self.nats_pid), self.a.cpu_seconds(), self.b.cpu_seconds())
        yield
        after = (_cpu_clock(self.nats_pid), self.a.cpu_seconds(), self.b.cpu_seconds())
        self.last = {k: y - x for k, x, y in zip(("nats", "a", "b"), before, after, strict=True)}

    def stop(self) -> None:
        for node in (self.a, self.b):
            node.stop()
        self.nats.stop()


@dataclass(slots=True)
class Result:
    """One measurement and, for the cluster, NATS's CPU and the split between the nodes."""

    m: Measurement
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def nats_us_per_delivery(self) -> float:
        if "nats" not in self.extra:
            return float("nan")
        return self.extra["nats"] / max(1, self.m.deliveries) * 1e6


def start_cluster_node(workdir: Path, name: str, url: str, uvloop: bool) -> ServerProcess:
    workdir.mkdir()
    config = workdir / "fastport.toml"
    config.write_text(run.FASTPORT_CONFIG)
    port = run._free_port()
    command = [
        str(Path(run.PYTHON).parent / "fastport"), "serve", "--host", HOST, "--port", str(port),
        "--config", str(config), "--backend", "asyncio", *(["--uvloop"] if uvloop else []), "--cluster", url,
    ]  # fmt: skip
    server = ServerProcess(name, command, port, workdir / f"{name}.log")
    server.wait_listening()
    return server


def start_nats(workdir: Path) -> NatsServer:
    """``nats-server -js`` on a free port, pinned to the servers' CPU (the child inherits the affinity)."""
    nats = NatsServer(store_dir=workdir / "nats" / "jetstream")
    pinned = False
    with contextlib.suppress(OSError, AttributeError):
        if run.SERVER_CPU in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {run.SERVER_CPU})
            pinned = True
    try:
        nats.start()
    finally:
        if pinned:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {run.LOAD_CPU})
    return nats


def measure(
    server: ServerProcess | ClusterNodes, name: str, scenario: run.Scenario, mode: Mode, rep: int
) -> Result:
    extra: dict[str, Any] = {"resumable": name != CLUSTER_ANON}
    if isinstance(server, ClusterNodes):
        server.name = name
        extra["subscriber_port"] = server.b.port
        time.sleep(CONSUMER_GAP)
        m = run.measure(cast(ServerProcess, server), scenario, mode, rep, around=server.interval, extra=extra)
        return Result(m, dict(server.last) if m.ok else {})
    m = run.measure(server, scenario, mode, rep, extra=extra)
    return Result(m)


def warm_up(servers: dict[str, ServerProcess | ClusterNodes], mode: Mode) -> None:
    """One unrecorded pass of the main scenarios per configuration (as ``run.warm_up``, with the
    subscribers' options); a failure is reported, not fatal (it shows again in the measurements)."""
    warm = Mode(scale=mode.scale * 0.3, reps_main=1, reps_trickle=0, cap=mode.cap)
    for name, server in servers.items():
        for scenario in MAIN:
            one = measure(server, name, scenario, warm, -1)
            if not one.m.ok:
                print(f"  warm-up {scenario.key} against {name} failed: {one.m.problem}", flush=True)
    print(f"warmed up: {', '.join(servers)}", flush=True)


def _print(result: Result) -> None:
    run._print_measurement(result.m)
    if result.m.redeliveries:
        print(f"  {'':<12} {'':<9} {result.m.redeliveries} messages received a second time", flush=True)
    if result.extra:
        per = max(1, result.m.deliveries)
        print(
            f"  {'':<12} {'':<9} NATS {result.extra['nats'] / per * 1e6:6.1f} µs/deliv; "
            f"node A (publisher) {result.extra['a'] / per * 1e6:6.1f}, "
            f"node B (subscribers) {result.extra['b'] / per * 1e6:6.1f}",
            flush=True,
        )


# -- tables ----------------------------------------------------------------------------------------------


def _ok(results: list[Result], scenario: str, name: str) -> list[Result]:
    return [r for r in results if r.m.scenario == scenario and r.m.server == name and r.m.ok]


def _latency(ok: list[Result], source: str, quantile: str) -> float:
    """The median over measurements of a latency percentile, in ms (``confirm``: the publisher's; else the
    subscribers' publish-to-delivery latency)."""
    if source == "confirm":
        values = [r.m.publisher.get("confirm_us", {}).get(quantile, float("nan")) for r in ok]
    else:
        values = [r.m.latency_us.get(quantile, float("nan")) for r in ok]
    return median(values) / 1000


METRICS: Final = (
    ("deliveries/s", lambda ok: median([r.m.deliveries_per_s for r in ok])),
    ("fastport CPU per delivery", lambda ok: median([r.m.us_per_delivery for r in ok])),
    ("confirm p99", lambda ok: _latency(ok, "confirm", "p99")),
    ("delivery p99", lambda ok: _latency(ok, "delivery", "p99")),
)


def table(results: list[Result], rounds: int) -> str:
    lines = [
        "| scenario | server | deliveries/s | msg/s | fastport µs per msg | per delivery "
        "| NATS µs per delivery | confirm p50 ms | confirm p99 ms | delivery p50 ms | delivery p99 ms | ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in MAIN:
        for name in CONFIGS:
            ok = _ok(results, scenario.key, name)
            if not ok:
                lines.append(f"| {scenario.label} | {name} | failed | | | | | | | | | 0/{rounds} |")
                continue
            nats = median([r.nats_us_per_delivery for r in ok])
            lines.append(
                f"| {scenario.label} | {name} | {median([r.m.deliveries_per_s for r in ok]):,.0f} "
                f"| {median([r.m.msg_per_s for r in ok]):,.0f} "
                f"| {median([r.m.us_per_message for r in ok]):.1f} "
                f"| {median([r.m.us_per_delivery for r in ok]):.1f} "
                f"| {'' if math.isnan(nats) else f'{nats:.1f}'} "
                f"| {_latency(ok, 'confirm', 'p50'):.2f} | {_latency(ok, 'confirm', 'p99'):.2f} "
                f"| {_latency(ok, 'delivery', 'p50'):.2f} | {_latency(ok, 'delivery', 'p99'):.2f} "
                f"| {len(ok)}/{rounds} |"
            )
    lines += [
        "",
        "| scenario | metric | cluster / in-memory | cluster / durable | durable / in-memory |",
        "| --- | --- | --- | --- | --- |",
    ]
    for scenario in MAIN:
        per = {name: _ok(results, scenario.key, name) for name in (MEMORY, DURABLE, CLUSTER)}
        if not all(per.values()):
            lines.append(f"| {scenario.label} | (a configuration has no successful measurement) | | | |")
            continue
        for metric, of in METRICS:
            memory, durable, cluster = (of(per[name]) for name in (MEMORY, DURABLE, CLUSTER))
            lines.append(
                f"| {scenario.label} | {metric} | {cluster / memory:.2f}{TIMES} "
                f"| {cluster / durable:.2f}{TIMES} | {durable / memory:.2f}{TIMES} |"
            )
        with_nats = median([r.m.us_per_delivery + r.nats_us_per_delivery for r in per[CLUSTER]])
        memory, durable = (median([r.m.us_per_delivery for r in per[name]]) for name in (MEMORY, DURABLE))
        lines.append(
            f"| {scenario.label} | fastport + NATS CPU per delivery | {with_nats / memory:.2f}{TIMES} "
            f"| {with_nats / durable:.2f}{TIMES} | |"
        )
        ranges = {
            name: (min(r.m.us_per_delivery for r in rs), max(r.m.us_per_delivery for r in rs))
            for name, rs in per.items()
        }
        lines.append(
            f"| {scenario.label} | (ranges, fastport µs per delivery) | "
            + " | ".join(f"{name} {lo:.1f}{DASH}{hi:.1f}" for name, (lo, hi) in ranges.items())
            + " |"
        )
    return "\n".join(lines)


def log_report(paths: list[Path]) -> str:
    """The servers' log lines worth a look (count, and the first few): any of fastport's, NATS's warnings."""
    out = []
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            out.append(f"{path.name}: no log")
            continue
        nats = path.name.startswith("nats-server")
        bad = [line for line in lines if not nats or any(marker in line for marker in NATS_MARKERS)]
        out.append(f"{path.name}: {len(lines)} lines, {len(bad)} worth a look")
        out += [f"    {line[:200]}" for line in bad[:5]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--uvloop", action="store_true", help="every fastport process on asyncio with uvloop")
    parser.add_argument("--rounds", type=int, help=f"rounds (default {ROUNDS_FULL}; 1 with --quick)")
    args = parser.parse_args()
    mode: Mode = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else ROUNDS_FULL)
    backend = "uvloop" if args.uvloop else "asyncio"
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {run.LOAD_CPU})
    results: list[Result] = []
    started = time.monotonic()
    logs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="fastport-cluster-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "memory").mkdir()
        (workdir / "durable").mkdir()
        stoppable: list[ServerProcess | ClusterNodes] = []
        nats: NatsServer | None = None
        try:
            memory = run.start_fastport(workdir / "memory", backend)
            stoppable.append(memory)
            durable = run.start_fastport(workdir / "durable", backend, store=workdir / "store.db")
            stoppable.append(durable)
            nats = start_nats(workdir)
            a = start_cluster_node(workdir / "node-a", "cluster-a", nats.url, args.uvloop)
            stoppable.append(a)
            b = start_cluster_node(workdir / "node-b", "cluster-b", nats.url, args.uvloop)
            stoppable.append(b)
            cluster = ClusterNodes(nats, a, b)
            stoppable[-2:] = [cluster]
            logs = [memory.log_path, durable.log_path, a.log_path, b.log_path, nats.log_path]
            print(f"NATS {nats.url} (pid {cluster.nats_pid}); node A :{a.port}, node B :{b.port}", flush=True)
            servers: dict[str, ServerProcess | ClusterNodes] = {
                MEMORY: memory,
                DURABLE: durable,
                CLUSTER: cluster,
                CLUSTER_ANON: cluster,
            }
            warm_up(servers, mode)
            names = list(CONFIGS)
            for rep in range(rounds):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                print(f"round {rep + 1}/{rounds}: {', '.join(order)}", flush=True)
                for scenario in MAIN:
                    for name in order:
                        one = measure(servers[name], name, scenario, mode, rep)
                        _print(one)
                        results.append(one)
        finally:
            for server in stoppable:
                server.stop()
            if nats is not None:
                nats.stop()  # idempotent: also stopped with the cluster
            if logs:
                print("\nserver logs:\n" + log_report(logs), flush=True)
    print("\n" + table(results, rounds) + "\n", flush=True)
    print(f"total {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
