"""The web console's HTTP side in memory: static files and headers, login, CSRF, admin actions, history."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from fastport_core.admin import AdminCredentials, HttpResponse
from fastport_core.config import ServerConfig
from fastport_core.console import (
    COOKIE_NAME,
    HISTORY_SAMPLES,
    MAX_LOGINS,
    SAMPLE_INTERVAL,
    static_routes,
)
from fastport_core.errors import LocalProtocolError
from fastport_core.server import ServerCore

ADMIN = AdminCredentials("ops", "s3cret")
HOST = "127.0.0.1:3000"
WEB = {
    "admin/index.html": b"<html>admin</html>",
    "admin/admin.js": b"//js",
    "client/fastport.js": b"//m",
    "style.css": b"body{}",
}


def make_core(admin: AdminCredentials | None = ADMIN, history: bool = True) -> ServerCore:
    counter = itertools.count()
    core = ServerCore(
        ServerConfig(password_hash_cost=2),
        admin_credentials=admin,
        web_files=WEB,
        console_history=history,
        random=lambda n: next(counter).to_bytes(n, "big"),
    )
    core.broker.create_session("demo", "pw", 0.0)
    return core


def request(
    core: ServerCore,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    now: float = 1.0,
    peer: str = "",
) -> HttpResponse:
    all_headers = {"host": HOST, **(headers or {})}
    raw = b"" if body is None else orjson.dumps(body)
    response = core.console.handle(method, path, tuple(all_headers.items()), raw, now, peer=peer)
    assert response is not None
    return response


def header(response: HttpResponse, name: str) -> str:
    return next(value for key, value in response.headers if key.lower() == name.lower())


def answer(response: HttpResponse) -> Any:
    return orjson.loads(response.body)


def log_in(core: ServerCore, now: float = 1.0) -> tuple[str, str]:
    """Returns (cookie header value, CSRF token)."""
    response = request(
        core,
        "POST",
        "/console/login",
        {"user": "ops", "password": "s3cret"},
        {"x-fastport-csrf": "login", "origin": f"http://{HOST}"},
        now,
    )
    assert response.status == 200, response.body
    cookie = header(response, "Set-Cookie").split(";")[0]
    return cookie, answer(response)["csrfToken"]


def post(
    core: ServerCore, path: str, body: Any, session: tuple[str, str], now: float = 1.0, **extra: str
) -> HttpResponse:
    cookie, csrf = session
    return request(core, "POST", path, body, {"cookie": cookie, "x-fastport-csrf": csrf, **extra}, now)


def test_static_files_have_exact_types_and_a_strict_policy() -> None:
    core = make_core()
    page = request(core, "GET", "/admin/")
    assert page.status == 200 and page.body == b"<html>admin</html>"
    assert page.content_type == "text/html; charset=utf-8"
    policy = header(page, "Content-Security-Policy")
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert header(page, "X-Content-Type-Options") == "nosniff"
    assert request(core, "GET", "/admin/admin.js").content_type == "text/javascript; charset=utf-8"
    assert header(request(core, "GET", "/client/fastport.js"), "Access-Control-Allow-Origin") == "*"
    assert request(core, "GET", "/admin").status == 308
    assert request(core, "POST", "/admin/").status == 405
    assert core.console.handle("GET", "/healthz", (), b"", 1.0) is None  # the admin API's


def test_static_routes_refuse_unknown_types_and_unsafe_paths() -> None:
    with pytest.raises(LocalProtocolError):
        static_routes({"admin/x.exe": b""})
    with pytest.raises(LocalProtocolError):
        static_routes({"../x.js": b""})


def test_status_and_login_use_the_admin_credentials() -> None:
    core = make_core()
    assert answer(request(core, "GET", "/console/status")) == {"adminEnabled": True, "loggedIn": False}
    wrong = request(
        core, "POST", "/console/login", {"user": "ops", "password": "nope"}, {"x-fastport-csrf": "login"}
    )
    assert wrong.status == 401 and answer(wrong)["code"] == "login_failed"
    assert all(key != "Set-Cookie" for key, _ in wrong.headers)
    session = log_in(core)
    cookie_header = session[0]
    assert cookie_header.startswith(f"{COOKIE_NAME}=")
    status = answer(request(core, "GET", "/console/status", headers={"cookie": cookie_header}))
    assert status == {"adminEnabled": True, "loggedIn": True, "csrfToken": session[1]}


def test_console_logins_share_the_admin_apis_failure_budget() -> None:
    core = make_core()
    budget = core.config.auth_failure_budget
    wrong = {"user": "ops", "password": "nope"}
    csrf = {"x-fastport-csrf": "login"}
    codes = [
        answer(request(core, "POST", "/console/login", wrong, csrf, peer="10.0.0.5"))["code"]
        for _ in range(budget + 1)
    ]
    assert codes == ["login_failed"] * (budget + 1)  # the budget's failures cost nothing; the next one counts
    right = {"user": "ops", "password": "s3cret"}
    throttled = request(core, "POST", "/console/login", right, csrf, peer="10.0.0.5")
    assert throttled.status == 429 and answer(throttled)["code"] == "login_throttled"
    assert int(header(throttled, "Retry-After")) >= 1
    # The same address is throttled on the Basic-auth admin API too: one budget, one mechanism.
    basic = core.admin.handle(
        "GET", "/metrics", (("authorization", "Basic b3BzOnMzY3JldA=="),), b"", 1.0, peer="10.0.0.5"
    )
    assert basic.status == 429
    assert (
        request(core, "POST", "/console/login", right, csrf, peer="10.0.0.6").status == 200
    )  # others unaffected


def test_the_login_cookie_is_httponly_strict_and_expires() -> None:
    core = make_core()
    response = request(
        core, "POST", "/console/login", {"user": "ops", "password": "s3cret"}, {"x-fastport-csrf": "login"}
    )
    cookie = header(response, "Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console/" in cookie
    assert "Max-Age=28800" in cookie and "Secure" not in cookie
    cookie_value = cookie.split(";")[0]
    assert request(core, "GET", "/console/overview", headers={"cookie": cookie_value}, now=1.0).status == 200
    expired = request(core, "GET", "/console/overview", headers={"cookie": cookie_value}, now=1.0 + 28800)
    assert expired.status == 401 and answer(expired)["code"] == "login_required"


def test_secure_cookies_with_tls() -> None:
    core = ServerCore(admin_credentials=ADMIN, secure_cookies=True)
    response = core.console.handle(
        "POST", "/console/login", (("x-fastport-csrf", "l"),), b'{"user":"ops","password":"s3cret"}', 1.0
    )
    assert response is not None and "; Secure" in header(response, "Set-Cookie")


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no CSRF header
        {"x-fastport-csrf": "wrong"},
        {"origin": "http://evil.example"},
        {"sec-fetch-site": "cross-site"},
    ],
    ids=["missing-header", "wrong-token", "other-origin", "cross-site"],
)
def test_state_changing_requests_need_the_csrf_token_and_this_origin(headers: dict[str, str]) -> None:
    core = make_core()
    cookie, csrf = log_in(core)
    sent = {"cookie": cookie, "x-fastport-csrf": csrf, **headers}
    if not headers:
        del sent["x-fastport-csrf"]
    response = request(core, "POST", "/console/dropSession", {"sessionName": "demo"}, sent)
    assert response.status == 403 and answer(response)["code"] == "csrf_failed"
    assert "demo" in core.broker.session_names()


def test_login_itself_needs_the_custom_header_and_this_origin() -> None:
    core = make_core()
    body = {"user": "ops", "password": "s3cret"}
    assert request(core, "POST", "/console/login", body).status == 403
    other = request(core, "POST", "/console/login", body, {"x-fastport-csrf": "l", "origin": "http://x.test"})
    assert other.status == 403


def test_the_console_acts_as_the_admin_without_session_secrets() -> None:
    core = make_core()
    session = log_in(core)
    created = post(core, "/console/createSession", {"sessionName": "new", "password": "p"}, session)
    assert created.status == 200 and answer(created)["secretKey"]
    suspended = post(core, "/console/suspendSession", {"sessionName": "new", "suspend": True}, session)
    assert answer(suspended) == {"success": True, "sessionName": "new", "suspended": True}
    assert core.broker.stats().per_session["new"].suspended
    assert post(core, "/console/dropSession", {"sessionName": "new"}, session).status == 200
    assert "new" not in core.broker.session_names()
    missing = post(core, "/console/dropSession", {"sessionName": "new"}, session)
    assert missing.status == 404 and answer(missing)["code"] == "unknown_session"
    bad = post(core, "/console/suspendSession", {"sessionName": "demo", "suspend": "yes"}, session)
    assert bad.status == 400


def test_every_console_endpoint_but_status_and_login_needs_a_login() -> None:
    core = make_core()
    assert request(core, "GET", "/console/overview").status == 401
    no_login = request(
        core, "POST", "/console/dropSession", {"sessionName": "demo"}, {"x-fastport-csrf": "x"}
    )
    assert no_login.status == 401
    assert "demo" in core.broker.session_names()


def test_logout_forgets_the_login() -> None:
    core = make_core()
    session = log_in(core)
    response = post(core, "/console/logout", {}, session)
    assert "Max-Age=0" in header(response, "Set-Cookie")
    assert request(core, "GET", "/console/overview", headers={"cookie": session[0]}).status == 401


def test_logins_are_bounded() -> None:
    core = make_core()
    first = log_in(core, now=1.0)
    for i in range(MAX_LOGINS):
        log_in(core, now=2.0 + i)
    assert request(core, "GET", "/console/overview", headers={"cookie": first[0]}).status == 401


def test_without_admin_credentials_the_console_offers_nothing() -> None:
    core = make_core(admin=None)
    assert answer(request(core, "GET", "/console/status")) == {"adminEnabled": False, "loggedIn": False}
    login = request(core, "POST", "/console/login", {"user": "a", "password": "b"}, {"x-fastport-csrf": "l"})
    assert login.status == 403 and answer(login)["code"] == "admin_disabled"
    assert core.console.next_deadline() is None


def test_history_is_sampled_by_the_cores_timer_and_bounded() -> None:
    core = make_core()
    assert core.next_deadline() == float("-inf")  # the first sample is due at once
    now = 100.0
    for _ in range(HISTORY_SAMPLES + 10):
        core.handle_timeout(now)
        deadline = core.next_deadline()
        assert deadline == now + SAMPLE_INTERVAL
        now = deadline
    overview = core.console.overview(now)
    assert len(overview["history"]) == HISTORY_SAMPLES
    assert overview["history"][-1]["age"] == SAMPLE_INTERVAL
    assert [s["sessionName"] for s in overview["sessions"]] == ["demo"]


def test_rates_come_from_the_counters_between_samples() -> None:
    core = make_core()
    core.handle_timeout(10.0)
    cell = core.metrics.cell("publishes", "demo")
    cell.value += 50
    core.metrics.inc("deliveries", "demo", amount=100)
    core.metrics.inc("deliveries_given_up", "demo", "retries", amount=5)
    core.handle_timeout(15.0)
    overview = core.console.overview(15.0)
    demo = overview["sessions"][0]
    assert (demo["publishRate"], demo["deliveryRate"]) == (10.0, 20.0)
    assert (demo["publishes"], demo["deliveries"], demo["givenUp"]) == (50, 100, 5)
    assert overview["history"][-1]["publishRate"] == 10.0
    assert overview["history"][-1]["givenUpRate"] == 1.0


def test_history_is_off_unless_asked_for() -> None:
    assert make_core(history=False).next_deadline() is None
