"""The durable store of ``fastport serve --store PATH``: the core's records in one SQLite file (DESIGN §7).

The core decides *what* is durable (:mod:`fastport_core.storage`: :class:`~fastport_core.storage.StoreBatch`
in, :class:`~fastport_core.storage.Snapshot` out); this module only writes and reads it, with the stdlib
``sqlite3``. The server commits batches on a worker thread, one commit at a time, hence
``check_same_thread=False``: the connection is never used by two threads at once.

**Durability.** The file is in WAL mode with ``synchronous=FULL`` by default: a commit returns only once
the write-ahead log is fsynced, so what a ``publish_response`` confirmed survives a process kill *and* a
power loss. ``synchronous="NORMAL"`` skips that fsync (the WAL is synced only at checkpoints): a process
kill (``kill -9``, a crash) still loses nothing, because committed pages are in the OS page cache, but a
power loss or kernel crash can lose the last commits before the next checkpoint (never corrupting the
file). That breaks the promise of a confirmed publish, so NORMAL is an explicit opt-in.

**Hot path.** :meth:`SqliteStore.commit` runs once per few milliseconds under load: one transaction for all
the batches it is given, one ``executemany`` per record kind and batch, the rows of the frequent records
(messages, deliveries, dedupe entries) made by C-level ``attrgetter``: no Python work per record.

**Schema.** ``PRAGMA user_version`` holds the layout's version and ``PRAGMA application_id`` marks the file
as fastport's. :data:`_MIGRATIONS` [v] turns version v into v + 1; opening runs the missing steps in one
transaction. A file of a newer version is refused (an older fastport must not write it).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Final, Literal

import orjson

from fastport_core.config import DEFAULT_DEDUPE_TTL, Limits
from fastport_core.errors import FastportError, LocalProtocolError
from fastport_core.storage import (
    SCHEMA_VERSION,
    BacklogRecord,
    MessageRecord,
    PublishRecord,
    SessionRecord,
    Snapshot,
    StoreBatch,
    SubscriberRecord,
    settings_from_json,
    settings_to_json,
)

__all__ = [
    "SessionCounts",
    "SqliteStore",
    "StoreError",
    "StoreReport",
    "StoreUnavailable",
    "backup_store",
    "check_store",
]

APPLICATION_ID: Final = 0x46505354  # "FPST": PRAGMA application_id of a fastport store
DEFAULT_DEDUPE_WINDOW: Final = Limits().dedupe_window
PRUNE_INTERVAL: Final = 5.0
"""Seconds between two deletions of expired dedupe entries (from :meth:`SqliteStore.commit`)."""

_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 0 -> 1: the first layout. Times are wall-clock seconds (REAL); settings are JSON (field: value).
    (
        "CREATE TABLE sessions (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
        " secret_hash TEXT NOT NULL, token_key BLOB NOT NULL, settings TEXT NOT NULL,"
        " suspended INTEGER NOT NULL) WITHOUT ROWID",
        "CREATE TABLE subscribers (session TEXT NOT NULL, client_id TEXT NOT NULL,"
        " persistent INTEGER NOT NULL, topics TEXT NOT NULL, PRIMARY KEY (session, client_id)) WITHOUT ROWID",
        # seq is the rowid: messages are stored, and load, in publish order without an index of their own.
        "CREATE TABLE messages (session TEXT NOT NULL, message_id TEXT NOT NULL, seq INTEGER PRIMARY KEY,"
        " topic TEXT NOT NULL, data TEXT NOT NULL, hash TEXT NOT NULL, timestamp INTEGER NOT NULL,"
        " encoding TEXT NOT NULL, expires_at REAL NOT NULL, size INTEGER NOT NULL,"
        " UNIQUE (session, message_id))",
        # seq (the message's) orders a subscriber's backlog, read back a page at a time on resume.
        "CREATE TABLE deliveries (session TEXT NOT NULL, message_id TEXT NOT NULL, client_id TEXT NOT NULL,"
        " seq INTEGER NOT NULL, retries INTEGER NOT NULL, PRIMARY KEY (session, message_id, client_id))"
        " WITHOUT ROWID",
        "CREATE INDEX deliveries_by_subscriber ON deliveries (session, client_id, seq)",
        # A rowid table: the rowid keeps insertion order among entries published in the same instant.
        "CREATE TABLE publishes (session TEXT NOT NULL, message_id TEXT NOT NULL,"
        " delivered_to INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (session, message_id))",
        "CREATE INDEX publishes_by_at ON publishes (at)",
    ),
    # 1 -> 2: dedupe entries packed into one row per session per batch (a JSON array of
    # [message_id, delivered_to, at]; the row's at is its newest entry's, so pruning deletes whole rows):
    # one row instead of one per message, which cost ~3 µs of the committing thread's CPU per message.
    (
        "CREATE TABLE publish_log (id INTEGER PRIMARY KEY, session TEXT NOT NULL, at REAL NOT NULL,"
        " entries TEXT NOT NULL)",
        "CREATE INDEX publish_log_by_at ON publish_log (at)",
        "INSERT INTO publish_log (session, at, entries)"
        " SELECT session, max(at), json_group_array(json_array(message_id, delivered_to, at))"
        " FROM (SELECT * FROM publishes ORDER BY at, rowid) GROUP BY session",
        "DROP TABLE publishes",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION, "one migration step per schema version"

_TABLES: Final = ("subscribers", "messages", "deliveries", "publish_log")
"""Tables whose rows belong to a session (by their ``session`` column)."""
_COUNTS: Final = {
    "publish_log": "SELECT p.session, count(DISTINCT json_extract(e.value, '$[0]'))"
    " FROM publish_log p, json_each(p.entries) e GROUP BY p.session"
}
"""How ``check`` counts a table whose rows are not one record each (default: rows per session)."""

# SQLite primary result codes (sqlite3.h) of failures that may pass: retry the same batches later.
_TRANSIENT: Final = frozenset({5, 6, 7, 10, 13})  # BUSY, LOCKED, NOMEM, IOERR, FULL
_SQLITE_CORRUPT: Final = 11

_subscriber_row = attrgetter("session", "client_id", "persistent", "topics")
_message_key = itemgetter(0, 1)

_UPSERT_SESSION: Final = "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)"
_UPSERT_SUBSCRIBER: Final = "INSERT OR REPLACE INTO subscribers VALUES (?, ?, ?, ?)"
_DELETE_SUBSCRIBER: Final = "DELETE FROM subscribers WHERE session = ? AND client_id = ?"
_UPSERT_MESSAGE: Final = "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPSERT_DELIVERY: Final = "INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?)"
_SUBSCRIBER_MESSAGES: Final = "SELECT session, message_id FROM deliveries WHERE session = ? AND client_id = ?"
_DELETE_SUBSCRIBER_DELIVERIES: Final = "DELETE FROM deliveries WHERE session = ? AND client_id = ?"
_JOIN: Final = " FROM deliveries d JOIN messages m ON m.session = d.session AND m.message_id = d.message_id"
_LOAD_BACKLOGS: Final = (
    "SELECT d.session, d.client_id, count(*), sum(m.size)" + _JOIN + " GROUP BY d.session, d.client_id"
)
_LOAD_BACKLOG_PAGE: Final = (
    "SELECT m.session, m.message_id, m.seq, m.topic, m.data, m.hash, m.timestamp, m.encoding, m.expires_at,"
    " m.size, d.retries" + _JOIN + " WHERE d.session = ? AND d.client_id = ? AND d.seq > ?"
    " ORDER BY d.seq LIMIT ?"
)
_DELETE_DELIVERY: Final = "DELETE FROM deliveries WHERE session = ? AND message_id = ? AND client_id = ?"
_INSERT_PUBLISHES: Final = "INSERT INTO publish_log (session, at, entries) VALUES (?, ?, ?)"
_DELETE_ORPHAN: Final = (
    "DELETE FROM messages WHERE session = ?1 AND message_id = ?2"
    " AND NOT EXISTS (SELECT 1 FROM deliveries WHERE session = ?1 AND message_id = ?2)"
)
_LOAD_PUBLISHES: Final = "SELECT session, entries FROM publish_log WHERE at >= ? ORDER BY id"


class StoreError(FastportError):
    """The store cannot be used: not a fastport SQLite file, corrupt, unreadable or unwritable, in a
    directory that does not exist, or of a newer schema version. A local problem: the message says which
    file and what to do; the server does not start (``fastport serve`` exits 2)."""


class StoreUnavailable(StoreError):
    """A commit failed for a reason that may pass (disk full, I/O error, database busy or locked).

    Nothing of the failed commit was applied: the caller keeps its batches and commits the same ones again
    later (meanwhile the server refuses publishes with ``store_unavailable``).
    """


def _describe(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)


def _code(exc: sqlite3.Error) -> int | None:
    """The primary result code (extended codes carry it in their low byte)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _is_transient(exc: sqlite3.Error) -> bool:
    return _code(exc) in _TRANSIENT


def _corrupt(path: Path, problem: str) -> str:
    return f"the store {path} is corrupt ({problem}): restore a backup (`fastport store check` tells more)"


def _packed_publishes(publishes: list[PublishRecord]) -> list[tuple[str, float, str]]:
    """A batch's dedupe entries as ``publish_log`` rows: one per session, its newest time, its entries."""
    packed: dict[str, list[tuple[str, int, float]]] = {}
    for session, message_id, delivered_to, at in publishes:
        packed.setdefault(session, []).append((message_id, delivered_to, at))
    return [
        (session, max(entry[2] for entry in entries), orjson.dumps(entries).decode())
        for session, entries in packed.items()
    ]


def _session_row(record: SessionRecord) -> tuple[object, ...]:
    return (
        record.name, record.password_hash, record.secret_hash, record.token_key,
        settings_to_json(record.settings), record.suspended,
    )  # fmt: skip


def _read_only_uri(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


@dataclass(frozen=True, slots=True)
class SessionCounts:
    """What the store holds for one session (a name only found in other tables is counted too)."""

    name: str
    subscribers: int
    messages: int
    deliveries: int
    publishes: int
    """Entries of the publish dedupe window (expired ones included until they are pruned)."""


@dataclass(frozen=True, slots=True)
class StoreReport:
    """The result of :meth:`SqliteStore.check` (what ``fastport store check`` prints)."""

    path: str
    schema_version: int
    integrity: tuple[str, ...]
    """``PRAGMA integrity_check``'s lines: ``("ok",)`` when the file is sound."""
    sessions: tuple[SessionCounts, ...]

    @property
    def ok(self) -> bool:
        return self.integrity == ("ok",)


class SqliteStore:
    """One SQLite store file, opened with :meth:`open`. Not for concurrent use: one thread at a time."""

    __slots__ = ("_clock", "_conn", "_last_prune", "dedupe_ttl", "dedupe_window", "path")

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        dedupe_ttl: float,
        dedupe_window: int,
        clock: Callable[[], float],
    ) -> None:
        self._conn = conn
        self.path = path
        self.dedupe_ttl = dedupe_ttl
        self.dedupe_window = dedupe_window
        self._clock = clock
        self._last_prune = float("-inf")

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        dedupe_ttl: float = DEFAULT_DEDUPE_TTL,
        dedupe_window: int = DEFAULT_DEDUPE_WINDOW,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> SqliteStore:
        """Open (creating it when missing, unless ``read_only``) and migrate the store at ``path``.

        ``dedupe_ttl``, ``dedupe_window``: the server's (``ServerConfig.dedupe_ttl``,
        ``Limits.dedupe_window``), which bound what :meth:`load` returns and what commits prune.
        ``synchronous``: see the module doc. ``read_only``: never create, migrate or write the file (what
        ``fastport store check`` uses). ``clock``: wall-clock seconds (dedupe expiry). Raises
        :class:`StoreError` when the file cannot be used.
        """
        if synchronous not in ("FULL", "NORMAL"):
            raise LocalProtocolError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        path = Path(path)
        if read_only and not path.is_file():
            raise StoreError(f"no store file at {path}")
        if not read_only and not path.parent.is_dir():
            raise StoreError(f"cannot open the store {path}: directory {path.parent} does not exist")
        if path.is_dir():
            raise StoreError(f"cannot open the store {path}: it is a directory")
        try:
            if read_only:
                conn = sqlite3.connect(
                    _read_only_uri(path), uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {path}: {_describe(exc)}") from exc
        store = cls(conn, path, dedupe_ttl=dedupe_ttl, dedupe_window=dedupe_window, clock=clock)
        try:
            store._prepare(synchronous, read_only)
        except BaseException:
            conn.close()
            raise
        return store

    def _prepare(self, synchronous: str, read_only: bool) -> None:
        conn = self._conn
        try:
            application_id, version = self._header()
            if application_id not in (0, APPLICATION_ID) or (
                application_id == 0 and version == 0 and self._has_tables()
            ):
                raise StoreError(f"{self.path} is an SQLite database but not a fastport store")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self.path} has schema version {version}, newer than this fastport knows "
                    f"({SCHEMA_VERSION}): upgrade fastport"
                )
            if read_only:
                if version == 0:
                    raise StoreError(f"{self.path} is an empty SQLite file, not a fastport store yet")
                if version < SCHEMA_VERSION:
                    raise StoreError(
                        f"the store {self.path} has schema version {version}: start `fastport serve --store` "
                        "on it once to migrate it"
                    )
                return
            conn.execute(f"PRAGMA synchronous={synchronous}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"cannot put the store {self.path} in WAL mode (journal mode {mode})")
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreError(_corrupt(self.path, " ".join(problems[0].split())))
            self._migrate(version)
        except sqlite3.Error as exc:
            if _code(exc) == _SQLITE_CORRUPT:  # damage can also stop the check itself
                raise StoreError(_corrupt(self.path, _describe(exc))) from exc
            raise StoreError(f"cannot use the store {self.path}: {_describe(exc)}") from exc

    def _header(self) -> tuple[int, int]:
        application_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        return int(application_id), int(version)

    def _has_tables(self) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None

    def _migrate(self, version: int) -> None:
        """Run the missing migration steps in one transaction; it also proves the file is writable."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            # SQLite may have rolled back by itself (a full disk): then there is nothing left to undo.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    # -- the server's two calls: load at start, commit batches ---------------------------------------------

    def load(self) -> Snapshot:
        """Everything the store holds, as :meth:`fastport_core.broker.Broker.restore` takes it.

        Each resumable subscriber's stored backlog only counted (read back by :meth:`load_backlog`); per
        session, the newest ``dedupe_window`` dedupe entries not older than ``dedupe_ttl``, oldest first.
        """
        conn = self._conn
        try:
            sessions = [
                SessionRecord(
                    name, password, secret, bytes(key), settings_from_json(settings), bool(suspended)
                )
                for name, password, secret, key, settings, suspended in conn.execute("SELECT * FROM sessions")
            ]
            subscribers = [
                SubscriberRecord(session, client_id, bool(persistent), tuple(json.loads(topics)))
                for session, client_id, persistent, topics in conn.execute("SELECT * FROM subscribers")
            ]
            backlogs = [BacklogRecord(*row) for row in conn.execute(_LOAD_BACKLOGS)]
            last_seq = conn.execute("SELECT max(seq) FROM messages").fetchone()[0] or 0
            publishes = self._load_publishes()
        except (sqlite3.Error, ValueError) as exc:  # ValueError: a damaged settings or topics column
            raise StoreError(f"cannot read the store {self.path}: {exc}") from exc
        return Snapshot(sessions, subscribers, backlogs, publishes, last_seq)

    def _load_publishes(self) -> list[PublishRecord]:
        """Per session, the newest ``dedupe_window`` dedupe entries not older than ``dedupe_ttl``, oldest
        first (an id taken again counts once, at its latest entry)."""
        cutoff = self._clock() - self.dedupe_ttl
        per_session: dict[str, dict[str, tuple[float, int, int]]] = {}
        order = 0  # the order written: it breaks ties between entries of the same time
        for session, entries in self._conn.execute(_LOAD_PUBLISHES, (cutoff,)):
            taken = per_session.setdefault(session, {})
            for message_id, delivered_to, at in json.loads(entries):
                order += 1
                taken[message_id] = (float(at), order, int(delivered_to))  # the latest entry wins
        newest: list[tuple[float, int, PublishRecord]] = []
        for session, taken in per_session.items():
            fresh = [item for item in taken.items() if item[1][0] >= cutoff]
            window = sorted(fresh, key=lambda item: item[1][:2])[-self.dedupe_window :]
            newest += [
                (at, n, PublishRecord(session, mid, delivered, at)) for mid, (at, n, delivered) in window
            ]
        newest.sort(key=itemgetter(0, 1))
        return [record for _, _, record in newest]

    def load_backlog(
        self, session: str, client_id: str, after_seq: int, limit: int
    ) -> list[tuple[MessageRecord, int]]:
        """The next page of a resumable subscriber's stored backlog: up to ``limit`` of its deliveries whose
        message ``seq`` is above ``after_seq``, oldest first, as ``(message, retries)``."""
        try:
            rows = self._conn.execute(_LOAD_BACKLOG_PAGE, (session, client_id, after_seq, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read the store {self.path}: {_describe(exc)}") from exc
        return [(MessageRecord(*row[:10]), row[10]) for row in rows]

    def commit(self, batches: Sequence[StoreBatch]) -> None:
        """Apply ``batches`` in order, in one transaction (see :class:`~fastport_core.storage.StoreBatch`).

        Messages left without a delivery are deleted once, after the last batch, and only those whose
        deliveries this commit deleted (cheap under load). So a message whose deliveries one batch drops
        and a later batch of the same commit delivers again stays, as the later batch needs.
        Expired dedupe entries are pruned at most every :data:`PRUNE_INTERVAL` seconds.

        Raises :class:`StoreUnavailable` when the failure may pass (commit the same batches again later)
        and :class:`StoreError` otherwise; either way nothing of them was applied.
        """
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._apply(batches)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            if _is_transient(exc):
                raise StoreUnavailable(f"cannot write the store {self.path}: {_describe(exc)}") from exc
            raise StoreError(f"cannot write the store {self.path}: {_describe(exc)}") from exc

    def _apply(self, batches: Sequence[StoreBatch]) -> None:
        many = self._conn.executemany
        orphans: set[tuple[str, str]] = set()
        for batch in batches:
            if batch.sessions_dropped:
                names = [(name,) for name in batch.sessions_dropped]
                for table in _TABLES:
                    many(f"DELETE FROM {table} WHERE session = ?", names)
                many("DELETE FROM sessions WHERE name = ?", names)
            if batch.sessions:
                many(_UPSERT_SESSION, map(_session_row, batch.sessions))
            if batch.subscribers_dropped:
                many(_DELETE_SUBSCRIBER, batch.subscribers_dropped)
                for key in batch.subscribers_dropped:  # its stored backlog goes with it
                    orphans.update(self._conn.execute(_SUBSCRIBER_MESSAGES, key).fetchall())
                many(_DELETE_SUBSCRIBER_DELIVERIES, batch.subscribers_dropped)
            if batch.subscribers:
                many(
                    _UPSERT_SUBSCRIBER,
                    [(s, c, p, json.dumps(t)) for s, c, p, t in map(_subscriber_row, batch.subscribers)],
                )
            if batch.messages:
                many(_UPSERT_MESSAGE, batch.messages)
            if batch.deliveries_dropped:
                many(_DELETE_DELIVERY, batch.deliveries_dropped)
                orphans.update(map(_message_key, batch.deliveries_dropped))
            if batch.deliveries:
                many(_UPSERT_DELIVERY, batch.deliveries)
            if batch.publishes:
                many(_INSERT_PUBLISHES, _packed_publishes(batch.publishes))
        if orphans:
            many(_DELETE_ORPHAN, orphans)
        now = self._clock()
        if now - self._last_prune >= PRUNE_INTERVAL:
            self._conn.execute("DELETE FROM publish_log WHERE at < ?", (now - self.dedupe_ttl,))
            self._last_prune = now

    # -- operations ----------------------------------------------------------------------------------------

    def check(self) -> StoreReport:
        """``PRAGMA integrity_check`` and what the store holds per session (``fastport store check``)."""
        conn = self._conn
        version = self._header()[1]
        try:
            integrity = tuple(row[0] for row in conn.execute("PRAGMA integrity_check"))
        except sqlite3.DatabaseError as exc:  # damage can also stop the check itself
            return StoreReport(str(self.path), version, (str(exc),), ())
        counts: dict[str, dict[str, int]] = {}
        try:
            for (name,) in conn.execute("SELECT name FROM sessions"):
                counts[name] = {}
            for table in _TABLES:
                query = _COUNTS.get(table, f"SELECT session, count(*) FROM {table} GROUP BY session")
                for name, count in conn.execute(query):
                    counts.setdefault(name, {})[table] = count
        except sqlite3.DatabaseError as exc:
            return StoreReport(str(self.path), version, (*integrity, str(exc)), ())
        sessions = tuple(
            SessionCounts(name, *(found.get(table, 0) for table in _TABLES))
            for name, found in sorted(counts.items())
        )
        return StoreReport(str(self.path), version, integrity, sessions)

    def backup(self, target: str | Path) -> None:
        """Copy the store, as of one committed state, to a new file ``target`` (see :func:`backup_store`)."""
        backup_store(self.path, target)

    def close(self) -> None:
        """Close the connection (the last one out checkpoints the WAL into the file)."""
        self._conn.close()


def check_store(path: str | Path) -> StoreReport:
    """Open the store at ``path`` read-only (never creating it) and :meth:`~SqliteStore.check` it."""
    store = SqliteStore.open(path, read_only=True)
    try:
        return store.check()
    finally:
        store.close()


def backup_store(path: str | Path, target: str | Path) -> None:
    """Copy the store at ``path`` to ``target`` (which must not exist) with SQLite's online backup.

    Safe while a server writes the store: the copy is read in one read transaction on a connection of its
    own, so it holds one committed state (WAL lets the server go on committing meanwhile).
    """
    target = Path(target)
    if target.exists():
        raise StoreError(f"the backup target {target} already exists: remove it or name another")
    if not target.parent.is_dir():
        raise StoreError(f"cannot write the backup {target}: directory {target.parent} does not exist")
    source = SqliteStore.open(path, read_only=True)
    try:
        destination = sqlite3.connect(target)
        try:
            source._conn.backup(destination)
        finally:
            destination.close()
    except sqlite3.Error as exc:
        target.unlink(missing_ok=True)
        error = StoreUnavailable if _is_transient(exc) else StoreError
        raise error(f"cannot back up {path} to {target}: {_describe(exc)}") from exc
    finally:
        source.close()
