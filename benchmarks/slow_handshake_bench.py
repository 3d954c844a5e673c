"""Connections held by slow handshakes (issue 8, item 4): the absolute handshake deadline and the cap on
uninitialised connections per address.

Run by hand, never from the test suite (speed is never asserted)::

    .venv/bin/python benchmarks/slow_handshake_bench.py                        # ~15 s, real defaults
    .venv/bin/python benchmarks/slow_handshake_bench.py --handshake-timeout 3  # shorter

One run:

* **The server**: ``fastport serve --config FILE``, pinned to CPU 0 (when it exists), with the config's
  defaults (``handshake_timeout`` 10 s, ``max_uninitialised_per_address`` 64, real scrypt cost) unless
  ``--handshake-timeout`` / ``--cap`` change them in the file; it declares one session.
* **Slow clients** (one process, CPU 1): ``connections`` sockets spread round-robin over ``addresses``
  source addresses (127.0.0.2, 127.0.0.3, ...; default 200 over 4, so 50 each: under the cap), plus a
  burst of ``burst`` sockets from one more address (127.0.0.100; default 80, so the cap of 64 must refuse
  16). Each sends a WebSocket upgrade request one byte every ``interval`` s (0.5), which never completes
  within the deadline (the request is ~200 bytes: ~100 s). For each socket it records when the server
  closed it (EOF, or a reset on the next byte), relative to its own connect, and how many are still open
  at ``handshake_timeout + 1`` s. A socket closed within a second of connecting counts as refused at
  accept (the server's log lines "refusing connection" are counted as a cross-check).
* **A legitimate client** (CPU 1, ``benchmarks/auth_flood_bench.py``'s login role) connects from
  127.0.0.1 every 0.5 s meanwhile, ``init``s with the right password and publishes once: connect +
  upgrade + ``init_response`` time, and the publish's round trip.

Everything goes to 127.0.0.0/8 only; every loop is bounded (the slow clients stop at ``handshake_timeout +
5`` s whatever happens). Raw results: ``benchmarks/results/slow-handshake-*.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import orjson
from auth_flood_bench import PASSWORD, SESSION, percentiles, result_of, spawn
from run import HOST, PYTHON, RESULTS_DIR, ServerProcess, _free_port

from fastport_core.handshake import ClientHandshake

SCRIPT: Final = Path(__file__).resolve()
AUTH_FLOOD: Final = SCRIPT.parent / "auth_flood_bench.py"
BURST_ADDRESS: Final = "127.0.0.100"
REFUSED_WITHIN: Final = 1.0
"""A socket the server closes this soon after connect was refused at accept, not timed out."""
SNAPSHOT_AFTER: Final = 1.0
"""Seconds past ``handshake_timeout`` at which the sockets still open are counted."""
CAP_AFTER: Final = 5.0
"""Seconds past ``handshake_timeout`` at which the slow clients stop, whatever is still open."""


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


# -- the slow clients ------------------------------------------------------------------------------------


def run_slow(port: int, sources: list[str], interval: float, timeout: float) -> dict[str, Any]:
    """Open one socket per entry of ``sources`` (its source address), then dribble the upgrade request."""
    request = ClientHandshake(f"{HOST}:{port}", "/").request
    _emit({"ready": True})
    if sys.stdin.readline().strip() != "go":
        return {"error": "no go"}
    selector = selectors.DefaultSelector()
    opened: dict[int, float] = {}
    closed: dict[int, float] = {}
    answered: dict[int, str] = {}
    socks: dict[int, socket.socket] = {}
    connect_errors = 0
    start = time.monotonic()
    for index, source in enumerate(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        try:
            sock.connect((HOST, port))
        except OSError:
            connect_errors += 1
            sock.close()
            continue
        sock.setblocking(False)
        opened[index] = time.monotonic()
        socks[index] = sock
        selector.register(sock, selectors.EVENT_READ, index)

    def close(index: int, now: float) -> None:
        sock = socks.pop(index)
        selector.unregister(sock)
        sock.close()
        closed[index] = now - opened[index]

    sent = 0
    next_byte = start
    stop = start + timeout + CAP_AFTER
    snapshot_at = start + timeout + SNAPSHOT_AFTER
    open_at_snapshot: int | None = None
    while socks and (now := time.monotonic()) < stop:
        if open_at_snapshot is None and now >= snapshot_at:
            open_at_snapshot = len(socks)
        if now >= next_byte and sent < len(request):
            for index, sock in list(socks.items()):
                try:
                    sock.send(request[sent : sent + 1])
                except OSError:  # reset by the server: closed
                    close(index, now)
            sent += 1
            next_byte += interval
        for key, _ in selector.select(max(0.0, min(next_byte, stop) - time.monotonic())):
            index = key.data
            try:
                data = socks[index].recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                answered[index] = data.split(b"\r\n", 1)[0].decode("latin-1")
            else:
                close(index, time.monotonic())
    if open_at_snapshot is None:
        open_at_snapshot = len(socks)
    still_open = len(socks)
    for sock in socks.values():
        sock.close()
    return {
        "connections": len(sources), "connect_errors": connect_errors, "bytes_sent": sent,
        "closed_after": {str(index): seconds for index, seconds in closed.items()},
        "answers": sorted(set(answered.values())), "open_at_snapshot": open_at_snapshot,
        "still_open_at_end": still_open, "ran_s": time.monotonic() - start,
    }  # fmt: skip


# -- the driver ------------------------------------------------------------------------------------------


def write_config(path: Path, args: argparse.Namespace) -> None:
    lines = ["# Written by benchmarks/slow_handshake_bench.py", "[server]", 'log_level = "INFO"']
    if args.handshake_timeout is not None:
        lines.append(f"handshake_timeout = {args.handshake_timeout}")
    if args.cap is not None:
        lines += ["[limits]", f"max_uninitialised_per_address = {args.cap}"]
    lines += ["[[sessions]]", f'name = "{SESSION}"', f'password = "{PASSWORD}"']
    path.write_text("\n".join(lines) + "\n")


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from fastport_core.config import Limits, ServerConfig

    timeout = args.handshake_timeout or ServerConfig().handshake_timeout
    cap = args.cap or Limits().max_uninitialised_per_address
    config = workdir / "fastport.toml"
    write_config(config, args)
    port = _free_port()
    fastport = str(Path(PYTHON).parent / "fastport")
    command = [fastport, "serve", "--host", HOST, "--port", str(port), "--config", str(config)]
    log = workdir / "server.log"
    server = ServerProcess("fastport", command, port, log)
    groups = [f"127.0.0.{2 + i % args.addresses}" for i in range(args.connections)]
    sources = groups + [BURST_ADDRESS] * args.burst
    try:
        server.wait_listening()
        run_for = timeout + CAP_AFTER
        slow = spawn(
            "_slow",
            str(port),
            orjson.dumps(sources).decode(),
            str(args.interval),
            str(timeout),
            script=SCRIPT,
        )
        legit = spawn("_logins", str(port), str(run_for), script=AUTH_FLOOD)
        for _process, reader in (slow, legit):
            if not orjson.loads(reader.line(60.0)).get("ready"):
                raise RuntimeError("a role did not get ready")
        for process, _reader in (slow, legit):
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            process.stdin.flush()
        slow_result = result_of(*slow, timeout=run_for + 30.0)
        legit_result = result_of(*legit, timeout=30.0)
    finally:
        server.stop()
    refusal_lines = log.read_text(errors="replace").count("refusing connection from")
    return summarise(args, timeout, cap, len(groups), slow_result, legit_result, refusal_lines)


def summarise(
    args: argparse.Namespace, timeout: float, cap: int, spread: int, slow: dict[str, Any],
    legit: dict[str, Any], refusal_lines: int,
) -> dict[str, Any]:  # fmt: skip
    closed = {int(index): seconds for index, seconds in slow["closed_after"].items()}
    groups = {"spread": range(spread), "burst": range(spread, slow["connections"])}
    out: dict[str, Any] = {
        "handshake_timeout": timeout, "cap": cap, "interval": args.interval, "bytes_sent": slow["bytes_sent"],
        "open_at_snapshot": slow["open_at_snapshot"], "still_open_at_end": slow["still_open_at_end"],
        "connect_errors": slow["connect_errors"], "answers": slow["answers"],
        "server_refusal_lines": refusal_lines,
    }  # fmt: skip
    for name, indexes in groups.items():
        times = [closed[i] for i in indexes if i in closed]
        refused = [t for t in times if t < REFUSED_WITHIN]
        timed_out = [t * 1000 for t in times if t >= REFUSED_WITHIN]
        stats = percentiles(timed_out)
        out[name] = {
            "connections": len(indexes), "refused_at_accept": len(refused), "closed_later": len(timed_out),
            "never_closed": len(indexes) - len(times),
            "closed_after_s": {key: value / 1000 if key != "n" else value for key, value in stats.items()},
            "closed_after_min_s": min(timed_out) / 1000 if timed_out else None,
            "refused_after_ms": percentiles([t * 1000 for t in refused]),
        }  # fmt: skip
    out["legit_login_ms"] = percentiles([ns / 1e6 for _, ns in legit["samples"]])
    out["legit_login_series_ms"] = [ns / 1e6 for _, ns in legit["samples"]]
    out["legit_publish_ms"] = percentiles([ns / 1e6 for _, ns in legit["publishes"]])
    out["legit_failures"] = legit["failure_count"], legit["failures"]
    return out


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"handshake_timeout {result['handshake_timeout']} s, max_uninitialised_per_address {result['cap']}, "
        f"one byte every {result['interval']} s ({result['bytes_sent']} bytes sent per socket)",
        f"still open at handshake_timeout + {SNAPSHOT_AFTER:.0f} s: {result['open_at_snapshot']}; "
        f"at the end: {result['still_open_at_end']}; server answers seen: {result['answers'] or 'none'}",
        "",
        "| group | sockets | refused at accept | closed later | never closed | closed after: min | p50 | p99 "
        "| max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {
        "spread": f"{args.connections} over {args.addresses} addresses",
        "burst": f"{args.burst} from {BURST_ADDRESS}",
    }
    for name in ("spread", "burst"):
        group = result[name]
        stats = group["closed_after_s"]
        cells = [f"{stats[k]:.2f} s" if k in stats else "-" for k in ("p50", "p99", "max")]
        low = group["closed_after_min_s"]
        cells.insert(0, f"{low:.2f} s" if low is not None else "-")
        lines.append(
            f"| {labels[name]} | {group['connections']} | {group['refused_at_accept']} | "
            f"{group['closed_later']} | {group['never_closed']} | {' | '.join(cells)} |"
        )
    login, publish = result["legit_login_ms"], result["legit_publish_ms"]
    refused = [f"{result[g]['refused_after_ms'].get('max', 0):.1f} ms" for g in ("spread", "burst")]
    lines += [
        "",
        f"server log 'refusing connection' lines: {result['server_refusal_lines']}; refused sockets closed "
        f"after at most {', '.join(refused)} (spread, burst)",
        f"legitimate client meanwhile: {login['n']} logins, connect+init p50 {login.get('p50', 0):.1f} ms, "
        f"p99 {login.get('p99', 0):.1f} ms, max {login.get('max', 0):.1f} ms; publish round trip p50 "
        f"{publish.get('p50', 0):.1f} ms, max {publish.get('max', 0):.1f} ms; "
        f"failures {result['legit_failures']}",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_slow":
        port, sources, interval, timeout = sys.argv[2:6]
        _emit(run_slow(int(port), orjson.loads(sources), float(interval), float(timeout)))
        os._exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--connections", type=int, default=200, help="slow sockets spread over --addresses")
    parser.add_argument("--addresses", type=int, default=4, help="source addresses 127.0.0.2... (default 4)")
    parser.add_argument(
        "--burst", type=int, default=80, help=f"slow sockets from {BURST_ADDRESS} (default 80)"
    )
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between bytes (default 0.5)")
    parser.add_argument(
        "--handshake-timeout", type=float, help="the server's (default: ServerConfig's, 10 s)"
    )
    parser.add_argument("--cap", type=int, help="max_uninitialised_per_address (default: Limits', 64)")
    args = parser.parse_args()
    if not 1 <= args.addresses <= 90:
        parser.error("--addresses must be 1..90")
    with tempfile.TemporaryDirectory(prefix="fastport-slow-") as tmp:
        result = measure(args, Path(tmp))
    print(report(result, args))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"slow-handshake-{stamp}.json"
    path.write_bytes(orjson.dumps({"args": vars(args), "result": result}, option=orjson.OPT_INDENT_2))
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
