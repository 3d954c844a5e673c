"""The web console through the anyio server, on both backends: the package's files are found and served,
and a login through the cookie can act as the admin. (The browser tests in tests/web drive the pages.)"""

from __future__ import annotations

import orjson
import pytest

from fastport_anyio import Server
from fastport_anyio.server import web_files

from .conftest import ADMIN, http_request

pytestmark = pytest.mark.anyio


def test_the_package_ships_every_console_file() -> None:
    assert {
        "admin/index.html",
        "admin/admin.js",
        "playground/index.html",
        "playground/playground.js",
        "client/fastport.js",
        "style.css",
    } <= set(web_files())


async def test_pages_are_served_with_their_policy(server: Server) -> None:
    status, headers, body = await http_request(server.port, "GET", "/playground/")
    assert status == 200 and b'src="/playground/playground.js"' in body
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["content-security-policy"]
    status, headers, body = await http_request(server.port, "GET", "/client/fastport.js")
    assert status == 200 and b"export async function connect" in body


async def test_a_console_login_drops_a_session_without_its_secrets(server: Server) -> None:
    credentials = orjson.dumps({"user": ADMIN.user, "password": ADMIN.password})
    status, headers, body = await http_request(
        server.port, "POST", "/console/login", body=credentials, headers={"X-Fastport-CSRF": "login"}
    )
    assert status == 200
    cookie = headers["set-cookie"].split(";")[0]
    csrf = orjson.loads(body)["csrfToken"]
    status, _, body = await http_request(server.port, "GET", "/console/overview", headers={"Cookie": cookie})
    assert status == 200
    assert [s["sessionName"] for s in orjson.loads(body)["sessions"]] == ["alpha", "beta"]
    status, _, _ = await http_request(
        server.port,
        "POST",
        "/console/dropSession",
        body=b'{"sessionName": "beta"}',
        headers={"Cookie": cookie, "X-Fastport-CSRF": csrf},
    )
    assert status == 200
    assert server.core.broker.session_names() == ["alpha"]
