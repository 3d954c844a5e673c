"""What the server process imports at start-up: only what serving needs (its baseline memory,
docs/performance.md "Idle connections"). Checked in a fresh interpreter, since this test process has
imported everything already."""

from __future__ import annotations

import subprocess
import sys

import pytest

LOADED_ON_DEMAND = ("prometheus_client", "jwt", "cryptography")
"""Imported at the first ``/metrics`` scrape, at the first token, and when a client makes its suite."""


@pytest.mark.parametrize("module", LOADED_ON_DEMAND)
def test_starting_the_server_does_not_import(module: str) -> None:
    code = (
        "import sys, fastport_anyio.cli, fastport_anyio.server;"
        f"sys.exit(1 if {module!r} in sys.modules else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=60, check=False)
    assert done.returncode == 0, f"importing the server imported {module}"
