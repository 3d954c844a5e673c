"""The SQLite store (fastport_anyio/store.py) and ``fastport store check|backup``: plain synchronous tests.

The store is driven with hand-made batches (what the broker's journal would produce) and a fake wall
clock; a hypothesis test checks it against a dict model of the semantics :class:`StoreBatch` documents.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastport_anyio import store as store_module
from fastport_anyio.cli import main
from fastport_anyio.store import SqliteStore, StoreError, StoreUnavailable, check_store
from fastport_core.broker import Broker
from fastport_core.config import ServerConfig, SessionSettings
from fastport_core.errors import LocalProtocolError
from fastport_core.protocol import Ack, Init, Publish, Subscribe
from fastport_core.storage import (
    SCHEMA_VERSION,
    BacklogRecord,
    DeliveryRecord,
    MessageRecord,
    PublishRecord,
    SessionRecord,
    Snapshot,
    StoreBatch,
    SubscriberRecord,
)
from tests.store_model import ModelStore

from .test_cli import one_line_error

SETTINGS = SessionSettings(
    retry_interval=2.0, max_retry_limit=3, message_expiry_time=60.0, session_expiry=None
)
OTHER_SETTINGS = SessionSettings(session_expiry=86400.0)


class Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def session(name: str, *, settings: SessionSettings = SETTINGS, suspended: bool = False) -> SessionRecord:
    return SessionRecord(name, f"scrypt$16$8$1$c2FsdA==${name}", "scrypt$16$8$1$c2FsdA==$c2Vj", b"\x00key" + name.encode(),
                         settings, suspended)  # fmt: skip


def message(sess: str, message_id: str, seq: int, *, data: str = "iv:ct") -> MessageRecord:
    return MessageRecord(sess, message_id, seq, "site/1/temp", data, "v1:" + "0" * 64, 1700, "text", 2e9, 600)


def open_store(path: Path, clock: Clock | None = None, **kwargs: object) -> SqliteStore:
    return SqliteStore.open(path, clock=clock or Clock(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = open_store(tmp_path / "store.db")
    yield opened
    opened.close()


class Stored(NamedTuple):
    messages: list[MessageRecord]
    deliveries: list[DeliveryRecord]


MESSAGE_COLUMNS = ", ".join(MessageRecord._fields)


def stored(store: SqliteStore) -> Stored:
    """The stored messages, and the deliveries their ``owed`` columns hold, as records (``load`` only counts
    backlogs)."""
    conn = store._conn
    messages = [
        MessageRecord(*row) for row in conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages ORDER BY seq")
    ]
    deliveries = conn.execute(
        "SELECT m.session, m.message_id, e.key, m.seq, e.value FROM messages m, json_each(m.owed) e"
    )
    return Stored(messages, sorted(DeliveryRecord(*row) for row in deliveries))


def counts(store: SqliteStore) -> dict[str, tuple[int, int, int, int]]:
    return {c.name: (c.subscribers, c.messages, c.deliveries, c.publishes) for c in store.check().sessions}


def a_full_batch(seq: int = 1) -> StoreBatch:
    return StoreBatch(
        seq,
        sessions=[session("a", suspended=True), session("b", settings=OTHER_SETTINGS)],
        subscribers=[SubscriberRecord("a", "c1", True, ("site/+/temp", "x/#")), SubscriberRecord("a", "c2", False, ())],
        messages=[message("a", "m1", 1), MessageRecord("a", "m2", 2, "t", "iv:bin", "h", 5, "binary", 1.5e9, 530)],
        deliveries=[DeliveryRecord("a", "m1", "c1", 1, 0), DeliveryRecord("a", "m2", "c1", 2, 3)],
        publishes=[PublishRecord("a", "m1", 1, 999_999.0), PublishRecord("b", "p", 0, 999_999.5)],
    )  # fmt: skip


# -- records ------------------------------------------------------------------------------------------------


def test_every_record_kind_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    first = open_store(path)
    batch = a_full_batch()
    first.commit([batch])
    first.close()
    again = open_store(path)  # from the file, not from anything the first connection remembers
    loaded = again.load()
    table = stored(again)
    page = again.load_backlog("a", "c1", 0, 10)
    again.close()
    assert sorted(loaded.sessions, key=lambda s: s.name) == batch.sessions
    assert sorted(loaded.subscribers, key=lambda s: s.client_id) == batch.subscribers
    assert table.messages == batch.messages
    assert table.deliveries == batch.deliveries
    assert loaded.publishes == batch.publishes
    assert loaded.backlogs == [BacklogRecord("a", "c1", 2, 600 + 530)]
    assert loaded.last_seq == 2
    assert page == [(batch.messages[0], 0), (batch.messages[1], 3)]


def test_upserts_replace_and_deletions_delete(store: SqliteStore) -> None:
    store.commit([a_full_batch()])
    store.commit(
        [
            StoreBatch(
                2,
                sessions=[session("b", suspended=True)],
                subscribers=[SubscriberRecord("a", "c1", False, ("only",))],
                subscribers_dropped=[("a", "c2")],
                deliveries=[DeliveryRecord("a", "m1", "c1", 0, 4)],
            )
        ]
    )
    loaded = store.load()
    assert {s.name: s.suspended for s in loaded.sessions} == {"a": True, "b": True}
    assert loaded.subscribers == [SubscriberRecord("a", "c1", False, ("only",))]
    assert {d.message_id: d.retries for d in stored(store).deliveries} == {"m1": 4, "m2": 3}


def delivered(messages: list[MessageRecord], client_id: str = "c") -> list[DeliveryRecord]:
    """A delivery of each message to ``client_id`` (a message is stored only while some delivery is)."""
    return [DeliveryRecord(m.session, m.message_id, client_id, m.seq, 0) for m in messages]


def test_messages_load_in_publish_order(store: SqliteStore) -> None:
    messages = [message("a", "late", 9), message("b", "early", 2), message("a", "mid", 5)]
    store.commit([StoreBatch(1, messages=messages, deliveries=delivered(messages))])
    assert [m.message_id for m in stored(store).messages] == ["early", "mid", "late"]


# -- transactions ---------------------------------------------------------------------------------------------


def test_batches_given_together_commit_in_one_transaction(store: SqliteStore) -> None:
    good = StoreBatch(1, sessions=[session("a")], messages=[message("a", "m1", 1)])
    good.deliveries = delivered(good.messages)
    broken = StoreBatch(2, messages=[MessageRecord("a", "m2", 2, "t", None, "h", 1, "text", 1.0, 1)])  # type: ignore[arg-type]
    broken.deliveries = delivered(broken.messages)
    with pytest.raises(StoreError) as raised:
        store.commit([good, broken])
    assert not isinstance(raised.value, StoreUnavailable)  # a NOT NULL violation will not pass by retrying
    assert store.load() == Snapshot()
    store.commit([good])  # the connection is usable again
    assert [m.message_id for m in stored(store).messages] == ["m1"]


def test_batches_apply_in_order(store: SqliteStore) -> None:
    store.commit(
        [
            StoreBatch(1, messages=[message("a", "m", 1)], deliveries=[DeliveryRecord("a", "m", "c", 1, 0)]),
            StoreBatch(2, deliveries_dropped=[("a", "m", "c")]),
            StoreBatch(3, deliveries=[DeliveryRecord("a", "m", "c", 1, 7)]),
        ]
    )
    assert stored(store).deliveries == [DeliveryRecord("a", "m", "c", 1, 7)]


def test_a_full_disk_is_transient_applies_nothing_and_the_same_batches_commit_later(
    store: SqliteStore,
) -> None:
    store.commit([StoreBatch(1, sessions=[session("a")])])
    before = store.load()
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    big = [
        StoreBatch(2, messages=[message("a", f"m{i}", i, data="x" * 1000) for i in range(50)]),
        StoreBatch(3, deliveries=[DeliveryRecord("a", f"m{i}", "c", 0, 0) for i in range(50)]),
    ]
    with pytest.raises(StoreUnavailable, match="full"):
        store.commit(big)
    assert store.load() == before
    store._conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    store.commit(big)
    table = stored(store)
    assert len(table.messages) == len(table.deliveries) == 50


# -- what a commit deletes ----------------------------------------------------------------------------------


def test_dropping_a_session_cascades_to_everything_of_it(store: SqliteStore) -> None:
    batch = a_full_batch()
    batch.subscribers.append(SubscriberRecord("b", "c9", True, ("t",)))
    batch.messages.append(message("b", "mb", 3))
    batch.deliveries.append(DeliveryRecord("b", "mb", "c9", 0, 0))
    store.commit([batch])
    store.commit([StoreBatch(2, sessions_dropped=["a"])])
    assert counts(store) == {"b": (1, 1, 1, 1)}


def test_a_session_dropped_and_created_again_in_one_batch_keeps_only_the_new_one(store: SqliteStore) -> None:
    store.commit([a_full_batch()])
    fresh = session("a", settings=OTHER_SETTINGS)
    store.commit([StoreBatch(2, sessions=[fresh], sessions_dropped=["a"])])
    assert [s for s in store.load().sessions if s.name == "a"] == [fresh]
    assert counts(store)["a"] == (0, 0, 0, 0)


def test_a_message_goes_when_its_last_delivery_goes(store: SqliteStore) -> None:
    store.commit(
        [
            StoreBatch(
                1,
                messages=[message("a", "m", 1)],
                deliveries=[DeliveryRecord("a", "m", "c1", 0, 0), DeliveryRecord("a", "m", "c2", 0, 0)],
            )
        ]
    )
    store.commit([StoreBatch(2, deliveries_dropped=[("a", "m", "c1")])])
    assert [m.message_id for m in stored(store).messages] == ["m"]
    store.commit([StoreBatch(3, deliveries_dropped=[("a", "m", "c2")])])
    assert stored(store).messages == []


def test_a_message_dropped_and_delivered_again_in_one_commit_stays(store: SqliteStore) -> None:
    store.commit(
        [StoreBatch(1, messages=[message("a", "m", 1)], deliveries=[DeliveryRecord("a", "m", "c1", 1, 0)])]
    )
    store.commit(
        [
            StoreBatch(2, deliveries_dropped=[("a", "m", "c1")]),
            StoreBatch(3, deliveries=[DeliveryRecord("a", "m", "c2", 1, 0)]),
        ]
    )
    assert stored(store) == Stored([message("a", "m", 1)], [DeliveryRecord("a", "m", "c2", 1, 0)])


def test_a_message_stored_and_acked_in_one_commit_is_never_written(store: SqliteStore) -> None:
    m = message("a", "m", 1)
    store.commit(
        [
            StoreBatch(1, messages=[m], deliveries=delivered([m], "c1") + delivered([m], "c2")),
            StoreBatch(2, deliveries_dropped=[("a", "m", "c1")]),
            StoreBatch(3, deliveries_dropped=[("a", "m", "c2")]),
        ]
    )
    assert stored(store) == Stored([], [])


def test_a_retry_count_replaces_the_stored_one(store: SqliteStore) -> None:
    m = message("a", "m", 1)
    store.commit([StoreBatch(1, messages=[m], deliveries=delivered([m], "c1") + delivered([m], "c2"))])
    store.commit([StoreBatch(2, deliveries=[DeliveryRecord("a", "m", "c1", 1, 2)])])
    store.commit(
        [
            StoreBatch(3, deliveries=[DeliveryRecord("a", "m", "c1", 1, 3)]),
            StoreBatch(4, deliveries=[DeliveryRecord("a", "m", "c2", 1, 1)]),
        ]
    )
    assert store.load_backlog("a", "c1", 0, 10) == [(m, 3)]
    assert store.load_backlog("a", "c2", 0, 10) == [(m, 1)]


def test_a_dropped_subscriber_is_owed_nothing_and_messages_owed_by_nobody_else_go(store: SqliteStore) -> None:
    """Also from a message an earlier batch of the same commit stored; ``x"c1``, whose JSON key holds
    c1's (after an escaped quote), and c1 in another session keep theirs."""
    owed_by = {"m1": ("c1", "c2"), "m2": ("c1",), "m3": ("c2",), "m4": ('x"c1',)}
    messages = [message("a", mid, n) for n, mid in enumerate(owed_by, 1)]
    other = message("b", "m1", 5)
    deliveries = [
        DeliveryRecord("a", m.message_id, c, m.seq, 0) for m in messages for c in owed_by[m.message_id]
    ]
    store.commit(
        [StoreBatch(1, messages=[*messages, other], deliveries=[*deliveries, *delivered([other], "c1")])]
    )
    late = message("a", "m5", 6)
    store.commit(
        [
            StoreBatch(2, messages=[late], deliveries=delivered([late], "c1")),
            StoreBatch(3, subscribers_dropped=[("a", "c1")]),
        ]
    )
    assert stored(store) == Stored(
        [messages[0], messages[2], messages[3], other],
        sorted(
            [
                DeliveryRecord("a", "m1", "c2", 1, 0),
                DeliveryRecord("a", "m3", "c2", 3, 0),
                DeliveryRecord("a", "m4", 'x"c1', 4, 0),
                DeliveryRecord("b", "m1", "c1", 5, 0),
            ]
        ),
    )


def test_a_session_dropped_mid_commit_takes_what_earlier_batches_stored_or_changed(
    store: SqliteStore,
) -> None:
    old, kept = message("a", "old", 1), message("b", "kept", 2)
    store.commit([StoreBatch(1, messages=[old, kept], deliveries=delivered([old, kept]))])
    new = message("a", "new", 3)
    store.commit(
        [
            StoreBatch(
                2, messages=[new], deliveries=[*delivered([new]), DeliveryRecord("a", "old", "c2", 1, 0)]
            ),
            StoreBatch(3, sessions_dropped=["a"], sessions=[session("a")]),
            # Deliveries of messages that went with the session: nothing to store them with.
            StoreBatch(
                4, deliveries=[DeliveryRecord("a", "old", "c", 1, 5), DeliveryRecord("a", "new", "c", 3, 5)]
            ),
        ]
    )
    assert stored(store) == Stored([kept], delivered([kept]))
    assert counts(store) == {"a": (0, 0, 0, 0), "b": (0, 1, 1, 0)}


def test_a_damaged_owed_column_fails_the_commit_as_corrupt(store: SqliteStore) -> None:
    m = message("a", "m", 1)
    store.commit([StoreBatch(1, messages=[m], deliveries=delivered([m]))])
    store._conn.execute("UPDATE messages SET owed = '{\"c\": 0'")
    with pytest.raises(StoreError, match="is corrupt") as raised:
        store.commit([StoreBatch(2, deliveries_dropped=[("a", "m", "c")])])
    assert not isinstance(raised.value, StoreUnavailable)
    assert not store._conn.in_transaction


def test_a_delivery_of_a_message_that_is_not_stored_is_ignored(store: SqliteStore) -> None:
    store.commit([StoreBatch(1, deliveries=[DeliveryRecord("a", "nowhere", "c", 1, 0)])])
    store.commit([StoreBatch(2, deliveries_dropped=[("a", "nowhere", "c")])])
    assert stored(store) == Stored([], [])
    assert store.load() == Snapshot()


# -- the dedupe window --------------------------------------------------------------------------------------


def test_load_returns_the_newest_window_of_unexpired_dedupe_entries_oldest_first(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    store = open_store(tmp_path / "s.db", clock, dedupe_ttl=100.0, dedupe_window=3)
    store.commit(
        [StoreBatch(1, publishes=[PublishRecord("a", f"p{i}", 0, 850.0 + 10 * i) for i in range(10)])]
    )
    store.commit([StoreBatch(2, publishes=[PublishRecord("b", "same-instant-1", 0, 990.0),
                                           PublishRecord("b", "same-instant-2", 0, 990.0)])])  # fmt: skip
    ids = [(p.session, p.message_id) for p in store.load().publishes]
    assert ids == [("a", "p7"), ("a", "p8"), ("a", "p9"), ("b", "same-instant-1"), ("b", "same-instant-2")]
    store.close()


def test_a_message_id_taken_again_replaces_its_dedupe_entry(store: SqliteStore) -> None:
    store.commit(
        [
            StoreBatch(
                1, publishes=[PublishRecord("a", "p", 1, 999_800.0), PublishRecord("a", "q", 1, 999_801.0)]
            )
        ]
    )
    store.commit([StoreBatch(2, publishes=[PublishRecord("a", "p", 5, 999_802.0)])])
    assert store.load().publishes == [
        PublishRecord("a", "q", 1, 999_801.0),
        PublishRecord("a", "p", 5, 999_802.0),
    ]


def test_commits_prune_expired_dedupe_entries_at_most_every_few_seconds(tmp_path: Path) -> None:
    """Entries are packed one row per session per batch, so a row goes once its newest entry expired
    (a batch spans milliseconds); an expired entry still in its row is never loaded."""
    clock = Clock(1000.0)
    store = open_store(tmp_path / "s.db", clock, dedupe_ttl=100.0)
    store.commit(
        [StoreBatch(1, publishes=[PublishRecord("a", "old", 0, 950.0), PublishRecord("a", "new", 0, 999.0)])]
    )
    clock.now = 1060.0  # "old" expired at 1050, its row (newest 999) not yet
    store.commit([StoreBatch(2, publishes=[PublishRecord("a", "newer", 0, 1060.0)])])
    assert counts(store) == {"a": (0, 0, 0, 3)}
    assert [p.message_id for p in store.load().publishes] == ["new", "newer"]
    clock.now = 1061.0 + store_module.PRUNE_INTERVAL / 2  # no prune due
    store.commit([StoreBatch(3, publishes=[PublishRecord("a", "x", 0, 900.0)])])
    assert counts(store) == {"a": (0, 0, 0, 4)}
    clock.now = 1061.0 + store_module.PRUNE_INTERVAL
    store.commit([StoreBatch(4)])  # x's row goes; the first row lives until 1099
    assert counts(store) == {"a": (0, 0, 0, 3)}
    clock.now = 1100.0 + store_module.PRUNE_INTERVAL
    store.commit([StoreBatch(5)])
    assert counts(store) == {"a": (0, 0, 0, 1)}
    store.close()


# -- opening: migrations and unusable files -----------------------------------------------------------------


def test_an_empty_file_is_migrated_to_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    store = open_store(path)
    assert store.check().schema_version == SCHEMA_VERSION == 3
    store.commit([a_full_batch()])
    store.close()


def test_synchronous_is_full_unless_normal_is_asked_for(tmp_path: Path) -> None:
    full = open_store(tmp_path / "full.db")
    normal = open_store(tmp_path / "normal.db", synchronous="NORMAL")
    assert full._conn.execute("PRAGMA synchronous").fetchone() == (2,)
    assert normal._conn.execute("PRAGMA synchronous").fetchone() == (1,)
    assert normal._conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    full.close()
    normal.close()
    with pytest.raises(LocalProtocolError):
        open_store(tmp_path / "off.db", synchronous="OFF; DROP TABLE sessions")


def test_store_check_of_an_empty_file_exits_2_and_leaves_it_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    assert main(["store", "check", str(path)]) == 2
    assert "empty SQLite file" in one_line_error(capsys.readouterr().err, "store")
    assert path.stat().st_size == 0


def test_opening_runs_the_missing_migration_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.db"
    open_store(path).close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(store_module, "_MIGRATIONS", (*store_module._MIGRATIONS, ("CREATE TABLE extra (x)",)))
    store = open_store(path)
    assert store.check().schema_version == SCHEMA_VERSION + 1
    assert store._conn.execute("SELECT count(*) FROM extra").fetchone() == (0,)
    store.close()


def a_store_of_version(path: Path, version: int) -> sqlite3.Connection:
    """A new store file of layout ``version`` (made by the migration steps up to it), open to fill in."""
    conn = sqlite3.connect(path)
    for step in store_module._MIGRATIONS[:version]:
        for statement in step:
            conn.execute(statement)
    conn.execute(f"PRAGMA application_id={store_module.APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version={version}")
    return conn


def test_a_version_1_store_keeps_its_dedupe_entries_when_migrated(tmp_path: Path) -> None:
    """Layout 1 kept one row per dedupe entry; 2 packs them (one row per session per batch)."""
    path = tmp_path / "v1.db"
    conn = a_store_of_version(path, 1)
    rows = [("a", "m1", 1, 990.0), ("a", "m2", 0, 995.0), ("b", "m1", 2, 996.0), ("a", "gone", 0, 10.0)]
    conn.executemany("INSERT INTO publishes VALUES (?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    store = open_store(path, Clock(1000.0), dedupe_ttl=100.0)
    assert store.check().schema_version == SCHEMA_VERSION
    assert store.load().publishes == [PublishRecord(*row) for row in rows[:3]]
    assert counts(store) == {"a": (0, 0, 0, 3), "b": (0, 0, 0, 1)}  # "gone" goes at the next prune
    store.close()


@pytest.mark.parametrize("version", [1, 2])
def test_a_version_1_or_2_store_keeps_its_backlogs_when_migrated(tmp_path: Path, version: int) -> None:
    """Layouts 1 and 2 kept a row per delivery; 3 folds them into their message's row. A message no delivery
    refers to any more, and a delivery of a message that is not stored, are not carried over."""
    path = tmp_path / f"v{version}.db"
    conn = a_store_of_version(path, version)
    m1, orphan, m3, mb = (
        message("a", "m1", 1),
        message("a", "orphan", 2),
        message("a", "m3", 3),
        message("b", "m", 4),
    )
    conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [m1, orphan, m3, mb])
    deliveries = [
        DeliveryRecord("a", "m1", "c1", 1, 0),
        DeliveryRecord("a", "m1", "c2", 1, 3),
        DeliveryRecord("a", "m3", "c1", 3, 1),
        DeliveryRecord("b", "m", "c9", 4, 0),
        DeliveryRecord("a", "ghost", "c1", 9, 0),
    ]
    conn.executemany("INSERT INTO deliveries VALUES (?, ?, ?, ?, ?)", deliveries)
    conn.commit()
    conn.close()
    store = open_store(path)
    assert store.check().schema_version == SCHEMA_VERSION
    tables = {name for (name,) in store._conn.execute("SELECT name FROM sqlite_master")}
    assert not {"deliveries", "deliveries_by_subscriber", "messages_3"} & tables
    assert stored(store) == Stored([m1, m3, mb], sorted(deliveries[:4]))
    loaded = store.load()
    assert sorted(loaded.backlogs) == [
        BacklogRecord("a", "c1", 2, 1200),
        BacklogRecord("a", "c2", 1, 600),
        BacklogRecord("b", "c9", 1, 600),
    ]
    assert loaded.last_seq == 4
    assert store.load_backlog("a", "c1", 0, 10) == [(m1, 0), (m3, 1)]
    assert store.load_backlog("a", "c1", 1, 10) == [(m3, 1)]
    assert store.load_backlog("a", "c2", 0, 10) == [(m1, 3)]
    assert counts(store) == {"a": (0, 2, 3, 0), "b": (0, 1, 1, 0)}
    store.commit([StoreBatch(1, deliveries_dropped=[("a", "m1", "c1"), ("a", "m1", "c2")])])  # it is writable
    assert [m.message_id for m in stored(store).messages] == ["m3", "m"]
    store.close()


def test_a_store_of_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    open_store(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StoreError, match="schema version 99, newer"):
        open_store(path)


def test_an_sqlite_file_of_another_application_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE accounts (id)")
    raw.close()
    with pytest.raises(StoreError, match="not a fastport store"):
        open_store(path)


def test_a_file_that_is_not_a_database_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError) as raised:
        open_store(path)
    assert "\n" not in str(raised.value) and "garbage.db" in str(raised.value)


def corrupt_a_page(path: Path) -> None:
    store = open_store(path)
    messages = [message("a", f"m{i}", i, data="x" * 200) for i in range(200)]
    store.commit([StoreBatch(1, messages=messages, deliveries=delivered(messages))])
    root = store._conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    size = store._conn.execute("PRAGMA page_size").fetchone()[0]
    store.close()  # checkpoints the WAL into the file
    data = bytearray(path.read_bytes())
    data[(root - 1) * size] = 0xFF  # not a b-tree page type
    path.write_bytes(bytes(data))


def test_a_corrupt_store_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    corrupt_a_page(path)
    with pytest.raises(StoreError, match="is corrupt") as raised:
        open_store(path)
    assert "\n" not in str(raised.value)


def test_a_missing_directory_a_directory_and_a_file_as_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nowhere" / "s.db")
    with pytest.raises(StoreError, match="is a directory"):
        open_store(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "file" / "s.db")
    assert not (tmp_path / "nowhere").exists()


def test_an_unwritable_store_or_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only file (SQLITE_READONLY) and a directory the server may not write in (SQLITE_CANTOPEN)
    do, made independent of who runs the tests (root writes through file permissions): SQLite is made to
    open the file read-only, as it does when the permissions say so."""
    path = tmp_path / "s.db"
    open_store(path).close()
    real_connect = sqlite3.connect

    def read_only(database: object, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.pop("uri", None)
        return real_connect(f"file:{database}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(store_module.sqlite3, "connect", read_only)
    with pytest.raises(StoreError, match=r"s\.db"):
        open_store(path)  # the file exists but cannot be written
    with pytest.raises(StoreError, match=r"fresh\.db"):
        open_store(tmp_path / "fresh.db")  # it cannot be created


# -- check and backup ---------------------------------------------------------------------------------------


def test_check_counts_per_session(store: SqliteStore) -> None:
    store.commit([a_full_batch()])
    report = store.check()
    assert report.ok and report.integrity == ("ok",)
    assert counts(store) == {"a": (2, 2, 2, 1), "b": (0, 0, 0, 1)}


def test_a_backup_holds_committed_state_only(store: SqliteStore, tmp_path: Path) -> None:
    store.commit([a_full_batch()])
    store._conn.execute("BEGIN IMMEDIATE")  # a commit in progress on the server's connection
    store._conn.execute("DELETE FROM sessions")
    target = tmp_path / "backup.db"
    store.backup(target)
    store._conn.execute("ROLLBACK")
    copy = open_store(target)
    assert copy.load() == store.load()
    copy.close()


def test_store_check_prints_the_report_and_exits_0(
    store: SqliteStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.commit([a_full_batch()])
    assert main(["store", "check", str(tmp_path / "store.db")]) == 0
    out = capsys.readouterr().out
    assert "schema version: 3" in out and "integrity: ok" in out
    assert "  a: subscribers=2 messages=2 deliveries=2 dedupe=1" in out.splitlines()


def test_store_check_of_a_missing_file_exits_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing.db"
    assert main(["store", "check", str(path)]) == 2
    assert "no store file" in one_line_error(capsys.readouterr().err, "store")
    assert not path.exists()


def test_store_check_of_garbage_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"not sqlite at all" * 100)
    assert main(["store", "check", str(path)]) == 2
    assert "not a database" in one_line_error(capsys.readouterr().err, "store")
    assert path.read_bytes() == b"not sqlite at all" * 100


def test_store_check_of_a_corrupt_store_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.db"
    corrupt_a_page(path)
    assert main(["store", "check", str(path)]) == 1
    captured = capsys.readouterr()
    assert "integrity: FAILED" in captured.out
    assert "integrity check" in one_line_error(captured.err, "store")


def test_store_backup_copies_and_refuses_an_existing_target(
    store: SqliteStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.commit([a_full_batch()])
    target = tmp_path / "copy.db"
    assert main(["store", "backup", str(tmp_path / "store.db"), str(target)]) == 0
    assert check_store(target).sessions == store.check().sessions
    capsys.readouterr()
    assert main(["store", "backup", str(tmp_path / "store.db"), str(target)]) == 2
    assert "already exists" in one_line_error(capsys.readouterr().err, "store")


# -- the store against a model of StoreBatch's semantics ------------------------------------------------------

SESSIONS = ("a", "b")
CLIENTS = ("c1", "c2")
IDS = ("m1", "m2", "m3")
NOW, TTL, WINDOW = 1000.0, 50.0, 2


@dataclass
class Model:
    """What the store should hold: dicts keyed like its tables (publishes with an insertion counter)."""

    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    subscribers: dict[tuple[str, str], SubscriberRecord] = field(default_factory=dict)
    messages: dict[tuple[str, str], MessageRecord] = field(default_factory=dict)
    deliveries: dict[tuple[str, str, str], DeliveryRecord] = field(default_factory=dict)
    publishes: dict[tuple[str, str], tuple[int, PublishRecord]] = field(default_factory=dict)
    inserted: int = 0

    def commit(self, batches: list[StoreBatch]) -> None:
        """A message is kept exactly while some delivery refers to it: a delivery of a message not kept
        (nor recorded earlier in the commit) is ignored, and messages no delivery refers to after the last
        batch go (so a message whose deliveries are dropped and delivered again in one commit stays)."""
        for batch in batches:
            for name in batch.sessions_dropped:
                self.sessions.pop(name, None)
                tables: tuple[dict[Any, Any], ...] = (
                    self.subscribers,
                    self.messages,
                    self.deliveries,
                    self.publishes,
                )
                for table in tables:
                    for key in [key for key in table if key[0] == name]:
                        del table[key]
            self.sessions.update((s.name, s) for s in batch.sessions)
            for key in batch.subscribers_dropped:
                self.subscribers.pop(key, None)
                for dkey in [k for k in self.deliveries if (k[0], k[2]) == key]:
                    del self.deliveries[dkey]
            self.subscribers.update(((s.session, s.client_id), s) for s in batch.subscribers)
            self.messages.update(((m.session, m.message_id), m) for m in batch.messages)
            for dkey in batch.deliveries_dropped:
                self.deliveries.pop(dkey, None)
            for d in batch.deliveries:  # its seq is its message's (the generated one is a placeholder)
                if (message := self.messages.get((d.session, d.message_id))) is not None:
                    self.deliveries[d.session, d.message_id, d.client_id] = d._replace(seq=message.seq)
            for p in batch.publishes:
                self.inserted += 1
                self.publishes[p.session, p.message_id] = (self.inserted, p)
        referred = {key[:2] for key in self.deliveries}
        self.messages = {key: m for key, m in self.messages.items() if key in referred}

    def snapshot(self) -> Snapshot:
        fresh = sorted((p.at, n, p) for n, p in self.publishes.values() if p.at >= NOW - TTL)
        kept = [p for name in SESSIONS for p in [p for _at, _n, p in fresh if p.session == name][-WINDOW:]]
        kept.sort(key=lambda p: (p.at, self.publishes[p.session, p.message_id][0]))
        backlogs: dict[tuple[str, str], list[int]] = {}
        for session_name, message_id, client_id in self.deliveries:
            if (message := self.messages.get((session_name, message_id))) is not None:
                counted = backlogs.setdefault((session_name, client_id), [0, 0])
                counted[0] += 1
                counted[1] += message.size
        return Snapshot(
            sorted(self.sessions.values(), key=lambda s: s.name),
            sorted(self.subscribers.values(), key=lambda s: (s.session, s.client_id)),
            sorted(BacklogRecord(s, c, n, size) for (s, c), (n, size) in backlogs.items()),
            kept,
            max((m.seq for m in self.messages.values()), default=0),
        )

    def stored(self) -> Stored:
        return Stored(sorted(self.messages.values(), key=lambda m: m.seq), sorted(self.deliveries.values()))


def normalised(snapshot: Snapshot) -> Snapshot:
    return Snapshot(
        sorted(snapshot.sessions, key=lambda s: s.name),
        sorted(snapshot.subscribers, key=lambda s: (s.session, s.client_id)),
        sorted(snapshot.backlogs),
        # Each session's dedupe window is restored on its own: only the order within a session matters
        # (a stable sort keeps it), not how entries of different sessions published at once interleave.
        sorted(snapshot.publishes, key=lambda p: p.session),
        snapshot.last_seq,
    )


sess = st.sampled_from(SESSIONS)
client = st.sampled_from(CLIENTS)
mid = st.sampled_from(IDS)
batch_parts = st.fixed_dictionaries(
    {
        "sessions": st.lists(st.builds(session, sess, suspended=st.booleans()), max_size=2),
        "sessions_dropped": st.lists(sess, max_size=1),
        "subscribers": st.lists(
            st.builds(
                SubscriberRecord, sess, client, st.booleans(), st.lists(st.sampled_from("xyz")).map(tuple)
            ),
            max_size=2,
        ),
        "subscribers_dropped": st.lists(st.tuples(sess, client), max_size=2),
        "messages": st.lists(st.tuples(sess, mid), max_size=3),
        "deliveries": st.lists(
            st.builds(DeliveryRecord, sess, mid, client, st.just(0), st.integers(0, 5)), max_size=4
        ),
        "deliveries_dropped": st.lists(st.tuples(sess, mid, client), max_size=4),
        "publishes": st.lists(
            st.builds(
                PublishRecord, sess, mid, st.integers(0, 3), st.sampled_from([900.0, 960.0, 980.0, 990.0])
            ),
            max_size=3,
        ),
    }
)


@settings(max_examples=60, deadline=None)
@given(commits=st.lists(st.lists(batch_parts, min_size=1, max_size=3), max_size=6))
def test_the_store_agrees_with_a_model_of_store_batch(
    tmp_path_factory: pytest.TempPathFactory, commits: list[list[dict[str, Any]]]
) -> None:
    path = tmp_path_factory.mktemp("model") / "s.db"
    store = open_store(path, Clock(NOW), dedupe_ttl=TTL, dedupe_window=WINDOW)
    model = Model()
    seq = 0
    latest = 0.0
    batches: list[StoreBatch] = []
    for parts in commits:
        batches = []
        taken = set(model.messages)  # the broker records a message once (see _Fold.add_messages)
        for fields_ in parts:
            publishes = []
            for p in fields_["publishes"]:  # the broker writes entries in publish order: times never go back
                latest = max(latest, p.at)
                publishes.append(p._replace(at=latest))
            messages = []
            for s, m in fields_["messages"]:
                if (s, m) not in taken:
                    taken.add((s, m))
                    seq += 1  # the broker numbers messages in publish order
                    messages.append(message(s, m, seq))
            batches.append(
                StoreBatch(len(batches) + 1, **{**fields_, "messages": messages, "publishes": publishes})
            )
        store.commit(batches)
        model.commit(batches)
        assert normalised(store.load()) == normalised(model.snapshot())
        assert stored(store) == model.stored()
    store.close()


# -- the store against ModelStore, however a broker's batches are grouped into commits ---------------------


Pair = tuple[tuple[str, str], str]
"""``((session, message_id), client_id)``: a delivery."""


class BrokerLike:
    """Makes batches as a durable broker takes them, remembering whom each stored message is owed by.

    A message is recorded once, with its first deliveries, in a new batch; a delivery is re-sent (its retry
    count + 1) or dropped only while it is owed, at most once per batch; a dropped subscriber or session is
    owed nothing any more. So no batch refers to a message no delivery refers to any more: then committing
    the batches one at a time (ModelStore, which deletes such messages after each batch) and in any
    grouping (the SQLite store, after each commit) must agree.
    """

    def __init__(self, data: st.DataObject) -> None:
        self.draw = data.draw
        self.owed: dict[tuple[str, str], dict[str, int]] = {}
        self.seqs: dict[tuple[str, str], int] = {}
        self.at = NOW - TTL

    def batch(self, seq: int) -> StoreBatch:
        draw = self.draw
        batch = StoreBatch(seq)
        if draw(st.integers(0, 9)) == 0:
            name = draw(sess)
            batch.sessions_dropped.append(name)
            self.forget({pair for pair in self.pairs() if pair[0][0] == name})
        batch.sessions = draw(st.lists(st.builds(session, sess, suspended=st.booleans()), max_size=1))
        if draw(st.integers(0, 4)) == 0:
            dropped = draw(st.tuples(sess, client))
            batch.subscribers_dropped.append(dropped)
            self.forget({pair for pair in self.pairs() if (pair[0][0], pair[1]) == dropped})
        batch.subscribers = draw(
            st.lists(st.builds(SubscriberRecord, sess, client, st.booleans(), st.just(("t",))), max_size=1)
        )
        owed = self.pairs()
        acked = draw(st.sets(st.sampled_from(owed), max_size=6)) if owed else set()
        self.forget(acked)
        batch.deliveries_dropped = [(*key, client_id) for key, client_id in sorted(acked)]
        retried = draw(st.sets(st.sampled_from(owed), max_size=3)) if owed else set()
        for key, client_id in sorted(retried - acked):
            self.owed[key][client_id] += 1
            batch.deliveries.append(
                DeliveryRecord(*key, client_id, self.seqs[key], self.owed[key][client_id])
            )
        for _ in range(draw(st.integers(0, 3))):
            self.publish(batch, draw(sess), draw(st.sets(client, min_size=1)))
        return batch

    def pairs(self) -> list[Pair]:
        return sorted((key, client_id) for key, clients in self.owed.items() for client_id in clients)

    def publish(self, batch: StoreBatch, session_name: str, clients: set[str]) -> None:
        seq = len(self.seqs) + 1
        record = message(session_name, f"p{seq}", seq)
        key = (session_name, record.message_id)
        self.seqs[key] = seq
        self.owed[key] = dict.fromkeys(clients, 0)
        self.at += 1.0
        batch.messages.append(record)
        batch.deliveries += [DeliveryRecord(*key, client_id, seq, 0) for client_id in sorted(clients)]
        batch.publishes.append(PublishRecord(session_name, record.message_id, len(clients), self.at))

    def forget(self, gone: set[Pair]) -> None:
        """Those deliveries are owed no more; messages owed by nobody are no more."""
        for key, client_id in gone:
            del self.owed[key][client_id]
            if not self.owed[key]:
                del self.owed[key]


def pages(
    store: SqliteStore | ModelStore, session_name: str, client_id: str
) -> list[list[tuple[MessageRecord, int]]]:
    """A subscriber's whole stored backlog, as the pages of two a resume reads (the last one short)."""
    read = [store.load_backlog(session_name, client_id, 0, 2)]
    while len(read[-1]) == 2:
        read.append(store.load_backlog(session_name, client_id, read[-1][-1][0].seq, 2))
    return read


@settings(max_examples=60, deadline=None)
@given(data=st.data(), count=st.integers(1, 12))
def test_the_store_agrees_with_model_store_however_batches_are_grouped(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, count: int
) -> None:
    broker = BrokerLike(data)
    batches = [broker.batch(seq) for seq in range(1, count + 1)]
    cuts = sorted(data.draw(st.sets(st.integers(1, count - 1))) if count > 1 else set())
    store = open_store(
        tmp_path_factory.mktemp("grouped") / "s.db", Clock(NOW), dedupe_ttl=TTL, dedupe_window=100
    )
    model = ModelStore()
    for start, end in zip([0, *cuts], [*cuts, count], strict=True):
        store.commit(batches[start:end])
        model.commit(batches[start:end])
        assert normalised(store.load()) == normalised(model.load())
        for session_name in SESSIONS:
            for client_id in CLIENTS:
                assert pages(store, session_name, client_id) == pages(model, session_name, client_id)
    store.close()


# -- the seam: what a durable broker journals goes through the store and back ------------------------------


def test_a_durable_brokers_state_survives_a_restart_through_the_store(tmp_path: Path) -> None:
    config = ServerConfig(password_hash_cost=2**4)
    wall = 1_000_000.0

    def durable_broker() -> Broker:
        broker = Broker(config, durable=True)
        broker.set_wall_clock(wall, 0.0)
        return broker

    broker = durable_broker()
    broker.create_session("s", "pw", 0.0, SETTINGS)
    broker.connection_opened(1, 0.0)
    broker.handle_packet(1, Init("s", "pw", client_id="sub", persistent=True), 0.0)
    broker.handle_packet(1, Subscribe("t/#"), 0.0)
    broker.connection_closed(1, 0.0)  # detached: it owes what is published now
    broker.connection_opened(2, 0.0)
    broker.handle_packet(2, Init("s", "pw"), 0.0)
    broker.handle_packet(2, Publish("t/1", "iv:ct", "h", 7, "m1", "binary"), 0.0)
    broker.output.clear()
    store = open_store(tmp_path / "s.db", Clock(wall))
    batch = broker.take_store_batch()
    assert batch is not None
    store.commit([batch])
    store.close()

    store = open_store(tmp_path / "s.db", Clock(wall))  # the restart
    snapshot = store.load()
    assert [(s.name, s.settings) for s in snapshot.sessions] == [("s", SETTINGS)]
    assert [(s.client_id, s.persistent, s.topics) for s in snapshot.subscribers] == [("sub", True, ("t/#",))]
    assert [(b.client_id, b.deliveries) for b in snapshot.backlogs] == [("sub", 1)]
    assert [(p.message_id, p.delivered_to) for p in snapshot.publishes] == [("m1", 1)]
    restored = durable_broker()
    restored.restore(snapshot, 0.0)
    restored.connection_opened(3, 0.0)
    restored.handle_packet(3, Init("s", "pw", client_id="sub", persistent=True), 0.0)
    (request,) = restored.output.backlog_requests  # the resume reads its backlog back from the store
    page = store.load_backlog(*request)
    assert [(m.message_id, m.encoding, retries) for m, retries in page] == [("m1", "binary", 0)]
    restored.backlog_loaded(request, page, 0.0)
    assert any(b'"m1"' in frame for _conn, frame in restored.output.frames)
    restored.handle_packet(3, Ack("t/1", "m1"), 0.0)
    batch = restored.take_store_batch()
    assert batch is not None
    store.commit([batch])
    assert counts(store) == {"s": (1, 0, 0, 1)}  # delivered and ACKed: only the dedupe entry is left
    store.close()
