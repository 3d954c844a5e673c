"""fastport's build backend: setuptools', plus mypy in the build environment when a compiled core is asked
for (``FASTPORT_COMPILE=1``; see setup.py). A pure build needs nothing more than setuptools, so mypy is a
build requirement only then, which a static ``[build-system] requires`` cannot say."""

from __future__ import annotations

import os
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 - the whole PEP 517 interface, unchanged but for below


def _compile_requires() -> list[str]:
    return ["mypy>=2.4"] if os.environ.get("FASTPORT_COMPILE") == "1" else []


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    # setuptools runs setup.py to answer this, before mypy is installed: tell it not to compile yet.
    os.environ["FASTPORT_LISTING_REQUIRES"] = "1"
    try:
        return [*build_meta.get_requires_for_build_wheel(config_settings), *_compile_requires()]
    finally:
        del os.environ["FASTPORT_LISTING_REQUIRES"]


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    if os.environ.get("FASTPORT_COMPILE") == "1":
        # The compiled modules would sit beside their sources and be imported instead of them: an edit
        # would silently do nothing until the next build.
        raise RuntimeError("FASTPORT_COMPILE=1 builds wheels and installs, not editable installs")
    return build_meta.build_editable(wheel_directory, config_settings, metadata_directory)
