"""Coverage-guided fuzz target for the server core (atheris, i.e. libFuzzer, in process).

Invariant, for any byte stream a peer can send, from the HTTP stage or from an open WebSocket after a
valid upgrade and a successful ``init``: ``ServerCore.receive_data`` answers, closes with a documented
code, or waits; it never raises (it would count ``internal_errors`` and close with 1011 instead: that is
a finding too), and memory stays within the configured bounds.

Run it (``tests/fuzz/test_fuzz_server.py`` does, for a bounded time, in every ``scripts/test``)::

    .venv/bin/python tests/fuzz/fuzz_server.py -max_total_time=600 -artifact_prefix=/tmp/fp-
    .venv/bin/python tests/fuzz/fuzz_server.py crash-<hash>        # replay one finding

Each input is decoded as: a mode byte (raw HTTP, raw WebSocket bytes, or JSON texts wrapped in valid
masked frames), then chunks of up to 255 bytes each preceded by a time step, so that timers (keepalive,
handshake timeout, retries, throttling) run between chunks too.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped, unused-ignore]

with atheris.instrument_imports():
    from fastport_core.config import Limits, ServerConfig, SessionSettings
    from fastport_core.errors import CloseCode
    from fastport_core.frames import ABNORMAL_CLOSURE, NO_STATUS_RECEIVED, is_valid_close_code
    from fastport_core.handshake import ClientHandshake
    from fastport_core.server import ServerCore

LIMITS = Limits(
    max_message_size=4096,
    max_fragments_per_message=16,
    max_output_buffer=8192,
    max_total_output_buffer=32768,
    max_pending_bytes_per_session=8192,
    max_inflight_per_subscriber=8,
    max_subscriptions_per_connection=8,
    max_connections=16,
    max_http_body=1024,
    max_http_header=2048,
    max_http_pipeline=4,
)
CONFIG = ServerConfig(
    limits=LIMITS,
    default_session_settings=SessionSettings(retry_interval=1.0, max_retry_limit=2, message_expiry_time=5.0),
    password_hash_cost=2,
    ping_interval=3.0,
    ping_timeout=2.0,
    handshake_timeout=4.0,
)
SENT_CODES = frozenset(int(code) for code in CloseCode)
UPGRADE = ClientHandshake("localhost", "/").request


def masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame with the all-zero mask key (valid, and keeps the payload readable for the fuzzer)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        header = bytes([first, 0x80 | size])
    elif size < 65536:
        header = bytes([first, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([first, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


INIT = masked(0x1, b'{"type":"init","sessionName":"demo","password":"pw"}')
SUBSCRIBE = masked(0x1, b'{"type":"subscribe","topic":"t"}')


def new_core() -> ServerCore:
    core = ServerCore(CONFIG)
    core.broker.create_session("demo", "pw", 0.0)
    return core


def drain(core: ServerCore) -> None:
    for conn in core.take_dirty():
        core.data_to_send(conn)
        if core.should_close(conn):
            core.connection_lost(conn, 0.0)


def check(core: ServerCore) -> None:
    assert core.metrics.value("internal_errors") == 0, "the core hit a bug (see the log)"
    assert core._output_total <= LIMITS.max_total_output_buffer
    assert core.connection_count <= LIMITS.max_connections + 1
    for connection in core._connections.values():
        ws = connection.ws
        if ws is None:
            continue
        assert ws.pending_bytes <= LIMITS.max_output_buffer + 256
        if ws.failure is not None:
            assert ws.failure.close_code in SENT_CODES, ws.failure
        code = ws.close_code
        assert code is None or code in (NO_STATUS_RECEIVED, ABNORMAL_CLOSURE) or is_valid_close_code(code)
    for session in core.broker._sessions.values():
        assert session.pending_bytes <= LIMITS.max_pending_bytes_per_session


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    mode = provider.ConsumeIntInRange(0, 2)
    core = new_core()
    now = 0.0
    subscriber = None
    conn = core.open_connection(now, "192.0.2.1")
    if mode:
        # A valid upgrade and init first, and a second client subscribed, so that publishes fan out.
        core.receive_data(conn, UPGRADE + INIT, now)
        subscriber = core.open_connection(now, "192.0.2.2")
        core.receive_data(subscriber, UPGRADE + INIT + SUBSCRIBE, now)
        drain(core)
    while provider.remaining_bytes():
        now += provider.ConsumeIntInRange(0, 255) / 32
        chunk = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 255))
        if mode == 2:
            opcode = provider.ConsumeIntInRange(0, 15)
            chunk = masked(opcode, chunk, fin=provider.ConsumeBool())
        core.receive_data(conn, chunk, now)
        if provider.ConsumeBool():
            drain(core)  # a peer that reads; otherwise its output accumulates, up to the bounds
        if (deadline := core.next_deadline()) is not None and deadline <= now:
            core.handle_timeout(now)
        check(core)
    core.receive_data(conn, b"", now)  # end of stream
    core.handle_timeout(now + 1000.0)
    drain(core)
    check(core)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
