"""Regenerate the tables in docs/ from the code's own tables, so the docs cannot drift.

Each generated block sits between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``
markers in a Markdown file. ``python tools/gendocs.py`` rewrites them; ``--check`` exits 1 if any is stale
(the test suite runs that).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from types import ModuleType

from fastport_core import broker as broker_module
from fastport_core import client as client_module
from fastport_core import config as config_module
from fastport_core import websocket as websocket_module
from fastport_core.broker import GiveUpReason
from fastport_core.client import TRANSITIONS, ClientInput, ClientState
from fastport_core.config import ClientConfig, Limits, ServerConfig, SessionSettings, SlowConsumerPolicy
from fastport_core.errors import CloseCode, ErrorCode
from fastport_core.metrics import COUNTERS
from fastport_core.protocol import CLIENT_PACKETS, SERVER_PACKETS, PacketSpec

DOCS = Path(__file__).resolve().parent.parent / "docs"
_JSON_TYPES = {str: "string", int: "integer", bool: "boolean"}


def _frames_table(frames: dict[str, PacketSpec]) -> str:
    rows = ["| type | fields (required **bold**) | meaning |", "| --- | --- | --- |"]
    for name, spec in frames.items():
        fields = ", ".join(
            (f"**`{f.wire}`**" if f.required else f"`{f.wire}`") + f" ({_JSON_TYPES[f.kind]})"
            for f in spec.fields
        )
        rows.append(f"| `{name}` | {fields} | {spec.doc} |")
    return "\n".join(rows)


def _enum_table(header: str, members: list[tuple[object, str]]) -> str:
    rows = [f"| {header} | meaning |", "| --- | --- |"]
    rows += [f"| `{value}` | {doc} |" for value, doc in members]
    return "\n".join(rows)


def _attribute_docs(cls: type, module: ModuleType = config_module) -> dict[str, str]:
    """Attribute docstrings (the string literal after a field or an enum member), read with ``ast``."""
    tree = ast.parse(inspect.getsource(module))
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            for current, following in itertools.pairwise(node.body):
                if isinstance(current, ast.AnnAssign):
                    target = current.target
                elif isinstance(current, ast.Assign) and len(current.targets) == 1:
                    target = current.targets[0]
                else:
                    continue
                if (
                    isinstance(target, ast.Name)
                    and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                ):
                    docs[target.id] = " ".join(following.value.value.split())
    return docs


def _settings_table(cls: type) -> str:
    docs = _attribute_docs(cls)
    defaults = cls()
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            continue
        shown = value.value if hasattr(value, "value") else value
        rows.append(f"| `{f.name}` | `{shown!r}` | {docs.get(f.name, '')} |")
    return "\n".join(rows)


def _counters_table() -> str:
    rows = ["| counter (`fastport_` prefix, `_total` suffix) | labels | meaning |", "| --- | --- | --- |"]
    for name, (text, labels) in COUNTERS.items():
        rows.append(f"| `{name}` | {', '.join(labels) or '-'} | {text} |")
    return "\n".join(rows)


def _members_table(header: str, enum: type[Enum], module: ModuleType, *, by_value: bool = False) -> str:
    """One row per enum member with its attribute docstring: states, policies, reasons."""
    docs = _attribute_docs(enum, module)
    rows = [f"| {header} | meaning |", "| --- | --- |"]
    rows += [f"| `{m.value if by_value else m.name}` | {docs.get(m.name, '')} |" for m in enum]
    return "\n".join(rows)


def _client_transitions_table() -> str:
    """``client.TRANSITIONS``: one row per (input, target), its source states in the table's order."""
    rows: dict[tuple[ClientInput, ClientState], list[ClientState]] = {}
    for (old, event), new in TRANSITIONS.items():
        rows.setdefault((event, new), []).append(old)
    lines = ["| from | on | to |", "| --- | --- | --- |"]
    for (event, new), olds in rows.items():
        lines.append(f"| {', '.join(f'`{old.name}`' for old in olds)} | {event.value} | `{new.name}` |")
    return "\n".join(lines)


GENERATORS: dict[str, Callable[[], str]] = {
    "client-frames": lambda: _frames_table(dict(CLIENT_PACKETS)),
    "server-frames": lambda: _frames_table(dict(SERVER_PACKETS)),
    "error-codes": lambda: _enum_table("code", [(c.value, c.doc) for c in ErrorCode]),
    "close-codes": lambda: _enum_table("close code", [(int(c), c.doc) for c in CloseCode]),
    "limits": lambda: _settings_table(Limits),
    "server-config": lambda: _settings_table(ServerConfig),
    "session-settings": lambda: _settings_table(SessionSettings),
    "client-config": lambda: _settings_table(ClientConfig),
    "counters": _counters_table,
    "client-states": lambda: _members_table("state", ClientState, client_module),
    "client-transitions": _client_transitions_table,
    "websocket-states": lambda: _members_table("state", websocket_module.WebSocketState, websocket_module),
    "give-up-reasons": lambda: _members_table("reason", GiveUpReason, broker_module, by_value=True),
    "slow-consumer-policies": lambda: _members_table(
        "policy", SlowConsumerPolicy, config_module, by_value=True
    ),
}

_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: ([\w-]+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.DOTALL)


def render(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in GENERATORS:
            raise SystemExit(f"unknown generated block {name!r}")
        return f"{match.group(1)}{GENERATORS[name]()}\n{match.group(4)}"

    return _BLOCK.sub(replace, text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    if check and stale:
        print("stale generated docs (run python tools/gendocs.py):", *map(str, stale), sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
