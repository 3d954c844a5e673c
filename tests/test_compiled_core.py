"""The compiled core (``FASTPORT_COMPILE=1``, setup.py) passes the core's own tests.

A wheel is built with the core's hot modules compiled by mypyc, installed in a fresh virtualenv, and
tests/core runs there against it (a copy of the tests, away from this checkout, so that nothing imports
the interpreted sources; the venv as tests/wheel_venv.py makes it). Slow: the compilation alone takes
~40 s on this 2-core machine.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

import fastport_core
from tests.wheel_venv import ROOT, build_wheel, fresh_venv

CHECK_COMPILED = """
import fastport_core, fastport_core.broker, fastport_core.protocol
assert fastport_core.compiled(), fastport_core.broker.__file__
assert fastport_core.protocol.__file__.endswith(".py")  # interpreted by design (setup.py)
print(fastport_core.broker.__file__)
"""


def _compiled_modules() -> list[str]:
    """setup.py's ``COMPILED_MODULES``, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text("utf-8"))
    (value,) = (
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMPILED_MODULES"
    )
    modules: list[str] = ast.literal_eval(value)
    return modules


@pytest.mark.slow
def test_the_compiled_core_passes_the_core_tests(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, compile_core=True)
    assert "-cp3" in wheel.name  # a platform wheel: it carries extension modules
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name.split(".")[0] + ".py" for name in archive.namelist() if name.endswith(".so")}
    # Exactly what setup.py compiles, plus mypyc's shared library: nothing left over from an earlier build.
    assert shipped == {*_compiled_modules(), "fastport_core_mypyc__mypyc.py"}
    venv, python = fresh_venv(tmp_path, wheel)

    work = tmp_path / "work"
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work)  # pytest's settings (markers, warnings as errors)
    shutil.copytree(ROOT / "docs", work / "docs")  # some core tests hold the docs to the code
    script = Path("fastport_anyio", "web", "client", "fastport.js")  # and the browser client's rules
    (work / script).parent.mkdir(parents=True)  # a bare folder: the installed package still wins
    shutil.copy(ROOT / script, work / script)
    where = subprocess.run(
        [str(python), "-c", CHECK_COMPILED], check=True, timeout=60, capture_output=True, text=True, cwd=work
    ).stdout
    assert where.startswith(str(venv))

    result = subprocess.run(
        [str(python), "-m", "pytest", "tests/core", "-q", "-p", "no:cacheprovider", "-x"],
        check=False,
        timeout=600,
        capture_output=True,
        text=True,
        cwd=work,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" in summary, summary  # the patches_core tests are skipped


def test_an_editable_install_is_never_compiled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A compiled module beside its source would be imported instead of it: an edit would do nothing."""
    build_backend = _build_backend(monkeypatch)
    monkeypatch.setenv("FASTPORT_COMPILE", "1")
    with pytest.raises(RuntimeError, match="not editable installs"):
        build_backend.build_editable(str(tmp_path))
    # This checkout's own (editable) install, which every other test uses, is interpreted.
    assert not fastport_core.compiled()


def test_mypy_joins_the_build_only_when_a_compiled_core_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    build_backend = _build_backend(monkeypatch)
    asked: list[str | None] = []

    def setuptools_requires(config_settings: object = None) -> list[str]:
        asked.append(os.environ.get("FASTPORT_LISTING_REQUIRES"))  # what setup.py sees meanwhile
        return ["wheel"]

    monkeypatch.setattr(build_backend.build_meta, "get_requires_for_build_wheel", setuptools_requires)
    monkeypatch.delenv("FASTPORT_COMPILE", raising=False)
    assert build_backend.get_requires_for_build_wheel() == ["wheel"]
    monkeypatch.setenv("FASTPORT_COMPILE", "1")
    assert build_backend.get_requires_for_build_wheel() == ["wheel", "mypy>=2.4"]
    assert asked == ["1", "1"] and "FASTPORT_LISTING_REQUIRES" not in os.environ


def _build_backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """tools/build_backend.py, imported as the build frontend does (its folder on the path)."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    return importlib.import_module("build_backend")
