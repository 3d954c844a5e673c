"""What the broker asks a store to make durable, as data (DESIGN §7): records, batches and a snapshot.

Records are named tuples: cheap to build on the hot path (one per stored message, delivery and publish)
and rows as they are, in their tables' column order, for a store's ``executemany``.

The core never calls a database. With a store configured, the broker notes every change to its durable
state in a :class:`Journal` (which object changed, not how to write it); the server core takes the
journal's content as a :class:`StoreBatch` of plain records whenever the adapter asks, numbered in order;
the adapter commits batches in that order (one transaction each, or several together) on its own thread
and reports the number of the last durable one back. Frames that promise durability (a successful
``publish_response``, ``ack_received``) wait until then. At start the adapter loads a :class:`Snapshot`
and the broker restores itself from it.

What is durable: sessions (with their password, secret and token key), resumable subscribers (``clientId``)
with their subscriptions, every message some resumable subscriber still owes an ACK for, with each such
delivery's retry count, and the publish dedupe window. Anonymous subscribers are not: their deliveries end
with their connection anyway, and a restart ends every connection.

Coalescing is the point of journalling objects rather than logging operations: a message published and
ACKed between two batches changes nothing durable but its dedupe entry, so under load most deliveries
never reach the disk, and a delivery re-sent three times is written once, with its last retry count.

All times in records are wall-clock seconds since the epoch (the broker converts with its wall-clock
offset), so expiry continues across a restart, however long the server was down.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, NamedTuple

from .config import SessionSettings

__all__ = [
    "SCHEMA_VERSION",
    "BacklogRecord",
    "BacklogRequest",
    "DeliveryKey",
    "DeliveryRecord",
    "Journal",
    "MessageRecord",
    "Presence",
    "PublishRecord",
    "SessionRecord",
    "Snapshot",
    "StoreBatch",
    "SubscriberKey",
    "SubscriberRecord",
    "settings_from_json",
    "settings_to_json",
]

SCHEMA_VERSION: Final = 3
"""The version of a store's layout (what it keeps the records in); a store keeps it and migrates older
layouts on open. 2: dedupe entries packed, one row per session per batch. 3: deliveries folded into their
message's row."""

SubscriberKey = tuple[str, str]
"""``(session, clientId)``."""
DeliveryKey = tuple[str, str, str]
"""``(session, messageId, clientId)``."""


_SETTINGS_FIELDS: Final = tuple(f.name for f in fields(SessionSettings))


def settings_to_json(settings: SessionSettings) -> str:
    """A session's settings as a JSON object (field: value), as every store keeps them."""
    return json.dumps(asdict(settings), separators=(",", ":"))


def settings_from_json(text: str) -> SessionSettings:
    """:func:`settings_to_json`'s inverse; fields it does not know are ignored, missing ones default (a
    store written by another version)."""
    values: dict[str, Any] = json.loads(text)
    return SessionSettings(**{name: values[name] for name in _SETTINGS_FIELDS if name in values})


class SessionRecord(NamedTuple):
    """A session: its name, secrets (as hashes, except the token key an HMAC needs in clear), settings."""

    name: str
    password_hash: str
    """:meth:`~fastport_core.auth.PasswordHash.encode` of the password."""
    secret_hash: str
    token_key: bytes
    settings: SessionSettings
    suspended: bool


class SubscriberRecord(NamedTuple):
    """A resumable subscriber (``clientId``) and what it subscribed to."""

    session: str
    client_id: str
    persistent: bool
    topics: tuple[str, ...]


class MessageRecord(NamedTuple):
    """A published message some resumable subscriber still owes an ACK for."""

    session: str
    message_id: str
    seq: int
    """Publish order across the whole broker: a subscriber's backlog is read back in this order."""
    topic: str
    data: str
    hash: str
    timestamp: int
    encoding: str
    expires_at: float
    """Wall-clock seconds: when every delivery of it is given up (``expired``); a store may delete it then."""
    size: int
    """What it is charged (``accounting.message_size``): backlogs are bounded in these bytes."""


class DeliveryRecord(NamedTuple):
    """One resumable subscriber's un-ACKed delivery of a stored message."""

    session: str
    message_id: str
    client_id: str
    seq: int
    """The message's ``seq``: a subscriber's backlog is read back in this order."""
    retries: int
    """Re-sends so far (the next send carries ``retry`` = this + 1)."""


class PublishRecord(NamedTuple):
    """One entry of a session's publish dedupe window: the id was taken, and how many it reached."""

    session: str
    message_id: str
    delivered_to: int
    at: float
    """Wall-clock seconds when it was published (the entry expires ``dedupe_ttl`` later). Entries come in
    publish order, so times never go back (a store may rely on it: one whose clock stepped back may keep
    an id's older entry a little longer)."""


@dataclass(slots=True)
class StoreBatch:
    """The net change to durable state since the previous batch: upserts, and deletions as keys.

    A store applies, in one transaction: session deletions (cascading to everything of the session),
    session upserts, subscriber deletions (cascading to the subscriber's deliveries) and upserts, message
    inserts, delivery deletions and upserts, publish inserts; then it deletes every message no delivery
    refers to any more. Order matters only for a session (or subscriber) dropped and created again in one
    batch, which appears in both lists: the deletion comes first.
    """

    seq: int
    """Batches are numbered from 1, in the order they must commit."""
    sessions: list[SessionRecord] = field(default_factory=list)
    sessions_dropped: list[str] = field(default_factory=list)
    subscribers: list[SubscriberRecord] = field(default_factory=list)
    subscribers_dropped: list[SubscriberKey] = field(default_factory=list)
    messages: list[MessageRecord] = field(default_factory=list)
    deliveries: list[DeliveryRecord] = field(default_factory=list)
    deliveries_dropped: list[DeliveryKey] = field(default_factory=list)
    publishes: list[PublishRecord] = field(default_factory=list)
    # What only a shared engine (a cluster, DESIGN §8) is given; a store never sees them filled.
    outgoing: list[tuple[MessageRecord, int]] = field(default_factory=list)
    """Published messages for the engine to store and feed back to every node (``Broker(shared=True)``),
    each with its publisher's connection id (a node does not send a publisher its own message)."""
    presence: list[Presence] = field(default_factory=list)
    """Resumable subscribers this node began or stopped serving, in that order: the engine delivers an
    arrived one's messages here, and takes back from a departed one what it had handed it."""

    def __len__(self) -> int:
        """Records in the batch (what a commit writes)."""
        return (
            len(self.sessions) + len(self.sessions_dropped) + len(self.subscribers)
            + len(self.subscribers_dropped) + len(self.messages) + len(self.deliveries)
            + len(self.deliveries_dropped) + len(self.publishes) + len(self.outgoing)
            + len(self.presence)
        )  # fmt: skip


class Presence(NamedTuple):
    """A resumable subscriber a node of a cluster began or stopped serving (``StoreBatch.presence``)."""

    session: str
    client_id: str
    arrived: float | None
    """Wall-clock seconds when it arrived; ``None``: it left. What the engine holds for a subscriber
    starts when it first arrived, even when the engine creates its state later (every message published
    once it could subscribe)."""


class BacklogRecord(NamedTuple):
    """What a resumable subscriber has waiting in the store (its deliveries stay there until it resumes)."""

    session: str
    client_id: str
    deliveries: int
    size: int
    """The stored messages' ``accounting.message_size``, summed."""


@dataclass(slots=True)
class Snapshot:
    """What the broker restores at start (loaded by the adapter): everything but the messages.

    Messages and deliveries stay in the store: each resumable subscriber's backlog is only counted
    (``backlogs``) and read back page by page when it resumes (:meth:`Store.load_backlog`), so a restart
    with large backlogs does not load them into memory. ``publishes`` oldest first; ``last_seq`` is the
    highest message ``seq`` in the store. Records of a session that is not in ``sessions`` are ignored.
    """

    sessions: list[SessionRecord] = field(default_factory=list)
    subscribers: list[SubscriberRecord] = field(default_factory=list)
    backlogs: list[BacklogRecord] = field(default_factory=list)
    publishes: list[PublishRecord] = field(default_factory=list)
    last_seq: int = 0


class BacklogRequest(NamedTuple):
    """The broker wants the next page of a resumable subscriber's stored backlog (oldest first).

    The adapter answers, once every batch taken before the request is committed, with the stored
    deliveries of ``client_id`` whose ``seq`` is above ``after_seq``, at most ``limit`` of them, each as
    ``(message record, retries)``, through ``ServerCore.backlog_loaded``.
    """

    session: str
    client_id: str
    after_seq: int
    limit: int


class Journal:
    """The broker's changes to durable state since the last batch, by object (see the module doc).

    ``changed`` maps a live broker object (a session, a resumable subscriber, a delivery) to ``True``
    (write its current record) or ``False`` (delete it); the broker turns it into a :class:`StoreBatch`.
    An object no taken batch wrote that is deleted again simply leaves the journal: nothing to write,
    nothing to delete (each object knows whether it was ``saved``).
    """

    __slots__ = ("changed", "changes", "fresh", "outgoing", "presence", "publishes", "spills", "taken")

    def __init__(self) -> None:
        self.changed: dict[object, bool] = {}
        self.fresh: set[object] = set()
        """Deliveries made since the last batch and not ACKed (or given up) yet: each one's ACK, if it comes
        before the next batch is taken, spares writing it (and its message) at all. One held back by its
        subscriber's window waits here too: its ACK is further off, and the writer's wait is bounded."""
        self.spills: list[tuple[object, object]] = []
        """``(subscriber, message)``: a delivery recorded only in the store (its subscriber is away)."""
        self.outgoing: list[tuple[object, object]] = []
        """``(publisher, message)`` per publish a shared engine takes (see :attr:`StoreBatch.outgoing`)."""
        self.presence: list[tuple[object, str, bool, float]] = []
        """``(session, clientId, arrived, now)``, in the order they happened: a resumable subscriber this
        node began (``True``) or stopped (``False``) serving (see :attr:`StoreBatch.presence`)."""
        self.publishes: list[tuple[object, str, int, float]] = []
        """``(session, messageId, deliveredTo, now)`` per accepted publish: its dedupe entry."""
        self.taken = 0
        """The number of the last batch taken (0: none yet)."""
        self.changes = 0
        """Session-level changes journalled so far (what an admin answer that must wait for them detects)."""

    def __bool__(self) -> bool:
        return bool(self.changed or self.publishes or self.spills or self.outgoing or self.presence)

    def put(self, obj: object) -> None:
        """``obj``'s durable record changed (or it is new)."""
        self.changed[obj] = True

    def deliver(self, delivery: object) -> None:
        """A new delivery (never written): see :attr:`fresh`."""
        self.changed[delivery] = True
        self.fresh.add(delivery)

    def drop(self, obj: object, saved: bool) -> None:
        """``obj`` is gone from durable state; ``saved``: some taken batch wrote it."""
        if saved:
            self.changed[obj] = False
        else:
            self.changed.pop(obj, None)
            self.fresh.discard(obj)
