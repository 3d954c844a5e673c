"""Cluster nodes as sans-IO cores (issue 10): ``ServerCore(cluster=True)`` over :class:`ModelEngine`.

The engine here is a model in dicts (tests/engine_model.py) that applies the nodes' store batches as the
NATS adapter does; the same behaviour against a real NATS is in tests/anyio/test_cluster.py. No sockets,
no clock: the tests choose when each node commits and when the engine delivers.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fastport_core.config import ServerConfig, SessionSettings
from fastport_core.errors import CloseCode
from fastport_core.server import ServerCore
from tests.engine_model import ModelEngine

from .test_server import ADMIN
from .wire import RawPeer, basic_auth, http_request


def node(engine: ModelEngine, **config: Any) -> ServerCore:
    config.setdefault("password_hash_cost", 2)
    core = engine.join(ServerCore(ServerConfig(**config), admin_credentials=ADMIN, cluster=True))
    core.broker.configure_session("demo", "pw", 0.0, SessionSettings(retry_interval=5.0))
    engine.commit(core)
    return core


def peer(core: ServerCore, **init: Any) -> RawPeer:
    p = RawPeer(core)
    p.init("demo", "pw", **init)
    assert of_type(p.received, "init_response")[0]["success"] is True
    return p


def subscribed(core: ServerCore, topic: str = "t", **init: Any) -> RawPeer:
    p = peer(core, **init)
    p.send({"type": "subscribe", "topic": topic})
    assert p.pump()[-1]["success"] is True
    return p


def of_type(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == kind]


def ids(p: RawPeer) -> list[str]:
    return [m["messageId"] for m in of_type(p.pump(), "message")]


def ack(p: RawPeer, message_id: str, topic: str = "t") -> None:
    p.send({"type": "ack", "topic": topic, "messageId": message_id})


def test_a_publish_is_confirmed_once_the_engine_has_it_and_every_node_fans_it_out() -> None:
    engine = ModelEngine()
    a, b = node(engine), node(engine)
    near, far, pub = subscribed(a), subscribed(b), subscribed(a)
    pub.publish("t", "m1")
    assert of_type(pub.pump(), "publish_response") == []  # not before the engine has it
    assert ids(near) == [] and ids(far) == []  # nor fanned out before the engine feeds it back
    engine.commit(a)
    (response,) = of_type(pub.pump(), "publish_response")
    assert response == {"type": "publish_response", "success": True, "messageId": "m1"}
    assert ids(near) == ids(far) == ["m1"]
    assert ids(pub) == []  # the publisher does not get its own message, as on a single node
    ack(near, "m1")
    ack(far, "m1")
    lonely = subscribed(a, "own/topic")  # its own message goes to no one but itself
    lonely.publish("own/topic", "m2")
    engine.commit(a)
    # No node knows when every subscriber ACKed: no ack_received, even for a message that went to no one.
    assert of_type(pub.pump(), "ack_received") == of_type(lonely.pump(), "ack_received") == []


def test_a_publish_retried_on_another_node_is_stored_and_fanned_out_once() -> None:
    engine = ModelEngine()
    a, b = node(engine), node(engine)
    sub = subscribed(b)
    peer(a).publish("t", "m1")
    engine.commit(a)
    retry = peer(b)
    retry.publish("t", "m1")
    engine.commit(b)
    assert of_type(retry.pump(), "publish_response")[0]["success"] is True
    assert ids(sub) == ["m1"]
    assert [m.message_id for m in engine.streams["demo"]] == ["m1"]


def test_a_resumable_subscriber_gets_its_deliveries_from_the_engine_and_acks_go_back_to_it() -> None:
    engine = ModelEngine()
    a, b = node(engine), node(engine)
    sub = subscribed(a, clientId="dev")
    engine.commit(a)  # attached, and its subscription kept with its consumer
    assert engine.consumers["demo", "dev"].topics == ("t",)
    pub = peer(b)
    pub.publish("t", "m1")
    pub.publish("other", "x1")
    engine.commit(b)
    assert ids(sub) == []  # not from the node's fan-out: from its consumer
    engine.deliver()
    assert ids(sub) == ["m1"]
    assert ("demo", "dev", "x1") in engine.acked  # not subscribed: the engine counts it done at once
    ack(sub, "m1")
    engine.commit(a)
    assert ("demo", "dev", "m1") in engine.acked and engine.consumers["demo", "dev"].pending == {}


def test_a_resumable_subscriber_resumes_on_another_node_with_what_it_did_not_ack() -> None:
    engine = ModelEngine()
    a, b = node(engine), node(engine)
    sub = subscribed(a, clientId="dev")
    engine.commit(a)
    pub = peer(b)
    for message_id in ("m1", "m2"):
        pub.publish("t", message_id)
    engine.commit(b)
    engine.deliver()
    assert ids(sub) == ["m1", "m2"]
    ack(sub, "m1")
    a.connection_lost(sub.conn, 0.0)  # lost, m2 un-ACKed
    engine.commit(a)
    assert engine.consumers["demo", "dev"].node is None
    pub.publish("t", "m3")
    engine.commit(b)

    again = peer(b, clientId="dev")  # no subscribe: the engine kept its subscriptions
    engine.commit(b)
    engine.deliver()
    messages = of_type(again.pump(), "message")
    assert [(m["messageId"], m.get("retry")) for m in messages] == [("m2", 1), ("m3", None)]
    assert b.broker.stats().per_session["demo"].subscribers == 2  # pub and the resumed one


def test_a_clean_close_releases_the_resumable_subscriber_everywhere() -> None:
    engine = ModelEngine()
    a = node(engine)
    sub = subscribed(a, clientId="dev")
    engine.commit(a)
    sub.ws.close(CloseCode.NORMAL, "bye", 0.0)
    sub.send_raw(sub.ws.data_to_send())
    engine.commit(a)
    assert ("demo", "dev") not in engine.consumers


def test_sessions_created_suspended_and_dropped_on_one_node_take_effect_on_the_others() -> None:
    engine = ModelEngine()
    a, b = node(engine), node(engine)
    conn = a.open_connection(0.0)
    auth = (("Authorization", basic_auth("admin", "secret")),)
    body = orjson.dumps({"sessionName": "fleet", "password": "p"})
    a.receive_data(conn, http_request("POST", "/api/createSession", body, auth), 0.0)
    assert a.data_to_send(conn) == b""  # answered once the engine has it
    engine.commit(a)
    assert a.data_to_send(conn).startswith(b"HTTP/1.1 200")
    assert "fleet" in b.session_names()
    member = RawPeer(b)
    assert member.init("fleet", "p")["success"] is True

    a.broker.suspend_session_as_admin("fleet", True, 0.0)
    engine.commit(a)
    member.publish("t", "m1")
    assert of_type(member.pump(), "publish_response")[0]["code"] == "session_suspended"

    a.broker.drop_session_as_admin("fleet", 0.0)
    engine.commit(a)
    assert "fleet" not in b.session_names()
    member.pump()
    assert member.ws.close_code == CloseCode.SESSION_DROPPED


def test_a_node_without_its_engine_refuses_with_cluster_unavailable() -> None:
    engine = ModelEngine()
    a = node(engine)
    pub = peer(a)
    a.engine_available(False)
    pub.publish("t", "m1")
    (refused,) = of_type(pub.pump(), "publish_response")
    assert refused["success"] is False and refused["code"] == "cluster_unavailable"
    conn = a.open_connection(0.0)
    a.receive_data(conn, http_request("GET", "/healthz"), 0.0)
    head, _, payload = a.data_to_send(conn).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and orjson.loads(payload)["status"] == "cluster_unavailable"
    a.engine_available(True)
    pub.publish("t", "m2")
    engine.commit(a)
    assert of_type(pub.pump(), "publish_response")[-1]["success"] is True


def test_a_password_changed_by_another_node_during_its_check_is_checked_again() -> None:
    engine = ModelEngine()
    a = ServerCore(ServerConfig(password_hash_cost=2), cluster=True, offload_verification=True)
    engine.join(a)
    a.broker.configure_session("demo", "pw", 0.0)
    engine.commit(a)
    member = RawPeer(a)
    member.send({"type": "init", "sessionName": "demo", "password": "pw"})
    (check,) = a.take_verifications()
    # Another node wrote the session meanwhile: the same password under another salt.
    other = ServerCore(ServerConfig(password_hash_cost=2), cluster=True)
    other.broker.configure_session("demo", "pw", 0.0)
    record = other.take_store_batch()
    assert record is not None
    a.engine_session(record.sessions[0], 0.0)
    a.verification_done(check, check.password_hash.verify("pw"), 0.0)
    assert of_type(member.pump(), "init_response") == []
    (again,) = a.take_verifications()
    a.verification_done(again, again.password_hash.verify("pw"), 0.0)
    assert of_type(member.pump(), "init_response")[0]["success"] is True


def test_a_cluster_node_never_expires_an_idle_session_on_its_own() -> None:
    engine = ModelEngine()
    a = node(engine)
    a.broker.configure_session("idle", "pw", 0.0, SessionSettings(session_expiry=10.0))
    engine.commit(a)
    a.handle_timeout(1000.0)  # idle here; perhaps busy on another node
    assert "idle" in a.session_names() and "idle" in engine.sessions


def test_a_client_id_claimed_on_another_node_closes_its_connection_here_with_4003() -> None:
    engine = ModelEngine()
    a = node(engine)
    sub = subscribed(a, clientId="dev")
    engine.commit(a)
    a.engine_client_claimed("demo", "dev", 0.0)
    sub.pump()
    assert sub.ws.close_code == CloseCode.REPLACED
    batch = a.take_store_batch()
    assert batch is not None and batch.presence == [("demo", "dev", None)]  # its deliveries go back


def test_a_node_without_its_engine_refuses_a_resumable_init_but_not_an_anonymous_one() -> None:
    engine = ModelEngine()
    a = node(engine)
    a.engine_available(False)
    refused = RawPeer(a).init("demo", "pw", clientId="dev")
    assert refused["success"] is False and refused["code"] == "cluster_unavailable"
    assert RawPeer(a).init("demo", "pw")["success"] is True


@pytest.mark.patches_core
def test_a_bug_in_an_engine_call_is_contained_not_raised_into_the_engine_link() -> None:
    engine = ModelEngine()
    a = node(engine)

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    a.broker.engine_deliveries = broken  # type: ignore[method-assign]
    assert a.engine_deliveries("demo", "dev", [], 0.0) is None  # handed back, nothing raised
    assert a.metrics.total("internal_errors") == 1
