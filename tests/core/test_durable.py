"""The durable broker in memory (issue 9): the core journals, holds confirmations until a commit, restores.

A "restart" here is a new :class:`ServerCore` restored from a :class:`ModelStore` that holds exactly the
batches committed so far: the process died right after its last commit (``kill -9``), whatever was
journalled or in a commit that had not returned is lost, as it would be.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from fastport_core.config import Limits, ServerConfig, SessionSettings
from fastport_core.errors import CloseCode
from fastport_core.server import ServerCore
from tests.store_model import ModelStore

from .test_server import ADMIN
from .wire import RawPeer, basic_auth, http_request

EPOCH = 1_800_000_000.0
"""The wall clock at ``now == 0`` (records hold wall-clock times)."""


def durable_core(store: ModelStore | None = None, now: float = 0.0, **config: Any) -> ServerCore:
    """A durable core, restored from ``store`` when given, with session "demo" (configured, like the CLI)."""
    config.setdefault("password_hash_cost", 2)
    core = ServerCore(ServerConfig(**config), admin_credentials=ADMIN, durable=True)
    core.set_wall_clock(EPOCH + now, now)
    if store is not None:
        core.restore(store.load(), now)
    core.broker.configure_session("demo", "pw", now, SessionSettings(retry_interval=5.0))
    return core


def commit(core: ServerCore, store: ModelStore, now: float = 0.0) -> None:
    """What the adapter's writer does: take every pending batch, commit them together, report; then read
    the backlog pages the core asked for; again until the core wants nothing more."""
    while core.store_work():
        requests = core.take_backlog_requests()
        batches = []
        while (batch := core.take_store_batch()) is not None:
            batches.append(batch)
        if batches:
            store.commit(batches)
            core.store_committed(batches[-1].seq, now)
        for request in requests:
            core.backlog_loaded(request, store.load_backlog(*request), now)


def peer(core: ServerCore, now: float = 0.0, **init: Any) -> RawPeer:
    p = RawPeer(core, now)
    p.init("demo", "pw", now, **init)
    assert of_type(p.received, "init_response")[0]["success"] is True
    return p


def resumed(core: ServerCore, store: ModelStore, now: float = 0.0) -> RawPeer:
    """The subscriber "dev" resumes; its stored backlog is read back (the writer's work) and sent."""
    p = peer(core, now, clientId="dev")
    commit(core, store, now)
    p.pump(now)
    return p


def subscribed(core: ServerCore, topic: str = "t", now: float = 0.0, **init: Any) -> RawPeer:
    p = peer(core, now, **init)
    p.send({"type": "subscribe", "topic": topic}, now)
    assert p.pump(now)[-1]["success"] is True
    return p


def of_type(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == kind]


def ack(p: RawPeer, message: dict[str, Any], now: float = 0.0) -> None:
    p.send({"type": "ack", "topic": message["topic"], "messageId": message["messageId"]}, now)


# -- confirmations wait for the commit ---------------------------------------------------------------------


def test_a_publish_is_confirmed_only_once_its_batch_is_committed() -> None:
    store = ModelStore()
    core = durable_core()
    commit(core, store)
    sub = subscribed(core, clientId="dev")
    pub = peer(core)
    pub.publish("t", "m1")
    assert of_type(sub.pump(), "message")[0]["messageId"] == "m1"  # delivery does not wait
    assert of_type(pub.pump(), "publish_response") == []
    commit(core, store)
    (response,) = of_type(pub.pump(), "publish_response")
    assert response == {"type": "publish_response", "success": True, "messageId": "m1", "deliveredTo": 1}
    assert store.message_ids == {"m1"}


def test_a_publish_acked_before_the_commit_never_reaches_the_store_but_its_dedupe_entry_does() -> None:
    store = ModelStore()
    core = durable_core()
    sub = subscribed(core, clientId="dev")
    commit(core, store)
    pub = peer(core)
    pub.publish("t", "m1")
    ack(sub, of_type(sub.pump(), "message")[0])
    batch = core.take_store_batch()
    assert batch is not None
    assert (batch.messages, batch.deliveries, batch.deliveries_dropped) == ([], [], [])
    assert [p.message_id for p in batch.publishes] == ["m1"]
    store.commit([batch])
    core.store_committed(batch.seq, 0.0)
    kinds = [f["type"] for f in pub.pump()]
    assert kinds == ["publish_response", "ack_received"]  # in that order, both after the commit


def test_a_batch_is_due_once_the_deliveries_it_would_write_are_acked_or_the_delay_has_passed() -> None:
    store = ModelStore()
    core = durable_core(group_commit_delay=0.5)
    sub = subscribed(core, clientId="dev")
    plain = subscribed(core, topic="plain")  # no clientId: nothing of its deliveries is ever written
    commit(core, store)
    assert core.store_due() is None  # nothing journalled
    pub = peer(core)
    pub.publish("t", "m1", now=10.0)
    pub.publish("t", "m2", now=10.25)
    assert core.store_due() == 10.5  # the oldest publish + the delay: ACKs are on their way
    first, second = of_type(sub.pump(), "message")
    ack(sub, first, now=10.3)
    assert core.store_due() == 10.5  # m2 still awaits its ACK
    ack(sub, second, now=10.3)
    assert core.store_due() == 10.0  # nothing left to spare: due already
    commit(core, store)
    assert core.store_due() is None and store.message_ids == set()
    pub.publish("plain", "m3", now=11.0)
    assert of_type(plain.pump(), "message")[0]["messageId"] == "m3"
    assert core.store_due() == 11.0  # only a non-resumable subscriber: nothing to wait for


def test_the_due_batch_is_a_deadline_until_the_writer_is_told_then_until_it_takes_the_batch() -> None:
    store = ModelStore()
    core = durable_core(group_commit_delay=0.5, ping_interval=None)
    sub = subscribed(core, clientId="dev")
    commit(core, store)
    assert not core.store_ready(5.0) and core.next_deadline() is None
    peer(core).publish("t", "m1", now=10.0)
    assert not core.store_ready(10.1)
    assert core.next_deadline() == 10.5  # the adapter's timer wakes it then
    core.handle_timeout(10.5)
    assert core.store_ready(10.5)
    # Told: the deadline is gone (a writer busy with a page must not make the timer spin), and it stays
    # ready until the batch is taken, even if an ACK meanwhile made it due earlier.
    assert core.next_deadline() == 15.0  # only the delivery's first retry (retry_interval 5 s)
    ack(sub, of_type(sub.pump(), "message")[0], now=10.6)
    assert core.store_ready(10.6)
    batch = core.take_store_batch()
    assert batch is not None and not core.store_ready(10.6) and core.store_due() is None
    store.commit([batch])
    core.store_committed(batch.seq, 10.7)


def test_changes_made_during_a_commit_wait_the_delay_after_it_and_others_are_due_at_once() -> None:
    store = ModelStore()
    core = durable_core(group_commit_delay=0.5, ping_interval=None)
    sub = subscribed(core, clientId="dev")
    commit(core, store)
    peer(core).publish("t", "m1", now=1.0)
    (message,) = of_type(sub.pump(), "message")
    batch = core.take_store_batch()  # the commit starts before the ACK: the delivery is written
    assert batch is not None
    ack(sub, message, now=1.1)  # journalled while the commit runs: no publish to confirm
    assert core.store_due() is None  # waits for the commit in progress
    store.commit([batch])
    core.store_committed(batch.seq, 1.2)
    assert core.store_due() == 1.7 and not core.store_ready(1.6)  # then the delay, to gather more
    assert core.store_ready(1.7)
    commit(core, store, now=1.7)
    assert store.message_ids == set()
    sub.send({"type": "subscribe", "topic": "other"}, 5.0)  # a change while no commit runs: due at once
    assert core.store_due() == -math.inf and core.store_ready(5.0)


def test_a_delivery_written_by_an_earlier_batch_is_not_waited_for_again() -> None:
    store = ModelStore()
    core = durable_core(group_commit_delay=0.5)
    sub = subscribed(core, clientId="dev")
    commit(core, store)
    pub = peer(core)
    pub.publish("t", "m1", now=1.0)
    commit(core, store, now=1.0)  # written: an ACK now deletes it, it spares nothing
    (message,) = of_type(sub.pump(), "message")
    pub.publish("t", "m2", now=2.0)
    ack(sub, of_type(sub.pump(), "message")[0], now=2.0)
    assert core.store_due() == 2.0
    ack(sub, message, now=2.0)
    commit(core, store, now=2.0)
    assert store.message_ids == set()


def test_a_duplicate_publish_is_confirmed_after_the_original_is_durable() -> None:
    store = ModelStore()
    core = durable_core()
    subscribed(core, clientId="dev")
    commit(core, store)
    pub = peer(core)
    pub.publish("t", "m1")
    pub.publish("t", "m1")  # the client retried before hearing back
    assert of_type(pub.pump(), "publish_response") == []
    commit(core, store)
    assert [r["deliveredTo"] for r in of_type(pub.pump(), "publish_response")] == [1, 1]


def test_a_refused_publish_is_answered_at_once() -> None:
    core = durable_core()
    pub = peer(core)
    pub.publish("t/+", "m1")
    (response,) = of_type(pub.pump(), "publish_response")
    assert response["success"] is False and response["code"] == "invalid_topic"


def test_an_admin_answer_that_changed_a_session_waits_for_the_commit() -> None:
    store = ModelStore()
    core = durable_core()
    commit(core, store)
    conn = core.open_connection(0.0)
    auth = (("Authorization", basic_auth("admin", "secret")),)
    body = orjson.dumps({"sessionName": "fleet", "password": "p"})
    core.receive_data(conn, http_request("POST", "/api/createSession", body, auth), 0.0)
    assert core.data_to_send(conn) == b""
    assert not core.should_close(conn)
    commit(core, store)
    assert core.data_to_send(conn).startswith(b"HTTP/1.1 200")
    assert "fleet" in store.sessions
    core.receive_data(conn, http_request("GET", "/healthz"), 0.0)  # changed nothing: answered at once
    assert core.data_to_send(conn).startswith(b"HTTP/1.1 200")


def test_a_failed_commit_refuses_publishes_with_store_unavailable_until_a_commit_works() -> None:
    store = ModelStore()
    core = durable_core()
    sub = subscribed(core, clientId="dev")
    commit(core, store)
    pub = peer(core)
    pub.publish("t", "m1")
    batch = core.take_store_batch()
    assert batch is not None
    store.fail = True
    try:
        store.commit([batch])
    except OSError:
        core.store_failed(0.0)
    pub.publish("t", "m2")
    (refused,) = of_type(pub.pump(), "publish_response")
    assert refused["messageId"] == "m2" and refused["code"] == "store_unavailable"
    store.fail = False
    store.commit([batch])  # the writer retries the same batch
    core.store_committed(batch.seq, 0.0)
    assert [r["messageId"] for r in of_type(pub.pump(), "publish_response")] == ["m1"]
    pub.publish("t", "m2")
    commit(core, store)
    assert of_type(pub.pump(), "publish_response")[-1]["success"] is True
    assert [m["messageId"] for m in of_type(sub.pump(), "message")] == ["m1", "m2"]


# -- restart -----------------------------------------------------------------------------------------------


def test_a_resumable_subscriber_gets_every_confirmed_message_after_a_restart() -> None:
    store = ModelStore()
    core = durable_core()
    subscribed(core, clientId="dev")
    pub = peer(core)
    for i in range(5):
        pub.publish("t", f"m{i}")
    commit(core, store)
    assert len(of_type(pub.pump(), "publish_response")) == 5
    pub.publish("t", "lost")  # journalled, never committed: the process dies now
    del core

    core = durable_core(store, now=100.0)
    again = resumed(core, store, 100.0)
    messages = of_type(again.received, "message")
    assert [m["messageId"] for m in messages] == [f"m{i}" for i in range(5)]
    for message in messages:
        ack(again, message, 100.0)
    commit(core, store, 100.0)
    assert store.messages == {} and store.deliveries == {}


def test_the_subscription_survives_so_new_publishes_after_a_restart_reach_the_subscriber() -> None:
    store = ModelStore()
    core = durable_core()
    sub = subscribed(core, "sensors/+", clientId="dev", persistent=True)
    sub.ws.close(CloseCode.NORMAL, "bye", 0.0)
    sub.send_raw(sub.ws.data_to_send())
    commit(core, store)
    core = durable_core(store)
    peer(core).publish("sensors/1", "m1")
    commit(core, store)
    assert ("demo", "m1", "dev") in store.deliveries
    again = resumed(core, store)
    assert [m["messageId"] for m in of_type(again.received, "message")] == ["m1"]


def test_an_acked_delivery_does_not_come_back_after_a_restart() -> None:
    store = ModelStore()
    core = durable_core()
    sub = subscribed(core, clientId="dev")
    pub = peer(core)
    pub.publish("t", "m1")
    pub.publish("t", "m2")
    commit(core, store)
    first, _second = of_type(sub.pump(), "message")
    ack(sub, first)
    commit(core, store)
    core = durable_core(store, now=1.0)
    again = resumed(core, store, 1.0)
    assert [m["messageId"] for m in of_type(again.received, "message")] == ["m2"]


def test_retry_counts_survive_a_restart() -> None:
    store = ModelStore()
    core = durable_core()
    sub = subscribed(core, clientId="dev")
    peer(core).publish("t", "m1")
    for now in (5.0, 10.0):
        core.handle_timeout(now)
    assert [m.get("retry") for m in of_type(sub.pump(10.0), "message")] == [None, 1, 2]
    commit(core, store, 10.0)
    core = durable_core(store, now=20.0)
    again = resumed(core, store, 20.0)
    assert [m.get("retry") for m in of_type(again.received, "message")] == [2]


def test_a_republish_after_a_restart_is_deduplicated() -> None:
    store = ModelStore()
    core = durable_core()
    subscribed(core, clientId="dev")
    peer(core).publish("t", "m1")
    commit(core, store)
    core = durable_core(store, now=1.0)
    pub = peer(core, 1.0)
    pub.publish("t", "m1", now=1.0)
    commit(core, store, 1.0)
    (response,) = of_type(pub.pump(1.0), "publish_response")
    assert response["deliveredTo"] == 1
    assert core.metrics.value("publish_duplicates", "demo") == 1


def test_expiry_continues_across_a_restart_on_the_wall_clock() -> None:
    store = ModelStore()
    core = durable_core()
    core.broker.configure_session("demo", "pw", 0.0, SessionSettings(message_expiry_time=60.0))
    subscribed(core, clientId="dev")
    peer(core).publish("t", "m1")
    commit(core, store)
    # The server was down for 100 s; its monotonic clock starts again from 0.
    core = ServerCore(ServerConfig(password_hash_cost=2), durable=True)
    core.set_wall_clock(EPOCH + 100.0, 0.0)
    core.restore(store.load(), 0.0)
    core.broker.configure_session("demo", "pw", 0.0, SessionSettings(message_expiry_time=60.0))
    again = resumed(core, store)
    assert of_type(again.received, "message") == []  # read back expired: given up, never sent
    assert core.metrics.value("deliveries_given_up", "demo", "expired") == 1
    commit(core, store)
    assert store.messages == {}


def test_sessions_created_dropped_and_suspended_through_the_admin_api_survive() -> None:
    store = ModelStore()
    core = durable_core()
    secret = core.broker.create_session("fleet", "pw-fleet", 0.0)
    doomed = core.broker.create_session("doomed", "pw", 0.0)
    core.broker.suspend_session("fleet", "pw-fleet", secret, True, 0.0)
    commit(core, store)
    core.broker.drop_session("doomed", "pw", doomed, 0.0)
    commit(core, store)
    core = durable_core(store, now=1.0)
    assert core.session_names() == ["demo", "fleet"]
    refused = RawPeer(core, 1.0).init("fleet", "pw-fleet", 1.0)
    assert refused["code"] == "session_suspended"
    core.broker.suspend_session("fleet", "pw-fleet", secret, False, 1.0)  # the secret key still works
    assert RawPeer(core, 1.0).init("fleet", "pw-fleet", 1.0)["success"] is True
    assert RawPeer(core, 1.0).init("fleet", "wrong", 1.0)["success"] is False


def test_the_config_file_decides_the_password_of_a_restored_session() -> None:
    store = ModelStore()
    core = durable_core()
    commit(core, store)
    core = ServerCore(ServerConfig(password_hash_cost=2), durable=True)
    core.restore(store.load(), 0.0)
    core.broker.configure_session("demo", "new-pw", 0.0)
    assert RawPeer(core).init("demo", "pw")["success"] is False
    assert RawPeer(core).init("demo", "new-pw")["success"] is True
    commit(core, store)
    assert store.sessions["demo"].password_hash != ""


def test_a_session_dropped_and_created_again_in_one_batch_starts_empty() -> None:
    store = ModelStore()
    core = durable_core()
    secret = core.broker.create_session("s", "pw", 0.0)
    commit(core, store)
    p = RawPeer(core)
    assert p.init("s", "pw", clientId="dev")["success"] is True
    p.send({"type": "subscribe", "topic": "t"})
    core.broker.drop_session("s", "pw", secret, 0.0)
    core.broker.create_session("s", "pw2", 0.0)
    commit(core, store)
    assert "s" in store.sessions
    assert [k for k in store.subscribers if k[0] == "s"] == []


def test_an_in_memory_core_journals_nothing() -> None:
    core = ServerCore(ServerConfig(password_hash_cost=2))
    core.create_session("demo", "pw", 0.0)
    assert core.take_store_batch() is None
    pub = RawPeer(core)
    assert pub.init("demo", "pw")["success"] is True
    pub.publish("t", "m1")
    assert of_type(pub.pump(), "publish_response")[0]["success"] is True


def test_session_changes_are_refused_with_503_while_the_store_cannot_be_written() -> None:
    core = durable_core()
    core.store_failed(0.0)
    conn = core.open_connection(0.0)
    auth = (("Authorization", basic_auth("admin", "secret")),)
    body = orjson.dumps({"sessionName": "fleet", "password": "p"})
    core.receive_data(conn, http_request("POST", "/api/createSession", body, auth), 0.0)
    head, _, payload = core.data_to_send(conn).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert orjson.loads(payload)["code"] == "store_unavailable"
    assert core.session_names() == ["demo"]


def test_healthz_answers_503_while_the_store_cannot_be_written() -> None:
    core = durable_core()
    core.store_failed(0.0)
    conn = core.open_connection(0.0)
    core.receive_data(conn, http_request("GET", "/healthz"), 0.0)
    head, _, payload = core.data_to_send(conn).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and orjson.loads(payload)["status"] == "store_unavailable"
    store = ModelStore()
    commit(core, store)
    core.receive_data(conn, http_request("GET", "/healthz"), 0.0)
    assert core.data_to_send(conn).startswith(b"HTTP/1.1 200")


# -- backlogs on disk --------------------------------------------------------------------------------------


def test_an_away_subscribers_backlog_lives_in_the_store_and_comes_back_a_window_at_a_time() -> None:
    store = ModelStore()
    core = durable_core(limits=Limits(max_inflight_per_subscriber=10))
    sub = subscribed(core, clientId="dev", persistent=True)
    core.connection_lost(sub.conn, 0.0)
    pub = peer(core)
    for i in range(100):
        pub.publish("t", f"m{i}")
    commit(core, store)
    assert [r["deliveredTo"] for r in of_type(pub.pump(), "publish_response")] == [1] * 100
    stats = core.stats()
    assert (stats.stored_messages, stats.pending_bytes) == (0, 0)  # nothing of it in memory
    assert stats.backlogged_deliveries == 100
    assert len(store.deliveries) == 100
    again = resumed(core, store)
    got = [m["messageId"] for m in of_type(again.received, "message")]
    assert got == [f"m{i}" for i in range(10)]  # one window
    assert core.stats().stored_messages <= 20  # at most a page and a window in memory
    while len(got) < 100:
        for message in of_type(again.received, "message"):
            ack(again, message)
        again.received.clear()
        commit(core, store)
        again.pump()
        new = [m["messageId"] for m in of_type(again.received, "message")]
        assert new, "the backlog stopped flowing"
        got += new
        assert core.stats().stored_messages <= 20
    assert got == [f"m{i}" for i in range(100)]
    for message in of_type(again.received, "message"):
        ack(again, message)
    commit(core, store)
    assert store.deliveries == {} and store.messages == {}


def test_a_stored_backlog_is_bounded_in_bytes_and_new_deliveries_past_it_are_given_up() -> None:
    store = ModelStore()
    core = durable_core(limits=Limits(max_backlog_bytes=3000))
    sub = subscribed(core, clientId="dev", persistent=True)
    core.connection_lost(sub.conn, 0.0)
    pub = peer(core)
    for i in range(10):
        pub.publish("t", f"m{i}")
    commit(core, store)
    kept = len(store.deliveries)
    assert 0 < kept < 10
    assert core.metrics.value("deliveries_given_up", "demo", "overflow") == 10 - kept
    again = resumed(core, store)
    assert [m["messageId"] for m in of_type(again.received, "message")] == [f"m{i}" for i in range(kept)]


def test_a_subscriber_forgotten_while_away_takes_its_stored_backlog_with_it() -> None:
    store = ModelStore()
    core = durable_core()
    core.broker.configure_session("demo", "pw", 0.0, SessionSettings(message_expiry_time=60.0))
    sub = subscribed(core, clientId="dev", persistent=True)
    core.connection_lost(sub.conn, 0.0)
    peer(core).publish("t", "m1")
    commit(core, store)
    assert len(store.deliveries) == 1
    core.handle_timeout(61.0)  # away longer than messageExpiryTime: forgotten
    commit(core, store, 61.0)
    assert store.deliveries == {} and store.messages == {} and store.subscribers == {}
    assert core.metrics.value("deliveries_given_up", "demo", "detached") == 1


def test_a_message_also_stored_for_an_away_subscriber_gets_no_early_ack_received() -> None:
    store = ModelStore()
    core = durable_core()
    away = subscribed(core, clientId="dev", persistent=True)
    core.connection_lost(away.conn, 0.0)
    here = subscribed(core)
    pub = peer(core)
    pub.publish("t", "m1")
    commit(core, store)
    ack(here, of_type(here.pump(), "message")[0])
    commit(core, store)
    assert [f["type"] for f in pub.pump()] == ["publish_response"]  # "dev" has not ACKed it yet
