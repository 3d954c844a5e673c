"""The console's files are package data: a wheel built from the repository, installed in a fresh
virtualenv (tests/wheel_venv.py), serves them. (Slow-ish: a wheel build and a venv, ~10 s; bounded by
timeouts.) The check that ``fastport_anyio`` is imported from the new venv makes the test fail if the
checkout leaked in.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.wheel_venv import build_wheel, fresh_venv

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
    venv, python = fresh_venv(tmp_path, build_wheel(tmp_path))
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
