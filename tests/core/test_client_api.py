"""The application-facing pieces both client adapters share."""

from __future__ import annotations

import pytest

from fastport_core.client import AuthRefused
from fastport_core.client_api import Endpoint, auth_error, describe_error, parse_url
from fastport_core.errors import ErrorCode, LocalProtocolError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://127.0.0.1:3000", Endpoint("127.0.0.1", 3000, False, "127.0.0.1:3000", "/")),
        (
            "wss://broker.example.com/ws?x=1",
            Endpoint("broker.example.com", 443, True, "broker.example.com", "/ws?x=1"),
        ),
        ("ws://host", Endpoint("host", 80, False, "host", "/")),
        ("WS://[::1]:8080/", Endpoint("::1", 8080, False, "[::1]:8080", "/")),
    ],
)
def test_urls_become_endpoints(url: str, expected: Endpoint) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["http://host", "host:3000", "ws://", "ws://host:99999", "ws://host:abc"])
def test_bad_urls_are_local_errors_naming_the_url(url: str) -> None:
    with pytest.raises(LocalProtocolError, match="url"):
        parse_url(url)


def test_a_refused_init_becomes_a_typed_authentication_error() -> None:
    error = auth_error(AuthRefused("wrong password", "auth_failed"))
    assert error.code is ErrorCode.AUTH_FAILED
    assert "wrong password" in str(error)
    assert auth_error(AuthRefused("slow down", "auth_throttled")).code is ErrorCode.AUTH_THROTTLED
    assert auth_error(AuthRefused("?", "from_the_future")).code is ErrorCode.AUTH_FAILED


def test_a_suspended_or_throttled_session_does_not_blame_the_credentials() -> None:
    suspended = auth_error(AuthRefused("session suspended", "session_suspended"))
    assert suspended.code is ErrorCode.SESSION_SUSPENDED
    assert "suspended" in str(suspended) and "credentials" not in str(suspended)
    assert "credentials" not in str(auth_error(AuthRefused("slow down", "auth_throttled")))
    assert "credentials" in str(auth_error(AuthRefused("wrong password", "auth_failed")))


class _SSLError(OSError):
    reason = "WRONG_VERSION_NUMBER"


_SSLError.__module__ = "ssl"


def test_error_descriptions_name_the_cause() -> None:
    assert describe_error(OSError()) == "OSError"
    wrapped = OSError("all connection attempts failed")
    wrapped.__cause__ = ConnectionRefusedError("connection refused")
    assert describe_error(wrapped) == "all connection attempts failed (connection refused)"
    assert describe_error(_SSLError("long text")) == "TLS error: WRONG_VERSION_NUMBER"
