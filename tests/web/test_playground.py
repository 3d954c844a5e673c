"""The playground and the JavaScript client (/client/fastport.js) in a real browser, against Python clients.

Every message crosses languages: a Python client publishes and the page shows it decrypted, the page
publishes and a Python subscriber gets it decrypted, under both suites. The JavaScript client's
reconnect, resubscribe, resend, dedupe and integrity behaviour is driven through the module itself in
the page (``page.evaluate``), since the playground's form only exercises the happy path.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fastport_core.client_api import Message
from fastport_core.crypto import generate_key
from fastport_threads import connect

from .conftest import PASSWORD, SESSION, WAIT, WebServer

expect: Any
try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture fails with the reason
    expect = None

ROOT = Path(__file__).resolve().parents[2]
SUITES = ["authenticated", "legacy"]


def open_playground(page: Any, server: WebServer, key: str, suite: str) -> None:
    page.goto(server.http + "/playground/")
    expect(page.locator("#url")).to_have_value(server.ws)
    page.fill("#session", SESSION)
    page.fill("#password", PASSWORD)
    page.fill("#key", key)
    page.select_option("#suite", suite)
    page.click("#connect")
    expect(page.locator("#status")).to_have_text("ready")


@pytest.mark.parametrize("suite", SUITES)
def test_a_python_publish_appears_decrypted_in_the_page(
    page: Any, server: WebServer, key: str, suite: str
) -> None:
    open_playground(page, server, key, suite)
    page.fill("#sub-topic", "room/1")
    page.click("#subscribe")
    expect(page.locator('#subscriptions li[data-topic="room/1"]')).to_be_visible()
    with connect(server.ws, session=SESSION, password=PASSWORD, key=key, suite=suite) as python:
        message_id = python.publish("room/1", "Grüße from Python 🐍")
    message = page.locator("#messages li.message").first
    expect(message.locator(".payload")).to_have_text("Grüße from Python 🐍")
    expect(message.locator(".id")).to_have_text(message_id)
    expect(message.locator(".topic")).to_have_text("room/1")


@pytest.mark.parametrize("suite", SUITES)
def test_a_page_publish_reaches_a_python_subscriber_decrypted(
    page: Any, server: WebServer, key: str, suite: str
) -> None:
    open_playground(page, server, key, suite)
    with connect(server.ws, session=SESSION, password=PASSWORD, key=key, suite=suite) as python:
        stream = python.messages("room/2", timeout=WAIT)
        page.fill("#pub-topic", "room/2")
        page.fill("#pub-text", "hello from the browser ✓")
        page.click("#publish")
        received: Message = next(stream)
        assert received.payload == "hello from the browser ✓"
        assert received.topic == "room/2"
        expect(page.locator("#publish-result")).to_have_text(f"confirmed {received.message_id}")


def test_a_wrong_password_is_reported_in_the_playground(page: Any, server: WebServer, key: str) -> None:
    page.goto(server.http + "/playground/")
    page.fill("#session", SESSION)
    page.fill("#password", "wrong")
    page.fill("#key", key)
    page.click("#connect")
    expect(page.locator("#log li").first).to_contain_text("cannot connect: init refused")
    expect(page.locator("#connect")).to_be_enabled()


def test_the_generated_key_works_with_python(page: Any, server: WebServer) -> None:
    page.goto(server.http + "/playground/")
    page.click("#generate")
    key = page.locator("#key").input_value()
    open_playground(page, server, key, "authenticated")
    page.fill("#sub-topic", "k")
    page.click("#subscribe")
    expect(page.locator('#subscriptions li[data-topic="k"]')).to_be_visible()
    with connect(server.ws, session=SESSION, password=PASSWORD, key=key) as python:
        python.publish("k", "with a browser-made key")
    expect(page.locator("#messages .payload").first).to_have_text("with a browser-made key")


# -- the module itself, driven in the page --------------------------------------------------------------

SETUP = """async ([url, session, password, key, suite]) => {
  const fastport = await import("/client/fastport.js");
  window.received = [];
  window.failures = [];
  window.states = [];
  window.client = await fastport.connect(url, {
    session, password, key, suite,
    reconnectInitialDelay: 20, reconnectMaxDelay: 200, publishRetryInterval: 300,
    onIntegrityFailure: (failure) => window.failures.push(failure),
    onStateChange: (state) => window.states.push(state),
  });
  await window.client.subscribe("js", (m) => window.received.push(
    {topic: m.topic, payload: typeof m.payload === "string" ? m.payload : Array.from(m.payload),
     messageId: m.messageId, timestamp: m.timestamp}));
}"""


def start_module_client(page: Any, server: WebServer, key: str, suite: str = "authenticated") -> None:
    page.goto(server.http + "/playground/")
    page.evaluate(SETUP, [server.ws, SESSION, PASSWORD, key, suite])


def received(page: Any, count: int) -> list[dict[str, Any]]:
    page.wait_for_function("(n) => window.received.length >= n", arg=count)
    result: list[dict[str, Any]] = page.evaluate("window.received")
    return result


def test_binary_payloads_cross_both_ways(page: Any, server: WebServer, key: str) -> None:
    start_module_client(page, server, key)
    with connect(server.ws, session=SESSION, password=PASSWORD, key=key) as python:
        stream = python.messages("js-back", timeout=WAIT)
        python.publish("js", bytes([0, 1, 2, 255]))
        assert received(page, 1)[0]["payload"] == [0, 1, 2, 255]
        page.evaluate('window.client.publish("js-back", new Uint8Array([9, 8, 7]))')
        assert next(stream).payload == bytes([9, 8, 7])


def test_integrity_failures_are_reported_acked_and_not_delivered(
    page: Any, server: WebServer, key: str
) -> None:
    start_module_client(page, server, key)
    with connect(server.ws, session=SESSION, password=PASSWORD, key=generate_key()) as wrong_key:
        bad_id = wrong_key.publish("js", "sealed under another key")
    with connect(server.ws, session=SESSION, password=PASSWORD, key=key) as python:
        good_id = python.publish("js", "genuine")
    assert [m["messageId"] for m in received(page, 1)] == [good_id]
    failures = page.evaluate("window.failures")
    assert [f["messageId"] for f in failures] == [bad_id]
    assert "authentication failed" in failures[0]["error"]
    # ACKed: the server owes nobody that message any more (no retries, nothing un-ACKed left).
    page.wait_for_function("() => window.client.integrityFailures === 1")


def test_reconnect_resubscribes_and_resends_unconfirmed_publishes(
    page: Any, server: WebServer, key: str
) -> None:
    start_module_client(page, server, key)
    server.stop()
    page.wait_for_function('() => window.states.includes("waiting")')
    # Published while the server is down: it stays pending and is resent once the client is back, so
    # the promise resolves (to its id) only with the new server's publish_response.
    page.evaluate('() => { window.pending = window.client.publish("js-later", "sent after the outage"); }')
    server.start()
    page.wait_for_function('() => window.client.state === "ready"')
    message_id = page.evaluate("window.pending")  # resolved by now, or about to be (the resend)
    assert isinstance(message_id, str) and len(message_id) == 32
    assert page.evaluate("window.client.state") == "ready"
    # The subscription was renewed on the new server without the application doing anything.
    with connect(server.ws, session=SESSION, password=PASSWORD, key=key) as python:
        python.publish("js", "after the reconnection")
    assert received(page, 1)[0]["payload"] == "after the reconnection"


def test_redeliveries_reach_the_application_once(page: Any, server: WebServer, key: str) -> None:
    start_module_client(page, server, key)
    # Hand the client the same frame twice, as a server retry would (the dedupe window's job).
    with connect(server.ws, session=SESSION, password=PASSWORD, key=key) as python:
        python.publish("js", "once")
    first = received(page, 1)[0]
    page.evaluate(
        """(m) => window.client._deliveries.then(() => { window.client._onMessage(m);
               window.client._onMessage(m); return window.client._deliveries; })""",
        {
            "type": "message",
            "topic": "js",
            "messageId": first["messageId"],
            "timestamp": first["timestamp"],
            "data": "x:y",
            "hash": "v1:00",
        },
    )
    assert page.evaluate("window.received.length") == 1
    assert page.evaluate("window.failures.length") == 0  # a known id is not even opened again


def test_the_js_suites_reproduce_the_python_known_answer_vectors() -> None:
    """In Node (WebCrypto is built in): every vector of tests/core/data/crypto_vectors.json, byte for byte."""
    result = subprocess.run(
        [
            "node",
            str(ROOT / "tests/js/crypto_vectors.mjs"),
            str(ROOT / "fastport_anyio/web/client/fastport.js"),
            str(ROOT / "tests/core/data/crypto_vectors.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["failures"] == []
    assert report["checked"] >= 100


def test_the_js_client_gives_a_publish_up_before_the_servers_dedupe_window_forgets_it() -> None:
    """In Node, with a scripted WebSocket that never confirms: re-sent until ``publishGiveUpAfter``, then
    rejected and never sent again; a horizon at the server's 600000 ms dedupe window is refused."""
    result = subprocess.run(
        [
            "node",
            str(ROOT / "tests/js/publish_give_up.mjs"),
            str(ROOT / "fastport_anyio/web/client/fastport.js"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout)
    assert "publishGiveUpAfter" in report["refused"]
    assert "not confirmed within publishGiveUpAfter (200 ms)" in report["error"]
    assert report["elapsed"] >= 190 and report["publishes"] >= 3
    assert report["publishesLater"] == report["publishes"]  # nothing re-sent past the horizon
