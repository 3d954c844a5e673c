"""The optional compiled core: ``FASTPORT_COMPILE=1 pip install .`` (or ``pip wheel``) compiles the core's
hot modules with mypyc (part of mypy), which turns their type-annotated Python into a C extension: the
same code, ~30% less server CPU per message (docs/performance.md, "A compiled core"). Without the
variable the package is pure Python, as everything else is configured in pyproject.toml. An editable
install is always pure (tools/build_backend.py refuses the variable there): a compiled module next to its
source would be imported instead of it, so an edit would do nothing until the next build.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from setuptools import setup

COMPILED_MODULES = [
    # The per-message path: frames in, packets routed, frames out. protocol.py stays interpreted: its
    # packet builders are generated at run time (exec) and stay interpreted anyway; compiling the rest of
    # it (with the events built by their native constructors) measured no gain.
    "fastport_core/accounting.py",
    "fastport_core/broker.py",
    "fastport_core/dedupe.py",
    "fastport_core/frames.py",
    "fastport_core/server.py",
    "fastport_core/storage.py",
    "fastport_core/timers.py",
    "fastport_core/topics.py",
    "fastport_core/websocket.py",
]

# Every build starts from an empty folder: setuptools would otherwise reuse ./build, and a module compiled
# by an earlier build (one since dropped from the list, say) would ship in the next wheel.
build_base = tempfile.mkdtemp(prefix="fastport-build-")
atexit.register(shutil.rmtree, build_base, ignore_errors=True)

ext_modules = []
# FASTPORT_LISTING_REQUIRES: the build backend (tools/build_backend.py) is only asking what to install.
if os.environ.get("FASTPORT_COMPILE") == "1" and not os.environ.get("FASTPORT_LISTING_REQUIRES"):
    from mypyc.build import mypycify

    ext_modules = mypycify(
        COMPILED_MODULES,
        opt_level="3",
        group_name="fastport_core_mypyc",
        target_dir=os.path.join(build_base, "mypyc"),
    )

setup(ext_modules=ext_modules, options={"build": {"build_base": build_base}})
