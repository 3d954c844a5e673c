"""The project's own scaffolding, as a fresh clone meets it: ``scripts/setup`` and the package metadata.

``scripts/serve &`` followed at once by ``scripts/test`` runs two set-ups at the same time; they must not
run pip into one venv at once. The first install itself is too slow for CI (it downloads the dependencies),
so these tests pin the mechanism instead: the set-up holds a lock around creating and installing, and two
set-ups of an installed venv (the fast path every ``scripts/test`` takes) both succeed side by side.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup"
TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("bash") is None or shutil.which("flock") is None,
    reason="the scripts are bash, and the lock is flock (util-linux)",
)


def setup_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTPORT_")}
    return env | extra


def test_setup_does_nothing_until_it_holds_the_lock(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a set-up that is still installing would hold it
        result = subprocess.run(
            [str(SETUP)],
            env=setup_environment(FASTPORT_VENV=str(venv), FASTPORT_SETUP_LOCK_WAIT="0"),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert "another scripts/setup is still installing" in result.stderr
    assert not venv.exists()  # it did not start a second venv creation beside the first


def test_two_setups_of_an_installed_venv_at_once_both_succeed() -> None:
    stamp = ROOT / ".venv" / ".fastport-installed"
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    if not stamp.is_file() or stamp.read_bytes() != pyproject:
        pytest.skip("the repository's .venv is not installed from this pyproject.toml (run scripts/setup)")
    env = setup_environment()
    first, second = (
        subprocess.Popen([str(SETUP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    )
    outputs = [process.communicate(timeout=TIMEOUT) for process in (first, second)]
    assert (first.returncode, second.returncode) == (0, 0), outputs
    assert outputs == [(b"", b""), (b"", b"")]


def test_the_license_is_an_spdx_expression_with_its_file() -> None:
    """A license table is deprecated by setuptools (a warning on every install); the string form needs
    setuptools 77, which the build requirement must then ask for."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "MIT"
    assert all((ROOT / name).is_file() for name in project["project"]["license-files"])
    assert "setuptools>=77" in project["build-system"]["requires"]
