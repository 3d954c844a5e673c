"""Credentials: scrypt hashes compared in constant time, the verified-password cache, the auth throttle."""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastport_core.auth import AuthThrottle, PasswordHash
from fastport_core.config import ServerConfig
from fastport_core.errors import LocalProtocolError

FAST_N = 2  # scrypt's smallest cost: the tests check behaviour, not strength


class Spy:
    """Wraps a function and counts (and records the keyword arguments of) its calls."""

    def __init__(self, target: Callable[..., Any]) -> None:
        self.target = target
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.target(*args, **kwargs)


@pytest.fixture
def scrypt_spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy(hashlib.scrypt)
    monkeypatch.setattr(hashlib, "scrypt", spy)
    return spy


def test_verify_accepts_the_secret_and_refuses_anything_else() -> None:
    hashed = PasswordHash.create("correct horse", n=FAST_N)
    assert hashed.verify("correct horse")
    assert not hashed.verify("correct hors")
    assert not hashed.verify("")
    assert not hashed.verify("correct horse ")
    assert hashed.verify("correct horse")  # cached success does not accept anything else afterwards
    assert not hashed.verify("Correct horse")


def test_default_parameters_are_the_documented_scrypt(scrypt_spy: Spy) -> None:
    salts = random.Random(1).randbytes
    hashed = PasswordHash.create("pw", random=salts)
    (call,) = scrypt_spy.calls
    assert (call["n"], call["r"], call["p"], call["dklen"]) == (2**14, 8, 1, 32)
    assert len(call["salt"]) == 16
    assert call["salt"] == random.Random(1).randbytes(16)
    assert "pw" not in repr(hashed) and "n=16384" in repr(hashed)


def test_same_secret_gets_different_salts_and_digests() -> None:
    a = PasswordHash.create("same", n=FAST_N)
    b = PasswordHash.create("same", n=FAST_N)
    assert a._salt != b._salt
    assert a._digest != b._digest


def test_comparisons_use_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(hmac.compare_digest)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    hashed = PasswordHash.create("pw", n=FAST_N)
    assert not hashed.verify("nope")
    assert len(spy.calls) == 1  # the scrypt digests
    assert hashed.verify("pw")
    assert hashed.verify("pw")
    assert len(spy.calls) == 3  # then the cached tag, which matched


def test_success_is_cached_but_failures_always_pay_scrypt(scrypt_spy: Spy) -> None:
    hashed = PasswordHash.create("pw", n=FAST_N)
    assert len(scrypt_spy.calls) == 1
    assert hashed.verify("pw")
    assert len(scrypt_spy.calls) == 2
    for _ in range(5):
        assert hashed.verify("pw")
    assert len(scrypt_spy.calls) == 2  # reconnect storms cost an HMAC each
    for _ in range(3):
        assert not hashed.verify("guess")
    assert len(scrypt_spy.calls) == 5  # every failure runs scrypt


def test_the_cache_tag_is_bound_to_the_hash_object() -> None:
    a = PasswordHash.create("pw", n=FAST_N)
    b = PasswordHash.create("other", n=FAST_N)
    assert a.verify("pw")
    b._verified_tag = a._verified_tag  # a tag lifted from another hash (another salt) opens nothing
    assert not b.verify("pw")


def test_a_secret_that_is_not_valid_unicode_never_raises() -> None:
    hashed = PasswordHash.create("pw", n=FAST_N)
    assert not hashed.verify("\udcff")
    assert PasswordHash.create("\ud800", n=FAST_N).verify("\ud800")


# -- throttle ------------------------------------------------------------------------------------------


def test_throttle_delays_double_per_failure_up_to_the_maximum() -> None:
    throttle = AuthThrottle(base=0.5, maximum=4.0, capacity=100)
    assert throttle.retry_at("p", 0.0) is None
    assert throttle.record_failure("p", 0.0) == 0.5
    assert throttle.retry_at("p", 0.25) == 0.5
    assert throttle.retry_at("p", 0.5) is None
    assert throttle.record_failure("p", 0.5) == 1.5  # second failure: 1 s
    assert throttle.retry_at("p", 1.4) == 1.5
    assert throttle.record_failure("p", 1.5) == 3.5  # third: 2 s
    assert throttle.record_failure("p", 3.5) == 7.5  # fourth: capped at 4 s
    assert throttle.retry_at("p", 7.4) == 7.5
    assert throttle.retry_at("other", 1.0) is None  # per peer


def test_failures_are_forgotten_after_the_maximum_without_failures() -> None:
    throttle = AuthThrottle(base=1.0, maximum=10.0, capacity=100)
    throttle.record_failure("p", 0.0)
    throttle.record_failure("p", 1.0)
    assert throttle.next_deadline() == 11.0
    throttle.handle_timeout(10.9)
    assert len(throttle) == 1
    throttle.handle_timeout(11.0)
    assert len(throttle) == 0
    assert throttle.next_deadline() is None
    assert throttle.record_failure("p", 12.0) == 13.0  # back to the first delay


def test_reset_also_applies_when_the_timeout_was_not_run() -> None:
    throttle = AuthThrottle(base=1.0, maximum=10.0, capacity=100)
    throttle.record_failure("p", 0.0)
    throttle.record_failure("p", 1.0)
    assert throttle.record_failure("p", 11.0) == 12.0


def test_next_deadline_follows_the_oldest_last_failure() -> None:
    throttle = AuthThrottle(base=1.0, maximum=10.0, capacity=100)
    throttle.record_failure("a", 0.0)
    throttle.record_failure("b", 2.0)
    throttle.record_failure("a", 3.0)  # a's failure is now the newest
    assert throttle.next_deadline() == 12.0
    throttle.handle_timeout(12.0)
    assert throttle.retry_at("a", 3.5) == 5.0  # a (2 failures, last at 3) is still throttled
    assert len(throttle) == 1


def test_table_is_bounded_and_evicts_the_stalest_peer() -> None:
    throttle = AuthThrottle(base=1.0, maximum=100.0, capacity=3)
    for i, peer in enumerate("abcd"):
        throttle.record_failure(peer, float(i))
    assert len(throttle) == 3
    assert throttle.retry_at("a", 3.5) is None  # evicted
    assert throttle.retry_at("d", 3.5) == 4.0


@given(st.lists(st.tuples(st.sampled_from("abcdefg"), st.floats(0, 5)), max_size=100))
def test_throttle_never_exceeds_capacity_and_delays_stay_in_bounds(events: list[tuple[str, float]]) -> None:
    throttle = AuthThrottle(base=0.5, maximum=8.0, capacity=4)
    now = 0.0
    for peer, step in events:
        now += step
        until = throttle.record_failure(peer, now)
        assert now + 0.5 <= until <= now + 8.0
        throttle.handle_timeout(now)
        assert len(throttle) <= 4
        deadline = throttle.next_deadline()
        assert deadline is not None and deadline > now


@pytest.mark.parametrize("cost", [0, 1, 3, 1000])
def test_the_configured_scrypt_cost_must_be_a_power_of_two(cost: int) -> None:
    with pytest.raises(LocalProtocolError, match="power of two"):
        ServerConfig(password_hash_cost=cost)


@given(st.floats(0, 1e6), st.floats(0.01, 1e3))
def test_a_reported_deadline_is_always_handled_at_that_time(start: float, maximum: float) -> None:
    """``last + maximum`` and ``now - maximum`` round differently; a due deadline must never survive."""
    throttle = AuthThrottle(base=0.01, maximum=maximum, capacity=10)
    throttle.record_failure("peer", start)
    deadline = throttle.next_deadline()
    assert deadline is not None
    throttle.handle_timeout(deadline)
    assert throttle.next_deadline() is None
