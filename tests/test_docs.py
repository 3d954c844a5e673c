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


ROOT = Path(__file__).resolve().parent.parent
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def test_the_docs_stand_alone_without_the_design_brief() -> None:
    """The design brief does not ship: the docs must define everything they rely on themselves."""
    citing = [path.name for path in USER_DOCS if "DESIGN" in path.read_text(encoding="utf-8")]
    assert not citing


def test_links_between_the_docs_point_at_existing_files_and_headings() -> None:
    import re

    broken = []
    for path in USER_DOCS:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", path.read_text("utf-8")):
            if not target and not anchor:
                continue
            linked = (path.parent / target).resolve() if target else path
            if not linked.is_file():
                broken.append(f"{path.name}: {target}")
                continue
            headings = re.findall(r"^#+ (.+)$", linked.read_text("utf-8"), flags=re.MULTILINE)
            if anchor and anchor not in {_anchor(h) for h in headings}:
                broken.append(f"{path.name}: {target}#{anchor}")
    assert not broken
