"""Idle connections: server memory per connection at the margin, and the connection rate, side by side with
the Node model of the original.

Run by hand, never from the test suite (speed is never asserted)::

    .venv/bin/python benchmarks/idle_bench.py                 # 2 rounds per server, ~1-2 min
    .venv/bin/python benchmarks/idle_bench.py --rounds 1 --connections 2000,10000 --backend trio

One round, for each server in turn (fastport, Node, Node, fastport, ...; a fresh server process per round,
pinned to CPU 0, with the same config file as ``run.py``: the default limits):

* the server's **baseline** RSS once it listens (``VmRSS`` of ``/proc/<pid>/status``);
* one client process (CPU 1) opens connections, each doing the HTTP upgrade, an ``init`` and a
  ``subscribe`` to its own topic, at most :data:`IN_FLIGHT` handshakes at a time (below the server's
  ``max_uninitialised_per_address``, 64), and stops at each **step** (2,000 and 10,000 by default): the
  driver waits a moment, then reads the server's RSS and CPU time;
* **memory per connection at the margin**: (RSS at the last step - RSS at the first) / (the difference in
  connections); **connection rate**: connections established per second between the two steps, with the
  server's CPU per connection over the same interval.

The client is a selector loop of non-blocking sockets (no event-loop framework: its own cost is noise here)
that ignores everything after ``subscribe_response``; the whole round lasts well under the servers'
keepalive (20 s ping + 20 s timeout), so no idle connection is dropped while measured. Loopback only; every
wait is bounded. Raw results: ``benchmarks/results/idle-*.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import orjson
from loadgen import split_frames
from run import (
    HOST,
    PASSWORD,
    PYTHON,
    RESULTS_DIR,
    SESSION,
    LineReader,
    ServerProcess,
    _pin,
    ensure_node_model,
    start_fastport,
    start_node,
)

from fastport_core.frames import Opcode, encode_frame
from fastport_core.handshake import ClientHandshake

SCRIPT: Final = Path(__file__).resolve()
IN_FLIGHT: Final = 32
"""Connections being set up at once (below the server's ``max_uninitialised_per_address`` of 64)."""
SETTLE: Final = 1.0
"""Seconds between reaching a step and reading the server's RSS (let the allocator and the GC settle)."""
STEP_CAP: Final = 60.0
"""Seconds one step may take before the round is abandoned."""
LOAD_CPU: Final = 1


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


# -- the client process ----------------------------------------------------------------------------------


class _Setup:
    """One connection being set up: which answer it waits for next, and its unparsed bytes."""

    __slots__ = ("buffer", "handshake", "index", "sock", "stage")

    def __init__(self, sock: socket.socket, index: int, handshake: ClientHandshake) -> None:
        self.sock = sock
        self.index = index
        self.handshake = handshake
        self.stage = 0
        """0: the 101 answer; 1: ``init_response``; 2: ``subscribe_response``."""
        self.buffer = b""


def run_client(port: int, steps: list[int]) -> None:
    """Open connections up to each step in turn; print ``{"step": n, ...}`` at each; wait for a line on
    stdin before going on (and before closing everything after the last)."""
    init = encode_frame(
        Opcode.TEXT, orjson.dumps({"type": "init", "sessionName": SESSION, "password": PASSWORD}), mask=True
    )
    selector = selectors.DefaultSelector()
    held: list[socket.socket] = []
    opened = 0
    _emit({"ready": True})
    for step in steps:
        if sys.stdin.readline().strip() != "go":
            return
        start = time.monotonic()
        while len(held) < step:
            if time.monotonic() - start > STEP_CAP:
                _emit({"error": f"step {step}: only {len(held)} connections after {STEP_CAP:.0f} s"})
                return
            while opened - len(held) < IN_FLIGHT and opened < step:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.connect((HOST, port))
                sock.setblocking(False)
                handshake = ClientHandshake(f"{HOST}:{port}", "/")
                sock.send(handshake.request)
                selector.register(sock, selectors.EVENT_READ, _Setup(sock, opened, handshake))
                opened += 1
            for key, _ in selector.select(timeout=1.0):
                setup: _Setup = key.data
                data = setup.sock.recv(65536)
                if not data:
                    _emit({"error": f"connection {setup.index} closed by the server during setup"})
                    return
                if setup.stage == 0:
                    leftover = setup.handshake.receive_data(data)
                    if leftover is None:
                        continue
                    setup.stage = 1
                    setup.sock.send(init)
                    data = leftover
                setup.buffer += data
                frames, setup.buffer = split_frames(setup.buffer)
                for opcode, payload in frames:
                    if opcode != Opcode.TEXT:
                        continue
                    answer = orjson.loads(payload)
                    if not answer.get("success"):
                        _emit({"error": f"connection {setup.index}: {answer!r}"})
                        return
                    if setup.stage == 1 and answer.get("type") == "init_response":
                        setup.stage = 2
                        topic = f"idle/{setup.index}"
                        subscribe = {"type": "subscribe", "topic": topic}
                        setup.sock.send(encode_frame(Opcode.TEXT, orjson.dumps(subscribe), mask=True))
                    elif setup.stage == 2 and answer.get("type") == "subscribe_response":
                        selector.unregister(setup.sock)
                        held.append(setup.sock)
                        break
        _emit({"step": step, "seconds": time.monotonic() - start})
    sys.stdin.readline()
    for sock in held:
        sock.close()
    _emit({"closed": len(held)})


# -- the driver ------------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def one_round(server: ServerProcess, steps: list[int]) -> dict[str, Any]:
    """Baseline, then RSS and CPU at each step, for one freshly started server."""
    import subprocess

    time.sleep(SETTLE)
    result: dict[str, Any] = {"server": server.name, "baseline": rss_bytes(server.pid), "steps": []}
    client = subprocess.Popen(
        [PYTHON, str(SCRIPT), "--client", str(server.port), ",".join(map(str, steps))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=_pin(LOAD_CPU),  # noqa: PLW1509
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    reader = LineReader(client.stdout)
    try:
        if not orjson.loads(reader.line(30)).get("ready"):
            raise RuntimeError("client not ready")
        for step in steps:
            cpu_before = server.cpu_seconds()
            client.stdin.write(b"go\n")
            client.stdin.flush()
            answer = orjson.loads(reader.line(STEP_CAP + 10))
            if "error" in answer:
                raise RuntimeError(answer["error"])
            cpu = server.cpu_seconds() - cpu_before
            time.sleep(SETTLE)
            result["steps"].append(
                {"connections": step, "seconds": answer["seconds"], "cpu": cpu, "rss": rss_bytes(server.pid)}
            )
        client.stdin.write(b"close\n")
        client.stdin.flush()
        reader.line(30)
    finally:
        client.kill()
        client.wait()
    first, last = result["steps"][0], result["steps"][-1]
    added = last["connections"] - first["connections"]
    result["kib_per_connection"] = (last["rss"] - first["rss"]) / added / 1024
    result["connections_per_second"] = added / last["seconds"]
    result["cpu_us_per_connection"] = last["cpu"] / added * 1e6
    return result


def _cell(values: list[float], digits: int = 1) -> str:
    low, middle, high = min(values), statistics.median(values), max(values)
    return f"{middle:,.{digits}f} ({low:,.{digits}f}\u2013{high:,.{digits}f})"


def table(results: list[dict[str, Any]], steps: list[int]) -> str:
    lines = [
        f"| server | baseline RSS | RSS at {steps[0]:,} | RSS at {steps[-1]:,} | KiB / connection (margin) "
        "| connections / s | server CPU µs / connection | rounds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("fastport", "node"):
        mine = [r for r in results if r["server"] == name]
        if not mine:
            continue
        label = "fastport" if name == "fastport" else "Node model"
        mib = 1024 * 1024
        lines.append(
            f"| {label} | {_cell([r['baseline'] / mib for r in mine])} MiB "
            f"| {_cell([r['steps'][0]['rss'] / mib for r in mine])} MiB "
            f"| {_cell([r['steps'][-1]['rss'] / mib for r in mine])} MiB "
            f"| {_cell([r['kib_per_connection'] for r in mine])} "
            f"| {_cell([r['connections_per_second'] for r in mine], 0)} "
            f"| {_cell([r['cpu_us_per_connection'] for r in mine], 0)} | {len(mine)} |"
        )
    fast = [r for r in results if r["server"] == "fastport"]
    node = [r for r in results if r["server"] == "node"]
    if fast and node:
        pairs = list(zip(fast, node, strict=False))
        for key, what in (
            ("kib_per_connection", "memory per connection"),
            ("connections_per_second", "connection rate"),
            ("cpu_us_per_connection", "server CPU per connection"),
        ):
            ratios = [f[key] / n[key] for f, n in pairs]
            lines.append(f"\nfastport / Node model, {what}: {_cell(ratios, 2)}\u00d7")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--client", nargs=2, metavar=("PORT", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per server (alternating order)")
    parser.add_argument("--connections", default="2000,10000", help="the steps, comma-separated")
    parser.add_argument("--backend", default="asyncio", help="fastport's backend (asyncio, trio)")
    parser.add_argument("--no-node", action="store_true", help="fastport only")
    args = parser.parse_args()
    if args.client:
        run_client(int(args.client[0]), [int(n) for n in args.client[1].split(",")])
        return
    steps = [int(n) for n in args.connections.split(",")]
    node = None if args.no_node else ensure_node_model()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastport-idle-") as tmp:
        workdir = Path(tmp)
        for index in range(args.rounds):
            order = ["fastport", "node"] if index % 2 == 0 else ["node", "fastport"]
            for name in order:
                if name == "node" and node is None:
                    continue
                if name == "fastport":
                    server = start_fastport(workdir, args.backend)
                else:
                    assert node is not None
                    server = start_node(node, workdir)
                try:
                    result = one_round(server, steps)
                finally:
                    server.stop()
                results.append(result)
                print(
                    f"{name}: baseline {result['baseline'] / 2**20:.1f} MiB, "
                    f"{result['kib_per_connection']:.2f} KiB/connection, "
                    f"{result['connections_per_second']:.0f} connections/s, "
                    f"{result['cpu_us_per_connection']:.0f} µs CPU/connection",
                    flush=True,
                )
    print()
    print(table(results, steps))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"idle-{stamp}.json"
    raw = {"backend": args.backend, "steps": steps, "results": results}
    out.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
