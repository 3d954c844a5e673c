"""fastport_core: the sans-IO protocol core (see docs/architecture.md)."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES

__all__ = ["compiled"]


def compiled() -> bool:
    """Whether the core's hot modules run compiled (a ``FASTPORT_COMPILE=1`` build, see setup.py) rather
    than interpreted. Same code and behaviour either way; only the CPU per message differs."""
    from . import broker

    return (broker.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES))
