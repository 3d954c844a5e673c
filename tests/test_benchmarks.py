"""The in-memory benchmarks still run against today's core (a tiny bounded run each; speed not checked).

They drive the core's public and semi-private API directly, so a change of that API breaks them silently
unless something runs them: this does, in a subprocess, with counts small enough to take a second or two.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, args",
    [
        ("core_bench.py", ["--messages", "200", "--rounds", "1"]),
        ("core_broker_probe.py", ["--messages", "200", "--rounds", "1"]),
        ("topics_bench.py", ["--messages", "200", "--rounds", "1"]),
        ("store_bench.py", ["--messages", "200", "--rounds", "1"]),  # a store in a temporary directory
    ],
)
def test_an_in_memory_benchmark_runs(script: str, args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "µs" in done.stdout or "us" in done.stdout
