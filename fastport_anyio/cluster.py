"""A fastport node as one of a cluster over NATS JetStream (DESIGN §8; ``fastport serve --cluster``).

The core runs as one node of a shared broker (``ServerCore(cluster=True)``) and this module is its link to
the engine, the third :class:`~fastport_anyio.durability.Backend` beside the in-memory mode and the SQLite
store. Everything crosses the seam as data, in both directions:

* **Out** (:meth:`NatsCluster.commit`, through the :class:`~fastport_anyio.durability.StoreWriter`'s
  group commits): session records go to the key-value bucket ``fastport_sessions`` (after their stream
  exists); published messages to their session's stream, with ``Nats-Msg-Id`` = ``messageId`` so that a
  publish retried on another node is stored once (the stream's duplicate window is the session's dedupe
  window), and the core sends each ``publish_response`` only once JetStream's PubAck is in; ACKs of a
  resumable subscriber's deliveries ACK its JetStream messages; its subscriptions go to its consumer's
  metadata; a release deletes its consumer.
* **In** (:meth:`NatsCluster.serve`): every node watches the bucket (a session created, changed, suspended
  or dropped anywhere takes effect here: ``engine_session``) and the ``clientId`` claims (a resumable
  subscriber resumed on another node closes its connection here with 4003: ``engine_client_claimed``);
  every node reads each session's stream
  from an ordered consumer (the *feed*) and fans every message out to its own subscribers
  (``engine_messages``); for each resumable subscriber connected here a *pull* reads its durable
  consumer (its own pull requests, a window at a time, taken in the inbox's callback: nats-py's ``fetch``
  costs a task per message) and hands the deliveries to the core (``engine_deliveries``).

JetStream names: a session's stream is ``FP_<h>`` with the one subject ``fastport.<h>`` (``h``: the first
32 hex digits of the session name's SHA-256, as names may hold any character); a resumable subscriber's
durable consumer is ``fp_<h'>`` (``h'`` of session and clientId). A durable consumer takes every message
of its session from its creation on (the core keeps those matching the subscriber's subscriptions and
the others are ACKed at once), ``ack_wait`` is the session's ``retryInterval`` (so a node killed with
``kill -9`` hands its deliveries on within one retry interval), ``max_ack_pending`` the in-flight
window, and ``inactive_threshold`` the ``messageExpiryTime`` a detached subscriber is kept for.
Streams keep messages for ``messageExpiryTime`` (``max_age``, limits retention).

nats-py is asyncio-only: a cluster node runs on the asyncio backend (with or without uvloop).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, TypeVar

import anyio
import anyio.abc
import orjson

from fastport_core.config import ServerConfig
from fastport_core.errors import FastportError
from fastport_core.server import ServerCore
from fastport_core.storage import (
    BacklogRequest,
    MessageRecord,
    SessionRecord,
    Snapshot,
    StoreBatch,
    SubscriberKey,
    settings_from_json,
    settings_to_json,
)

__all__ = ["ClusterError", "ClusterOptions", "NatsCluster"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

BUCKET: Final = "fastport_sessions"
"""The key-value bucket every node shares the sessions through."""
CLIENTS_BUCKET: Final = "fastport_clients"
"""Which node serves each resumable subscriber (``clientId``) now, since when: a node that sees a later
arrival than its own closes its connection with 4003, as one node does when a second connection resumes a
``clientId``."""
CLAIM_TTL: Final = 86400.0
"""Seconds a claim is kept: only a claim newer than a node's own matters, so old ones may go."""
ORIGIN_HEADER: Final = "Fastport-Origin"
"""``<node id>:<connection id>`` of the publisher (a node does not send a publisher its own message)."""
PUBLISH_TIMEOUT: Final = 5.0
"""Seconds a batch's publishes may wait for their PubAcks before the commit counts as failed (retried)."""
PULL_WAIT: Final = 1.0
"""Seconds a pull request stays open in JetStream (then it ends, and the pull asks again). Short, because a
request cannot be withdrawn: a stopped pull stays subscribed until its request ends."""
FEED_HEARTBEAT: Final = 1.0
"""Seconds between JetStream's heartbeats on a feed: two missed ones (NATS restarted and lost the
feed's consumer) make nats-py re-create it from the last message it saw."""
CLOSE_FLUSH: Final = 2.0
"""Seconds a closing node waits for NATS to take what it still has to send."""
WATCH_WAIT: Final = 5.0
"""Seconds the session watch waits for a change before asking again."""
START_MARGIN: Final = 1.0
"""Seconds before its subscriber arrived a new consumer starts from: the node's clock and NATS's (which
stamps the messages) are not one clock."""


class ClusterError(FastportError):
    """The cluster cannot be joined (NATS unreachable, no JetStream, refused credentials): a startup error."""


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """How to reach NATS (``--cluster`` and the ``cluster_*`` settings)."""

    servers: tuple[str, ...]
    """``nats://host:port`` URLs of the NATS cluster (any of them will do; the client follows the rest)."""
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    """A CA file to verify NATS's TLS certificate (``tls://`` URLs) against."""
    replicas: int = 1
    """JetStream replicas of each session's stream and of the bucket (3 on a three-server NATS cluster)."""
    connect_timeout: float = 5.0


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def stream_name(session: str) -> str:
    return f"FP_{_digest(session)}"


def _subject(session: str) -> str:
    return f"fastport.{_digest(session)}"


def consumer_name(session: str, client_id: str) -> str:
    return f"fp_{_digest(session, client_id)}"


def _claim_key(session: str, client_id: str) -> str:
    return _digest(session, client_id)


def _key(session: str) -> str:
    return base64.urlsafe_b64encode(session.encode()).decode("ascii").rstrip("=")


def _session_of_key(key: str) -> str:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()


def encode_session(record: SessionRecord) -> bytes:
    return orjson.dumps(
        {
            "name": record.name,
            "password": record.password_hash,
            "secret": record.secret_hash,
            "tokenKey": base64.b64encode(record.token_key).decode("ascii"),
            "settings": settings_to_json(record.settings),
            "suspended": record.suspended,
        }
    )


def decode_session(value: bytes) -> SessionRecord:
    fields = orjson.loads(value)
    return SessionRecord(
        fields["name"],
        fields["password"],
        fields["secret"],
        base64.b64decode(fields["tokenKey"]),
        settings_from_json(fields["settings"]),
        bool(fields["suspended"]),
    )


def encode_message(record: MessageRecord) -> bytes:
    return orjson.dumps(record[:2] + record[3:])  # all but the node-local seq


def decode_message(body: bytes, seq: int) -> MessageRecord:
    session, message_id, topic, data, hash_, timestamp, encoding, expires_at, size = orjson.loads(body)
    return MessageRecord(session, message_id, seq, topic, data, hash_, timestamp, encoding, expires_at, size)


@dataclass(eq=False, slots=True)
class _Pull:
    """A resumable subscriber's pull from its durable consumer, on this node."""

    key: SubscriberKey
    subject: str
    """``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``: where pull requests go."""
    inbox: str
    """Where JetStream sends the messages (and the status that ends a request)."""
    subscription: Any = None
    remaining: int = 0
    """Messages the open request may still bring."""
    active: float = 0.0
    """``time.monotonic()`` of the last request, message or status: a request silent for long was lost."""
    stopping: bool = False
    buffer: list[Any] = field(default_factory=list)
    """Messages not handed to the core yet (they are, once per event-loop turn)."""


class NatsCluster:
    """The node's link to NATS JetStream; see the module docstring. Make one with :meth:`connect`."""

    shared: ClassVar[bool] = True

    def __init__(self, nc: Any, options: ClusterOptions, config: ServerConfig) -> None:
        # nats-py is an optional dependency (the ``cluster`` extra): imported only by a cluster node.
        import nats.js.api
        import nats.js.errors
        import nats.js.kv

        self._api: Any = nats.js.api
        self._errors: Any = nats.js.errors
        self._kv_entry: Any = nats.js.kv.KeyValue.Entry
        self._nc = nc
        self._js = nc.jetstream()
        self._options = options
        self._config = config
        self.node = uuid.uuid4().hex[:12]
        """This process's id in the cluster (publishers' messages are tagged with it)."""
        self._kv: Any = None
        self._watcher: Any = None
        self._clients: Any = None
        self._claim_watcher: Any = None
        self._claims: dict[SubscriberKey, tuple[float, str]] = {}
        """The subscribers this node serves: when each arrived (and this node's id, to break ties)."""
        self._core: ServerCore | None = None
        self._now: Callable[[], float] = time.monotonic
        self._flush: Callable[[], None] = lambda: None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._feeds: dict[str, Any] = {}
        """Session name -> its feed subscription (an ordered push consumer)."""
        self._inbox: list[tuple[MessageRecord, int]] = []
        """Feed messages not yet given to the core (handed over once per event-loop turn)."""
        self._draining = False
        self._pulls: dict[SubscriberKey, _Pull] = {}
        """The pulls of the resumable subscribers this node serves."""
        self._ending: set[_Pull] = set()
        """Pulls stopped, subscribed until their last request ends (see :meth:`_stop_pull`)."""
        self._held: dict[SubscriberKey, dict[str, Any]] = {}
        """The JetStream messages a pull handed the core and the core has not ACKed: by message id."""
        self._closing = False
        self._consumer_lock = asyncio.Lock()
        self._feeds_lock = asyncio.Lock()
        """One feed sync at a time (a commit's and the watch's may overlap): never two feeds of a session."""

    # -- joining -------------------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, options: ClusterOptions, config: ServerConfig) -> NatsCluster:
        """Connect to NATS (every configured server tried once) and open the sessions' bucket; raise
        :class:`ClusterError` if either fails. Once joined, a lost connection is retried forever."""
        try:
            import nats
        except ImportError:
            raise ClusterError("--cluster needs nats-py: pip install 'fastport[cluster]'") from None
        cluster: NatsCluster | None = None

        async def disconnected() -> None:
            if cluster is not None:
                cluster._lost()

        async def reconnected() -> None:
            if cluster is not None:
                cluster._back()

        async def error(exc: Exception) -> None:
            logger.warning("NATS: %s", exc)

        tls = ssl.create_default_context(cafile=options.tls_ca) if options.tls_ca else None
        try:
            nc = await nats.connect(
                servers=list(options.servers),
                user=options.user,
                password=options.password,
                token=options.token,
                tls=tls,
                name="fastport",
                connect_timeout=int(max(1, options.connect_timeout)),
                allow_reconnect=True,
                # Once per server at start (nats-py would retry a first connect for minutes), then
                # forever: ``max_reconnect_attempts`` is raised below, once the node has joined.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
        except Exception as exc:
            where = ", ".join(options.servers)
            raise ClusterError(f"cannot reach NATS at {where}: {exc or type(exc).__name__}") from None
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 1
        cluster = cls(nc, options, config)
        try:
            await cluster._open_bucket()
        except Exception as exc:
            await nc.close()
            where = ", ".join(options.servers)
            raise ClusterError(f"NATS at {where} has no usable JetStream: {exc}") from None
        return cluster

    async def _open_bucket(self) -> None:
        self._kv = await self._bucket(BUCKET)
        self._clients = await self._bucket(CLIENTS_BUCKET, ttl=CLAIM_TTL)
        self._claim_watcher = await self._clients.watchall()

    async def _bucket(self, name: str, ttl: float | None = None) -> Any:
        try:
            return await self._js.key_value(name)
        except self._errors.BucketNotFoundError:
            return await self._js.create_key_value(
                bucket=name, history=1, ttl=ttl, replicas=self._options.replicas
            )

    # -- the Backend protocol ----------------------------------------------------------------------------

    async def load(self) -> Snapshot:
        """The sessions in the bucket; the watch that read them goes on in :meth:`serve` (no gap)."""
        sessions: dict[str, SessionRecord] = {}
        try:
            self._watcher = await self._kv.watchall()
            wait = self._options.connect_timeout
            while (entry := await self._watcher.updates(timeout=wait)) is not None:
                if entry.value and entry.operation is None:
                    record = decode_session(entry.value)
                    sessions[record.name] = record
        except Exception as exc:  # a timeout, a damaged entry: the node cannot know the sessions
            raise ClusterError(f"cannot read the sessions from NATS ({BUCKET}): {exc}") from None
        logger.info("cluster: node %s joined; %d session(s) in the cluster", self.node, len(sessions))
        return Snapshot(sessions=list(sessions.values()))

    async def serve(self, core: ServerCore, now: Callable[[], float], flush: Callable[[], None]) -> None:
        self._core, self._now, self._flush = core, now, flush
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                await self._sync_feeds()
                task_group.start_soon(self._follow, self._watcher, self._apply_session)
                task_group.start_soon(self._follow, self._claim_watcher, self._apply_claim)
                task_group.start_soon(self._watch_pulls)
        finally:
            self._task_group = None  # stopping: pulls start no more work (aclose hands back what is held)

    async def commit(self, batches: Sequence[StoreBatch]) -> None:
        if not self._nc.is_connected:
            # nats-py would buffer what it can (ACKs) and let the commit "succeed" with NATS away; the
            # batches wait for the connection instead, and the node refuses publishes meanwhile.
            raise ClusterError("not connected to NATS")
        for batch in batches:
            await self._commit(batch)

    async def load_backlog(self, request: BacklogRequest) -> list[tuple[MessageRecord, int]]:
        """Never asked: a cluster node's resumable subscribers are fed by their consumers, not pages."""
        return []

    async def aclose(self) -> None:
        self._closing = True
        for key in list(self._pulls):
            await self._stop_pull(key)
        for subscription in self._feeds.values():
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._feeds.clear()
        for watcher in (self._watcher, self._claim_watcher):
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        # Send what is queued (the ACKs and hand-backs above) and close; nats-py's drain() could wait its
        # whole timeout on a pull request the shutdown cancelled.
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=CLOSE_FLUSH)
        with contextlib.suppress(Exception):
            await self._nc.close()

    # -- out: a batch -------------------------------------------------------------------------------------

    async def _commit(self, batch: StoreBatch) -> None:
        for name in batch.sessions_dropped:
            await self._drop_session(name)
        for record in batch.sessions:
            await self._ensure_stream(record)
            await self._kv.put(_key(record.name), encode_session(record))
        if batch.sessions or batch.sessions_dropped:
            await self._sync_feeds()
        if batch.outgoing:
            await self._publish(batch.outgoing)
        for session, client_id in batch.subscribers_dropped:
            await self._stop_pull((session, client_id))
            await self._delete_consumer(session, client_id)
            with contextlib.suppress(self._errors.KeyNotFoundError):
                await self._clients.delete(_claim_key(session, client_id))
        kept: dict[SubscriberKey, list[str]] = {}
        for session, client_id, arrived in batch.presence:
            if arrived is not None and (session, client_id) not in kept:
                # Its consumer first (a new one holds every message from the moment it arrived), and
                # what it kept comes back before this batch's subscriptions are written over it.
                ensure = self._ensure_consumer(session, client_id, arrived)
                kept[session, client_id] = topics = await self._unless_gone(session, ensure) or []
                assert self._core is not None
                self._core.engine_subscriptions(session, client_id, topics, self._now())
                self._flush()
        for subscriber in batch.subscribers:
            key = (subscriber.session, subscriber.client_id)
            # Its subscriptions go with its consumer: a resume on any node restores them.
            merged = (*subscriber.topics, *kept.get(key, ()))
            save = self._ensure_consumer(*key, time.time(), merged)
            await self._unless_gone(subscriber.session, save)
        final = {(session, client_id): arrived for session, client_id, arrived in batch.presence}
        for key, arrived in final.items():  # one that came and went in this batch is gone
            if arrived is None or self._gone(key[0]):
                self._claims.pop(key, None)
                await self._stop_pull(key)
            else:
                await self._stop_pull(key)  # it left and came back: what it was handed goes back
                self._claims[key] = (arrived, self.node)
                claim = {"session": key[0], "clientId": key[1], "node": self.node, "arrived": arrived}
                await self._clients.put(_claim_key(*key), orjson.dumps(claim))
                self._start_pull(key)
        for session, message_id, client_id in batch.deliveries_dropped:
            msg = self._held.get((session, client_id), {}).pop(message_id, None)
            if msg is not None:
                await msg.ack()

    async def _unless_gone(self, session: str, operation: Awaitable[_T]) -> _T | None:
        """``await operation``; if it fails because its session was dropped meanwhile (on another node,
        with its stream), skip it (``None``): retrying would stall every later commit of the node."""
        try:
            return await operation
        except Exception:
            if self._gone(session):
                logger.info("cluster: skipping a change to session %r, gone", session)
                return None
            raise

    def _gone(self, session: str) -> bool:
        """The node no longer knows ``session`` (dropped, here or on another node)."""
        return self._core is not None and self._core.broker.session_settings(session) is None

    async def _publish(self, outgoing: list[tuple[MessageRecord, int]]) -> None:
        """Store the messages (PubAck for each, all at once); raise if any is not stored."""
        js = self._js
        node = self.node
        futures = []
        for record, conn in outgoing:
            headers = {"Nats-Msg-Id": record.message_id, ORIGIN_HEADER: f"{node}:{conn}"}
            futures.append(
                await js.publish_async(_subject(record.session), encode_message(record), headers=headers)
            )
        with anyio.fail_after(PUBLISH_TIMEOUT):
            results = await asyncio.gather(*futures, return_exceptions=True)
        for (record, _), result in zip(outgoing, results, strict=True):
            if isinstance(result, BaseException):
                if self._gone(record.session):
                    # Dropped meanwhile (on another node, with its stream): its publisher was closed
                    # with 4001 and never confirmed. Retrying would stall every later commit.
                    logger.info("cluster: dropping a publish to session %r, gone", record.session)
                    continue
                raise result

    async def _ensure_stream(self, record: SessionRecord) -> None:
        api = self._api
        config = api.StreamConfig(
            name=stream_name(record.name),
            subjects=[_subject(record.name)],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=float(record.settings.message_expiry_time),
            # JetStream wants the window within the age (a message expired is forgotten anyway).
            duplicate_window=float(min(self._config.dedupe_ttl, record.settings.message_expiry_time)),
            num_replicas=self._options.replicas,
        )
        try:
            await self._js.add_stream(config)
        except self._errors.BadRequestError:  # exists with another config (settings changed): update
            await self._js.update_stream(config)

    async def _drop_session(self, name: str) -> None:
        await self._stop_feed(name)
        for key in [key for key in self._pulls if key[0] == name]:
            await self._stop_pull(key)
        with contextlib.suppress(self._errors.NotFoundError):
            await self._js.delete_stream(stream_name(name))
        await self._kv.delete(_key(name))

    # -- in: sessions -------------------------------------------------------------------------------------

    async def _follow(self, watcher: Any, apply: Callable[[Any], Awaitable[None]]) -> None:
        """Apply every change a bucket's watch reports, until the watch is stopped (:meth:`aclose`)."""
        while True:
            try:
                entry = await watcher.updates(timeout=WATCH_WAIT)
            except TimeoutError:
                continue
            except Exception as exc:  # the connection is being re-established: the watch resumes
                logger.debug("cluster: watch: %s", exc)
                await anyio.sleep(0.5)
                continue
            if entry is None:
                continue  # the end of the initial values
            if not isinstance(entry, self._kv_entry):
                return  # stopped
            try:
                await apply(entry)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("cluster: ignoring a damaged entry %r: %s", entry.key, exc)

    async def _apply_session(self, entry: Any) -> None:
        """A session created, changed or dropped (by this node too: applying one again changes nothing)."""
        core = self._core
        assert core is not None
        name = _session_of_key(entry.key)
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            core.engine_session_dropped(name, self._now())
        else:
            record = decode_session(entry.value)
            # Its feed first: once the session is here, a member may subscribe, and every message
            # published from then on must reach it.
            async with self._feeds_lock:
                if name not in self._feeds:
                    await self._start_feed(name)
            core.engine_session(record, self._now())
        self._flush()
        await self._sync_feeds()

    async def _apply_claim(self, entry: Any) -> None:
        """Another node's connection took a ``clientId`` this node serves: the later claim wins (4003)."""
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            return
        claim = orjson.loads(entry.value)
        key = (claim["session"], claim["clientId"])
        mine = self._claims.get(key)
        # The later arrival wins (not the later write: a node may commit an older arrival late).
        if claim["node"] != self.node and mine is not None and (claim["arrived"], claim["node"]) > mine:
            del self._claims[key]
            assert self._core is not None
            self._core.engine_client_claimed(*key, self._now())
            self._flush()

    # -- in: messages -------------------------------------------------------------------------------------

    async def _sync_feeds(self) -> None:
        """Read the stream of every session this node knows, and only those."""
        core = self._core
        if core is None:
            return
        async with self._feeds_lock:
            names = set(core.session_names())
            for name in [name for name in self._feeds if name not in names]:
                await self._stop_feed(name)
            for name in names - self._feeds.keys():
                await self._start_feed(name)

    async def _start_feed(self, name: str) -> None:
        """Read the session's stream from now on (an ordered consumer: nats-py re-creates it, from where
        it was, when NATS restarts)."""
        try:
            self._feeds[name] = await self._js.subscribe(
                _subject(name),
                stream=stream_name(name),
                ordered_consumer=True,
                deliver_policy=self._api.DeliverPolicy.NEW,
                cb=self._on_feed,
                idle_heartbeat=FEED_HEARTBEAT,
            )
        except Exception as exc:
            # Its stream is made by the node that commits the session: the next sync starts the feed.
            logger.info("cluster: cannot read session %r's stream yet (%s)", name, exc)

    async def _stop_feed(self, name: str) -> None:
        subscription = self._feeds.pop(name, None)
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _on_feed(self, msg: Any) -> None:
        headers = msg.headers or {}
        node, _, conn = headers.get(ORIGIN_HEADER, "").partition(":")
        try:
            record = decode_message(msg.data, 0)
        except (ValueError, TypeError) as exc:
            logger.warning("cluster: ignoring a damaged message on %s: %s", msg.subject, exc)
            return
        self._inbox.append((record, int(conn) if node == self.node and conn.isdigit() else 0))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        """Hand the core what the feeds brought in this event-loop turn, in one call."""
        self._draining = False
        inbox, self._inbox = self._inbox, []
        if self._core is not None and inbox:
            self._core.engine_messages(inbox, self._now())
            self._flush()

    # -- resumable subscribers ----------------------------------------------------------------------------

    def _start_pull(self, key: SubscriberKey) -> None:
        if self._task_group is None:
            return
        consumer = consumer_name(*key)
        pull = self._pulls[key] = _Pull(
            key, f"$JS.API.CONSUMER.MSG.NEXT.{stream_name(key[0])}.{consumer}", self._nc.new_inbox()
        )
        self._task_group.start_soon(self._open_pull, pull)

    async def _stop_pull(self, key: SubscriberKey) -> None:
        """Stop delivering ``key`` here and hand its un-ACKed messages back to JetStream at once.

        A pull request cannot be withdrawn, and what JetStream sends to an abandoned one waits
        ``ack_wait`` before another node gets it: the pull stays subscribed until its request ends
        (within :data:`PULL_WAIT`), handing back whatever still comes.
        """
        pull = self._pulls.pop(key, None)
        if pull is not None:
            pull.stopping = True
            self._ending.add(pull)
        for msg in self._held.pop(key, {}).values():
            with contextlib.suppress(Exception):
                await msg.nak()

    async def _open_pull(self, pull: _Pull) -> None:
        try:
            pull.subscription = await self._nc.subscribe(
                pull.inbox, cb=functools.partial(self._on_pulled, pull)
            )
            await self._request(pull)
        except Exception as exc:  # the watchdog asks again
            logger.warning("cluster: subscriber %r of %r: %s (retrying)", pull.key[1], pull.key[0], exc)

    async def _request(self, pull: _Pull) -> None:
        """Ask for a window's worth (JetStream sends them as the subscriber's ACKs make room)."""
        window = self._config.limits.max_inflight_per_subscriber
        pull.remaining = window
        pull.active = time.monotonic()
        body = orjson.dumps({"batch": window, "expires": int(PULL_WAIT * 1e9)})
        await self._nc.publish(pull.subject, body, reply=pull.inbox)

    async def _on_pulled(self, pull: _Pull, msg: Any) -> None:
        """A message for the subscriber, or the end of a request (a status): handled in the inbox's
        callback, without nats-py's per-message fetch machinery; the core gets them once per loop turn."""
        pull.active = time.monotonic()
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None:
            if status == "100":  # a heartbeat
                return
            if pull.stopping:
                await self._end_pull(pull)
            else:  # 408: the request expired; 404/409/503: no messages now, or the consumer changed
                if status not in ("404", "408"):
                    await self._ensure_consumer(*pull.key, time.time())
                await self._request(pull)
            return
        if pull.stopping:
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        pull.remaining -= 1
        pull.buffer.append(msg)
        if len(pull.buffer) == 1:
            asyncio.get_running_loop().call_soon(self._hand_over_soon, pull)
        if pull.remaining <= 0:
            await self._request(pull)

    def _hand_over_soon(self, pull: _Pull) -> None:
        """Give the core what the pull brought this loop turn, in order; the replies to JetStream (ACKs
        of what the subscriber does not take, hand-backs) go out from a task."""
        batch, pull.buffer = pull.buffer, []
        core = self._core
        if not batch or core is None or self._task_group is None:
            return
        replies: list[tuple[Any, str]] = []
        held = self._held.setdefault(pull.key, {}) if not pull.stopping else {}
        rows: list[tuple[MessageRecord, int]] = []
        for msg in batch:
            metadata = msg.metadata
            try:
                record = decode_message(msg.data, metadata.sequence.stream)
            except (ValueError, TypeError):
                logger.warning("cluster: terminating a damaged message on %s", msg.subject)
                replies.append((msg, "term"))
                continue
            held[record.message_id] = msg
            rows.append((record, max(0, metadata.num_delivered - 1)))
        refused = None if pull.stopping else core.engine_deliveries(*pull.key, rows, self._now())
        self._flush()
        if refused is None:  # it left meanwhile: hand these back (its departure hands back the rest)
            replies += [(msg, "nak") for record, _ in rows if (msg := held.pop(record.message_id, None))]
        else:
            replies += [(msg, "ack") for message_id in refused if (msg := held.pop(message_id, None))]
        if replies:
            self._task_group.start_soon(_reply, replies)

    async def _end_pull(self, pull: _Pull) -> None:
        self._ending.discard(pull)
        if pull.subscription is not None:
            with contextlib.suppress(Exception):
                await pull.subscription.unsubscribe()

    async def _watch_pulls(self) -> None:
        """Ask again for a pull whose request was lost (NATS restarted), end the pulls that stopped."""
        while True:
            await anyio.sleep(PULL_WAIT)
            late = time.monotonic() - 3 * PULL_WAIT
            for pull in list(self._ending):
                if pull.active < late:
                    await self._end_pull(pull)
            for pull in list(self._pulls.values()):
                if pull.active < late and self._nc.is_connected:
                    try:
                        if pull.subscription is None:
                            await self._open_pull(pull)
                        else:
                            await self._ensure_consumer(*pull.key, time.time())
                            await self._request(pull)
                    except Exception as exc:
                        logger.info("cluster: asking again for %r: %s", pull.key[1], exc)

    async def _ensure_consumer(
        self, session: str, client_id: str, since: float, topics: Sequence[str] | None = None
    ) -> list[str]:
        """Create the subscriber's consumer unless it exists, holding every message stored from ``since``
        (wall-clock seconds) on; with ``topics``, keep them with it (an existing one's are replaced).
        Returns the topics it kept before (none when new)."""
        stream, durable = stream_name(session), consumer_name(session, client_id)
        async with self._consumer_lock:
            try:
                info = await self._js.consumer_info(stream, durable)
            except self._errors.NotFoundError:
                config = self._consumer_config(session, client_id, topics or (), since)
                await self._js.add_consumer(stream, config=config)
                return []
            config = info.config
            kept: list[str] = orjson.loads((config.metadata or {}).get("topics", "[]"))
            if topics is not None:
                config.metadata = _metadata(topics)
                await self._js.add_consumer(stream, config=config)
        return kept

    def _consumer_config(self, session: str, client_id: str, topics: Sequence[str], since: float) -> Any:
        api = self._api
        core = self._core
        settings = core.broker.session_settings(session) if core is not None else None
        settings = settings or self._config.default_session_settings
        start = datetime.fromtimestamp(since - START_MARGIN, UTC)
        return api.ConsumerConfig(
            durable_name=consumer_name(session, client_id),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            opt_start_time=start,
            ack_wait=float(settings.retry_interval),
            max_ack_pending=self._config.limits.max_inflight_per_subscriber,
            max_deliver=-1,
            inactive_threshold=float(settings.message_expiry_time),
            metadata=_metadata(topics),
        )

    async def _delete_consumer(self, session: str, client_id: str) -> None:
        async with self._consumer_lock:
            with contextlib.suppress(self._errors.NotFoundError):
                await self._js.delete_consumer(stream_name(session), consumer_name(session, client_id))

    # -- the connection -----------------------------------------------------------------------------------

    def _lost(self) -> None:
        if self._closing:
            return  # the node is stopping: the connection ends on purpose
        logger.warning("cluster: lost NATS: refusing publishes (cluster_unavailable) until it is back")
        if self._core is not None:
            self._core.engine_available(False)

    def _back(self) -> None:
        logger.info("cluster: NATS is back")
        if self._core is not None:
            self._core.engine_available(True)
            self._flush()


async def _reply(replies: list[tuple[Any, str]]) -> None:
    """ACK, hand back (``nak``) or terminate JetStream messages (a lost connection loses them: JetStream
    redelivers after ``ack_wait``)."""
    for msg, verb in replies:
        with contextlib.suppress(Exception):
            await getattr(msg, verb)()


def _metadata(topics: Sequence[str]) -> dict[str, str]:
    return {"topics": orjson.dumps(sorted(set(topics))).decode()}
