"""Config values validate themselves; the admin API's milliseconds convert at the edge."""

from __future__ import annotations

import pytest

from fastport_core.config import ClientConfig, Limits, ServerConfig, SessionSettings
from fastport_core.errors import LocalProtocolError


def test_from_wire_converts_milliseconds_and_keeps_unset_defaults() -> None:
    s = SessionSettings.from_wire({"retryInterval": 1500, "maxRetryLimit": 3, "sessionExpiry": None})
    assert s == SessionSettings(retry_interval=1.5, max_retry_limit=3)


def test_from_wire_layers_on_a_base() -> None:
    base = SessionSettings(retry_interval=9.0, message_expiry_time=60.0)
    assert SessionSettings.from_wire({"maxRetryLimit": 1}, base=base) == SessionSettings(9.0, 1, 60.0)


@pytest.mark.parametrize(
    "values",
    [{"retryInterval": "5"}, {"retryInterval": True}, {"retryInterval": 0}, {"maxRetryLimit": -1},
     {"messageExpiryTime": -5}],
)  # fmt: skip
def test_from_wire_rejects_bad_values(values: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        SessionSettings.from_wire(values)


@pytest.mark.parametrize(
    ("values", "names", "message"),
    [({"retryInterval": -5}, None, "retryInterval must be a positive number of milliseconds, got -5"),
     ({"retryInterval": -5}, {"retryInterval": "--retry-interval"},
      "--retry-interval must be a positive number of milliseconds, got -5"),
     ({"sessionExpiry": 0}, None, "sessionExpiry must be a positive number of milliseconds, got 0"),
     ({"maxRetryLimit": 1.5}, None, "maxRetryLimit must be a whole number of re-sends >= 0, got 1.5")],
)  # fmt: skip
def test_from_wire_errors_name_the_value_as_typed_and_its_unit(
    values: dict[str, object], names: dict[str, str] | None, message: str
) -> None:
    with pytest.raises(LocalProtocolError) as raised:
        SessionSettings.from_wire(values, names=names)
    assert str(raised.value) == message


def test_limits_and_configs_reject_non_positive_values() -> None:
    with pytest.raises(LocalProtocolError, match="max_topic_length"):
        Limits(max_topic_length=0)
    with pytest.raises(LocalProtocolError, match="ping_timeout"):
        ServerConfig(ping_timeout=-1)
    with pytest.raises(LocalProtocolError, match="dedupe_window"):
        ClientConfig(dedupe_window=0)
    assert ServerConfig(ping_interval=None).ping_interval is None
