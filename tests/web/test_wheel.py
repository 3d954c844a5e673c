"""The console's files are package data: a wheel built from the repository, installed in a fresh
virtualenv, serves them. (Slow-ish: a wheel build and a venv, ~10 s; bounded by timeouts.)

The fresh venv gets fastport from the wheel only (``--no-deps --no-index``); its dependencies come from
the test's own environment through a ``.pth`` file, which adds that site-packages directory *after* the
venv's own, and without processing the ``.pth`` files in it (so the editable install of this checkout is
not seen). The check that ``fastport_anyio`` is imported from the new venv makes the test fail if the
checkout leaked in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SERVE_AND_FETCH = """
import json, urllib.request
import anyio, fastport_anyio
from fastport_anyio import Server

async def main():
    async with Server("127.0.0.1", 0) as server:
        def fetch():
            result = {"module": fastport_anyio.__file__}
            for path in ("/admin/", "/playground/", "/client/fastport.js", "/style.css"):
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as r:
                    result[path] = [r.status, r.headers["Content-Type"], len(r.read())]
            return result
        print(json.dumps(await anyio.to_thread.run_sync(fetch)))
        await server.shutdown()

anyio.run(main)
"""


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_serves_the_console(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        check=True,
        timeout=180,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("fastport-*.whl")
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

    result = subprocess.run(
        [str(python), "-c", SERVE_AND_FETCH],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    served = json.loads(result.stdout)
    assert served.pop("module").startswith(str(venv))
    assert served == {
        "/admin/": [200, "text/html; charset=utf-8", served["/admin/"][2]],
        "/playground/": [200, "text/html; charset=utf-8", served["/playground/"][2]],
        "/client/fastport.js": [200, "text/javascript; charset=utf-8", served["/client/fastport.js"][2]],
        "/style.css": [200, "text/css; charset=utf-8", served["/style.css"][2]],
    }
    assert all(size > 500 for _, _, size in served.values())
