"""Latency of legitimate traffic while 64 addresses guess passwords (issue 8, item 2).

Run by hand, never from the test suite (speed is never asserted)::

    .venv/bin/python benchmarks/auth_flood_bench.py                 # both modes, ~45 s
    .venv/bin/python benchmarks/auth_flood_bench.py --duration 4    # a shorter flood
    .venv/bin/python benchmarks/auth_flood_bench.py --modes offload --unknown-sessions

What one run does, per *mode* (``offload``: the server as shipped, scrypt in worker threads; ``inline``: the
same server with ``ServerCore(offload_verification=False)``, scrypt on the event loop, as before the fix):

* **The server** is a subprocess pinned to CPU 0 (when it exists), running :class:`fastport_anyio.Server`
  the way ``fastport serve`` does (asyncio, logging at the CLI's default level ``INFO`` to a file) with
  ``ServerConfig()``'s defaults: real scrypt cost (``password_hash_cost`` 2**14), the failed-login budget
  and throttle, ``auth_max_failures``. The only difference between the modes is the constructor flag
  (``inline`` swaps in a core built with ``offload_verification=False``; no product code changes).
* **The probe** (CPU 1): a publisher and a subscriber on one session, logged in before anything else
  happens, send a publish every ``1/rate`` s (stamped with ``perf_counter_ns``, CLOCK_MONOTONIC, one clock
  for every process) for the whole run; it records the delivery latency (publish sent → message received
  by the subscriber, which ACKs it) and the publish round trip (publish sent → ``publish_response``).
* **Logins** (CPU 1): every 0.5 s a fresh client connects from 127.0.0.1 and ``init``s with the right
  password: connect + upgrade + ``init_response`` time.
* **The flood** (CPU 1), ``quiet`` s after the probe starts and for ``duration`` s: ``attackers``
  connections, each bound to its own source address 127.0.0.2, 127.0.0.3, ... (Linux routes all of
  127/8 to ``lo``), send an ``init`` with a wrong password as soon as the previous one is answered, and
  reconnect when the server closes them (``auth_max_failures``). ``--unknown-sessions`` makes every guess
  name a different, non-existent session instead (the server then checks a decoy hash, and the
  per-address-and-session budget never runs out).

Samples are split by the time their publish was sent: before the flood (``quiet``), during it, and after
it (``recovery``, 2 s). Everything goes to 127.0.0.1 … 127.0.0.65 only; every loop is bounded by its
duration. Raw results: ``benchmarks/results/auth-flood-*.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import logging
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import orjson
from loadgen import Connection, split_frames
from run import HOST, LOAD_CPU, PYTHON, RESULTS_DIR, LineReader, ServerProcess, _free_port, _pin

from fastport_core.frames import Opcode, encode_frame
from fastport_core.handshake import ClientHandshake

SCRIPT: Final = Path(__file__).resolve()
SESSION: Final = "flood"
PASSWORD: Final = "the-right-password-0123456789"
TOPIC: Final = "bench/flood"
RECV: Final = 65536
RECOVERY: Final = 2.0
"""Seconds the probe keeps measuring after the flood ends."""
LOGIN_INTERVAL: Final = 0.5
COLD_SESSIONS: Final = 40
"""Extra sessions ``cold-0`` ... whose passwords nobody has used yet: a login into one pays a real scrypt (the
verified-password cache is empty), as the first login after a restart does."""
HASH: Final = "v1:" + "0" * 64
TIMES: Final = "\u00d7"


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 / p99 / max (nearest rank) of ``samples`` in ms, and their count."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {
        "n": len(ordered),
        "p50": ordered[round(0.50 * last)],
        "p99": ordered[round(0.99 * last)],
        "max": ordered[-1],
    }


# -- the server (a subprocess) ---------------------------------------------------------------------------


def run_server(port: int, mode: str, log_level: str) -> None:
    """What ``fastport serve`` runs (``Server`` on asyncio, logging to stderr, stopped by SIGINT/SIGTERM) with
    ``ServerConfig()``'s defaults; ``inline`` moves scrypt back onto the event loop (a benchmark-only
    subclass using the constructor flag ``ServerCore`` already has)."""
    import signal

    import anyio

    from fastport_anyio import Server
    from fastport_anyio.server import web_files
    from fastport_core.config import ServerConfig
    from fastport_core.config_file import SessionSpec
    from fastport_core.server import ServerCore

    class InlineVerificationServer(Server):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.core = ServerCore(
                kwargs.get("config"), offload_verification=False, web_files=web_files(), console_history=True
            )

    server_class = InlineVerificationServer if mode == "inline" else Server
    cold = [SessionSpec(f"cold-{i}", f"cold-password-{i}") for i in range(COLD_SESSIONS)]
    sessions = (SessionSpec(SESSION, PASSWORD), *cold)

    async def serve() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with server_class(HOST, port, config=ServerConfig(), sessions=sessions):
                async for _ in signals:
                    return  # leaving the block stops the server gracefully

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    anyio.run(serve, backend="asyncio")


# -- the probe: a paced publisher/subscriber pair ----------------------------------------------------------


def run_probe(port: int, rate: float, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds + 30.0
    pub, sub = Connection(HOST, port), Connection(HOST, port)
    for conn in (pub, sub):
        conn.send_json({"type": "init", "sessionName": SESSION, "password": PASSWORD})
        conn.expect("init_response", deadline)
    sub.send_json({"type": "subscribe", "topic": TOPIC})
    sub.expect("subscribe_response", deadline)
    _emit({"ready": True})
    if sys.stdin.readline().strip() != "go":
        return {"error": "no go"}
    clock = time.perf_counter_ns
    interval = int(1e9 / rate)
    start = clock()
    stop = start + int(seconds * 1e9)
    next_send = start
    sent_at: dict[str, int] = {}
    deliveries: list[tuple[int, int]] = []  # (sent ns, latency ns)
    round_trips: list[tuple[int, int]] = []
    errors: list[Any] = []
    selector = selectors.DefaultSelector()
    for conn in (pub, sub):
        conn.sock.setblocking(False)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    seq = 0
    data_tail = "x" * 64
    while True:
        now = clock()
        if now >= stop + int(3e9) or (now >= stop and len(deliveries) == seq and len(round_trips) == seq):
            break
        if now >= next_send and now < stop:
            message_id = f"m{seq:07d}"
            stamp = clock()
            frame = {
                "type": "publish", "topic": TOPIC, "data": f"{stamp:019d}{data_tail}", "hash": HASH,
                "timestamp": 1_764_000_000_000, "messageId": message_id,
            }  # fmt: skip
            pub.sock.setblocking(True)
            pub.send_json(frame)
            pub.sock.setblocking(False)
            sent_at[message_id] = stamp
            seq += 1
            next_send += interval
        timeout = max(0.0, (next_send - clock()) / 1e9) if clock() < stop else 0.05
        for key, _ in selector.select(min(timeout, 0.05)):
            conn = key.data
            try:
                data = conn.sock.recv(RECV)
            except BlockingIOError:
                continue
            arrived = clock()
            if not data:
                errors.append("connection closed by the server")
                return {"error": "closed", "errors": errors}
            frames, conn.buffer = split_frames(conn.buffer + data)
            out = []
            for opcode, payload in frames:
                if opcode == Opcode.PING:
                    out.append(encode_frame(Opcode.PONG, payload, mask=True))
                    continue
                if opcode != Opcode.TEXT:
                    errors.append(f"opcode {opcode}")
                    continue
                obj = orjson.loads(payload)
                kind = obj.get("type")
                if kind == "message":
                    stamp = int(obj["data"][:19])
                    deliveries.append((stamp, arrived - stamp))
                    ack = {"type": "ack", "topic": TOPIC, "messageId": obj["messageId"]}
                    out.append(encode_frame(Opcode.TEXT, orjson.dumps(ack), mask=True))
                elif kind == "publish_response":
                    stamp = sent_at.pop(obj.get("messageId", ""), 0)
                    if obj.get("success") and stamp:
                        round_trips.append((stamp, arrived - stamp))
                    else:
                        errors.append(obj)
                elif kind != "ack_received":
                    errors.append(obj)
            if out:
                conn.sock.setblocking(True)
                conn.sock.sendall(b"".join(out))
                conn.sock.setblocking(False)
    for conn in (pub, sub):
        conn.sock.close()
    return {
        "sent": seq, "deliveries": deliveries, "round_trips": round_trips, "errors": errors[:10],
        "error_count": len(errors), "start_ns": start,
    }  # fmt: skip


# -- legitimate logins -----------------------------------------------------------------------------------


def _login(port: int, session: str = SESSION, password: str = PASSWORD) -> tuple[int, int]:
    """Connect, upgrade, ``init`` with the right password, publish once: (ns to ``init_response``, ns from
    the publish to its ``publish_response``)."""
    clock = time.perf_counter_ns
    begin = clock()
    conn = Connection(HOST, port)
    try:
        deadline = time.monotonic() + 10.0
        conn.send_json({"type": "init", "sessionName": session, "password": password})
        conn.expect("init_response", deadline)
        logged_in = clock()
        publish = {
            "type": "publish", "topic": TOPIC + "/login", "data": "x", "hash": HASH,
            "timestamp": 1_764_000_000_000, "messageId": f"login-{os.getpid()}-{logged_in}",
        }  # fmt: skip
        conn.send_json(publish)
        conn.expect("publish_response", deadline)
        return logged_in - begin, clock() - logged_in
    finally:
        conn.sock.close()


def run_logins(port: int, seconds: float, cold_from: float = 0.0, cold_until: float = 0.0) -> dict[str, Any]:
    """A fresh legitimate client every :data:`LOGIN_INTERVAL` s (after one unrecorded warm-up login, which
    pays the one scrypt verification that the server then caches). From ``cold_from`` to ``cold_until`` s
    after "go" (the flood), every other login goes into a session never logged into before
    (:data:`COLD_SESSIONS`), so its password check is a real scrypt, queued with the attackers' ones. (Only
    then: outside the flood, an inline check would stall the pair and spoil the baseline.)"""
    _login(port)
    _emit({"ready": True})
    if sys.stdin.readline().strip() != "go":
        return {"error": "no go"}
    clock = time.perf_counter_ns
    start = time.monotonic()
    stop = start + seconds
    samples: list[tuple[int, int]] = []
    cold_samples: list[tuple[int, int]] = []
    publishes: list[tuple[int, int]] = []
    failures: list[str] = []
    turn = 0
    while time.monotonic() < stop:
        begin = clock()
        index, turn = turn // 2, turn + 1
        elapsed = time.monotonic() - start
        into_cold = cold_from <= elapsed < cold_until and turn % 2 == 0 and index < COLD_SESSIONS
        try:
            if into_cold:
                login_ns, publish_ns = _login(port, f"cold-{index}", f"cold-password-{index}")
                cold_samples.append((begin, login_ns))
            else:
                login_ns, publish_ns = _login(port)
                samples.append((begin, login_ns))
            publishes.append((begin, publish_ns))
        except (OSError, RuntimeError) as exc:
            failures.append(f"{'cold' if into_cold else 'warm'}: {type(exc).__name__}: {exc}")
        time.sleep(max(0.0, LOGIN_INTERVAL - (clock() - begin) / 1e9))
    return {
        "samples": samples, "cold_samples": cold_samples, "publishes": publishes, "failures": failures[:10],
        "failure_count": len(failures),
    }  # fmt: skip


# -- the flood --------------------------------------------------------------------------------------------


class Attacker:
    """One guessing client bound to its own loopback address: a non-blocking state machine."""

    def __init__(self, index: int, source: str, port: int, unknown_sessions: bool) -> None:
        self.index = index
        self.source = source
        self.port = port
        self.unknown_sessions = unknown_sessions
        self.sock: socket.socket | None = None
        self.handshake: ClientHandshake | None = None
        self.buffer = b""
        self.guesses = 0
        self.sent_ns = 0

    def connect(self, selector: selectors.BaseSelector, stats: dict[str, Any]) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.source, 0))
        sock.setblocking(False)
        code = sock.connect_ex((HOST, self.port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            stats["connect_errors"] += 1
            return
        self.sock = sock
        self.handshake = None
        self.buffer = b""
        stats["connections"] += 1
        selector.register(sock, selectors.EVENT_WRITE, self)

    def guess(self) -> bytes:
        self.guesses += 1
        session = f"guess-{self.index}-{self.guesses}" if self.unknown_sessions else SESSION
        init = {"type": "init", "sessionName": session, "password": f"wrong-{self.index}-{self.guesses}"}
        self.sent_ns = time.perf_counter_ns()
        return encode_frame(Opcode.TEXT, orjson.dumps(init), mask=True)


def run_flood(port: int, attackers: int, seconds: float, unknown_sessions: bool) -> dict[str, Any]:
    _emit({"ready": True})
    if sys.stdin.readline().strip() != "go":
        return {"error": "no go"}
    stats: dict[str, Any] = {"connections": 0, "connect_errors": 0, "closed_by_server": 0, "inits": 0}
    answers: dict[str, int] = {}
    answer_ms: list[float] = []
    selector = selectors.DefaultSelector()
    crowd = [Attacker(i, f"127.0.0.{2 + i}", port, unknown_sessions) for i in range(attackers)]
    start_ns = time.perf_counter_ns()
    stop = time.monotonic() + seconds
    for attacker in crowd:
        attacker.connect(selector, stats)

    def drop(attacker: Attacker) -> None:
        assert attacker.sock is not None
        selector.unregister(attacker.sock)
        attacker.sock.close()
        attacker.sock = None
        stats["closed_by_server"] += 1
        if time.monotonic() < stop:
            attacker.connect(selector, stats)

    while (remaining := stop - time.monotonic()) > 0:
        for key, events in selector.select(min(remaining, 0.1)):
            attacker = key.data
            sock = attacker.sock
            assert sock is not None
            if events & selectors.EVENT_WRITE:  # connected (or failed): send the upgrade request
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    drop(attacker)
                    continue
                attacker.handshake = ClientHandshake(f"{HOST}:{port}", "/")
                sock.send(attacker.handshake.request)
                selector.modify(sock, selectors.EVENT_READ, attacker)
                continue
            try:
                data = sock.recv(RECV)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                drop(attacker)
                continue
            if attacker.handshake is not None:
                leftover = attacker.handshake.receive_data(data)
                if leftover is None:
                    continue
                attacker.handshake = None
                data = leftover
                with contextlib.suppress(OSError):
                    sock.send(attacker.guess())
                    stats["inits"] += 1
            frames, attacker.buffer = split_frames(attacker.buffer + data)
            for opcode, payload in frames:
                if opcode == Opcode.TEXT:
                    obj = orjson.loads(payload)
                    code = str(obj.get("code") or obj.get("type"))
                    answers[code] = answers.get(code, 0) + 1
                    answer_ms.append((time.perf_counter_ns() - attacker.sent_ns) / 1e6)
                    with contextlib.suppress(OSError):
                        sock.send(attacker.guess())
                        stats["inits"] += 1
                elif opcode == Opcode.PING:
                    with contextlib.suppress(OSError):
                        sock.send(encode_frame(Opcode.PONG, payload, mask=True))
    end_ns = time.perf_counter_ns()
    for attacker in crowd:
        if attacker.sock is not None:
            attacker.sock.close()
    return {
        "start_ns": start_ns, "end_ns": end_ns, **stats, "answers": answers,
        "answer_ms": percentiles(answer_ms),
    }  # fmt: skip


def loop_wait(pid: int) -> float:
    """Seconds the server's main thread (its event loop) has been runnable but waiting for a CPU: the
    noise of this shared machine, and, with scrypt in threads of the same pinned process, their share."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1]) / 1e9
    return 0.0


# -- the driver -------------------------------------------------------------------------------------------


def spawn(role: str, *args: str, script: Path = SCRIPT) -> tuple[subprocess.Popen[bytes], LineReader]:
    """Start one role of a benchmark script (``script role args...``) on the load generator's CPU."""
    process = subprocess.Popen(
        [PYTHON, str(script), role, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        preexec_fn=_pin(LOAD_CPU),  # noqa: PLW1509 - the driver has one thread
    )  # fmt: skip
    assert process.stdout is not None
    return process, LineReader(process.stdout)


def result_of(process: subprocess.Popen[bytes], reader: LineReader, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(reader.line(timeout))
    process.wait(10)
    if "error" in result:
        raise RuntimeError(f"a benchmark role failed: {result}")
    return result


def measure(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = _free_port()
    command = [PYTHON, str(SCRIPT), "_server", str(port), mode, args.log_level]
    server = ServerProcess(f"fastport ({mode})", command, port, workdir / f"server-{mode}.log")
    try:
        server.wait_listening()
        total = args.quiet + args.duration + RECOVERY
        roles = {
            "probe": spawn("_probe", str(port), str(args.rate), str(total)),
            "logins": spawn(
                "_logins", str(port), str(total), str(args.quiet), str(args.quiet + args.duration)
            ),
            "flood": spawn(
                "_flood", str(port), str(args.attackers), str(args.duration), str(args.unknown_sessions)
            ),
        }
        for _process, reader in roles.values():
            if not orjson.loads(reader.line(60.0)).get("ready"):
                raise RuntimeError("a role did not get ready")
        for name in ("probe", "logins"):
            stdin = roles[name][0].stdin
            assert stdin is not None
            stdin.write(b"go\n")
            stdin.flush()
        cpu0, wait0 = server.cpu_seconds(), loop_wait(server.pid)
        time.sleep(args.quiet)
        stdin = roles["flood"][0].stdin
        assert stdin is not None
        stdin.write(b"go\n")
        stdin.flush()
        flood = result_of(*roles["flood"], timeout=args.duration + 30.0)
        probe = result_of(*roles["probe"], timeout=RECOVERY + 30.0)
        logins = result_of(*roles["logins"], timeout=30.0)
        server_cpu = server.cpu_seconds() - cpu0
        server_wait = loop_wait(server.pid) - wait0
    finally:
        server.stop()
    result = summarise(mode, probe, logins, flood, server_cpu)
    result["loop_wait_s"] = server_wait
    result["loadavg"] = os.getloadavg()
    return result


def summarise(
    mode: str, probe: dict[str, Any], logins: dict[str, Any], flood: dict[str, Any], server_cpu: float
) -> dict[str, Any]:
    begin, end = flood["start_ns"], flood["end_ns"]

    def phase(stamp: int) -> str:
        return "quiet" if stamp < begin else "flood" if stamp <= end else "recovery"

    out: dict[str, Any] = {"mode": mode, "flood": flood, "server_cpu_s": server_cpu, "sent": probe["sent"]}
    for name, samples in (
        ("delivery", probe["deliveries"]),
        ("round_trip", probe["round_trips"]),
        ("login", logins["samples"]),
        ("cold_login", logins["cold_samples"]),
        ("login_publish", logins["publishes"]),
    ):
        split: dict[str, list[float]] = {"quiet": [], "flood": [], "recovery": []}
        for stamp, latency in samples:
            split[phase(stamp)].append(latency / 1e6)
        out[name] = {key: percentiles(values) for key, values in split.items()}
    out["series"] = [((stamp - begin) / 1e9, latency / 1e6) for stamp, latency in probe["deliveries"]]
    out["lost"] = probe["sent"] - len(probe["deliveries"])
    out["probe_errors"] = probe["error_count"], probe["errors"]
    out["login_failures"] = logins["failure_count"], logins["failures"]
    return out


def _ms(stats: dict[str, float], key: str) -> str:
    return f"{stats[key]:,.1f}" if key in stats else "-"


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | what | phase | samples | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        for what in ("delivery", "round_trip", "login", "cold_login"):
            for phase in ("quiet", "flood", "recovery"):
                stats = result[what][phase]
                lines.append(
                    f"| {result['mode']} | {what.replace('_', ' ')} | {phase} | {stats['n']} | "
                    f"{_ms(stats, 'p50')} | {_ms(stats, 'p99')} | {_ms(stats, 'max')} |"
                )
    lines += [
        "",
        "| mode | delivery p50 flood/quiet | p99 flood/quiet | max flood/quiet |",
        "| --- | ---: | ---: | ---: |",
    ]
    for result in results:
        quiet, flood = result["delivery"]["quiet"], result["delivery"]["flood"]
        ratios = [f"{flood[k] / quiet[k]:.1f}{TIMES}" if quiet.get(k) else "-" for k in ("p50", "p99", "max")]
        lines.append(f"| {result['mode']} | {' | '.join(ratios)} |")
    lines += [
        "",
        "| mode | attacker inits | answers | attacker answer p50 / p99 ms | connections | server CPU s "
        "| event loop waited for CPU s | load average |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        flood = result["flood"]
        answers = ", ".join(f"{k} {v}" for k, v in sorted(flood["answers"].items()))
        lines.append(
            f"| {result['mode']} | {flood['inits']} | {answers} | {_ms(flood['answer_ms'], 'p50')} / "
            f"{_ms(flood['answer_ms'], 'p99')} | {flood['connections']} | {result['server_cpu_s']:.1f} | "
            f"{result['loop_wait_s']:.2f} | {result['loadavg'][0]:.1f} |"
        )
    for result in results:
        if result["lost"] or result["probe_errors"][0] or result["login_failures"][0]:
            lines.append(
                f"\n{result['mode']}: {result['lost']} publishes not delivered, probe errors "
                f"{result['probe_errors']}, login failures {result['login_failures']}"
            )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        role, *rest = sys.argv[1:]
        if role == "_server":
            run_server(int(rest[0]), rest[1], rest[2])
            return
        if role == "_probe":
            result = run_probe(int(rest[0]), float(rest[1]), float(rest[2]))
        elif role == "_logins":
            result = run_logins(int(rest[0]), *map(float, rest[1:]))
        else:
            result = run_flood(int(rest[0]), int(rest[1]), float(rest[2]), rest[3] == "True")
        _emit(result)
        os._exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of flood (default 8)")
    parser.add_argument(
        "--quiet", type=float, default=3.0, help="seconds measured before the flood (default 3)"
    )
    parser.add_argument("--attackers", type=int, default=64, help="source addresses 127.0.0.2... (max 250)")
    parser.add_argument("--rate", type=float, default=100.0, help="probe publishes per second (default 100)")
    parser.add_argument("--modes", default="offload,inline", help="offload, inline or both (default)")
    parser.add_argument(
        "--unknown-sessions", action="store_true", help="guess a new unknown session each time"
    )
    parser.add_argument("--log-level", default="INFO", help="the server's (default INFO, as fastport serve)")
    args = parser.parse_args()
    if not 1 <= args.attackers <= 250:
        parser.error("--attackers must be 1..250")
    results = []
    with tempfile.TemporaryDirectory(prefix="fastport-flood-") as tmp:
        for mode in args.modes.split(","):
            print(f"measuring {mode} ({args.quiet:.0f} s quiet, {args.duration:.0f} s flood)...", flush=True)
            results.append(measure(mode, args, Path(tmp)))
    print(report(results))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"auth-flood-{stamp}.json"
    path.write_bytes(orjson.dumps({"args": vars(args), "results": results}, option=orjson.OPT_INDENT_2))
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
