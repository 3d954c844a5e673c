"""Load-generator processes for ``benchmarks/run.py``: one publisher, or N subscriber connections.

``run.py`` starts one process of each role per measurement, pinned to the CPU the server does not use, and
talks to them over stdin/stdout, one JSON line each way::

    python benchmarks/loadgen.py publisher   '<params JSON>'   # prints {"ready": ...}, waits for "go"
    python benchmarks/loadgen.py subscribers '<params JSON>'   # prints {"ready": ...}, then its result

Why it is shaped like this: the load generator shares a 2-core machine with the server it measures, so
every microsecond it spends is a microsecond of noise. It therefore uses no client library and no event
loop framework: blocking sockets (plus :mod:`selectors` for the subscribers' connections), the opening
handshake from :class:`fastport_core.handshake.ClientHandshake`, and frames masked in advance or with one
big-integer XOR per frame (a fixed per-run mask key: the server's unmasking work does not depend on the
key's value). Every frame a server sends is parsed with orjson. Subscribers ACK every message (with
frames pre-encoded per sequence number) and send all the ACKs of one received chunk in one write; the
publisher sends all the publishes it may send in one write.

Latency is measured on one clock: the publisher writes ``time.perf_counter_ns()`` (CLOCK_MONOTONIC,
shared by every process of the machine) into the first 19 characters of each message's ``data`` right
before the frame is sent, and the subscriber subtracts it from the time its ``recv`` returned.

The payload: ``data`` has the size a 256-byte plaintext has once sealed by the ``authenticated`` suite,
base64(16-byte IV) + ":" + base64(256 + 16 bytes of padded ciphertext) = 389 characters, plus a
``v1:`` + 64-hex ``hash``. It is an opaque string (servers never decrypt), so the clients' crypto cost
(~17 µs to seal, ~17 µs to open per message) is not part of these figures.

Every loop is bounded twice: by its message count and by ``cap`` seconds of wall-clock time. Traffic goes
only to the host in the parameters, which ``run.py`` sets to 127.0.0.1.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import time
from array import array
from dataclasses import dataclass
from typing import Any, Final

import orjson

from fastport_core.frames import Opcode, encode_frame
from fastport_core.handshake import ClientHandshake

TOPIC: Final = "bench/t"
STAMP_DIGITS: Final = 19
"""``perf_counter_ns()`` as zero-padded decimal at the head of ``data``."""
SEQ_DIGITS: Final = 7
"""The sequence number closes the message id, zero-padded, so that every frame of a run has one length."""
DATA_SIZE: Final = 24 + 1 + 364
"""base64(16-byte IV) ":" base64(272-byte ciphertext): a 256-byte plaintext sealed (AES-CBC, PKCS#7)."""
HASH: Final = "v1:" + "0" * 64
TIMESTAMP_MS: Final = 1_764_000_000_000
RECV_SIZE: Final = 1 << 18

_LOADS = orjson.loads


@dataclass(frozen=True, slots=True)
class Params:
    """One measurement, as ``run.py`` describes it to both roles."""

    host: str
    port: int
    session: str
    password: str
    prefix: str
    """Message ids are ``prefix`` + the zero-padded sequence number; unique per measurement, so that a
    server's dedupe window never mistakes this run's publishes for an earlier run's."""
    count: int
    """Messages the publisher sends; deliveries each subscriber connection expects."""
    window: int
    """Publishes the publisher keeps in flight without their ``publish_response``."""
    rate: float = 0.0
    """Publishes per second (paced) when positive; otherwise as fast as the window allows."""
    connections: int = 1
    """Subscriber connections (the subscribers role)."""
    cap: float = 60.0
    """Wall-clock seconds after which the role stops and reports what it has (``timed_out``)."""
    mask_key: str = "5a3c9e71"
    resumable: bool = False
    """Subscribers ``init`` with a ``clientId`` (what a durable broker stores deliveries for)."""
    subscriber_port: int = 0
    """The port the subscribers connect to when positive (another node of a cluster); else ``port``."""


# -- a minimal WebSocket client ------------------------------------------------------------------------


class MaskedFrames:
    """Client frames of one fixed payload length, masked with one fixed key.

    The header, the key and the key stream (as one integer) are computed once; masking a payload is then a
    single big-integer XOR, ~1 µs for a publish, instead of ``encode_frame``'s fresh key per frame.
    """

    __slots__ = ("_length", "_prefix", "_stream")

    def __init__(self, length: int, key: bytes) -> None:
        template = encode_frame(Opcode.TEXT, b"\0" * length, mask=True)
        header_size = len(template) - 4 - length
        self._prefix = template[:header_size] + key
        self._length = length
        self._stream = int.from_bytes((key * (length // 4 + 1))[:length], "little")

    def frame(self, payload: bytes) -> bytes:
        assert len(payload) == self._length
        return self._prefix + (int.from_bytes(payload, "little") ^ self._stream).to_bytes(
            self._length, "little"
        )


def split_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Complete server frames (opcode, payload) at the head of ``buffer``, and the incomplete rest.

    Server frames are unmasked and, from both servers measured here, never fragmented.
    """
    frames: list[tuple[int, bytes]] = []
    position = 0
    end = len(buffer)
    while end - position >= 2:
        first = buffer[position]
        length = buffer[position + 1] & 0x7F
        if length < 126:
            header = 2
        elif length == 126:
            if end - position < 4:
                break
            length = buffer[position + 2] << 8 | buffer[position + 3]
            header = 4
        else:
            if end - position < 10:
                break
            length = int.from_bytes(buffer[position + 2 : position + 10], "big")
            header = 10
        stop = position + header + length
        if stop > end:
            break
        if not first & 0x80:
            raise RuntimeError("fragmented frame from the server: the load generator does not reassemble")
        frames.append((first & 0x0F, buffer[position + header : stop]))
        position = stop
    return frames, buffer[position:]


class Connection:
    """One client connection: a blocking socket past the opening handshake, and its unparsed bytes."""

    __slots__ = ("buffer", "index", "pending", "received", "seen", "sock")

    def __init__(self, host: str, port: int, index: int = 0) -> None:
        self.index = index
        self.sock = socket.create_connection((host, port), timeout=10.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake = ClientHandshake(f"{host}:{port}", "/")
        self.sock.sendall(handshake.request)
        leftover = None
        while leftover is None:
            data = self.sock.recv(RECV_SIZE)
            leftover = handshake.receive_data(data)
        self.pending, self.buffer = split_frames(leftover)
        self.received = 0
        self.seen = bytearray()

    def send_json(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(Opcode.TEXT, orjson.dumps(obj), mask=True))

    def receive_json(self, deadline: float) -> dict[str, Any]:
        """The next JSON frame (setup only: simple, not fast). A Close or EOF is an error."""
        while True:
            while self.pending:
                opcode, payload = self.pending.pop(0)
                if opcode == Opcode.TEXT:
                    obj: dict[str, Any] = _LOADS(payload)
                    return obj
                if opcode == Opcode.CLOSE:
                    raise RuntimeError(f"server closed the connection: {payload!r}")
                # a ping during setup: ignored (keepalive intervals are far longer than a setup)
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise RuntimeError("server closed the connection during setup")
            self.pending, self.buffer = split_frames(self.buffer + data)

    def expect(self, kind: str, deadline: float) -> dict[str, Any]:
        obj = self.receive_json(deadline)
        if obj.get("type") != kind or not obj.get("success"):
            raise RuntimeError(f"expected a successful {kind}, got {obj!r}")
        return obj


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _percentiles(samples: array[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max in µs (nearest rank)."""
    if not samples:
        return {}
    ordered = sorted(samples)
    last = len(ordered) - 1

    def at(q: float) -> float:
        return ordered[min(last, round(q * last))] / 1000.0

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p999": at(0.999), "max": ordered[-1] / 1000}


# -- the publisher -------------------------------------------------------------------------------------


def run_publisher(params: Params) -> dict[str, Any]:
    """Publish ``count`` messages keeping at most ``window`` unconfirmed (optionally paced at ``rate``)."""
    deadline = time.monotonic() + params.cap
    conn = Connection(params.host, params.port)
    conn.send_json({"type": "init", "sessionName": params.session, "password": params.password})
    conn.expect("init_response", deadline)
    filler = ("A" * 21 + ":" + "B" * 364).encode()[: DATA_SIZE - STAMP_DIGITS]
    head = b'{"type":"publish","topic":"' + TOPIC.encode() + b'","data":"'
    middle = (
        filler
        + b'","hash":"'
        + HASH.encode()
        + b'","timestamp":'
        + str(TIMESTAMP_MS).encode()
        + b',"messageId":"'
        + params.prefix.encode()
    )
    tail = b'"}'
    length = len(head) + STAMP_DIGITS + len(middle) + SEQ_DIGITS + len(tail)
    masker = MaskedFrames(length, bytes.fromhex(params.mask_key))
    frame = masker.frame
    _emit({"ready": True, "role": "publisher"})
    if sys.stdin.readline().strip() != "go":
        return {"role": "publisher", "error": "no go"}

    cpu0 = time.process_time()
    clock = time.perf_counter_ns
    sock = conn.sock
    count, window = params.count, params.window
    interval_ns = int(1e9 / params.rate) if params.rate > 0 else 0
    sent = confirmed = errors = reads = acks_received = 0
    sent_ns = array("q", bytes(8 * count))
    """When each publish was written, by sequence number: publish-to-confirmation latency."""
    confirm_latencies: array[int] = array("q")
    skip = len(params.prefix)
    first_error: Any = None
    timed_out = False
    buffer = conn.buffer
    start_ns = clock()
    next_ns = start_ns
    while confirmed + errors < count:
        now_ns = clock()
        # Send what the window (and the pace) allows, all in one write.
        allowed = min(count - sent, window - (sent - confirmed - errors))
        if interval_ns and allowed > 0:
            allowed = min(allowed, (now_ns - next_ns) // interval_ns + 1) if now_ns >= next_ns else 0
        if allowed > 0:
            out = []
            for seq in range(sent, sent + allowed):
                stamp = sent_ns[seq] = clock()
                out.append(frame(head + b"%019d" % stamp + middle + b"%07d" % seq + tail))
            sock.sendall(b"".join(out))
            sent += allowed
            next_ns += allowed * interval_ns
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        if interval_ns and sent < count and sent - confirmed - errors < window:
            # Wait for an answer, but no longer than until the next paced publish is due. (Never 0: a
            # zero timeout would make the socket non-blocking, and sendall could then fail half-way.)
            sock.settimeout(max(1e-5, min(remaining, (next_ns - clock()) / 1e9)))
        else:
            sock.settimeout(remaining)
        try:
            data = sock.recv(RECV_SIZE)
        except TimeoutError:
            continue
        if not data:
            first_error = first_error or "server closed the connection"
            break
        reads += 1
        frames, buffer = split_frames(buffer + data if buffer else data)
        for opcode, payload in frames:
            if opcode == Opcode.TEXT:
                obj = _LOADS(payload)
                kind = obj.get("type")
                if kind == "publish_response" and obj.get("success"):
                    confirmed += 1
                    confirm_latencies.append(clock() - sent_ns[int(obj["messageId"][skip:])])
                elif kind == "ack_received":
                    acks_received += 1  # fastport's (default) word that every delivery was ACKed
                else:
                    errors += 1
                    first_error = first_error or obj
            elif opcode == Opcode.PING:
                sock.sendall(encode_frame(Opcode.PONG, payload, mask=True))
            elif opcode == Opcode.CLOSE:
                first_error = first_error or f"closed by the server: {payload!r}"
        if first_error is not None and isinstance(first_error, str):
            break
    end_ns = clock()
    cpu = time.process_time() - cpu0
    sock.close()
    return {
        "role": "publisher", "sent": sent, "confirmed": confirmed, "errors": errors,
        "first_error": first_error, "start_ns": start_ns, "end_ns": end_ns, "cpu_s": cpu,
        "timed_out": timed_out, "reads": reads, "acks_received": acks_received,
        "confirm_us": _percentiles(confirm_latencies),
    }  # fmt: skip


# -- the subscribers -------------------------------------------------------------------------------------


def run_subscribers(params: Params) -> dict[str, Any]:
    """Receive ``count`` messages on each of ``connections`` connections, ACK each, measure latency."""
    deadline = time.monotonic() + params.cap
    port = params.subscriber_port or params.port
    conns = [Connection(params.host, port, index) for index in range(params.connections)]
    for conn in conns:  # pipelined: every init and subscribe first, then the answers
        init = {"type": "init", "sessionName": params.session, "password": params.password}
        if params.resumable:
            init["clientId"] = f"{params.prefix}sub{conn.index}"
        conn.send_json(init)
        conn.send_json({"type": "subscribe", "topic": TOPIC})
    for conn in conns:
        conn.expect("init_response", deadline)
        conn.expect("subscribe_response", deadline)
        conn.seen = bytearray(params.count)
    ack_head = b'{"type":"ack","topic":"' + TOPIC.encode() + b'","messageId":"' + params.prefix.encode()
    ack_tail = b'"}'
    masker = MaskedFrames(len(ack_head) + SEQ_DIGITS + len(ack_tail), bytes.fromhex(params.mask_key))
    acks = [masker.frame(ack_head + b"%07d" % seq + ack_tail) for seq in range(params.count)]
    selector = selectors.DefaultSelector()
    for conn in conns:
        conn.sock.settimeout(None)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    _emit({"ready": True, "role": "subscribers"})

    cpu0 = time.process_time()
    clock = time.perf_counter_ns
    count = params.count
    skip = len(params.prefix)
    latencies: array[int] = array("q")
    record = latencies.append
    incomplete = len(conns)
    duplicates = errors = reads = 0
    first_error: Any = None
    first_ns = last_ns = 0
    timed_out = False
    while incomplete:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in selector.select(min(remaining, 1.0)):
            conn = key.data
            sock = conn.sock
            data = sock.recv(RECV_SIZE)
            now_ns = clock()
            if not data:
                errors += 1
                first_error = first_error or f"connection {conn.index} closed by the server"
                selector.unregister(sock)
                incomplete -= conn.received < count
                continue
            reads += 1
            if not first_ns:
                first_ns = now_ns
            frames, conn.buffer = split_frames(conn.buffer + data if conn.buffer else data)
            out = []
            seen = conn.seen
            before = conn.received
            for opcode, payload in frames:
                if opcode == Opcode.TEXT:
                    obj = _LOADS(payload)
                    if obj.get("type") == "message":
                        seq = int(obj["messageId"][skip:])
                        out.append(acks[seq])
                        if seen[seq]:
                            duplicates += 1
                            continue
                        seen[seq] = 1
                        conn.received += 1
                        record(now_ns - int(obj["data"][:STAMP_DIGITS]))
                    else:
                        errors += 1
                        first_error = first_error or obj
                elif opcode == Opcode.PING:
                    out.append(encode_frame(Opcode.PONG, payload, mask=True))
                elif opcode == Opcode.CLOSE:
                    errors += 1
                    first_error = first_error or f"connection {conn.index} closed: {payload!r}"
            if out:
                sock.sendall(b"".join(out))
            if before < count <= conn.received:
                incomplete -= 1
                last_ns = now_ns
    cpu = time.process_time() - cpu0
    result = {
        "role": "subscribers", "connections": len(conns), "deliveries": len(latencies),
        "duplicates": duplicates, "errors": errors, "first_error": first_error, "first_ns": first_ns,
        "last_ns": last_ns, "cpu_s": cpu, "timed_out": timed_out, "latency_us": _percentiles(latencies),
        "incomplete": incomplete, "reads": reads,
    }  # fmt: skip
    for conn in conns:
        if params.resumable:  # a Close frame: the server releases the subscriber instead of keeping it
            conn.sock.sendall(encode_frame(Opcode.CLOSE, (1000).to_bytes(2, "big"), mask=True))
        conn.sock.close()
    return result


def main() -> None:
    role, raw = sys.argv[1], sys.argv[2]
    params = Params(**orjson.loads(raw))
    try:
        result = run_publisher(params) if role == "publisher" else run_subscribers(params)
    except Exception as exc:  # reported to run.py, which shows it with the measurement it spoils
        result = {"role": role, "error": f"{type(exc).__name__}: {exc}"}
    _emit(result)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: the driver only waits for the result line


if __name__ == "__main__":
    main()
