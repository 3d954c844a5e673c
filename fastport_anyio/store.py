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

**Layout** (version 3). ``sessions`` and ``subscribers`` hold a row per record. ``messages`` holds a row per
message some resumable subscriber still owes an ACK for, ``seq`` its rowid, with an ``owed`` column: a JSON
object ``{clientId: retries}`` of those subscribers and each one's retry count. Deliveries have no rows of
their own: the message's row exists exactly while its ``owed`` is not empty (the last ACK deletes it). A
subscriber's backlog is read back from these objects (``json_each``) in ``seq`` order, a page at a time;
deleting a subscriber scans its session's messages (an index by subscriber would cost every delivery).
``publish_log`` holds the dedupe entries, packed one row per session per batch.

**Hot path.** :meth:`SqliteStore.commit` runs once per few milliseconds under load: one transaction for all
the batches it is given. It folds the delivery changes of all its batches into their messages' ``owed`` in
Python (:class:`_Fold`), then writes each message it touched once, one ``executemany`` per statement: a
message stored with its 50 deliveries is one insert, and their 50 ACKs one delete. A row per delivery,
written and deleted again with its index entry (layout 2), cost the committing thread ~4.5 µs per delivery
of a fan-out; the fold ~0.6.

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
    DeliveryKey,
    DeliveryRecord,
    MessageRecord,
    PublishRecord,
    SessionRecord,
    Snapshot,
    StoreBatch,
    SubscriberKey,
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
    # 2 -> 3: deliveries folded into their message's row, as owed = {client_id: retries}; a message no
    # delivery refers to any more is not carried over (layout 2 deleted those only once touched).
    (
        "CREATE TABLE messages_3 (session TEXT NOT NULL, message_id TEXT NOT NULL, seq INTEGER PRIMARY KEY,"
        " topic TEXT NOT NULL, data TEXT NOT NULL, hash TEXT NOT NULL, timestamp INTEGER NOT NULL,"
        " encoding TEXT NOT NULL, expires_at REAL NOT NULL, size INTEGER NOT NULL, owed TEXT NOT NULL,"
        " UNIQUE (session, message_id))",
        "INSERT INTO messages_3 SELECT m.session, m.message_id, m.seq, m.topic, m.data, m.hash, m.timestamp,"
        " m.encoding, m.expires_at, m.size, json_group_object(d.client_id, d.retries)"
        " FROM messages m JOIN deliveries d ON d.session = m.session AND d.message_id = m.message_id"
        " GROUP BY m.seq",
        "DROP TABLE deliveries",
        "DROP TABLE messages",
        "ALTER TABLE messages_3 RENAME TO messages",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION, "one migration step per schema version"

_SESSION_TABLES: Final = ("subscribers", "messages", "publish_log")
"""Tables whose rows belong to a session (by their ``session`` column)."""
_COUNTS: Final = {
    "subscribers": "SELECT session, count(*) FROM subscribers GROUP BY session",
    "messages": "SELECT session, count(*) FROM messages GROUP BY session",
    "deliveries": "SELECT m.session, count(*) FROM messages m, json_each(m.owed) GROUP BY m.session",
    "publishes": "SELECT p.session, count(DISTINCT json_extract(e.value, '$[0]'))"
    " FROM publish_log p, json_each(p.entries) e GROUP BY p.session",
}
"""How ``check`` counts each of :class:`SessionCounts`' fields per session."""

# SQLite primary result codes (sqlite3.h) of failures that may pass: retry the same batches later.
_TRANSIENT: Final = frozenset({5, 6, 7, 10, 13})  # BUSY, LOCKED, NOMEM, IOERR, FULL
_SQLITE_CORRUPT: Final = 11

_subscriber_row = attrgetter("session", "client_id", "persistent", "topics")
_message_key = itemgetter(0, 1)
"""``(session, message_id)`` of a message, delivery record or delivery key."""

_Key = tuple[str, str]
_Owed = dict[str, int]
"""Whom a message is owed by: ``{client_id: retries}`` (its ``owed`` column, as JSON)."""

_UPSERT_SESSION: Final = "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)"
_UPSERT_SUBSCRIBER: Final = "INSERT OR REPLACE INTO subscribers VALUES (?, ?, ?, ?)"
_DELETE_SUBSCRIBER: Final = "DELETE FROM subscribers WHERE session = ? AND client_id = ?"
_INSERT_MESSAGE: Final = "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPDATE_OWED: Final = "UPDATE messages SET owed = ? WHERE session = ? AND message_id = ?"
_DELETE_MESSAGE: Final = "DELETE FROM messages WHERE session = ? AND message_id = ?"
_READ_OWED: Final = "SELECT owed FROM messages WHERE session = ? AND message_id = ?"
_READ_OWING: Final = "SELECT message_id, owed FROM messages WHERE session = ? AND instr(owed, ?)"
"""The stored messages of a session that may owe a client: their ``owed`` holds the client's JSON key (see
:func:`_owed_key`). A third of ``json_each``'s cost (30 ms instead of 100 for a session storing 30,000
messages owed by 50 subscribers): the session's rows are scanned, there is no index by subscriber."""
_LOAD_BACKLOGS: Final = (
    "SELECT m.session, e.key, count(*), sum(m.size) FROM messages m, json_each(m.owed) e"
    " GROUP BY m.session, e.key"
)
# The unary + keeps SQLite from reading the whole session through its (session, message_id) index and
# sorting it for every page (0.9 s to page through a 30,000-message backlog): it scans by seq, the rowid,
# from the cursor and stops at the page's last row (60 ms). Rows of other sessions on the way cost ~0.15 µs
# each, once per resume: an index on (session, seq) would skip them, but cost every message ~1 µs.
_LOAD_BACKLOG_PAGE: Final = (
    "SELECT m.session, m.message_id, m.seq, m.topic, m.data, m.hash, m.timestamp, m.encoding, m.expires_at,"
    " m.size, e.value FROM messages m, json_each(m.owed) e"
    " WHERE +m.session = ? AND e.key = ? AND m.seq > ? ORDER BY m.seq LIMIT ?"
)
_INSERT_PUBLISHES: Final = "INSERT INTO publish_log (session, at, entries) VALUES (?, ?, ?)"
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


def _owed_key(client_id: str) -> str:
    """How ``client_id`` appears in the ``owed`` of a message it is owed: its JSON string and a colon.

    orjson and SQLite's JSON functions (the 2 -> 3 migration's ``json_group_object``) escape every code
    point alike, so this finds every such message (and may find a message of another client whose id
    holds this one after an escaped quote: only a superset)."""
    return orjson.dumps(client_id).decode() + ":"


def _read_only_uri(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


class _Fold:
    """One commit's changes to whom its messages are owed by, folded per message, then written once each.

    It holds, per message a batch of the commit touched, whom the message is owed by after the batches
    folded so far, ``None`` when there is no such message (its deliveries are then ignored). A message of
    the commit's own records starts from ``{}``: no read, the common case (a message and its deliveries in
    one batch). One already in the file is read once, when a batch first touches it, and written back once,
    at the end: the whole point, since most messages are touched by several batches (stored, then ACKed).
    """

    __slots__ = ("_conn", "_owed", "_records", "_stored")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._owed: dict[_Key, _Owed | None] = {}
        self._records: dict[_Key, MessageRecord] = {}
        """The commit's message records (latest per key): they are written whole, the others' owed only."""
        self._stored: set[_Key] = set()
        """Touched messages read from the file (deleted at the end if owed by nobody then: a row its
        session's deletion took already is simply not found)."""

    def drop_sessions(self, names: list[str]) -> None:
        """The sessions' messages are gone (the caller deleted their rows)."""
        dropped = set(names)
        for key in self._owed:
            if key[0] in dropped:
                self._owed[key] = None

    def drop_subscribers(self, keys: list[SubscriberKey]) -> None:
        """Each subscriber is owed nothing any more: its stored backlog goes with it."""
        dropped: dict[str, set[str]] = {}
        for session, client_id in keys:
            dropped.setdefault(session, set()).add(client_id)
            for message_id, owed in self._conn.execute(_READ_OWING, (session, _owed_key(client_id))):
                if (session, message_id) not in self._owed:
                    self._take((session, message_id), owed)
        for key, owed in self._owed.items():
            if owed and (clients := dropped.get(key[0])):
                for client_id in clients:
                    owed.pop(client_id, None)

    def add_messages(self, records: list[MessageRecord]) -> None:
        """New messages, owed by nobody yet (stored at the end if owed by someone then, replacing a stored
        message of their key, if any: the broker stores a message once, but may take its id again once
        its dedupe entry expired)."""
        for record in records:
            key = _message_key(record)
            self._records[key] = record
            self._owed[key] = {}

    def drop_deliveries(self, keys: list[DeliveryKey]) -> None:
        of = self._of
        for session, message_id, client_id in keys:
            if entry := of((session, message_id)):
                entry.pop(client_id, None)

    def upsert_deliveries(self, records: list[DeliveryRecord]) -> None:
        """Each delivery's retry count, new or replacing the previous one."""
        of = self._of
        for session, message_id, client_id, _seq, retries in records:
            if (entry := of((session, message_id))) is not None:
                entry[client_id] = retries

    def _of(self, key: _Key) -> _Owed | None:
        """Whom a message is owed by as folded so far, read from the file when the commit first touches it
        (``None``: not stored)."""
        try:
            return self._owed[key]
        except KeyError:
            pass
        row = self._conn.execute(_READ_OWED, key).fetchone()
        if row is None:
            self._owed[key] = None
            return None
        return self._take(key, row[0])

    def _take(self, key: _Key, stored: str) -> _Owed:
        """A stored message's ``owed`` column, from now on folded here."""
        owed: _Owed = orjson.loads(stored)
        self._owed[key] = owed
        self._stored.add(key)
        return owed

    def write(self) -> None:
        """Write each touched message once: a new one with whom it is owed by (never stored if by nobody),
        a stored one's new ``owed``, or its deletion (owed by nobody now)."""
        owed, records, stored = self._owed, self._records, self._stored
        if not owed:  # a commit of dedupe entries, sessions or subscribers only
            return
        dumps = orjson.dumps
        gone = [key for key, entry in owed.items() if not entry and key in stored]
        changed = [
            (dumps(entry).decode(), *key) for key, entry in owed.items() if entry and key not in records
        ]
        new = [(*record, dumps(owed[key]).decode()) for key, record in records.items() if owed[key]]
        many = self._conn.executemany
        if gone:
            many(_DELETE_MESSAGE, gone)
        if changed:
            many(_UPDATE_OWED, changed)
        if new:
            many(_INSERT_MESSAGE, new)


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

        A message is stored exactly while some resumable subscriber owes it an ACK: the delivery changes of
        all the batches are folded per message (:class:`_Fold`), and each message touched is written once,
        after the last batch. So a message whose deliveries one batch drops and a later batch of the same
        commit delivers again stays, as the later batch needs; one owed by nobody after the last batch is
        deleted, or never stored. A delivery of a message that is neither stored nor recorded earlier in
        the commit is ignored (nothing could be read back with it). Expired dedupe entries are pruned at
        most every :data:`PRUNE_INTERVAL` seconds.

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
        except orjson.JSONDecodeError as exc:
            raise StoreError(_corrupt(self.path, f"a message's owed column: {exc}")) from exc

    def _apply(self, batches: Sequence[StoreBatch]) -> None:
        many = self._conn.executemany
        fold = _Fold(self._conn)
        for batch in batches:
            if batch.sessions_dropped:
                names = [(name,) for name in batch.sessions_dropped]
                for table in _SESSION_TABLES:
                    many(f"DELETE FROM {table} WHERE session = ?", names)
                many("DELETE FROM sessions WHERE name = ?", names)
                fold.drop_sessions(batch.sessions_dropped)
            if batch.sessions:
                many(_UPSERT_SESSION, map(_session_row, batch.sessions))
            if batch.subscribers_dropped:
                many(_DELETE_SUBSCRIBER, batch.subscribers_dropped)
                fold.drop_subscribers(batch.subscribers_dropped)
            if batch.subscribers:
                many(
                    _UPSERT_SUBSCRIBER,
                    [(s, c, p, json.dumps(t)) for s, c, p, t in map(_subscriber_row, batch.subscribers)],
                )
            if batch.messages:
                fold.add_messages(batch.messages)
            if batch.deliveries_dropped:
                fold.drop_deliveries(batch.deliveries_dropped)
            if batch.deliveries:
                fold.upsert_deliveries(batch.deliveries)
            if batch.publishes:
                many(_INSERT_PUBLISHES, _packed_publishes(batch.publishes))
        fold.write()
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
            for what, query in _COUNTS.items():
                for name, count in conn.execute(query):
                    counts.setdefault(name, {})[what] = count
        except sqlite3.DatabaseError as exc:
            return StoreReport(str(self.path), version, (*integrity, str(exc)), ())
        sessions = tuple(
            SessionCounts(name, **{what: found.get(what, 0) for what in _COUNTS})
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
