"""``fastport store check|backup``: inspect and copy the durable store of ``fastport serve --store PATH``.

``check`` opens the file read-only (it never creates or migrates one) and prints its schema version, the
result of SQLite's integrity check and what it holds per session. ``backup`` copies it with SQLite's
online backup, safe while the server runs. Exit codes: 0 ok; 1 the integrity check failed (or a backup
could not be written for a reason that may pass, such as a full disk); 2 the path is not a usable store
(missing, not a fastport store, a newer schema version), or the backup target exists.
"""

from __future__ import annotations

import argparse
import sys

from .cli_errors import EXIT_FAILURE, EXIT_OK
from .store import StoreReport, backup_store, check_store

__all__ = ["format_report", "register", "run_backup", "run_check"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``store check`` and ``store backup`` to the ``fastport`` command's subparsers."""
    store = subparsers.add_parser(
        "store",
        help="check or back up a durable store",
        description="The durable store of `fastport serve --store PATH` (docs/operations.md, "
        "'Durable store').",
    )
    actions = store.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="check a store's integrity and count what it holds",
        description="Open PATH read-only, run SQLite's integrity check and print the schema version and "
        "what each session holds. Exit codes: 0 ok, 1 integrity check failed, 2 not a usable store.",
    )
    check.add_argument("path", metavar="PATH", help="the store file")
    check.set_defaults(func=run_check)
    backup = actions.add_parser(
        "backup",
        help="copy a store (safe while the server runs)",
        description="Copy the store PATH to the new file TARGET with SQLite's online backup: one committed "
        "state, taken while the server goes on writing. Exit codes: 0 ok, 1 write failed, 2 bad path.",
    )
    backup.add_argument("path", metavar="PATH", help="the store file")
    backup.add_argument("target", metavar="TARGET", help="the backup file to create (must not exist)")
    backup.set_defaults(func=run_backup)


def format_report(report: StoreReport) -> list[str]:
    """The lines ``fastport store check`` prints."""
    lines = [
        f"store: {report.path}",
        f"schema version: {report.schema_version}",
        "integrity: ok" if report.ok else "integrity: FAILED",
    ]
    if not report.ok:
        lines += [f"  {problem}" for problem in report.integrity]
    lines.append(f"sessions: {len(report.sessions)}")
    lines += [
        f"  {c.name}: subscribers={c.subscribers} messages={c.messages} deliveries={c.deliveries} "
        f"dedupe={c.publishes}"
        for c in report.sessions
    ]
    return lines


def run_check(args: argparse.Namespace) -> int:
    report = check_store(args.path)
    print("\n".join(format_report(report)), flush=True)
    if not report.ok:
        print(
            f"fastport store: the integrity check of {args.path} failed: restore a backup",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_FAILURE
    return EXIT_OK


def run_backup(args: argparse.Namespace) -> int:
    backup_store(args.path, args.target)
    print(f"backed up {args.path} to {args.target}", flush=True)
    return EXIT_OK
