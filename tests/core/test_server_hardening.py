"""The server core's timers, connection bounds, internal-error containment and subscriber lifecycle, in
memory on a fake clock: the handshake deadline is absolute from accept, the per-address bound on
connections without a successful init, write deadlines, the shutdown grace period, a bug in any entry
point costs one connection, and a clean close releases a non-persistent subscriber."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import fastport_core.broker as broker_module
from fastport_core.accounting import message_size
from fastport_core.config import Limits, ServerConfig, SessionSettings
from fastport_core.errors import CloseCode
from fastport_core.frames import Opcode, encode_close_payload, encode_frame
from fastport_core.handshake import ClientHandshake
from fastport_core.protocol import Publish
from fastport_core.server import LAST_WRITE_TIMEOUT, ServerCore
from fastport_core.websocket import WebSocket

from .test_server import make_core, ready
from .wire import RawPeer, http_request


def explode(*_: object, **__: object) -> None:
    raise RuntimeError("injected bug")


def fail_for(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    """Make ``target.name()`` raise, for that one object only (its class has ``__slots__``)."""
    cls = type(target)
    real = getattr(cls, name)

    def method(self: object, *args: Any, **kwargs: Any) -> Any:
        if self is target:
            raise RuntimeError("injected bug")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, method)


# -- the handshake deadline ---------------------------------------------------------------------------------


def test_a_slowloris_sending_one_byte_per_half_second_is_closed_at_the_absolute_deadline() -> None:
    core = make_core(handshake_timeout=10.0)
    conns = [core.open_connection(0.0, f"10.0.0.{i}") for i in range(5)]
    request = ClientHandshake("localhost", "/").request
    now = 0.0
    for i in range(len(request)):
        now = 0.5 * (i + 1)
        if now >= 10.0:
            break
        for conn in conns:
            core.receive_data(conn, request[i : i + 1], now)
        deadline = core.next_deadline()
        assert deadline == 10.0  # bytes of an unfinished request never move it
        assert not any(core.should_close(conn) for conn in conns)
    core.handle_timeout(10.0)
    assert all(core.should_close(conn) for conn in conns)
    assert core.metrics.value("handshake_timeouts") == len(conns)


def test_the_deadline_covers_the_upgrade_and_the_init_together() -> None:
    core = make_core(handshake_timeout=10.0, ping_interval=None)
    peer = RawPeer(core, now=0.0)  # accepted and upgraded at 0 ...
    peer.send({"type": "subscribe", "topic": "t"}, now=9.0)  # ... busy, but never a successful init
    core.handle_timeout(9.99)
    assert not core.should_close(peer.conn)
    core.handle_timeout(10.0)
    peer.pump(10.0)
    assert peer.ws.close_code == CloseCode.HANDSHAKE_TIMEOUT


def test_a_late_upgrade_does_not_restart_the_deadline() -> None:
    core = make_core(handshake_timeout=10.0, ping_interval=None)
    conn = core.open_connection(0.0, "10.0.0.1")  # the accept; TLS would run here
    handshake = ClientHandshake("localhost", "/")
    core.receive_data(conn, handshake.request, 8.0)
    assert handshake.receive_data(core.data_to_send(conn)) is not None
    core.handle_timeout(10.0)
    assert not core.should_close(conn)  # CLOSING: the 4005 Close frame is queued
    ws = WebSocket(client=True, max_message_size=1 << 20, now=10.0, ping_interval=None)
    ws.receive_data(core.data_to_send(conn), 10.0)
    assert ws.close_code == CloseCode.HANDSHAKE_TIMEOUT


def test_a_successful_init_ends_the_deadline() -> None:
    core = make_core(handshake_timeout=10.0, ping_interval=None)
    peer = ready(core)
    core.handle_timeout(100.0)
    assert not core.should_close(peer.conn)


def test_an_idle_keep_alive_admin_connection_gets_a_fresh_window_per_answered_request() -> None:
    core = make_core(handshake_timeout=10.0)
    conn = core.open_connection(0.0)
    core.receive_data(conn, http_request("GET", "/healthz"), 8.0)
    assert core.data_to_send(conn).startswith(b"HTTP/1.1 200")
    core.handle_timeout(17.9)
    assert not core.should_close(conn)
    core.handle_timeout(18.0)
    assert core.should_close(conn)


# -- connections without a successful init, per address -----------------------------------------------------


def test_the_per_address_bound_refuses_the_next_uninitialised_connection() -> None:
    core = make_core(limits=Limits(max_uninitialised_per_address=3))
    held = [core.open_connection(0.0, "10.0.0.1") for _ in range(3)]
    refused = core.open_connection(0.0, "10.0.0.1")
    assert core.should_close(refused) and core.data_to_send(refused) == b""
    assert not any(core.should_close(conn) for conn in held)
    assert core.metrics.value("connections_refused", "max_uninitialised_per_address") == 1
    assert not core.should_close(core.open_connection(0.0, "10.0.0.2"))  # another address is not affected
    core.connection_lost(held[0], 0.0)  # a slot comes free when one goes away ...
    assert not core.should_close(core.open_connection(0.0, "10.0.0.1"))
    assert core.should_close(core.open_connection(0.0, "10.0.0.1"))


def test_ipv6_counts_per_64_and_a_trusted_proxy_is_exempt() -> None:
    core = make_core(limits=Limits(max_uninitialised_per_address=2), trusted_proxies=("10.0.0.99",))
    assert not core.should_close(core.open_connection(0.0, "2001:db8::1"))
    assert not core.should_close(core.open_connection(0.0, "2001:db8::2"))
    assert core.should_close(core.open_connection(0.0, "2001:db8::ffff"))  # the same /64
    assert not core.should_close(core.open_connection(0.0, "2001:db8:0:1::1"))  # the next /64
    # A proxy carries many clients: its connections are never refused by the per-address bound.
    assert not any(core.should_close(core.open_connection(0.0, "10.0.0.99")) for _ in range(5))


def test_a_successful_init_frees_its_slot_and_an_upgrade_alone_does_not() -> None:
    core = make_core(limits=Limits(max_uninitialised_per_address=2))
    upgraded = RawPeer(core, peer="10.0.0.1")
    initialised = ready(core)  # RawPeer's address is 127.0.0.1
    assert initialised
    assert core.should_close(core.open_connection(0.0, "127.0.0.1")) is False
    assert core.should_close(core.open_connection(0.0, "10.0.0.1")) is False
    assert core.should_close(core.open_connection(0.0, "10.0.0.1"))  # the upgraded one still counts
    upgraded.init("demo", "pw")
    assert not core.should_close(core.open_connection(0.0, "10.0.0.1"))


# -- write deadlines and the shutdown grace period ------------------------------------------------------------


def test_a_write_blocked_past_write_timeout_is_aborted() -> None:
    core = make_core(write_timeout=30.0, ping_interval=None)
    stuck, fine = ready(core), ready(core)
    core.write_blocked(stuck.conn, 1.0)
    core.write_blocked(fine.conn, 1.0)
    core.write_blocked(stuck.conn, 20.0)  # still the same write: the deadline does not move
    core.write_completed(fine.conn, 5.0)
    assert core.next_deadline() == 31.0
    core.take_dirty()
    core.handle_timeout(31.0)
    assert core.should_abort(stuck.conn) and core.should_close(stuck.conn)
    assert core.take_dirty() == [stuck.conn]
    assert core.data_to_send(stuck.conn) == b""  # nothing more is sent
    assert not core.should_abort(fine.conn)
    assert core.metrics.value("write_timeouts") == 1
    core.connection_lost(stuck.conn, 31.0)
    assert core.metrics.value("connections_closed", str(int(CloseCode.SLOW_CONSUMER))) == 1


def test_the_last_write_of_a_finished_connection_gets_a_short_deadline() -> None:
    core = make_core(write_timeout=30.0, ping_interval=None)
    peer = ready(core)
    core.write_blocked(peer.conn, 1.0)
    peer.send_frame(Opcode.CLOSE, encode_close_payload(1000, "bye"), now=2.0)  # CLOSED: only our echo left
    assert core.should_close(peer.conn) and not core.should_abort(peer.conn)
    assert core.next_deadline() == 2.0 + LAST_WRITE_TIMEOUT
    core.handle_timeout(2.0 + LAST_WRITE_TIMEOUT)
    assert core.should_abort(peer.conn)


def test_shutdown_aborts_what_is_left_after_the_grace_period_and_refuses_new_connections() -> None:
    core = make_core(ping_interval=None)
    silent = ready(core)  # never answers the 1001
    core.shutdown(1.0, grace=10.0)
    core.shutdown(2.0, grace=100.0)  # a second call can only shorten it
    assert not core.should_close(silent.conn)
    assert core.should_close(core.open_connection(3.0, "10.0.0.1"))
    core.handle_timeout(6.0)  # the WebSocket's own close timeout (5 s) gives up first here ...
    assert core.should_close(silent.conn) and not core.should_abort(silent.conn)
    core.handle_timeout(11.0)  # ... and the grace period aborts whatever is still there
    assert core.should_abort(silent.conn)
    assert core.should_close(core.open_connection(12.0, "10.0.0.1"))  # still refusing


def test_shutdown_grace_shorter_than_the_close_timeout_aborts_at_once() -> None:
    core = make_core(ping_interval=None)
    silent = ready(core)
    core.shutdown(1.0, grace=0.5)
    core.handle_timeout(1.5)
    assert core.should_abort(silent.conn)


# -- internal errors are contained everywhere ----------------------------------------------------------------


def _assert_still_serving(core: ServerCore, *peers: RawPeer) -> None:
    """Every peer can still publish to every other one: the server survived."""
    for peer in peers:
        peer.send({"type": "subscribe", "topic": "alive"})
        assert peer.pump()[-1]["success"] is True
    peers[0].publish("alive", "check")
    assert peers[0].pump()[-1]["deliveredTo"] == len(peers) - 1
    for peer in peers[1:]:
        assert peer.pump()[-1]["messageId"] == "check"


@pytest.mark.patches_core
def test_a_bug_in_one_connections_timer_closes_only_it_with_1011(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    core = make_core(ping_interval=10.0, ping_timeout=10.0)
    victim, a, b = ready(core), ready(core), ready(core)
    victim_ws = core._connections[victim.conn].ws  # the fault is injected into one object only
    assert victim_ws is not None
    fail_for(monkeypatch, victim_ws, "handle_timeout")
    with caplog.at_level(logging.ERROR):
        core.handle_timeout(10.0)
    victim.pump(10.0)
    assert victim.ws.close_code == CloseCode.INTERNAL_ERROR
    assert core.metrics.value("internal_errors") == 1
    assert "injected bug" in caplog.text  # logged with its traceback
    a.pump(10.0), b.pump(10.0)  # their pings
    _assert_still_serving(core, a, b)


@pytest.mark.patches_core
def test_a_bug_in_connection_lost_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    core = make_core()
    gone, a, b = ready(core), ready(core), ready(core)
    monkeypatch.setattr(core.broker, "connection_closed", explode)
    core.connection_lost(gone.conn, 1.0)  # must not raise
    assert core.metrics.value("internal_errors") == 1
    assert core.connection_count == 2
    monkeypatch.undo()
    _assert_still_serving(core, a, b)


@pytest.mark.patches_core
def test_a_bug_while_shutting_one_connection_down_still_closes_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = make_core()
    broken, a, b = ready(core), ready(core), ready(core)
    broken_ws = core._connections[broken.conn].ws
    assert broken_ws is not None
    real_close = WebSocket.close
    calls: list[int] = []

    def close(self: WebSocket, code: int, reason: str, now: float) -> None:
        if self is broken_ws and not calls:
            calls.append(code)
            raise RuntimeError("injected bug")
        real_close(self, code, reason, now)

    monkeypatch.setattr(WebSocket, "close", close)
    core.shutdown(1.0)
    for peer in (a, b):
        peer.pump(1.0)
        assert peer.ws.close_code == CloseCode.GOING_AWAY
    broken.pump(1.0)
    assert broken.ws.close_code == CloseCode.INTERNAL_ERROR  # contained: closed with 1011 instead
    assert core.metrics.value("internal_errors") == 1


@pytest.mark.patches_core
def test_a_bug_in_one_sessions_timers_leaves_the_others_running(monkeypatch: pytest.MonkeyPatch) -> None:
    core = make_core(ping_interval=None, default_session_settings=SessionSettings(retry_interval=1.0))
    for session in ("demo", "other"):
        password = "pw" if session == "demo" else "pw2"
        sub, publisher = ready(core, session, password), ready(core, session, password)
        sub.send({"type": "subscribe", "topic": "t"})
        sub.pump()
        publisher.publish("t", "m1")
        publisher.pump()
        sub.pump()
        if session == "other":
            other_sub = sub
    demo = core.broker._sessions["demo"]
    fail_for(monkeypatch, demo, "run_timers")
    core.handle_timeout(1.0)
    assert core.metrics.value("internal_errors") == 1
    assert [m.get("retry") for m in other_sub.pump(1.0)] == [1]  # the other session's retry went out
    deadline = core.next_deadline()
    assert deadline is not None and deadline > 1.0  # no busy loop on the broken session
    monkeypatch.undo()
    core.handle_timeout(2.0)
    assert core.metrics.value("internal_errors") == 1


@pytest.mark.patches_core
def test_a_fan_out_that_fails_half_way_leaves_consistent_state(monkeypatch: pytest.MonkeyPatch) -> None:
    core = make_core(ping_interval=None, default_session_settings=SessionSettings(message_expiry_time=50.0))
    subs = [ready(core) for _ in range(3)]
    for sub in subs:
        sub.send({"type": "subscribe", "topic": "t"})
        sub.pump()
    publisher = ready(core)
    real = broker_module._Delivery
    made: list[Any] = []

    def second_one_fails(*args: Any) -> Any:
        made.append(args)
        if len(made) == 2:
            raise RuntimeError("injected bug")
        return real(*args)

    monkeypatch.setattr(broker_module, "_Delivery", second_one_fails)
    publisher.publish("t", "m1")
    monkeypatch.undo()
    publisher.pump()
    assert publisher.ws.close_code == CloseCode.INTERNAL_ERROR  # the input that hit the bug pays
    received = [[m["messageId"] for m in sub.pump() if m["type"] == "message"] for sub in subs]
    assert received == [["m1"], [], []]  # what was recorded was sent; nothing else
    stats = core.stats().per_session["demo"]
    charged = message_size(Publish("t", "payload", "h", 1, "m1"))
    assert (stats.stored_messages, stats.inflight_deliveries, stats.pending_bytes) == (1, 1, charged)
    subs[0].send({"type": "ack", "topic": "t", "messageId": "m1"})
    stats = core.stats().per_session["demo"]
    assert (stats.stored_messages, stats.inflight_deliveries, stats.pending_bytes) == (0, 0, 0)
    again = ready(core)
    again.publish("t", "m2")
    assert again.pump()[-1]["deliveredTo"] == 3
    core.handle_timeout(100.0)  # expiry terminates and frees everything
    stats = core.stats().per_session["demo"]
    assert (stats.stored_messages, stats.inflight_deliveries, stats.pending_bytes) == (0, 0, 0)


# -- subscriber lifecycle at the server core: what counts as a clean close --------------------------------


def _subscribed(core: ServerCore, **init: Any) -> RawPeer:
    peer = ready(core, clientId="dev", **init)
    peer.send({"type": "subscribe", "topic": "t"})
    peer.pump()
    return peer


def test_the_peers_close_frame_releases_a_non_persistent_subscriber() -> None:
    core = make_core(ping_interval=None)
    sub, publisher = _subscribed(core), ready(core)
    publisher.publish("t", "m1")
    sub.ws.close(1000, "bye", 0.0)
    sub.send_raw(sub.ws.data_to_send())
    assert core.stats().per_session["demo"].subscribers == 1  # only the publisher
    assert core.metrics.value("deliveries_given_up", "demo", "released") == 1


@pytest.mark.parametrize("how", ["eof", "keepalive", "server_close"])
def test_a_connection_lost_without_the_peers_close_frame_keeps_the_subscriber(how: str) -> None:
    core = make_core(ping_interval=5.0, ping_timeout=5.0)
    sub, publisher = _subscribed(core), ready(core)
    publisher.publish("t", "m1")
    if how == "eof":
        sub.send_raw(b"", now=1.0)
    elif how == "keepalive":
        publisher.send({"type": "ack", "topic": "t", "messageId": "none"}, now=9.0)  # keeps it alive
        core.handle_timeout(5.0)
        core.handle_timeout(10.0)
    else:
        core.shutdown(1.0)
        sub.pump(1.0)  # the peer answers our 1001: still not its decision to leave
    core.connection_lost(sub.conn, 11.0)
    assert core.stats().per_session["demo"].detached_subscribers == 1


def test_a_persistent_subscriber_is_kept_across_the_peers_close_frame() -> None:
    core = make_core(ping_interval=None)
    sub, publisher = _subscribed(core, persistent=True), ready(core)
    sub.ws.close(1000, "bye", 0.0)
    sub.send_raw(sub.ws.data_to_send())
    publisher.publish("t", "m1")
    assert publisher.pump()[-1]["deliveredTo"] == 1
    again = RawPeer(core)
    again.init("demo", "pw", clientId="dev")
    assert [m["messageId"] for m in again.received if m["type"] == "message"] == ["m1"]


def test_a_close_frame_is_what_the_wire_sees_as_clean() -> None:
    """A Close frame with no code at all is still the peer's Close."""
    core = make_core(ping_interval=None)
    sub = _subscribed(core)
    sub.send_raw(encode_frame(Opcode.CLOSE, b"", mask=True))
    assert core.stats().per_session["demo"].subscribers == 0


# -- password checks off the core's thread (offload_verification) -------------------------------------------


def offloading_core(**config: Any) -> ServerCore:
    config.setdefault("password_hash_cost", 2)
    config.setdefault("ping_interval", None)
    core = ServerCore(ServerConfig(**config), offload_verification=True)
    core.create_session("demo", "pw", 0.0)
    return core


def test_an_init_waits_for_its_password_check_and_frames_sent_meanwhile_wait_in_order() -> None:
    core = offloading_core()
    peer = RawPeer(core)
    peer.send({"type": "init", "sessionName": "demo", "password": "pw"})
    peer.send({"type": "subscribe", "topic": "t"})  # pipelined behind the init, as old clients do
    assert peer.pump() == []  # nothing answered yet: the check runs elsewhere
    (check,) = core.take_verifications()
    assert core.take_verifications() == []  # each check is handed out once
    core.verification_done(check, check.run(), 1.0)
    assert [f["type"] for f in peer.pump(1.0)] == ["init_response", "subscribe_response"]
    assert peer.received[0]["success"] is True
    again = RawPeer(core)  # the same password again: the verified-password cache answers inline
    assert again.init("demo", "pw")["success"] is True
    assert core.take_verifications() == []


def test_a_failed_check_refuses_the_init_and_the_held_frames_see_no_session() -> None:
    core = offloading_core(auth_failure_budget=0)  # the first failure already delays the address
    peer = RawPeer(core, peer="10.0.0.9")
    peer.send({"type": "init", "sessionName": "demo", "password": "wrong"})
    peer.send({"type": "subscribe", "topic": "t"})
    (check,) = core.take_verifications()
    assert check.run() is False
    core.verification_done(check, False, 1.0)
    answers = peer.pump(1.0)
    assert [(f["type"], f.get("code")) for f in answers] == [
        ("init_response", "auth_failed"),
        ("error", "not_initialised"),
    ]
    throttled = RawPeer(core, peer="10.0.0.9")  # the failure was recorded for the address
    assert throttled.init("demo", "pw")["code"] == "auth_throttled"


def test_an_unknown_session_pays_a_check_too_and_fails_whatever_the_adapter_says() -> None:
    core = offloading_core()
    peer = RawPeer(core)
    peer.send({"type": "init", "sessionName": "nope", "password": "pw"})
    (check,) = core.take_verifications()
    core.verification_done(check, True, 1.0)
    assert peer.pump(1.0)[0]["code"] == "auth_failed"


def test_queued_checks_are_bounded_with_a_transient_refusal() -> None:
    core = offloading_core(limits=Limits(max_pending_verifications=2))
    peers = [RawPeer(core) for _ in range(3)]
    for peer in peers:
        peer.send({"type": "init", "sessionName": "demo", "password": "pw"})
    assert peers[2].pump()[0]["code"] == "server_busy"
    first, second = core.take_verifications()
    core.verification_done(first, True, 1.0)
    assert peers[0].pump(1.0)[0]["success"] is True
    late = RawPeer(core)
    late.send({"type": "init", "sessionName": "demo", "password": "other-wrong"})
    assert [c.conn for c in core.take_verifications()] == [late.conn]  # a slot came free
    core.verification_done(second, True, 1.0)


def test_a_connection_gone_during_its_check_is_forgotten() -> None:
    core = offloading_core(limits=Limits(max_pending_verifications=1))
    peer = RawPeer(core)
    peer.send({"type": "init", "sessionName": "demo", "password": "pw"})
    (check,) = core.take_verifications()
    core.connection_lost(peer.conn, 0.5)
    core.verification_done(check, True, 1.0)  # ignored, but its slot is free again
    again = RawPeer(core)
    again.send({"type": "init", "sessionName": "demo", "password": "pw"})
    assert again.pump() == []  # not refused with server_busy: queued
    assert [c.conn for c in core.take_verifications()] == [again.conn]


def test_frames_held_during_a_check_are_bounded() -> None:
    core = offloading_core(limits=Limits(max_message_size=1000))
    peer = RawPeer(core)
    peer.send({"type": "init", "sessionName": "demo", "password": "pw"})
    for i in range(20):
        peer.send({"type": "subscribe", "topic": f"t{i}" * 10})
    peer.pump()
    assert peer.ws.close_code == CloseCode.POLICY_VIOLATION
