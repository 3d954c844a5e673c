"""Fixtures for the browser tests: a real server in a background thread and Debian's Chromium via Playwright.

One Chromium per test module (starting it costs about a second); each test gets a fresh browser context,
so cookies never leak between tests. Chromium is never downloaded: Playwright drives the system's
``/usr/bin/chromium`` (CI installs it with apt-get, ``.ci/run``). Without it these tests *fail* with a clear
message rather than skip, so that a machine without a browser cannot pass them silently.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anyio.from_thread
import pytest

from fastport_anyio.server import SessionSpec
from fastport_core.admin import AdminCredentials
from fastport_core.crypto import generate_key
from tests.background import WAIT, ServerHandle, make_server_config

ADMIN = AdminCredentials("ops", "console-secret")
SESSION = "web"
PASSWORD = "web-password"
WAIT_MS = WAIT * 1000

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """The system Chromium, or a test failure that says how to install it."""
    path = os.environ.get("FASTPORT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail(
            "Chromium not found (looked for $FASTPORT_CHROMIUM, `chromium` on PATH, /usr/bin/chromium): "
            "install it with `apt-get install -y chromium` (.ci/run does this in CI)",
            pytrace=False,
        )
    return path


class WebServer(ServerHandle):
    """The background test server with the admin API on (or off) and the web session from the start."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, admin: AdminCredentials | None) -> None:
        sessions = (SessionSpec(SESSION, PASSWORD, secret_key="web-secret"),)
        super().__init__(portal, make_server_config(), sessions=sessions, admin=admin)
        self._web_admin = admin

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self._port}"

    def api(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST to the admin JSON API with HTTP Basic credentials."""
        assert self._web_admin is not None
        admin = self._web_admin
        basic = base64.b64encode(f"{admin.user}:{admin.password}".encode()).decode()
        request = urllib.request.Request(
            self.http + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal() as portal:
        yield portal


@pytest.fixture
def server(portal: anyio.from_thread.BlockingPortal) -> Iterator[WebServer]:
    handle = WebServer(portal, ADMIN)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page in a fresh context (no cookies). Uncaught script errors and Content-Security-Policy
    violations (which Chromium reports on the console) fail the test at its end."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on(
        "console",
        lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None,
    )
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def key() -> str:
    return generate_key()
