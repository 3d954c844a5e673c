"""Tests of ``fastport_core.admin``: every endpoint's answers, the auth rules, and a no-raise fuzz.

The broker is a fake that raises the real broker's exceptions, so that every answer can be provoked
directly and quickly; one test runs the real :class:`Broker` to hold the fake to it. The metrics are the
real :class:`Metrics`, and ``/metrics`` is read back with prometheus-client's own parser.
"""

from __future__ import annotations

import base64
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fastport_core.admin import ROUTES, AdminApi, AdminCredentials, AdminErrorCode, HttpResponse, LoginOutcome
from fastport_core.auth import AuthThrottle
from fastport_core.broker import (
    AccessDeniedError,
    Broker,
    BrokerStats,
    SessionExistsError,
    UnknownSessionError,
)
from fastport_core.config import Limits, ServerConfig, SessionSettings
from fastport_core.errors import LocalProtocolError
from fastport_core.exposition import GAUGES, PREFIX, SESSION_GAUGES
from fastport_core.metrics import Metrics

CREDENTIALS = AdminCredentials("admin", "s3cret:with-colon")
DOCS = Path(__file__).parents[2] / "docs" / "protocol.md"
NOW = 1234.5


# --------------------------------------------------------------------------------------------------------
# A fake broker: the real one's methods and exceptions, without scrypt, sinks or connections.


@dataclass
class FakeSession:
    password: str
    secret_key: str
    settings: SessionSettings | None
    suspended: bool = False
    token_key: str = "tk-0"


@dataclass
class FakeBroker:
    max_sessions: int = 3
    connections: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    sessions: dict[str, FakeSession] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def create_session(
        self,
        name: str,
        password: str,
        now: float,
        settings: SessionSettings | None = None,
        *,
        secret_key: str | None = None,
    ) -> str:
        self.calls.append(("create", name, password, now, settings))
        if name in self.sessions:
            raise SessionExistsError(f"session {name!r} already exists")
        if len(self.sessions) >= self.max_sessions:
            raise LocalProtocolError(f"the server holds its maximum of {self.max_sessions} sessions")
        key = secret_key or f"key-{name}"
        self.sessions[name] = FakeSession(password, key, settings)
        return key

    def _session(self, name: str, password: str, secret_key: str) -> FakeSession:
        session = self.sessions.get(name)
        if session is None:
            raise UnknownSessionError(f"no session {name!r}")
        if session.password != password or session.secret_key != secret_key:
            raise AccessDeniedError("wrong password or secret key")
        return session

    def drop_session(self, name: str, password: str, secret_key: str, now: float) -> None:
        self.calls.append(("drop", name, password, secret_key, now))
        self._session(name, password, secret_key)
        del self.sessions[name]

    def suspend_session(self, name: str, password: str, secret_key: str, suspend: bool, now: float) -> None:
        self.calls.append(("suspend", name, password, secret_key, suspend, now))
        self._session(name, password, secret_key).suspended = suspend

    def token_key(self, name: str) -> str:
        session = self.sessions.get(name)
        if session is None:
            raise UnknownSessionError(f"no session {name!r}")
        return session.token_key

    def rotate_token_key(self, name: str, password: str, secret_key: str, now: float) -> str:
        self.calls.append(("rotate", name, password, secret_key, now))
        session = self._session(name, password, secret_key)
        session.token_key = f"tk-{int(session.token_key[3:]) + 1}"
        return session.token_key

    def stats(self) -> BrokerStats:
        self.calls.append(("stats",))
        return BrokerStats(len(self.sessions), self.connections, 0, 0, 0, 0, 0, {})

    store_available = True

    def health(self) -> tuple[int, int]:
        return len(self.sessions), self.connections


# --------------------------------------------------------------------------------------------------------
# Helpers.


def basic(user: str, password: str) -> tuple[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return ("Authorization", f"Basic {token}")


AUTH = basic(CREDENTIALS.user, CREDENTIALS.password)


def call(
    api: AdminApi,
    method: str,
    target: str,
    body: object = None,
    headers: tuple[tuple[str, str], ...] = (AUTH,),
) -> HttpResponse:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return api.handle(method, target, headers, raw, NOW)


def answer(response: HttpResponse) -> Any:
    assert response.content_type == "application/json"
    return json.loads(response.body)


def assert_error(response: HttpResponse, code: AdminErrorCode, status: int) -> dict[str, Any]:
    body = answer(response)
    assert (response.status, body["success"], body["code"]) == (status, False, code)
    assert isinstance(body["error"], str)
    assert body["error"]
    return body  # type: ignore[no-any-return]


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def api(broker: FakeBroker) -> AdminApi:
    return AdminApi(broker, CREDENTIALS)


def create(api: AdminApi, name: str = "fleet", **extra: object) -> dict[str, Any]:
    response = call(api, "POST", "/api/createSession", {"sessionName": name, "password": "pw", **extra})
    assert response.status == 200, response.body
    return answer(response)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------------
# createSession.


def test_create_session_returns_the_secret_key_once(api: AdminApi, broker: FakeBroker) -> None:
    response = call(api, "POST", "/api/createSession", {"sessionName": "fleet", "password": "pw"})
    body = answer(response)
    assert response.status == 200
    secret_key = broker.sessions["fleet"].secret_key
    # The original fastPort's answer fields (its clients read ``password`` back), and the token key.
    assert body == {
        "success": True, "sessionName": "fleet", "password": "pw", "secretKey": secret_key, "tokenKey": "tk-0",
    }  # fmt: skip
    assert ("Cache-Control", "no-store") in response.headers
    assert broker.calls == [("create", "fleet", "pw", NOW, None)]

    again = call(api, "POST", "/api/createSession", {"sessionName": "fleet", "password": "other"})
    assert "secretKey" not in assert_error(again, AdminErrorCode.SESSION_EXISTS, 409)
    assert broker.sessions["fleet"].password == "pw"


def test_create_session_converts_milliseconds_to_seconds(api: AdminApi, broker: FakeBroker) -> None:
    create(api, retryInterval=1500, maxRetryLimit=3, messageExpiryTime=60_000, sessionExpiry=3_600_000)
    assert broker.sessions["fleet"].settings == SessionSettings(1.5, 3, 60.0, 3600.0)


def test_create_session_layers_given_fields_on_the_server_defaults(broker: FakeBroker) -> None:
    defaults = SessionSettings(retry_interval=9.0, message_expiry_time=42.0)
    create(AdminApi(broker, CREDENTIALS, session_defaults=defaults), retryInterval=2000, sessionExpiry=None)
    assert broker.sessions["fleet"].settings == SessionSettings(2.0, 10, 42.0, None)


def test_create_session_without_settings_leaves_the_defaults_to_the_broker(
    api: AdminApi, broker: FakeBroker
) -> None:
    create(api, sessionExpiry=None, unknownField="ignored")
    assert broker.sessions["fleet"].settings is None


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        (b"", AdminErrorCode.INVALID_JSON, "JSON object"),
        (b"{not json", AdminErrorCode.INVALID_JSON, "JSON object"),
        (b"\xff\xfe", AdminErrorCode.INVALID_JSON, "JSON object"),
        ([{"sessionName": "a", "password": "b"}], AdminErrorCode.INVALID_JSON, "JSON object"),
        ("fleet", AdminErrorCode.INVALID_JSON, "JSON object"),
        ({"password": "pw"}, AdminErrorCode.INVALID_REQUEST, "missing field 'sessionName'"),
        ({"sessionName": "fleet"}, AdminErrorCode.INVALID_REQUEST, "missing field 'password'"),
        ({"sessionName": 7, "password": "pw"}, AdminErrorCode.INVALID_REQUEST, "'sessionName' must be"),
        ({"sessionName": "", "password": "pw"}, AdminErrorCode.INVALID_REQUEST, "non-empty string"),
        ({"sessionName": "fleet", "password": ["pw"]}, AdminErrorCode.INVALID_REQUEST, "'password' must be"),
        ({"sessionName": "f", "password": "p", "retryInterval": "5000"}, AdminErrorCode.INVALID_REQUEST,
         "retryInterval must be a number of milliseconds"),
        ({"sessionName": "f", "password": "p", "maxRetryLimit": True}, AdminErrorCode.INVALID_REQUEST,
         "maxRetryLimit must be a number of re-sends"),
        ({"sessionName": "f", "password": "p", "retryInterval": 0}, AdminErrorCode.INVALID_REQUEST,
         "retryInterval must be a positive number of milliseconds, got 0"),
        ({"sessionName": "f", "password": "p", "maxRetryLimit": -1}, AdminErrorCode.INVALID_REQUEST,
         "maxRetryLimit must be a whole number of re-sends >= 0, got -1"),
        ({"sessionName": "f", "password": "p", "sessionExpiry": -5}, AdminErrorCode.INVALID_REQUEST,
         "sessionExpiry must be a positive number of milliseconds, got -5"),
    ],
)  # fmt: skip
def test_create_session_rejects_bad_input(
    api: AdminApi, broker: FakeBroker, body: object, code: AdminErrorCode, mentions: str
) -> None:
    error = assert_error(call(api, "POST", "/api/createSession", body), code, 400)
    assert mentions in error["error"]
    assert broker.calls == []


def test_create_session_reports_a_broker_limit_as_400_with_its_message(api: AdminApi) -> None:
    for name in ("a", "b", "c"):
        create(api, name)
    error = assert_error(call(api, "POST", "/api/createSession", {"sessionName": "d", "password": "p"}),
                         AdminErrorCode.INVALID_REQUEST, 400)  # fmt: skip
    assert error["error"] == "the server holds its maximum of 3 sessions"


# --------------------------------------------------------------------------------------------------------
# dropSession and suspendSession.


def test_drop_session(api: AdminApi, broker: FakeBroker) -> None:
    key = create(api)["secretKey"]
    request = {"sessionName": "fleet", "password": "pw", "secretKey": key}
    assert_error(call(api, "POST", "/api/dropSession", {**request, "password": "no"}),
                 AdminErrorCode.ACCESS_DENIED, 403)  # fmt: skip
    assert_error(call(api, "POST", "/api/dropSession", {**request, "secretKey": "no"}),
                 AdminErrorCode.ACCESS_DENIED, 403)  # fmt: skip
    assert_error(call(api, "POST", "/api/dropSession", {"password": "pw", "secretKey": key}),
                 AdminErrorCode.INVALID_REQUEST, 400)  # fmt: skip
    assert "fleet" in broker.sessions

    response = call(api, "POST", "/api/dropSession", request)
    assert (response.status, answer(response)) == (200, {"success": True, "sessionName": "fleet"})
    assert broker.calls[-1] == ("drop", "fleet", "pw", key, NOW)
    assert broker.sessions == {}
    assert_error(call(api, "POST", "/api/dropSession", request), AdminErrorCode.UNKNOWN_SESSION, 404)


@pytest.mark.parametrize("suspend", [True, False])
def test_suspend_session(api: AdminApi, broker: FakeBroker, suspend: bool) -> None:
    key = create(api)["secretKey"]
    broker.sessions["fleet"].suspended = not suspend
    request = {"sessionName": "fleet", "password": "pw", "secretKey": key, "suspend": suspend}
    response = call(api, "POST", "/api/suspendSession", request)
    assert (response.status, answer(response)) == (
        200, {"success": True, "sessionName": "fleet", "suspended": suspend},
    )  # fmt: skip
    assert broker.calls[-1] == ("suspend", "fleet", "pw", key, suspend, NOW)
    assert broker.sessions["fleet"].suspended is suspend


def test_rotate_token_key(api: AdminApi, broker: FakeBroker) -> None:
    key = create(api)["secretKey"]
    request = {"sessionName": "fleet", "password": "pw", "secretKey": key}
    response = call(api, "POST", "/api/rotateTokenKey", request)
    assert (response.status, answer(response)) == (
        200,
        {"success": True, "sessionName": "fleet", "tokenKey": "tk-1"},
    )
    assert ("Cache-Control", "no-store") in response.headers
    assert broker.calls[-1] == ("rotate", "fleet", "pw", key, NOW)
    assert_error(call(api, "POST", "/api/rotateTokenKey", {**request, "secretKey": "no"}),
                 AdminErrorCode.ACCESS_DENIED, 403)  # fmt: skip
    assert_error(call(api, "POST", "/api/rotateTokenKey", {**request, "sessionName": "nope"}),
                 AdminErrorCode.UNKNOWN_SESSION, 404)  # fmt: skip
    assert_error(call(api, "POST", "/api/rotateTokenKey", {"sessionName": "fleet", "password": "pw"}),
                 AdminErrorCode.INVALID_REQUEST, 400)  # fmt: skip
    assert_error(call(api, "GET", "/api/rotateTokenKey"), AdminErrorCode.METHOD_NOT_ALLOWED, 405)
    assert broker.sessions["fleet"].token_key == "tk-1"


def test_suspend_session_errors(api: AdminApi, broker: FakeBroker) -> None:
    key = create(api)["secretKey"]
    request = {"sessionName": "fleet", "password": "pw", "secretKey": key, "suspend": True}
    for bad in ({"suspend": "yes"}, {"suspend": 1}, {"suspend": None}, {"secretKey": ""}):
        assert_error(call(api, "POST", "/api/suspendSession", {**request, **bad}),
                     AdminErrorCode.INVALID_REQUEST, 400)  # fmt: skip
    assert_error(call(api, "POST", "/api/suspendSession", {**request, "sessionName": "nope"}),
                 AdminErrorCode.UNKNOWN_SESSION, 404)  # fmt: skip
    assert_error(call(api, "POST", "/api/suspendSession", {**request, "secretKey": "wrong"}),
                 AdminErrorCode.ACCESS_DENIED, 403)  # fmt: skip
    assert broker.sessions["fleet"].suspended is False


# --------------------------------------------------------------------------------------------------------
# /healthz and /metrics.


@pytest.mark.parametrize("credentials", [CREDENTIALS, None])
def test_healthz_needs_no_auth_and_reveals_only_counts(
    broker: FakeBroker, credentials: AdminCredentials | None
) -> None:
    broker.connections = 5
    create(AdminApi(broker, CREDENTIALS))
    response = call(AdminApi(broker, credentials), "GET", "/healthz?probe=lb", headers=())
    assert response.status == 200
    assert answer(response) == {"status": "ok", "sessions": 1, "connections": 5}
    assert ("stats",) not in broker.calls  # O(1): it never walks the sessions and subscribers


def test_metrics_are_prometheus_text_with_labels(api: AdminApi, broker: FakeBroker) -> None:
    tricky = 'fl"eet\\\nx'  # quotes, backslash and newline must survive the text format
    broker.metrics.inc("publishes", tricky, amount=7)
    broker.metrics.inc("connections_closed", "4002")
    broker.connections = 2
    create(api)
    call(api, "GET", "/nowhere/../../etc", headers=())

    response = call(api, "GET", "/metrics")
    assert (response.status, response.content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
    families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }

    assert samples[("fastport_publishes_total", (("session", tricky),))] == 7
    assert samples[("fastport_connections_closed_total", (("code", "4002"),))] == 1
    assert samples[("fastport_http_requests_total", (("path", "/api/createSession"), ("status", "200")))] == 1
    assert samples[("fastport_http_requests_total", (("path", "other"), ("status", "404")))] == 1
    assert samples[("fastport_binary_frames_total", ())] == 0
    assert samples[("fastport_sessions", ())] == 1
    assert samples[("fastport_connections", ())] == 2
    assert families["fastport_publishes"].type == "counter"
    assert families["fastport_publishes"].documentation == "Publishes accepted, per session."


def test_metrics_text_can_be_supplied_by_the_server(broker: FakeBroker) -> None:
    api = AdminApi(broker, CREDENTIALS, metrics_text=lambda: b"# custom\n")
    assert call(api, "GET", "/metrics").body == b"# custom\n"
    assert_error(call(api, "GET", "/metrics", headers=()), AdminErrorCode.UNAUTHORIZED, 401)


# --------------------------------------------------------------------------------------------------------
# Auth, routing, counting.

PROTECTED = [(route.method, path) for path, route in ROUTES.items() if route.protected]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [
        (),
        (basic("root", CREDENTIALS.password),),
        (basic(CREDENTIALS.user, "s3cret"),),
        (basic(CREDENTIALS.user, CREDENTIALS.password + "x"),),
        (("Authorization", "Basic"),),
        (("Authorization", "Basic !!!not base64"),),
        (("Authorization", "Basic " + base64.b64encode(b"no-colon").decode()),),
        (("Authorization", "Bearer " + base64.b64encode(b"admin:s3cret:with-colon").decode()),),
        (("Authorization", "Basic YWRtaW46czNjcmV0OndpdGgtY29sb24=\u00e9"),),
        (("Authorization", "Basic \ud800"),),
        (AUTH, AUTH),
    ],
)
def test_protected_routes_answer_401_without_valid_credentials(
    broker: FakeBroker, method: str, path: str, headers: tuple[tuple[str, str], ...]
) -> None:
    response = call(AdminApi(broker, CREDENTIALS), method, path, {}, headers)
    assert_error(response, AdminErrorCode.UNAUTHORIZED, 401)
    assert response.headers == (("WWW-Authenticate", 'Basic realm="fastport"'),)
    assert broker.calls == []


def test_basic_auth_scheme_and_header_name_are_case_insensitive(api: AdminApi) -> None:
    token = AUTH[1].split()[1]
    for headers in ((("authorization", f"basic {token}"),), (("AUTHORIZATION", f"  BASIC   {token} "),)):
        assert call(api, "GET", "/metrics", headers=headers).status == 200


def test_both_credentials_are_always_compared(api: AdminApi, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    call(api, "GET", "/metrics", headers=(basic("wrong-user", "wrong-password"),))
    assert len(compared) == 2


def test_failed_logins_are_throttled_per_address_after_the_budget(broker: FakeBroker) -> None:
    throttle = AuthThrottle(base=2.0, maximum=30.0, capacity=10, budget=1, window=60.0)
    api = AdminApi(broker, CREDENTIALS, throttle=throttle)
    wrong = (basic(CREDENTIALS.user, "wrong"),)

    def get(headers: tuple[tuple[str, str], ...], peer: str, now: float) -> HttpResponse:
        return api.handle("GET", "/metrics", headers, b"", now, peer=peer)

    assert get((), "192.0.2.1", NOW).status == 401  # no header: the start of a Basic exchange, not a failure
    assert len(throttle) == 0
    assert get(wrong, "192.0.2.1", NOW).status == 401  # within the budget
    assert get((("Authorization", "Basic !!"),), "192.0.2.1", NOW).status == 401  # malformed counts too
    throttled = get((AUTH,), "192.0.2.1", NOW + 1)
    assert_error(throttled, AdminErrorCode.AUTH_THROTTLED, 429)
    assert ("Retry-After", "1") in throttled.headers
    assert get((AUTH,), "192.0.2.2", NOW + 1).status == 200  # another address
    assert get((AUTH,), "192.0.2.1", NOW + 2).status == 200
    assert get(wrong, "", NOW + 2).status == 401 and get((AUTH,), "", NOW + 2).status == 200  # no address
    assert api.check_login(CREDENTIALS.user, "\ud800", "192.0.2.3", NOW) is LoginOutcome.DENIED
    assert AdminApi(broker, None).check_login("a", "b", "192.0.2.3", NOW) is LoginOutcome.DISABLED


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_without_credentials_the_admin_api_is_off(broker: FakeBroker, method: str, path: str) -> None:
    response = call(AdminApi(broker, None), method, path, {"sessionName": "x", "password": "y"})
    body = assert_error(response, AdminErrorCode.ADMIN_DISABLED, 403)
    assert body["error"] == "admin API disabled: start the server with admin credentials"
    assert broker.calls == []


def test_unknown_paths_and_wrong_methods(api: AdminApi, broker: FakeBroker) -> None:
    for target in ("/", "/api", "/api/createSession/", "/API/createSession", "//healthz", "*", ""):
        assert_error(call(api, "GET", target), AdminErrorCode.NOT_FOUND, 404)
    for method, target in (("GET", "/api/createSession"), ("POST", "/healthz"), ("HEAD", "/metrics")):
        response = call(api, method, target)
        assert_error(response, AdminErrorCode.METHOD_NOT_ALLOWED, 405)
        assert response.headers == (("Allow", ROUTES[target].method),)
    assert broker.calls == []


def test_every_request_is_counted_by_route_and_status(api: AdminApi, broker: FakeBroker) -> None:
    create(api)
    call(api, "GET", "/healthz?x=" + "y" * 1000)
    call(api, "GET", "/metrics", headers=())
    for junk in ("/a", "/b?c", "/" + "z" * 5000):
        call(api, "PUT", junk)
    requests = {labels: n for name, labels, n in broker.metrics.items() if name == "http_requests"}
    assert requests == {
        ("/api/createSession", "200"): 1, ("/healthz", "200"): 1, ("/metrics", "401"): 1, ("other", "404"): 3,
    }  # fmt: skip


def test_credentials_from_a_non_utf8_environment_match_their_raw_bytes(broker: FakeBroker) -> None:
    api = AdminApi(broker, AdminCredentials("admin", b"caf\xe9".decode("utf-8", "surrogateescape")))
    token = base64.b64encode(b"admin:caf\xe9").decode()
    assert call(api, "GET", "/metrics", headers=(("Authorization", f"Basic {token}"),)).status == 200


def test_credentials_validate_and_hide_the_password() -> None:
    assert "s3cret" not in repr(CREDENTIALS)
    for user, password in (("", "pw"), ("a:b", "pw"), ("admin", "")):
        with pytest.raises(LocalProtocolError):
            AdminCredentials(user, password)


def test_the_real_broker_answers_as_the_fake_does() -> None:
    config = ServerConfig(limits=Limits(max_sessions=1), password_hash_cost=2)
    broker = Broker(config)
    api = AdminApi(broker, CREDENTIALS, session_defaults=config.default_session_settings)
    key = create(api, retryInterval=1500)["secretKey"]
    assert_error(call(api, "POST", "/api/createSession", {"sessionName": "fleet", "password": "x"}),
                 AdminErrorCode.SESSION_EXISTS, 409)  # fmt: skip
    limit = assert_error(call(api, "POST", "/api/createSession", {"sessionName": "more", "password": "x"}),
                         AdminErrorCode.INVALID_REQUEST, 400)  # fmt: skip
    assert "maximum of 1 sessions" in limit["error"]

    request = {"sessionName": "fleet", "password": "pw", "secretKey": key}
    assert_error(call(api, "POST", "/api/suspendSession", {**request, "secretKey": "no", "suspend": True}),
                 AdminErrorCode.ACCESS_DENIED, 403)  # fmt: skip
    assert call(api, "POST", "/api/suspendSession", {**request, "suspend": True}).status == 200
    assert broker.stats().per_session["fleet"].suspended
    assert answer(call(api, "GET", "/healthz")) == {"status": "ok", "sessions": 1, "connections": 0}
    assert b'fastport_session_suspended{session="fleet"} 1.0' in call(api, "GET", "/metrics").body

    assert call(api, "POST", "/api/dropSession", request).status == 200
    assert_error(call(api, "POST", "/api/dropSession", request), AdminErrorCode.UNKNOWN_SESSION, 404)
    assert broker.metrics.value("sessions_created") == broker.metrics.total("sessions_dropped") == 1
    assert not broker.output  # no connection was open: nothing to send or close


# --------------------------------------------------------------------------------------------------------
# Fuzz: any request gets an answer from the documented set, and is counted once.

STATUS_OF_CODE = {code.value: code.status for code in AdminErrorCode}
STATUSES = {200, *STATUS_OF_CODE.values()}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
names = st.sampled_from(["a", "b", "c", "d"])
plausible_fields = st.fixed_dictionaries(
    {
        "sessionName": names,
        "password": st.just("pw"),
        "secretKey": st.sampled_from(["key-a", "key-b", "wrong"]),
        "suspend": st.booleans(),
    },
    optional={wire: st.integers(-1, 10**7) for wire in SessionSettings.WIRE_FIELDS},
)
mangled_fields = st.tuples(
    plausible_fields,
    st.sampled_from(["sessionName", "password", "secretKey", "suspend", *SessionSettings.WIRE_FIELDS]),
    json_values,
).map(lambda args: {**args[0], args[1]: args[2]})
bodies = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda value: json.dumps(value).encode()),
    (plausible_fields | mangled_fields).map(lambda fields: json.dumps(fields).encode()),
)
headers = st.lists(
    st.tuples(st.sampled_from(["Authorization", "authorization", "X"]) | st.text(), st.text()), max_size=3
)
nows = st.floats(allow_nan=False)
garbage = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "HEAD"]) | st.text(max_size=8),
    st.sampled_from([*ROUTES, "/", "/api/"]) | st.text(),
    headers,
    bodies,
    nows,
)
# Requests that get past routing and (mostly) auth, so that the body checks and the broker calls are fuzzed.
well_formed = st.sampled_from(sorted(ROUTES.items())).flatmap(
    lambda item: st.tuples(st.just(item[1].method), st.just(item[0]), st.just([AUTH]) | headers, bodies, nows)
)


@given(
    credentials=st.sampled_from([CREDENTIALS, CREDENTIALS, None]),
    requests=st.lists(well_formed | garbage, min_size=1, max_size=8),
)
def test_fuzz_handle_never_raises(
    credentials: AdminCredentials | None, requests: list[tuple[str, str, list[tuple[str, str]], bytes, float]]
) -> None:
    broker = FakeBroker()
    for name in ("a", "b"):  # so that drop and suspend can succeed, and create can collide
        broker.create_session(name, "pw", 0.0)
    api = AdminApi(broker, credentials)
    for count, (method, target, request_headers, body, now) in enumerate(requests, 1):
        response = api.handle(method, target, request_headers, body, now)
        assert response.status in STATUSES
        if response.content_type == "application/json":
            obj = json.loads(response.body)
            if response.status != 200:
                assert obj["success"] is False
                assert response.status == STATUS_OF_CODE[obj["code"]]
        assert broker.metrics.total("http_requests") == count
    paths = {labels[0] for name, labels, _ in broker.metrics.items() if name == "http_requests"}
    assert paths <= {*ROUTES, "other"}


# --------------------------------------------------------------------------------------------------------
# The docs say what the code does.


def test_docs_list_every_error_code_and_gauge() -> None:
    """The counters table there is a generated block (tools/gendocs.py); these rows are written by hand."""
    docs = DOCS.read_text(encoding="utf-8")
    for code in AdminErrorCode:
        assert f"| `{code}` | {int(code.status)} | {code.doc} |" in docs
    for name, help_text in GAUGES.items():
        assert f"| `{PREFIX}{name}` | | {help_text} |" in docs
    for name, help_text in SESSION_GAUGES.items():
        assert f"| `{PREFIX}session_{name}` | `session` | {help_text} |" in docs
