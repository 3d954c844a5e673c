"""A wheel of this checkout, installed alone in a fresh virtualenv (tests/web/test_wheel.py,
tests/test_compiled_core.py).

The fresh venv gets fastport from the wheel only (``--no-deps --no-index``); its dependencies come from
the test's own environment through a ``.pth`` file, which adds that site-packages directory *after* the
venv's own, and without processing the ``.pth`` files in it (so the editable install of this checkout is
not seen). Callers check that fastport is imported from the new venv, so a leak of the checkout fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: Path, *, compile_core: bool = False) -> Path:
    """A wheel of this checkout (with ``compile_core``, a ``FASTPORT_COMPILE=1`` build: ~40 s more)."""
    wheels = tmp_path / "wheels"
    env = {**os.environ, "FASTPORT_COMPILE": "1"} if compile_core else None
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        check=True,
        timeout=600 if compile_core else 180,
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = wheels.glob("fastport-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> tuple[Path, Path]:
    """A new venv in ``tmp_path`` with ``wheel`` installed (see the module doc): ``(venv, its python)``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "_deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, python
