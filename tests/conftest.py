"""Shared pytest configuration.

Hypothesis runs derandomized by default so that a run is reproducible on any machine (CI included);
``HYPOTHESIS_PROFILE=explore`` turns on fresh randomness and more examples for bug hunting.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

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
