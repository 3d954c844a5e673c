"""The browser client (fastport_anyio/web/client/fastport.js) retries the same refusals, and stops on the
same close code, as the Python clients: the rules are the core's (``fastport_core.client``,
``fastport_core.errors``), and the JavaScript copy must not drift."""

from __future__ import annotations

import re
from pathlib import Path

from fastport_core import client
from fastport_core.errors import CloseCode

SCRIPT = Path(__file__).resolve().parents[2] / "fastport_anyio" / "web" / "client" / "fastport.js"


def js_set(name: str) -> set[str]:
    match = re.search(rf"const {name} = new Set\(\[(.*?)\]\);", SCRIPT.read_text(encoding="utf-8"), re.S)
    assert match is not None, name
    return set(re.findall(r'"([a-z_]+)"', match.group(1)))


def test_the_browser_client_retries_the_refusals_the_python_clients_retry() -> None:
    assert js_set("TRANSIENT_PUBLISH_REFUSALS") == set(client._TRANSIENT_REFUSALS)
    assert js_set("RETRYABLE_INIT_REFUSALS") == {str(code) for code in client._RETRYABLE_INIT_REFUSALS}


def test_the_browser_client_stops_on_the_close_code_that_means_replaced() -> None:
    # Found by this test: the script had 4005 (the handshake timeout) for "another connection took over".
    match = re.search(r"const CLOSE_REPLACED = (\d+);", SCRIPT.read_text(encoding="utf-8"))
    assert match is not None and int(match.group(1)) == CloseCode.REPLACED
