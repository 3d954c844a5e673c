"""Scoped tokens: verification (PyJWT, HS256 pinned, exp on the core's clock) and the broker's checks."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest

from fastport_core.errors import CloseCode, ErrorCode, LocalProtocolError, RemoteProtocolError
from fastport_core.protocol import Init, Publish, Subscribe
from fastport_core.tokens import TokenScope, mint_token, verify_token

from .test_broker import Harness

KEY = bytes(range(32))
EPOCH = 1_700_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A JWT built by hand (for algorithms PyJWT will not sign with in a test)."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


def refusal(token: str, now: float = EPOCH, key: bytes = KEY) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as caught:
        verify_token(token, key, now)
    return caught.value.code  # type: ignore[return-value]


# -- verify_token -----------------------------------------------------------------------------------------


def test_a_minted_token_verifies_into_its_scope() -> None:
    token = mint_token(KEY, expires_at=EPOCH + 60, sub="c1", publish=["cmd/+"], subscribe=["sensors/#"])
    assert verify_token(token, KEY, EPOCH) == TokenScope(EPOCH + 60, "c1", ("cmd/+",), ("sensors/#",))
    assert mint_token(base64.b64encode(KEY).decode(), expires_at=EPOCH + 60) == mint_token(
        KEY, expires_at=EPOCH + 60
    )


def test_expiry_is_judged_on_the_given_clock_up_to_exp_exactly() -> None:
    token = mint_token(KEY, expires_at=EPOCH + 60)
    verify_token(token, KEY, EPOCH + 59.999)
    assert refusal(token, EPOCH + 60) is ErrorCode.TOKEN_EXPIRED
    assert refusal(token, EPOCH + 10_000) is ErrorCode.TOKEN_EXPIRED


def test_forged_signature_is_refused() -> None:
    token = mint_token(bytes(32), expires_at=EPOCH + 60, publish=["#"])
    assert refusal(token) is ErrorCode.INVALID_TOKEN
    header, _claims, signature = mint_token(KEY, expires_at=EPOCH + 60).split(".")
    widened = b64url(json.dumps({"exp": EPOCH + 60, "publish": ["#"]}).encode())
    assert refusal(f"{header}.{widened}.{signature}") is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize("alg", ["none", "None", "HS512", "RS256"])
def test_other_algorithms_are_refused(alg: str) -> None:
    assert refusal(unsigned({"alg": alg, "typ": "JWT"}, {"exp": EPOCH + 60, "publish": ["#"]})) is (
        ErrorCode.INVALID_TOKEN
    )


def test_hs512_with_the_right_key_is_still_refused() -> None:
    token = jwt.encode({"exp": EPOCH + 60}, KEY + KEY, algorithm="HS512")
    assert refusal(token, key=KEY + KEY) is ErrorCode.INVALID_TOKEN


def test_missing_exp_is_refused() -> None:
    token = jwt.encode({"publish": ["#"]}, KEY, algorithm="HS256")
    assert refusal(token) is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "tomorrow"},
        {"exp": True},
        {"exp": EPOCH + 60, "publish": "a/b"},
        {"exp": EPOCH + 60, "subscribe": ["a/#/b"]},
        {"exp": EPOCH + 60, "subscribe": [""]},
        {"exp": EPOCH + 60, "sub": 7},
        {"exp": EPOCH + 60, "nbf": EPOCH + 30},
    ],
)
def test_malformed_or_premature_claims_are_refused(claims: dict[str, Any]) -> None:
    assert refusal(jwt.encode(claims, KEY, algorithm="HS256")) is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "....", "é.é.é"])
def test_garbage_is_refused(garbage: str) -> None:
    assert refusal(garbage) is ErrorCode.INVALID_TOKEN


def test_mint_refuses_malformed_filters_and_keys() -> None:
    with pytest.raises(LocalProtocolError):
        mint_token(KEY, expires_at=EPOCH, publish=["a+"])
    with pytest.raises(LocalProtocolError):
        mint_token("not a key", expires_at=EPOCH)


# -- the broker -------------------------------------------------------------------------------------------


class TokenHarness(Harness):
    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.broker.set_wall_clock(EPOCH, self.now)  # wall-clock EPOCH at monotonic 100

    def key(self, session: str = "a") -> str:
        return self.broker.token_key(session)

    def token(self, session: str = "a", *, ttl: float = 60, **scope: Any) -> str:
        return mint_token(self.key(session), expires_at=EPOCH + (self.now - 100.0) + ttl, **scope)

    def token_init(
        self, conn: int, token: str, session: str = "a", client_id: str | None = None
    ) -> dict[str, Any]:
        response, *_ = self.send(conn, Init(session, client_id=client_id, token=token))
        return response

    def token_client(self, *topics: str, client_id: str | None = None, **scope: Any) -> int:
        conn = self.open()
        assert self.token_init(conn, self.token(**scope), client_id=client_id)["success"]
        for topic in topics:
            assert self.send(conn, Subscribe(topic))[0]["success"]
        return conn


@pytest.fixture
def t() -> TokenHarness:
    return TokenHarness()


def test_init_with_a_token(t: TokenHarness) -> None:
    conn = t.open()
    assert t.token_init(conn, t.token()) == {"type": "init_response", "success": True, "sessionName": "a"}


def test_a_token_of_another_session_or_an_unknown_one_is_refused_alike(t: TokenHarness) -> None:
    of_b = t.token_init(t.open(), t.token("b"))
    unknown = t.token_init(t.open(), t.token(), session="nope")
    assert of_b["code"] == unknown["code"] == ErrorCode.INVALID_TOKEN


def test_a_token_naming_another_session_is_refused_even_with_the_right_key(t: TokenHarness) -> None:
    key = t.key("a")
    assert t.token_init(t.open(), mint_token(key, expires_at=EPOCH + 60, session="b"))["code"] == (
        ErrorCode.INVALID_TOKEN
    )
    assert t.token_init(t.open(), mint_token(key, expires_at=EPOCH + 60, session="a"))["success"]


def test_password_and_token_together_are_refused(t: TokenHarness) -> None:
    (response,) = t.send(t.open(), Init("a", "pw-a", token=t.token()))
    assert response["success"] is False and response["code"] == ErrorCode.INVALID_FRAME


def test_publish_scope(t: TokenHarness) -> None:
    subscriber = t.client("a", "#")
    conn = t.token_client(publish=["cmd/+"])
    assert t.publish(conn, "cmd/1", "m1")["success"]
    refused = t.publish(conn, "cmd/1/x", "m2")
    assert refused["success"] is False and refused["code"] == ErrorCode.NOT_ALLOWED
    assert [m["messageId"] for m in t.messages(subscriber)] == ["m1"]


def test_subscribe_scope_is_filter_within_filter(t: TokenHarness) -> None:
    conn = t.token_client(subscribe=["sensors/+/temp", "alerts/#"])
    for allowed in ["sensors/1/temp", "sensors/+/temp", "alerts", "alerts/#", "alerts/+/x"]:
        assert t.send(conn, Subscribe(allowed))[0]["success"], allowed
    for refused in ["sensors/#", "sensors/+/+", "#", "other"]:
        (response,) = t.send(conn, Subscribe(refused))
        assert response["code"] == ErrorCode.NOT_ALLOWED, refused


def test_sub_binds_the_client_id(t: TokenHarness) -> None:
    token = t.token(sub="device-7")
    assert t.token_init(t.open(), token, client_id="device-8")["code"] == ErrorCode.CLIENT_ID_MISMATCH
    assert t.token_init(t.open(), token)["code"] == ErrorCode.CLIENT_ID_MISMATCH
    assert t.token_init(t.open(), token, client_id="device-7")["success"]


def test_an_expired_token_cannot_init(t: TokenHarness) -> None:
    token = t.token(ttl=30)
    t.advance(30)
    assert t.token_init(t.open(), token)["code"] == ErrorCode.TOKEN_EXPIRED


def test_a_connection_is_closed_when_its_token_expires(t: TokenHarness) -> None:
    conn = t.token_client(ttl=30)
    password_conn = t.client("a")
    t.advance(29.9)
    assert conn not in t.closes()
    t.advance(0.1)
    assert t.closes() == {conn: CloseCode.TOKEN_EXPIRED}
    assert password_conn not in t.closes()


def test_rotation_voids_old_tokens_and_closes_their_connections(t: TokenHarness) -> None:
    old_token = t.token()
    holder = t.token_client()
    password_conn = t.client("a")
    old_key = t.key()
    new_key = t.broker.rotate_token_key("a", "pw-a", t.secrets["a"], t.now)
    assert new_key != old_key and t.key("a") == new_key
    assert t.closes() == {holder: CloseCode.TOKEN_REVOKED}
    assert t.token_init(t.open(), old_token)["code"] == ErrorCode.INVALID_TOKEN
    assert t.token_init(t.open(), t.token())["success"]
    assert password_conn not in t.closes()
    assert t.metrics.value("token_key_rotations", "a") == 1


def test_a_token_resuming_a_client_id_keeps_only_what_it_grants(t: TokenHarness) -> None:
    first = t.client("a", "#", client_id="c1")
    publisher = t.client("a")
    t.broker.connection_closed(first, t.now)
    t.publish(publisher, "secret/x", "m1")
    t.publish(publisher, "public/x", "m2")
    resumed = t.open()
    assert t.token_init(resumed, t.token(subscribe=["public/#"]), client_id="c1")["success"]
    assert [m["messageId"] for m in t.messages(resumed)] == ["m2"]
    t.publish(publisher, "secret/y", "m3")
    assert [m["messageId"] for m in t.messages(resumed)] == ["m2"]
    assert int(t.metrics.value("deliveries_given_up", "a", "scope")) == 1


def test_repeated_bad_tokens_close_the_connection_and_throttle_the_peer(t: TokenHarness) -> None:
    forged = mint_token(bytes(32), expires_at=EPOCH + 60)
    codes = []
    for _ in range(3):
        conn = t.open("10.0.0.1")
        codes += [t.token_init(conn, forged)["code"] for _ in range(t.config.auth_max_failures)]
        assert t.closes()[conn] == CloseCode.POLICY_VIOLATION
    # As for passwords: the budget's failures cost nothing; the one past it starts a delay.
    free = t.config.auth_failure_budget + 1
    assert codes[: free + 1] == [ErrorCode.INVALID_TOKEN] * free + [ErrorCode.AUTH_THROTTLED]


def test_a_publish_outside_scope_is_not_remembered_as_taken(t: TokenHarness) -> None:
    conn = t.token_client(publish=["a"])
    (response,) = t.send(conn, Publish("b", "d", "h", 1, "m1"))
    assert response["code"] == ErrorCode.NOT_ALLOWED
    assert t.broker.stats().stored_messages == 0
