"""The generated tables in docs/ match the code (regenerate with ``python tools/gendocs.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import gendocs


def test_generated_doc_tables_are_current() -> None:
    assert gendocs.main(["--check"]) == 0


def test_every_generated_block_is_used_somewhere() -> None:
    text = "".join(p.read_text(encoding="utf-8") for p in gendocs.DOCS.rglob("*.md"))
    missing = [name for name in gendocs.GENERATORS if f"BEGIN GENERATED: {name} -->" not in text]
    assert not missing
