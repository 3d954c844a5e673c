"""The single node's wire tests, run against a node of a cluster (issue 10: "every wire behaviour the
single-node server has is the same on a cluster node").

The tests of test_wire_compat.py, test_server.py and test_client.py are collected here a second time with
the ``server`` fixture replaced by a node of a two-node cluster over a real NATS JetStream (the other
node is up, so every message crosses NATS). The few that pin what a cluster node does differently, by
design and as docs/operations.md ("Cluster") says, are left out by name below, each with its reason.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest

from fastport_anyio import ClusterOptions, NatsCluster, Server
from tests.nats_support import NatsServer

from . import test_client, test_server, test_wire_compat
from .conftest import ADMIN, FAST_CONFIG, SESSIONS

pytestmark = pytest.mark.anyio

DIFFERENT_ON_A_CLUSTER = {
    # ack_received needs every subscriber's ACK, and subscribers are spread over nodes: a cluster node
    # behaves as a single node with send_ack_received = false.
    "test_the_publisher_gets_ack_received_once_the_subscriber_acked",
    "test_publisher_does_not_receive_its_own_message",  # (checked in test_cluster.py without it)
    # They pin deliveredTo, which a cluster node leaves out (it does not know the other nodes'
    # subscribers), or count detached subscribers, which live in JetStream. test_cluster.py checks the
    # same behaviour (delivery, release on a clean close, resume after a lost connection) on a cluster.
    "test_publish_reaches_another_client_with_exact_fields",
    "test_unsubscribe_stops_delivery",
    "test_a_clean_close_releases_a_subscriber_that_is_not_persistent",
    "test_a_persistent_subscriber_is_kept_across_a_clean_close",
    "test_a_connection_lost_without_a_close_frame_keeps_the_subscriber",
    # The node checked the password of its configured sessions when it found them in the cluster at
    # start, so the first init hits the remembered check and never reaches the worker thread.
    "test_password_checks_run_in_a_worker_thread_and_pipelined_frames_wait",
    # Counts every task in the process: a cluster node runs the NATS client's tasks too.
    "test_close_leaves_no_task_and_no_connection",
}

for _module in (test_wire_compat, test_server, test_client):
    for _name, _test in inspect.getmembers(_module, inspect.iscoroutinefunction):
        if (
            _name.startswith("test_")
            and _name not in DIFFERENT_ON_A_CLUSTER
            and "server" in inspect.signature(_test).parameters
        ):
            globals()[_name] = _test


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py is asyncio only


@pytest.fixture
async def server(nats_server: NatsServer) -> AsyncIterator[Server]:
    """A node of a two-node cluster, with the two test sessions and the admin API."""
    options = ClusterOptions((nats_server.url,))
    other = NatsCluster.connect(options, FAST_CONFIG)
    async with (
        Server("127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, admin=ADMIN, cluster=await other),
        Server(
            "127.0.0.1",
            0,
            config=FAST_CONFIG,
            sessions=SESSIONS,
            admin=ADMIN,
            cluster=await NatsCluster.connect(options, FAST_CONFIG),
        ) as node,
    ):
        yield node
