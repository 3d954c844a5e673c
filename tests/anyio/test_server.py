"""The anyio server on real loopback sockets, on asyncio and trio: admin HTTP, limits, faults, TLS, timers,
slow consumers and graceful shutdown. The wire format itself is pinned in ``test_wire_compat.py``."""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import orjson
import pytest
from anyio.abc import SocketStream
from wsproto.events import Ping

import fastport_anyio.server as server_module
from fastport_anyio import Server, serve
from fastport_core.auth import PasswordCheck
from fastport_core.config import Limits, ServerConfig
from tests.certificates import make_certificate

from .conftest import ADMIN, FAST_CONFIG, SESSIONS, TIMEOUT, RawClient, http_request, publish_frame

pytestmark = pytest.mark.anyio


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def connected(port: int, session: str = "alpha", **kwargs: Any) -> RawClient:
    client = await RawClient.connect(port, **kwargs)
    answer = await client.init(session, f"{session}-password")
    assert answer["success"] is True, answer
    return client


async def assert_healthy(server: Server) -> None:
    """A fresh client can still do a full round trip."""
    async with await connected(server.port) as publisher, await connected(server.port) as subscriber:
        await subscriber.subscribe("health")
        assert (await publisher.request(publish_frame("health", "ok", f"h-{id(publisher)}")))["success"]
        assert (await subscriber.receive())["data"] == "ok"


# --------------------------------------------------------------------------------------------------------
# Start-up


async def test_port_zero_reports_the_bound_port_through_task_status(anyio_backend: str) -> None:
    async with anyio.create_task_group() as task_group:
        server: Server = await task_group.start(serve, "127.0.0.1", 0)
        assert server.port > 0
        assert server.url == f"ws://127.0.0.1:{server.port}"
        status, _, body = await http_request(server.port, "GET", "/healthz")
        assert status == 200 and orjson.loads(body)["status"] == "ok"
        task_group.cancel_scope.cancel()  # serve runs until cancelled


async def test_port_property_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not listening"):
        _ = Server("127.0.0.1", 0).port


async def test_sessions_given_to_serve_exist_at_start(server: Server) -> None:
    status, _, body = await http_request(server.port, "GET", "/healthz")
    assert status == 200
    assert orjson.loads(body) == {"status": "ok", "sessions": 2, "connections": 0}


async def test_port_in_use_raises_oserror(server: Server) -> None:
    with pytest.raises(OSError):
        async with Server("127.0.0.1", server.port, config=FAST_CONFIG):
            pass


# --------------------------------------------------------------------------------------------------------
# The admin API on the same port


async def test_create_session_over_http_then_use_it(server: Server) -> None:
    body = orjson.dumps({"sessionName": "gamma", "password": "gamma-password", "retryInterval": 1000})
    status, headers, answer = await http_request(
        server.port, "POST", "/api/createSession", body=body, headers=basic("ops", "admin-secret")
    )
    assert status == 200
    created = orjson.loads(answer)
    assert created["success"] is True and created["sessionName"] == "gamma"
    assert isinstance(created["secretKey"], str) and created["secretKey"]
    assert headers.get("cache-control") == "no-store"
    async with await connected(server.port, "gamma"):
        pass


async def test_admin_api_without_credentials_is_401(server: Server) -> None:
    body = orjson.dumps({"sessionName": "x", "password": "y"})
    status, headers, answer = await http_request(server.port, "POST", "/api/createSession", body=body)
    assert status == 401
    assert headers["www-authenticate"].startswith("Basic")
    assert orjson.loads(answer)["code"] == "unauthorized"
    status, _, _ = await http_request(
        server.port, "POST", "/api/createSession", body=body, headers=basic("ops", "wrong")
    )
    assert status == 401


async def test_admin_api_is_off_without_configured_credentials(anyio_backend: str) -> None:
    async with Server("127.0.0.1", 0, config=FAST_CONFIG) as server:
        body = orjson.dumps({"sessionName": "x", "password": "y"})
        status, _, answer = await http_request(
            server.port, "POST", "/api/createSession", body=body, headers=basic("ops", "admin-secret")
        )
        assert status == 403
        assert orjson.loads(answer)["code"] == "admin_disabled"
        status, _, _ = await http_request(server.port, "GET", "/healthz")
        assert status == 200


async def test_metrics_endpoint_serves_prometheus_text(server: Server) -> None:
    async with await connected(server.port):
        pass
    status, headers, body = await http_request(
        server.port, "GET", "/metrics", headers=basic("ops", "admin-secret")
    )
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert "# TYPE fastport_connections_opened_total counter" in text
    assert 'fastport_inits_total{session="alpha"} 1.0' in text
    status, _, _ = await http_request(server.port, "GET", "/metrics")
    assert status == 401


async def test_keep_alive_http_requests_on_one_connection(server: Server) -> None:
    """Plain HTTP/1.1 keeps the connection for the next request; the adapter keeps reading it."""
    async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        await stream.send(request + request)
        received = b""
        with anyio.fail_after(TIMEOUT):
            while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"}"):
                received += await stream.receive()
        assert received.count(b'"status":"ok"') == 2


# --------------------------------------------------------------------------------------------------------
# Faults: the server answers, closes, and stays healthy


async def test_oversized_message_closes_with_1009_and_the_server_stays_healthy(anyio_backend: str) -> None:
    config = ServerConfig(limits=Limits(max_message_size=1024), password_hash_cost=16)
    async with Server("127.0.0.1", 0, config=config, sessions=SESSIONS) as server:
        async with await connected(server.port) as client:
            await client.send_text("x" * 4096)
            closed = await client.receive_close()
            assert closed.code == 1009
            await client.wait_eof()
        await assert_healthy(server)
        assert server.core.metrics.value("connections_closed", "1009") == 1


async def test_garbage_bytes_get_a_400_and_the_server_stays_healthy(server: Server) -> None:
    async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        await stream.send(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n" + bytes(range(256)))
        received = b""
        with anyio.fail_after(TIMEOUT):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        assert received.startswith(b"HTTP/1.1 400")
    await assert_healthy(server)


async def test_garbage_after_the_upgrade_closes_with_a_protocol_error(server: Server) -> None:
    async with await connected(server.port) as client:
        await client.stream.send(b"\x8f\x00")  # an unmasked frame with a reserved opcode
        closed = await client.receive_close()
        assert closed.code == 1002
    await assert_healthy(server)


async def test_peer_that_vanishes_mid_frame_is_cleaned_up(server: Server) -> None:
    client = await connected(server.port)
    await client.stream.send(b"\x81\xfe\x10\x00")  # the header of a 4 KiB masked text frame, no payload
    await client.aclose()
    with anyio.fail_after(TIMEOUT):
        while server.core.connection_count:
            await anyio.sleep(0.01)  # connection_lost runs in the server's own task
    await assert_healthy(server)


async def test_max_connections_refuses_the_extra_socket(anyio_backend: str) -> None:
    config = ServerConfig(limits=Limits(max_connections=1), password_hash_cost=16)
    async with (
        Server("127.0.0.1", 0, config=config, sessions=SESSIONS) as server,
        await connected(server.port),
        await anyio.connect_tcp("127.0.0.1", server.port) as extra,
    ):
        with anyio.fail_after(TIMEOUT), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            while True:
                await extra.receive()


@pytest.mark.patches_core
async def test_a_bug_on_one_connection_costs_only_that_connection(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receive_data = server.core.receive_data

    def buggy(conn: int, data: bytes, now: float) -> None:
        if b"BOOM" in data:
            raise RuntimeError("simulated core bug")
        receive_data(conn, data, now)

    monkeypatch.setattr(server.core, "receive_data", buggy)
    async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        await stream.send(b"BOOM")
        with anyio.fail_after(TIMEOUT), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            while True:
                await stream.receive()
    assert "unexpected error; dropping the connection" in caplog.text
    assert "simulated core bug" in caplog.text
    await assert_healthy(server)


# --------------------------------------------------------------------------------------------------------
# The timer task


async def test_handshake_timeout_closes_a_silent_socket(anyio_backend: str) -> None:
    """A new connection arms an earlier deadline than the idle timer's: the timer must be woken early."""
    config = ServerConfig(handshake_timeout=0.2, password_hash_cost=16)
    async with (
        Server("127.0.0.1", 0, config=config) as server,
        await anyio.connect_tcp("127.0.0.1", server.port) as stream,
    ):
        start = anyio.current_time()
        with anyio.fail_after(TIMEOUT), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            while True:
                await stream.receive()
        assert anyio.current_time() - start < 5


async def test_keepalive_pings_and_drops_a_peer_that_never_answers(anyio_backend: str) -> None:
    config = ServerConfig(ping_interval=0.1, ping_timeout=0.1, password_hash_cost=16)
    async with (
        Server("127.0.0.1", 0, config=config, sessions=SESSIONS) as server,
        await connected(server.port) as lively,
        await connected(server.port) as mute,
    ):
        assert isinstance(await mute.next_event(answer_pings=False), Ping)

        async def keep_talking() -> None:  # any bytes received prove a peer alive
            while True:
                assert (await lively.subscribe("still-here"))["success"] is True
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(keep_talking)
            await mute.wait_eof()  # the ping was never answered: dropped, the socket closed
            task_group.cancel_scope.cancel()
        assert server.core.metrics.value("connections_closed", "4004") == 1
        assert (await lively.subscribe("after"))["success"] is True


# --------------------------------------------------------------------------------------------------------
# TLS


async def test_tls_round_trip_and_admin_over_https(anyio_backend: str, tmp_path: Path) -> None:
    certfile, keyfile = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certfile, keyfile)
    client_context = ssl.create_default_context(cafile=str(certfile))
    async with Server(
        "127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, admin=ADMIN, ssl_context=server_context
    ) as server:
        assert server.url.startswith("wss://")
        async with (
            await connected(server.port, ssl_context=client_context) as publisher,
            await connected(server.port, ssl_context=client_context) as subscriber,
        ):
            await subscriber.subscribe("secure")
            await publisher.request(publish_frame("secure", "over tls", "tls-1"))
            assert (await subscriber.receive())["data"] == "over tls"
        status, _, body = await http_request(server.port, "GET", "/healthz", ssl_context=client_context)
        assert status == 200 and orjson.loads(body)["status"] == "ok"
        # A plain-text client on the TLS port fails its handshake and is dropped; the server carries on.
        async with await anyio.connect_tcp("127.0.0.1", server.port) as plain:
            await plain.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with anyio.fail_after(TIMEOUT), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await plain.receive()
        async with await connected(server.port, ssl_context=client_context):
            pass


async def _wait_closed_by_server(stream: anyio.abc.ByteStream) -> None:
    with anyio.fail_after(TIMEOUT), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
        while True:
            await stream.receive()


async def test_a_tls_client_that_never_finishes_its_handshake_is_closed_by_the_cores_deadline(
    anyio_backend: str, tmp_path: Path
) -> None:
    """The core sees the connection from the accept, so its handshake deadline covers TLS too."""
    certfile, keyfile = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certfile, keyfile)
    config = ServerConfig(handshake_timeout=0.3, password_hash_cost=16)
    async with (
        Server("127.0.0.1", 0, config=config, ssl_context=server_context) as server,
        await anyio.connect_tcp("127.0.0.1", server.port) as stalled,
    ):
        await stalled.send(b"\x16\x03\x01\x00")  # the first bytes of a ClientHello, then nothing
        await _wait_closed_by_server(stalled)
        assert server.core.metrics.value("handshake_timeouts") == 1
        with anyio.fail_after(TIMEOUT):
            while server.core.connection_count:
                await anyio.sleep(0.01)


async def test_slowloris_connections_are_closed_at_the_absolute_handshake_deadline(
    anyio_backend: str,
) -> None:
    config = ServerConfig(handshake_timeout=0.5, password_hash_cost=16)
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n" + b"X-Pad: y\r\n" * 100
    async with Server("127.0.0.1", 0, config=config) as server:
        streams = [await anyio.connect_tcp("127.0.0.1", server.port) for _ in range(5)]
        closed: list[anyio.abc.ByteStream] = []

        async def trickle(stream: anyio.abc.ByteStream) -> None:
            try:
                for i in range(len(request)):  # one byte per 50 ms: never a complete request in time
                    await stream.send(request[i : i + 1])
                    await anyio.sleep(0.05)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

        async def watch(stream: anyio.abc.ByteStream) -> None:
            await _wait_closed_by_server(stream)
            closed.append(stream)

        start = anyio.current_time()
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                for stream in streams:
                    task_group.start_soon(watch, stream)
                    task_group.start_soon(trickle, stream)
                while len(closed) < len(streams):
                    await anyio.sleep(0.01)
                task_group.cancel_scope.cancel()
        assert anyio.current_time() - start < 5  # reset by every byte, they would live ~30 s
        assert server.core.metrics.value("handshake_timeouts") == len(streams)
        for stream in streams:
            await stream.aclose()


async def test_the_per_address_bound_refuses_the_next_uninitialised_connection(anyio_backend: str) -> None:
    config = ServerConfig(limits=Limits(max_uninitialised_per_address=2), password_hash_cost=16)
    async with (
        Server("127.0.0.1", 0, config=config, sessions=SESSIONS) as server,
        await anyio.connect_tcp("127.0.0.1", server.port),
        await anyio.connect_tcp("127.0.0.1", server.port),
        await anyio.connect_tcp("127.0.0.1", server.port) as refused,
    ):
        await _wait_closed_by_server(refused)
        assert server.core.metrics.value("connections_refused", "max_uninitialised_per_address") == 1
        assert server.core.connection_count == 2


async def test_password_checks_run_in_a_worker_thread_and_pipelined_frames_wait(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real_run = PasswordCheck.run

    def run(check: PasswordCheck) -> bool:
        threads.append(threading.get_ident())
        return real_run(check)

    monkeypatch.setattr(PasswordCheck, "run", run)
    async with await RawClient.connect(server.port) as client:
        await client.send_json({"type": "init", "sessionName": "alpha", "password": "alpha-password"})
        await client.send_json({"type": "subscribe", "topic": "t"})  # sent before the init is answered
        assert (await client.receive())["success"] is True
        assert await client.receive() == {"type": "subscribe_response", "success": True, "topic": "t"}
    assert threads and threading.get_ident() not in threads  # scrypt never ran on the event loop


# --------------------------------------------------------------------------------------------------------
# Slow consumers: bounded, and never blocking the publisher


async def test_a_subscriber_that_never_reads_is_dropped_and_never_blocks_the_publisher(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "CLOSE_LINGER", 0.2)
    limits = Limits(
        max_output_buffer=256 * 1024,
        max_inflight_per_subscriber=100_000,  # so that the adapter-side bound is the one that trips
        max_pending_bytes_per_session=1024 * 1024 * 1024,
    )
    config = ServerConfig(limits=limits, password_hash_cost=16, ping_interval=None)
    payload = "x" * 32 * 1024
    async with Server("127.0.0.1", 0, config=config, sessions=SESSIONS) as server:
        # A tiny receive buffer, set before connecting, keeps the kernel from absorbing megabytes for it.
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await anyio.to_thread.run_sync(raw.connect, ("127.0.0.1", server.port))
        slow = RawClient(await SocketStream.from_socket(raw))
        await slow.handshake(server.port)
        assert (await slow.init("alpha", "alpha-password"))["success"]
        await slow.subscribe("firehose")
        async with await connected(server.port) as publisher:
            for i in range(2000):  # bounded: the slow one is dropped long before (256 KiB + kernel buffers)
                with anyio.fail_after(TIMEOUT):  # each publish is confirmed promptly: never blocked
                    answer = await publisher.request(publish_frame("firehose", payload, f"f-{i}"))
                assert answer["success"] is True
                if server.core.metrics.value("output_overflows"):
                    break
            else:
                pytest.fail("the slow subscriber was never dropped")
            # Its socket is closed (after the linger); it reads a prefix of its messages, then EOF.
            await slow.wait_eof()
            await slow.aclose()
            # The publisher carries on with no subscriber left.
            answer = await publisher.request(publish_frame("firehose", "after", "after"))
            assert answer == {
                "type": "publish_response",
                "success": True,
                "messageId": "after",
                "deliveredTo": 0,
            }


async def test_a_write_blocked_past_write_timeout_drops_the_connection(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber that stops reading blocks the server's write to it (reported to the core when the
    socket does not take a write at once: the streams path's writer, a link's ``pause_writing``); past
    ``write_timeout`` the core says abort and the socket is dropped, while the publisher carries on."""
    monkeypatch.setattr(server_module, "CLOSE_LINGER", 0.2)
    limits = Limits(
        max_inflight_per_subscriber=100_000,
        max_pending_bytes_per_session=1024 * 1024 * 1024,
        max_output_buffer=64 * 1024 * 1024,  # so that the write deadline is the bound that trips
    )
    config = ServerConfig(limits=limits, password_hash_cost=16, ping_interval=None, write_timeout=0.5)
    payload = "x" * 32 * 1024
    async with Server("127.0.0.1", 0, config=config, sessions=SESSIONS) as server:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await anyio.to_thread.run_sync(raw.connect, ("127.0.0.1", server.port))
        slow = RawClient(await SocketStream.from_socket(raw))
        await slow.handshake(server.port)
        assert (await slow.init("alpha", "alpha-password"))["success"]
        await slow.subscribe("firehose")
        async with await connected(server.port) as publisher:
            for i in range(200):  # ~6 MiB: far more than the kernel's buffers take, far less than the bound
                with anyio.fail_after(TIMEOUT):
                    assert (await publisher.request(publish_frame("firehose", payload, f"w-{i}")))["success"]
            with anyio.fail_after(TIMEOUT):
                while not server.core.metrics.value("write_timeouts"):
                    await anyio.sleep(0.05)
                while len(server._connections) > 1:
                    await anyio.sleep(0.05)
            assert not server.core.metrics.value("output_overflows")
            answer = await publisher.request(publish_frame("firehose", "after", "after"))
            assert answer["deliveredTo"] == 0
        await slow.aclose()


# --------------------------------------------------------------------------------------------------------
# Graceful shutdown


async def test_shutdown_closes_clients_with_1001_and_serve_returns(anyio_backend: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as task_group:
            server: Server = await task_group.start(
                lambda task_status: serve(
                    "127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, task_status=task_status
                )
            )
            clients = [await connected(server.port) for _ in range(3)]
            await clients[0].subscribe("t")
            task_group.start_soon(server.shutdown)
            for client in clients:
                closed = await client.receive_close()  # RawClient answers the close, as clients must
                assert closed.code == 1001
                await client.wait_eof()
                await client.aclose()
        # Leaving the task group means serve() returned.
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", server.port)


async def test_shutdown_drops_clients_that_do_not_answer_within_the_timeout(anyio_backend: str) -> None:
    async with Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, shutdown_timeout=0.2) as server:
        mute = await connected(server.port)  # will not answer the close: never reads again
        start = anyio.current_time()
        with anyio.fail_after(TIMEOUT):
            await server.shutdown()
        assert anyio.current_time() - start < 3
        assert server.core.connection_count == 0
        await mute.aclose()


async def test_cancelling_serve_also_closes_gracefully(anyio_backend: str) -> None:
    serving = anyio.CancelScope()

    async def run(*, task_status: anyio.abc.TaskStatus[Server]) -> None:
        with serving:
            await serve("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, task_status=task_status)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as task_group:
            server: Server = await task_group.start(run)
            client = await connected(server.port)
            serving.cancel()
            closed = await client.receive_close()  # answered: the server finishes without waiting
            assert closed.code == 1001
            await client.wait_eof()
            await client.aclose()
    assert server.core.connection_count == 0


async def test_shutdown_twice_and_idempotent_exit(anyio_backend: str) -> None:
    async with Server("127.0.0.1", 0, config=FAST_CONFIG, shutdown_timeout=0.5) as server:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(server.shutdown)
            task_group.start_soon(server.shutdown, 0.0)
        await server.shutdown()
