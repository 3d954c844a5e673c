"""Who the client is: trusted proxies, forwarded headers, the throttle key; and the lock-out cases of
issue 8 (a shared address behind a NAT or a reverse proxy) through the whole server core."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastport_core.config import ServerConfig
from fastport_core.errors import LocalProtocolError
from fastport_core.peers import TrustedProxies, client_address, throttle_key
from fastport_core.server import ServerCore
from fastport_core.websocket import WebSocket

from .wire import RawPeer, basic_auth, http_request

PROXIES = TrustedProxies(["10.0.0.0/8", "::1"])


def test_trusted_proxies_take_addresses_and_networks_and_refuse_the_rest() -> None:
    assert "10.1.2.3" in PROXIES and "::1" in PROXIES and "::ffff:10.0.0.1" in PROXIES
    assert "11.0.0.1" not in PROXIES and "::2" not in PROXIES and "garbage" not in PROXIES
    assert not TrustedProxies([])
    with pytest.raises(LocalProtocolError, match="not-an-ip"):
        TrustedProxies(["not-an-ip"])
    with pytest.raises(LocalProtocolError):
        ServerConfig(trusted_proxies=("10.0.0.0/33",))


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # Not a trusted proxy: the headers are anyone's to write, so they are ignored.
        ("203.0.113.9", [("x-forwarded-for", "1.2.3.4")], "203.0.113.9"),
        # A trusted proxy without the headers: the proxy itself.
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", [("x-forwarded-for", "198.51.100.7")], "198.51.100.7"),
        # The rightmost entry that is not a trusted proxy: what the client wrote itself is never chosen.
        ("10.0.0.1", [("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.2")], "198.51.100.7"),
        ("10.0.0.1", [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "198.51.100.7")], "198.51.100.7"),
        ("10.0.0.1", [("x-forwarded-for", "10.0.0.3, 10.0.0.2")], "10.0.0.3"),
        ("10.0.0.1", [("x-forwarded-for", " , ")], "10.0.0.1"),
        # RFC 7239, with ports, quotes and brackets; it wins over X-Forwarded-For.
        ("::1", [("forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43")], "192.0.2.60"),
        ("::1", [("forwarded", 'for="[2001:db8:cafe::17]:4711"')], "2001:db8:cafe::17"),
        ("::1", [("forwarded", 'For="192.0.2.43:8080", for=10.0.0.5')], "192.0.2.43"),
        ("::1", [("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")], "2.2.2.2"),
        ("::1", [("forwarded", "for=unknown")], "unknown"),
    ],
)
def test_client_address(peer: str, headers: list[tuple[str, str]], expected: str) -> None:
    assert client_address(peer, headers, PROXIES) == expected
    assert client_address(peer, headers, TrustedProxies([])) == peer


def test_throttle_keys_group_ipv6_by_64() -> None:
    assert throttle_key("192.0.2.1") == "192.0.2.1"
    assert throttle_key("2001:db8::1") == throttle_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert throttle_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert throttle_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert throttle_key("unknown") == "unknown"


@given(
    st.text(max_size=40), st.lists(st.tuples(st.sampled_from(["forwarded", "x-forwarded-for"]), st.text()))
)
def test_client_address_never_raises(peer: str, headers: list[tuple[str, str]]) -> None:
    assert isinstance(client_address(peer, headers, PROXIES), str)
    assert isinstance(throttle_key(client_address("10.0.0.1", headers, PROXIES)), str)


# -- through the server core ------------------------------------------------------------------------------


def make_core(**config: Any) -> ServerCore:
    from fastport_core.admin import AdminCredentials

    core = ServerCore(
        ServerConfig(password_hash_cost=2, **config), admin_credentials=AdminCredentials("a", "b")
    )
    core.broker.create_session("demo", "pw", 0.0)
    return core


class ForwardedPeer(RawPeer):
    """A RawPeer whose upgrade request carries extra headers (what a reverse proxy adds)."""

    def __init__(self, core: ServerCore, peer: str, headers: tuple[tuple[str, str], ...]) -> None:
        self.core = core
        self.conn = core.open_connection(0.0, peer)
        key = base64.b64encode(b"0123456789abcdef").decode()
        extra = (("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key),
                 ("Sec-WebSocket-Version", "13"), *headers)  # fmt: skip
        core.receive_data(
            self.conn, http_request("GET", "/", headers=extra).replace(b"Content-Length: 0\r\n", b""), 0.0
        )
        assert core.data_to_send(self.conn).startswith(b"HTTP/1.1 101")
        self.ws = WebSocket(client=True, max_message_size=1 << 24, now=0.0, ping_interval=None)
        self.received = []


def init_code(peer: RawPeer, password: str) -> str | None:
    answer = peer.init("demo", password)
    return None if answer["success"] else str(answer["code"])


def test_one_mistyping_client_does_not_lock_out_the_next_one_from_the_same_address() -> None:
    core = make_core()
    assert init_code(RawPeer(core, peer="127.0.0.1"), "wrong") == "auth_failed"
    assert init_code(RawPeer(core, peer="127.0.0.1"), "pw") is None


def test_behind_a_trusted_proxy_each_client_has_its_own_budget() -> None:
    core = make_core(trusted_proxies=("10.0.0.1",), auth_failure_budget=1)
    guesser = (("X-Forwarded-For", "198.51.100.66"),)
    for _ in range(2):
        assert init_code(ForwardedPeer(core, "10.0.0.1", guesser), "wrong") == "auth_failed"
    assert init_code(ForwardedPeer(core, "10.0.0.1", guesser), "pw") == "auth_throttled"
    # Another client through the same proxy is not affected, and the guesser cannot pose as it.
    assert init_code(ForwardedPeer(core, "10.0.0.1", (("X-Forwarded-For", "198.51.100.7"),)), "pw") is None
    spoof = (("X-Forwarded-For", "198.51.100.7, 198.51.100.66"),)
    assert init_code(ForwardedPeer(core, "10.0.0.1", spoof), "pw") == "auth_throttled"


def test_forwarded_headers_from_an_untrusted_peer_are_ignored() -> None:
    core = make_core(auth_failure_budget=1)
    for n in range(2):  # a guesser that writes a new X-Forwarded-For each time still pays per address
        assert init_code(ForwardedPeer(core, "203.0.113.5", (("X-Forwarded-For", f"1.1.1.{n}"),)), "x")
    assert init_code(ForwardedPeer(core, "203.0.113.5", (("X-Forwarded-For", "1.1.1.9"),)), "pw") == (
        "auth_throttled"
    )


def test_admin_basic_failures_are_throttled_by_the_same_mechanism() -> None:
    core = make_core(auth_failure_budget=2, auth_throttle_base=4.0)

    def status(password: str, now: float) -> bytes:
        conn = core.open_connection(now, "192.0.2.1")
        headers = (("Authorization", basic_auth("a", password)),)
        core.receive_data(conn, http_request("GET", "/metrics", headers=headers), now)
        return core.data_to_send(conn).split(b" ", 2)[1]

    assert status("b", 0.0) == b"200"
    for _ in range(3):
        assert status("wrong", 0.0) == b"401"
    assert status("b", 1.0) == b"429"  # even the right password, without a comparison
    assert status("b", 4.0) == b"200"
    assert core.broker.stats().throttled_peers == 1
    # The web console's login goes through the same check and the same budget.
    assert core.admin.check_login("a", "wrong", "192.0.2.1", 4.0).value == "denied"
    assert core.admin.check_login("a", "b", "192.0.2.1", 4.0).value == "throttled"
    assert core.admin.check_login("a", "b", "192.0.2.2", 4.0).value == "ok"
