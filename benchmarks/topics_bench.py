"""Routing cost with many subscriptions: exact topics only (the dict fast path) vs. with wildcard filters.

Not a test (speed is never asserted): run it by hand, ``.venv/bin/python benchmarks/topics_bench.py``. One
session holds 10,000 distinct exact subscriptions (100 connections x 100 topics ``site/S/dev/D/temp``); the
"with filters" variant adds 1,000 wildcard filters (10 connections x 100: ``site/S/+/D/alarm``,
``site/S/dev/+/hum``, ``site/S/dev/D/#``, ``+/S/dev/+/temp``...). Each publish goes through the broker
(its output read and cleared after each call, no sockets, no JSON parsing) and every delivery is ACKed,
so memory stays flat. Prints broker CPU µs per publish (the publish and its ACKs), best of several
rounds, for:

* exact-only session, publish to a subscribed topic (1 delivery): routing as it was before filters;
* the same with 1,000 filters present, publish matching no filter (the trie walk's cost);
* with filters, publish matching 1 exact + 2 filters (3 deliveries, to compare with 3 exact subscribers);
* for scale, a linear scan of the 1,000 filters with ``filter_matches`` (what the trie avoids).

``--exact-only`` runs only the rows without filters, so that the same file can be run against a checkout
from before filters existed (``PYTHONPATH=/path/to/old/tree``) to compare the fast path with itself.
"""

from __future__ import annotations

import argparse
import random
import time

from fastport_core.broker import Broker
from fastport_core.config import Limits, ServerConfig
from fastport_core.protocol import Ack, Init, Publish, Subscribe

DATA = "A" * 44 + ":" + "B" * 64
HASH = "v1:" + "0" * 64
SITES, DEVICES = 100, 100


def build(filters: bool, extra_exact: int = 0) -> Broker:
    config = ServerConfig(password_hash_cost=2, limits=Limits(max_subscriptions_per_connection=1000))
    broker = Broker(config)
    broker.create_session("bench", "pw", 0.0)
    conn = 0

    def connection(topics: list[str]) -> None:
        nonlocal conn
        conn += 1
        broker.connection_opened(conn, 0.0)
        broker.handle_packet(conn, Init("bench", "pw"), 0.0)
        for topic in topics:
            broker.handle_packet(conn, Subscribe(topic), 0.0)

    for site in range(SITES):  # 10,000 distinct exact topics
        connection([f"site/{site}/dev/{device}/temp" for device in range(DEVICES)])
    for _ in range(extra_exact):  # more exact subscribers of site/0/dev/0/temp (the fan-out comparison)
        connection(["site/0/dev/0/temp"])
    if filters:
        shapes = ["site/{s}/+/{d}/alarm", "site/{s}/dev/+/hum", "site/{s}/dev/{d}/#", "+/{s}/dev/+/temp"]
        rng = random.Random(1)
        made: set[str] = set()
        for _ in range(10):  # 10 connections of 100 distinct filters each
            group: list[str] = []
            while len(group) < 100:
                # Sites 100-199: no exact subscriber, so they do not change the exact-only deliveries.
                made_filter = rng.choice(shapes).format(
                    s=rng.randrange(SITES, 2 * SITES), d=rng.randrange(DEVICES)
                )
                if made_filter not in made:
                    made.add(made_filter)
                    group.append(made_filter)
            connection(group)
        connection(["site/0/dev/0/#", "+/0/dev/+/temp"])  # the two filters the matching publishes hit
    connection([])  # the publisher
    assert not broker.output.closes
    broker.output.clear()
    return broker


def per_publish_us(broker: Broker, topics: list[str], messages: int) -> float:
    publisher = max(broker._connections)
    publishes = [Publish(topics[i % len(topics)], DATA, HASH, 1, f"m{i}") for i in range(messages)]
    handle = broker.handle_packet
    output = broker.output  # the broker's answers as data: (conn, frame) per delivery and reply
    start = time.process_time()
    for publish in publishes:
        handle(publisher, publish, 1.0)
        ack = Ack(publish.topic, publish.message_id)
        delivered = [conn for conn, _ in output.frames if conn != publisher]
        output.clear()
        for conn in delivered:
            handle(conn, ack, 1.0)
        output.clear()  # the publisher's ack_received
    elapsed = time.process_time() - start
    assert broker.stats().stored_messages == 0
    return elapsed / messages * 1e6


def linear_scan_us(broker: Broker, topics: list[str]) -> float:
    """µs to match one topic against every filter of the session one by one (the trie's alternative)."""
    from fastport_core.topics import filter_matches

    session = broker._sessions["bench"]
    filters = [
        t for c in session.connections if c.subscriber for t in c.subscriber.topics if "+" in t or "#" in t
    ]
    assert len(filters) >= 1000
    start = time.process_time()
    for topic in topics:
        [f for f in filters if filter_matches(f, topic)]
    return (time.process_time() - start) / len(topics) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exact-only", action="store_true", help="skip every row that needs filters")
    args = parser.parse_args()
    rng = random.Random(2)
    exact_topics = [f"site/{rng.randrange(1, SITES)}/dev/{rng.randrange(DEVICES)}/temp" for _ in range(1000)]

    def best(broker: Broker, topics: list[str]) -> float:
        return min(per_publish_us(broker, topics, args.messages) for _ in range(args.rounds))

    exact_only = build(filters=False)
    fan_out_exact = build(filters=False, extra_exact=2)
    rows = [("exact-only, 10,000 subscriptions, 1 delivery", best(exact_only, exact_topics))]
    if not args.exact_only:
        with_filters = build(filters=True)
        rows.append(("+ 1,000 filters, matching none, 1 delivery", best(with_filters, exact_topics)))
    rows.append(("exact-only, 3 exact subscribers, 3 deliveries", best(fan_out_exact, ["site/0/dev/0/temp"])))
    if not args.exact_only:
        rows.append(
            ("+ 1,000 filters, 1 exact + 2 filters, 3 deliveries", best(with_filters, ["site/0/dev/0/temp"]))
        )
        rows.append(
            (
                "linear scan of the 1,000 filters (no trie), per topic",
                linear_scan_us(with_filters, exact_topics),
            )
        )
    for label, value in rows:
        print(f"{label:55s} {value:7.2f} µs")


if __name__ == "__main__":
    main()
