"""The admin console in a real browser (Chromium): login, live session figures, actions, charts.

The server runs for real (anyio, in a thread); the page is driven by Playwright exactly as an operator
would use it. What the console promises without a browser (cookies, CSRF, headers, history) is tested in
memory in tests/core/test_console.py.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Any

from fastport_threads import connect

from .conftest import ADMIN, SESSION, WAIT, WebServer

expect: Any
try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture fails with the reason
    expect = None


def log_in(page: Any, server: WebServer, password: str = ADMIN.password) -> None:
    page.goto(server.http + "/admin/")
    page.fill("#login-user", ADMIN.user)
    page.fill("#login-password", password)
    page.click("#login-form button[type=submit]")


def row(page: Any, session: str) -> Any:
    return page.locator(f'#sessions tr[data-session="{session}"]')


def test_a_wrong_password_is_refused_and_nothing_is_shown(page: Any, server: WebServer) -> None:
    log_in(page, server, password="not-the-password")
    expect(page.locator("#login-error")).to_have_text(re.compile("wrong admin user or password"))
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.context.cookies() == []
    assert page.locator("#login-password").input_value() == ""  # the password does not stay in the page


def test_login_shows_a_session_created_through_the_api_with_its_figures(
    page: Any, server: WebServer, key: str
) -> None:
    status, answer = server.api("/api/createSession", {"sessionName": "from-api", "password": "pw-api"})
    assert status == 200, answer
    log_in(page, server)
    expect(page.locator("#dashboard")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "fastport_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console/"
    assert cookie["expires"] > 0  # an expiry, not a browser-session cookie
    expect(row(page, "from-api")).to_be_visible()
    expect(row(page, "from-api").locator(".connections")).to_have_text("0")
    # Figures are live: a client that connects and subscribes shows up without reloading the page.
    with connect(server.ws, session="from-api", password="pw-api", key=key) as client:
        client.subscribe("t", lambda message: None)
        expect(row(page, "from-api").locator(".connections")).to_have_text("1")
        expect(row(page, "from-api").locator(".subscribers")).to_have_text("1")
        client.publish("t", "hello")
        expect(row(page, "from-api").locator(".publishes")).to_have_text("1")
    expect(row(page, "from-api").locator(".connections")).to_have_text("0")
    # A reload keeps the login (the cookie), and the page never shows the admin password anywhere.
    page.reload()
    expect(row(page, "from-api")).to_be_visible()
    assert ADMIN.password not in page.content()


def test_create_suspend_resume_and_drop_through_the_page(page: Any, server: WebServer, key: str) -> None:
    log_in(page, server)
    page.fill("#create-name", "made-in-page")
    page.fill("#create-password", "page-pw")
    page.click("#create-form button[type=submit]")
    expect(page.locator("#created-secret")).not_to_be_empty()
    expect(row(page, "made-in-page")).to_be_visible()
    # The session is real: a Python client can use it.
    with connect(server.ws, session="made-in-page", password="page-pw", key=key) as client:
        assert client.session == "made-in-page"

    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    row(page, "made-in-page").locator("button.toggle").click()
    expect(row(page, "made-in-page").locator(".state")).to_have_text("suspended")
    row(page, "made-in-page").locator("button.toggle").click()
    expect(row(page, "made-in-page").locator(".state")).to_have_text("active")
    row(page, "made-in-page").locator("button.drop").click()
    expect(row(page, "made-in-page")).to_have_count(0)
    expect(page.locator("#action-result")).to_have_text('session "made-in-page" dropped')
    assert [m.split('"')[0] for m in dialogs] == ["Suspend session ", "Resume session ", "Drop session "]
    status, _ = server.api(
        "/api/dropSession", {"sessionName": "made-in-page", "password": "page-pw", "secretKey": "x"}
    )
    assert status == 404  # really gone


def test_a_dismissed_confirmation_drops_nothing(page: Any, server: WebServer) -> None:
    log_in(page, server)
    page.on("dialog", lambda dialog: dialog.dismiss())
    row(page, SESSION).locator("button.drop").click()
    page.wait_for_timeout(300)  # nothing is supposed to happen: give a wrong request the time to land
    page.reload()
    expect(row(page, SESSION)).to_be_visible()


def test_the_charts_draw_the_servers_history(page: Any, server: WebServer) -> None:
    log_in(page, server)
    # The core took its first sample when the server started, so a fresh page has history to draw.
    expect(page.locator("#chart-rates polyline")).to_have_count(3)
    expect(page.locator("#chart-connections polyline")).to_have_count(3)
    expect(page.locator("#history-span")).to_contain_text("last 10 minutes")


def test_logout_ends_the_login(page: Any, server: WebServer) -> None:
    log_in(page, server)
    expect(page.locator("#dashboard")).to_be_visible()
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    page.reload()
    expect(page.locator("#login")).to_be_visible()


def test_without_admin_credentials_the_console_says_so_and_offers_nothing(page: Any, portal: Any) -> None:
    handle = WebServer(portal, None)
    try:
        page.goto(handle.http + "/admin/")
        expect(page.locator("#disabled")).to_be_visible()
        expect(page.locator("#login")).to_be_hidden()
        expect(page.locator("#dashboard")).to_be_hidden()
    finally:
        handle.stop()


def test_pages_are_sent_with_a_strict_content_security_policy(server: WebServer) -> None:
    for path, content_type in [
        ("/admin/", "text/html"),
        ("/admin/admin.js", "text/javascript"),
        ("/playground/", "text/html"),
        ("/client/fastport.js", "text/javascript"),
        ("/style.css", "text/css"),
    ]:
        with urllib.request.urlopen(server.http + path, timeout=WAIT) as response:
            assert response.headers["Content-Type"].startswith(content_type), path
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            body = response.read().decode()
            assert "<script>" not in body and " on" + "click=" not in body  # no inline code at all
