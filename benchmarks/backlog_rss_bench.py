"""Memory while a resumable subscriber is away: its backlog in RAM (in memory) or in the store (durable).

Run by hand (about a minute; never from the test suite)::

    .venv/bin/python benchmarks/backlog_rss_bench.py [--messages 60000]

Two ``fastport serve`` processes, one in memory and one with ``--store``, each with a session whose
``messageExpiryTime`` is a day and whose pending-bytes limit is 1 GiB (so neither refuses). On each, a
subscriber with a ``clientId`` subscribes and drops its connection; then one publisher publishes
``--messages`` messages (the load generator's 389-character payload), window 100, confirmed one by one.
The server's RSS (``/proc/PID/status``) is read before and after every fifth of them. Then the subscriber
resumes and ACKs everything, to show the backlog comes back whole (the count received is printed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Final

import orjson
import run
from loadgen import Connection, Opcode, encode_frame, split_frames

CONFIG: Final = f"""\
[server]
log_level = "WARNING"
password_hash_cost = 1024
ping_interval = false

[limits]
max_pending_bytes_per_session = 1073741824

[[sessions]]
name = "{run.SESSION}"
password = "{run.PASSWORD}"
messageExpiryTime = 86400000
"""
DATA: Final = "A" * 389


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def login(port: int, **init: object) -> Connection:
    conn = Connection(run.HOST, port)
    conn.send_json({"type": "init", "sessionName": run.SESSION, "password": run.PASSWORD, **init})
    conn.expect("init_response", time.monotonic() + 10)
    return conn


def publish(conn: Connection, first: int, count: int, window: int = 100) -> None:
    """Publish ``count`` messages, at most ``window`` unconfirmed; bounded by a deadline."""
    deadline = time.monotonic() + 120
    sent = confirmed = 0
    while confirmed < count:
        if time.monotonic() > deadline:
            raise TimeoutError("publishing took too long")
        while sent < count and sent - confirmed < window:
            frame = {"type": "publish", "topic": "t", "data": DATA, "hash": "h", "timestamp": 1,
                     "messageId": f"m{first + sent}"}  # fmt: skip
            conn.sock.sendall(encode_frame(Opcode.TEXT, orjson.dumps(frame), mask=True))
            sent += 1
        conn.sock.settimeout(10)
        frames, conn.buffer = split_frames(conn.buffer + conn.sock.recv(1 << 18))
        for opcode, payload in frames:
            if opcode == Opcode.TEXT and orjson.loads(payload).get("type") == "publish_response":
                confirmed += 1


def drain(conn: Connection, expected: int) -> int:
    """Receive and ACK until ``expected`` messages arrived (or 60 s passed); how many did."""
    deadline = time.monotonic() + 60
    got = 0
    conn.sock.settimeout(5)
    frames = conn.pending
    while got < expected and time.monotonic() < deadline:
        acks = []
        for opcode, payload in frames:
            if opcode == Opcode.TEXT and (obj := orjson.loads(payload)).get("type") == "message":
                got += 1
                ack = {"type": "ack", "topic": "t", "messageId": obj["messageId"]}
                acks.append(encode_frame(Opcode.TEXT, orjson.dumps(ack), mask=True))
        if acks:
            conn.sock.sendall(b"".join(acks))
        if got >= expected:
            break
        frames, conn.buffer = split_frames(conn.buffer + conn.sock.recv(1 << 18))
    return got


def measure(name: str, store: Path | None, workdir: Path, messages: int) -> None:
    config = workdir / f"{name}.toml"
    config.write_text(CONFIG)
    port = run._free_port()
    command = [str(Path(run.PYTHON).parent / "fastport"), "serve", "--host", run.HOST, "--port", str(port),
               "--config", str(config)]  # fmt: skip
    if store is not None:
        command += ["--store", str(store)]
    server = run.ServerProcess(name, command, port, workdir / f"{name}.log")
    try:
        server.wait_listening()
        sub = login(port, clientId="away", persistent=True)
        sub.send_json({"type": "subscribe", "topic": "t"})
        sub.expect("subscribe_response", time.monotonic() + 10)
        sub.sock.close()  # away, without a Close frame: it will resume
        pub = login(port)
        step = messages // 5
        readings = [rss_kib(server.pid)]
        for part in range(5):
            publish(pub, part * step, step)
            readings.append(rss_kib(server.pid))
        growth = (readings[-1] - readings[0]) / messages * 1024
        print(
            f"{name:<9} RSS KiB {' -> '.join(str(r) for r in readings)}: "
            f"{growth:,.0f} bytes per backlogged message",
            flush=True,
        )
        back = login(port, clientId="away", persistent=True)
        print(f"{name:<9} resumed: {drain(back, messages * 5 // 5)} of {messages} delivered", flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fastport-backlog-") as tmp:
        workdir = Path(tmp)
        measure("memory", None, workdir, args.messages)
        measure("durable", workdir / "store.db", workdir, args.messages)


if __name__ == "__main__":
    main()
