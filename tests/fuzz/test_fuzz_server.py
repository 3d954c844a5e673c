"""A bounded run of the coverage-guided fuzz target (``fuzz_server.py``) in every test run.

``FASTPORT_FUZZ_SECONDS`` sets the budget (20 s by default; e.g. 600 for a long run; 0 skips). The run is a
subprocess because libFuzzer owns the process (it exits when done). A finding fails the test with
libFuzzer's report, and the crashing input is kept in the test's temporary directory for replay
(``python tests/fuzz/fuzz_server.py <file>``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SECONDS = int(os.environ.get("FASTPORT_FUZZ_SECONDS", "20"))


@pytest.mark.skipif(SECONDS <= 0, reason="FASTPORT_FUZZ_SECONDS=0")
def test_fuzz_server_core_for_a_bounded_time(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    command = [
        sys.executable,
        str(HERE / "fuzz_server.py"),
        f"-max_total_time={SECONDS}",
        f"-dict={HERE / 'server.dict'}",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        "-rss_limit_mb=1024",
        "-seed=1",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS + 120, check=False
    )
    report = result.stderr[-6000:]
    assert result.returncode == 0, f"fuzzing found a failure:\n{report}"
    runs = re.search(r"stat::number_of_executed_units: (\d+)", result.stderr)
    assert runs is not None and int(runs.group(1)) > 0, report
    print(f"fuzz_server: {runs.group(1)} executions in {SECONDS} s")  # shown with pytest -s
