"""Reconnect backoff: full jitter within a doubling cap, reset on success, and the give-up horizon."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastport_core.backoff import Backoff
from fastport_core.config import ClientConfig
from fastport_core.errors import LocalProtocolError

initials = st.floats(min_value=1e-3, max_value=10.0)
factors = st.floats(min_value=1.0, max_value=1e4)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


@given(initial=initials, factor=factors, seed=seeds, failures=st.integers(min_value=1, max_value=200))
def test_every_delay_is_within_a_cap_that_doubles_up_to_the_maximum(
    initial: float, factor: float, seed: int, failures: int
) -> None:
    maximum = initial * factor
    backoff = Backoff(initial=initial, maximum=maximum, rng=random.Random(seed))
    expected_cap = initial
    for attempt in range(failures):
        assert backoff.attempts == attempt
        assert backoff.cap == expected_cap
        delay = backoff.next_delay()
        assert 0.0 <= delay <= expected_cap
        expected_cap = min(maximum, expected_cap * 2)
    assert backoff.cap <= maximum


@given(initial=initials, factor=factors, seed=seeds, failures=st.integers(min_value=1, max_value=50))
def test_reset_starts_again_from_initial(initial: float, factor: float, seed: int, failures: int) -> None:
    backoff = Backoff(initial=initial, maximum=initial * factor, give_up_after=1e9, rng=random.Random(seed))
    for step in range(failures):
        backoff.schedule(float(step))
    backoff.reset()
    assert (backoff.attempts, backoff.cap, backoff.failing_since) == (0, initial, None)
    when = backoff.schedule(1000.0)
    assert when is not None and 1000.0 <= when <= 1000.0 + initial
    assert backoff.failing_since == 1000.0


def test_jitter_spreads_delays_over_the_whole_window() -> None:
    """Full jitter: uniform over [0, cap], so the clients of a restarted server do not come back together."""
    rng = random.Random(1234)
    samples = []
    for _ in range(4000):
        backoff = Backoff(initial=8.0, maximum=8.0, rng=rng)
        samples.append(backoff.next_delay())
    assert min(samples) >= 0.0 and max(samples) <= 8.0
    buckets = [0] * 8
    for delay in samples:
        buckets[min(int(delay), 7)] += 1
    # Each 1-second bucket holds ~1/8 of the samples (500 ± a generous 20 %).
    assert all(400 <= count <= 600 for count in buckets), buckets
    assert 3.8 <= sum(samples) / len(samples) <= 4.2


def test_cap_never_overflows() -> None:
    backoff = Backoff(initial=1e-300, maximum=1e300, rng=random.Random(0))
    for _ in range(5000):
        assert backoff.next_delay() <= 1e300
    assert backoff.cap == 1e300


def test_gives_up_after_continuous_failure_and_never_schedules_past_the_horizon() -> None:
    backoff = Backoff(initial=1.0, maximum=30.0, give_up_after=10.0, rng=random.Random(7))
    now = 100.0
    attempts = []
    while (when := backoff.schedule(now)) is not None:
        assert now <= when <= 110.0
        attempts.append(when)
        now = when + 0.001  # the attempt fails almost at once
    assert now >= 110.0 and attempts
    assert backoff.failing_since == 100.0


def test_failure_clock_counts_from_the_first_failure_after_a_success() -> None:
    backoff = Backoff(initial=1.0, maximum=1.0, give_up_after=5.0, rng=random.Random(0))
    assert backoff.schedule(0.0) is not None
    backoff.reset()
    assert backoff.schedule(100.0) is not None  # 100 s after the first failure, but a success came between
    assert backoff.schedule(104.0) is not None
    assert backoff.schedule(105.0) is None


@given(seed=seeds)
def test_without_give_up_it_retries_forever(seed: int) -> None:
    backoff = Backoff(initial=0.5, maximum=30.0, rng=random.Random(seed))
    for step in range(1000):
        when = backoff.schedule(step * 60.0)
        assert when is not None and step * 60.0 <= when <= step * 60.0 + 30.0


def test_from_config_and_argument_checks() -> None:
    config = ClientConfig(reconnect_initial_delay=2.0, reconnect_max_delay=16.0, reconnect_give_up_after=60.0)
    backoff = Backoff.from_config(config, random.Random(0))
    assert backoff.cap == 2.0
    for _ in range(10):
        backoff.next_delay()
    assert backoff.cap == 16.0
    with pytest.raises(LocalProtocolError):
        Backoff(initial=0.0, maximum=1.0)
    with pytest.raises(LocalProtocolError):
        Backoff(initial=2.0, maximum=1.0)
    with pytest.raises(LocalProtocolError):
        Backoff(initial=1.0, maximum=2.0, give_up_after=0.0)
