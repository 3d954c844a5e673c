"""Shared pytest configuration.

Hypothesis runs derandomized by default so that a run is reproducible on any machine (CI included);
``HYPOTHESIS_PROFILE=explore`` turns on fresh randomness and more examples for bug hunting.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import fastport_core

settings.register_profile(
    "default", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "explore",
    derandomize=False,
    deadline=None,
    max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A compiled core's classes are native: a test cannot replace one of their methods to inject a bug.
    Those tests run against the interpreted core (the normal run); tests/test_compiled_core.py runs the
    rest of the core's tests against a compiled build."""
    if not fastport_core.compiled():
        return
    skip = pytest.mark.skip(reason="injects a bug by replacing a method: the core here is compiled")
    for item in items:
        if item.get_closest_marker("patches_core"):
            item.add_marker(skip)
