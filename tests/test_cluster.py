"""Redis Cluster mode, against a real 3-primary cluster started once for the session.

Sharded pub/sub: an order's channel and cache key share a slot, each worker holds
at most one subscriber connection per primary, and the cluster may change under
held waits (a slot moves, a primary dies) without a waiter missing its result.
"""
import collections
import os
import secrets
import time

import gevent
import pytest

from eventi_flask import metrics
from eventi_flask.extensions import db
from eventi_flask.notify.cluster_hub import ClusterHub
from tests.redis_cluster import RedisCluster, redis_server_available, self_signed_certificate
from tests.support import DEMO, assert_answered_across, callback_body, wait_until
from tests.test_wait import QueriesByGreenlet

CALLBACK = "/api/payhero/callback?token=sandbox"
NO_CALLBACK = {**DEMO, "phone": "0708000004"}  # the sandbox never calls back for this phone


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if not redis_server_available():
        pytest.skip("redis-server and redis-cli are not installed (scripts/test.sh installs them)")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


# The in-process tests run over PostgreSQL and the cluster (overriding conftest's fixtures).
@pytest.fixture
def backend():
    return "postgres-redis"


@pytest.fixture(scope="module")
def tls_cluster(cluster, tmp_path_factory):
    """Another cluster, speaking TLS only (clients and bus), with a self-signed certificate."""
    workdir = tmp_path_factory.mktemp("redis-tls-cluster")
    tls_cluster = RedisCluster(workdir, tls=self_signed_certificate(workdir)).start()
    yield tls_cluster
    tls_cluster.stop()


@pytest.fixture
def settings(settings, cluster, request):
    on = request.getfixturevalue("tls_cluster") if "tls_cluster" in request.fixturenames else cluster
    return {**settings, "REDIS_URL": on.url}


def new_orders(client, count):
    orders = []
    for _ in range(count):
        response = client.post("/api/orders", json=NO_CALLBACK)
        assert response.status_code == 201, response.get_json()
        orders.append(response.get_json())
    return orders


def hold(client, order, timeout=30):
    path = f"/api/orders/{order['id']}/wait"
    return gevent.spawn(client.get, path, query_string={"since": order["version"], "timeout": timeout})


def pay(client, order, **kwargs):
    response = client.post(CALLBACK, json=callback_body(order, **kwargs))
    assert response.status_code == 200, response.get_json()


def answer(waiting, seconds=10):
    response = waiting.get(timeout=seconds)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def subscribers_by_node(cluster, name):
    """{node port: number of connections called `name`} from CLIENT LIST on every node."""
    counts = {}
    for node in cluster.nodes:
        with node.client() as client:
            counts[node.port] = sum(c.get("name") == name for c in client.client_list())
    return counts


def shard_channels(cluster, prefix):
    channels = set()
    for node in cluster.nodes:
        with node.client() as client:
            channels.update(c.decode() for c in client.execute_command("PUBSUB SHARDCHANNELS", f"{prefix}*"))
    return channels


def spublish_calls(cluster):
    calls = {}
    for node in cluster.nodes:
        with node.client() as client:
            calls[node.port] = client.info("commandstats").get("cmdstat_spublish", {}).get("calls", 0)
    return calls


def test_cluster_mode_is_detected_and_names_share_a_slot(app, client, wire, hub, settings, cluster):
    assert isinstance(hub, ClusterHub)
    prefix = settings["REDIS_PREFIX"]
    (order,) = new_orders(client, 1)  # creating it publishes it
    key = f"{prefix}order:{{{order['id']}}}:latest"
    assert hub.cache_key(order["id"]) == key and hub.channel(order["id"]) == f"{prefix}order:{{{order['id']}}}:status"
    owner = cluster.owner(hub.slot(order["id"]))
    with owner.client() as redis_client:
        assert 0 < redis_client.ttl(key) <= 60
        assert redis_client.keys(f"{prefix}order:latest:*") == []
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["notifications"] == "ok"


@pytest.mark.env(ORDER_LIMIT_PER_PHONE="2 per minute")
def test_order_limits_count_in_the_cluster(app, client, wire, settings, cluster):
    """Shared by every worker and instance: the counts are cluster keys, not this process's memory."""
    assert [client.post("/api/orders", json=NO_CALLBACK).status_code for _ in range(3)] == [201, 201, 429]
    keys = []
    for node in cluster.nodes:
        with node.client() as redis_client:
            keys += redis_client.keys(f"{settings['REDIS_PREFIX']}limits*phone*")
    assert len(keys) == 1, keys


def test_a_woken_wait_costs_no_query_on_the_cluster(app, client, wire, hub, cluster):
    """The cache on the order's primary answers the start, the SPUBLISHed message carries the order."""
    (order,) = new_orders(client, 1)
    with app.app_context():
        queries = QueriesByGreenlet(db.engine)
    try:
        waiting = hold(client, order)
        with cluster.owner(hub.slot(order["id"])).client() as redis_client:
            wait_until(lambda: redis_client.execute_command("PUBSUB SHARDCHANNELS", hub.channel(order["id"])), 10,
                       message="the subscription")
        pay(client, order)
        assert answer(waiting, 5)["status"] == "completed"
        assert queries.counts.get(waiting, 0) == 0
    finally:
        queries.close()


def test_a_tls_cluster_with_a_self_signed_certificate(app, client, wire, hub, tls_cluster, log_lines):
    """rediss://...?ssl_cert_reqs=none at one node: every node is reached over TLS with the same settings."""
    assert isinstance(hub, ClusterHub)
    orders = new_orders(client, 12)
    waits = [hold(client, order) for order in orders]
    wait_until(lambda: len(shard_channels(tls_cluster, "")) >= 12, 10, message="the subscriptions over TLS")
    assert client.get("/readyz").status_code == 200
    for order in orders:
        pay(client, order)
    assert [answer(w, 10)["status"] for w in waits] == ["completed"] * 12
    assert all(f"Order {o['id']} status changed via Redis" in "\n".join(log_lines) for o in orders)
    assert set(subscribers_by_node(tls_cluster, f"eventi-sub-{os.getpid()}").values()) <= {0, 1}


def test_300_waits_over_every_primary_answered_by_spublish_one_subscriber_per_primary(
        app, client, wire, hub, settings, cluster, log_lines):
    prefix = settings["REDIS_PREFIX"]
    orders = new_orders(client, 300)
    owners = collections.Counter(cluster.owner(hub.slot(o["id"])).port for o in orders)
    assert len(owners) == 3, f"orders should cover every primary: {owners}"
    waits = [hold(client, order) for order in orders]
    wait_until(lambda: hub.waiter_count == 300, 20, message="300 held waits")
    wait_until(lambda: len(shard_channels(cluster, prefix)) == 300, 10, message="300 shard channels subscribed")
    connections = subscribers_by_node(cluster, f"eventi-sub-{os.getpid()}")
    assert connections == {node.port: 1 for node in cluster.nodes}, "one subscriber connection per primary"
    assert not any(w.ready() for w in waits)

    before = spublish_calls(cluster)
    for order in orders:
        pay(client, order)
    answers = [answer(waiting, 20) for waiting in waits]
    assert [a["status"] for a in answers] == ["completed"] * 300
    assert all(a["version"] == o["version"] + 1 for a, o in zip(answers, orders))
    delivered = "\n".join(log_lines)
    assert all(f"Order {o['id']} status changed via Redis" in delivered for o in orders), \
        "every wait answered by its SPUBLISHed message"
    after = spublish_calls(cluster)
    assert all(after[port] - before[port] == owners[port] for port in owners), (before, after, owners)
    wait_until(lambda: not shard_channels(cluster, prefix), 10, message="every shard channel released")
    assert sum(subscribers_by_node(cluster, f"eventi-sub-{os.getpid()}").values()) <= 3


def ids_sharing_slots(hub, cluster, slots=2, per_slot=2):
    """Order ids (as we issue them) with `per_slot` in each of `slots` slots, all slots on one primary."""
    by_slot, ranges = collections.defaultdict(list), cluster.slot_ranges()
    while True:
        order_id = secrets.token_urlsafe(16)
        slot = hub.slot(order_id)
        by_slot[slot].append(order_id)
        full = [s for s, ids in by_slot.items() if len(ids) >= per_slot]
        for node in cluster.nodes:
            mine = [s for s in full if cluster.owner(s, ranges) is node]
            if len(mine) >= slots:
                return [order_id for s in mine[:slots] for order_id in by_slot[s][:per_slot]], node


def test_subscriptions_are_batched_by_slot(app, hub, cluster, log_lines):
    """One SSUBSCRIBE per slot, never one across slots (CROSSSLOT), and every waiter gets its message."""
    ids, node = ids_sharing_slots(hub, cluster)
    with node.client() as redis_client:
        before = redis_client.info("commandstats").get("cmdstat_ssubscribe", {}).get("calls", 0)
    watching = [gevent.spawn(hub.watch, order_id) for order_id in ids]  # all asked before the subscriber connects
    waiters = [w.get(timeout=10) for w in watching]
    with node.client() as redis_client:
        assert redis_client.info("commandstats")["cmdstat_ssubscribe"]["calls"] - before == 2
        assert set(redis_client.execute_command("PUBSUB SHARDCHANNELS", "*")) >= {hub.channel(i).encode() for i in ids}
    assert not any("dropped subscriptions" in line for line in log_lines)
    for version, order_id in enumerate(ids, 2):
        hub.publish({"id": order_id, "status": "completed", "version": version, "updated_at": "",
                     "published_at_ms": 0, "order": {"id": order_id, "version": version}})
    assert [w.wait(5)[0]["version"] for w in waiters] == list(range(2, 2 + len(ids)))
    for waiter in waiters:
        hub.unwatch(waiter)


def orders_on_distinct_slots(client, hub, count):
    """`count` orders, no two in one slot (30 random ids share a slot 3% of the time)."""
    by_slot = {}
    while len(by_slot) < count:
        (order,) = new_orders(client, 1)
        by_slot.setdefault(hub.slot(order["id"]), order)
    return list(by_slot.values())


@pytest.mark.env(WAIT_RECHECK_INTERVAL="60", WAIT_RECHECK_INTERVAL_DEGRADED="60")
def test_a_slot_moved_under_held_waits_is_followed_at_once(app, client, wire, hub, settings, cluster, log_lines):
    """With the periodic re-checks out of the way, only following the move can answer in time."""
    raced, followed, bystander = orders_on_distinct_slots(client, hub, 3)
    waits = {o["id"]: hold(client, o, 60) for o in (raced, followed, bystander)}
    wait_until(lambda: len(shard_channels(cluster, settings["REDIS_PREFIX"])) == 3, 10,
               message="the three channels subscribed")
    for order in (raced, followed):
        slot = hub.slot(order["id"])
        source = cluster.owner(slot)
        target = next(n for n in cluster.nodes if n is not source)
        moved_at = time.monotonic()
        cluster.move_slot(slot, target)  # its keys go too: the cached message of the order
        if order is raced:
            # A callback right after the move: published to the new owner, perhaps before we resubscribe
            # there; either the message or the re-check that follows a move answers it.
            pay(client, order)
            assert answer(waits[order["id"]], 10)["status"] == "completed"
            print(f"slot move to first answered wait: {time.monotonic() - moved_at:.3f}s")
        else:
            with target.client() as redis_client:
                wait_until(lambda: redis_client.execute_command("PUBSUB SHARDCHANNELS", hub.channel(order["id"])),
                           10, message="the channel subscribed on the slot's new owner")
            sent = time.monotonic()
            pay(client, order)
            assert answer(waits[order["id"]], 10)["status"] == "completed"
            assert time.monotonic() - sent < 2, "answered by the message on the new owner"
            assert f"Order {order['id']} status changed via Redis" in "\n".join(log_lines)
    assert not waits[bystander["id"]].ready()
    pay(client, bystander, result_code=1032)
    assert answer(waits[bystander["id"]], 10)["status"] == "cancelled"
    assert any("dropped subscriptions (unsubscribed by the server)" in line for line in log_lines)


def test_a_publish_on_a_stale_slot_map_follows_moved(app, client, wire, hub, cluster, log_lines):
    (order,) = new_orders(client, 1)
    waiting = hold(client, order)
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
    owner = hub._primary(order["id"])
    wrong = next(n.address for n in cluster.nodes if n.address != owner)
    hub._slots[hub.slot(order["id"])] = wrong  # as a process that has not heard of a move yet
    pay(client, order)
    assert answer(waiting, 5)["status"] == "completed"
    assert f"Order {order['id']} status changed via Redis" in "\n".join(log_lines)
    wait_until(lambda: hub._primary(order["id"]) == owner, 5, message="the slot map read again")


@pytest.mark.env(WAIT_RECHECK_INTERVAL="60", WAIT_RECHECK_INTERVAL_DEGRADED="60")
def test_a_callback_during_a_slot_migration_is_delivered(app, client, wire, hub, cluster, log_lines):
    """Mid-migration the key is ASKed to the target while the source still serves the channel."""
    (order,) = new_orders(client, 1)
    waiting = hold(client, order, 60)
    slot = hub.slot(order["id"])
    source = cluster.owner(slot)
    target = next(n for n in cluster.nodes if n is not source)
    with source.client() as redis_client:
        wait_until(lambda: redis_client.execute_command("PUBSUB SHARDCHANNELS", hub.channel(order["id"])), 10,
                   message="the subscription")
    cluster.begin_migration(slot, target)
    try:
        sent = time.monotonic()
        pay(client, order)
        assert answer(waiting, 10)["status"] == "completed"
        assert time.monotonic() - sent < 2
        assert f"Order {order['id']} status changed via Redis" in "\n".join(log_lines)
        with target.client() as redis_client:
            redis_client.execute_command("ASKING")
            assert redis_client.get(hub.cache_key(order["id"]))  # cached where the key now lives
    finally:
        cluster.finish_migration(slot, target)


@pytest.mark.env(WAIT_RECHECK_INTERVAL="60")
def test_a_primary_killed_under_held_waits_then_back(app, client, wire, hub, settings, cluster, log_lines):
    orders = orders_on_distinct_slots(client, hub, 30)
    owner_of = {o["id"]: cluster.owner(hub.slot(o["id"])) for o in orders}
    kept = orders[0]  # held through the outage and paid only once the primary is back
    victim = owner_of[kept["id"]]
    assert len(set(owner_of.values())) == 3
    waits = {o["id"]: hold(client, o, 60) for o in orders}
    wait_until(lambda: len(shard_channels(cluster, settings["REDIS_PREFIX"])) == 30, 10,
               message="every channel subscribed")

    def listener_connected():
        return metrics.registry.get_sample_value("eventi_redis_listener_connected", {"node": victim.address})

    assert listener_connected() == 1
    victim.kill()
    try:
        wait_until(lambda: hub.connected is False, 10, message="the dead primary to be noticed")
        assert listener_connected() == 0
        assert client.get("/readyz").status_code == 503
        assert victim.address in client.get("/readyz").get_json()["checks"]["notifications"]
        # Full coverage is required (the default): the survivors stop serving too, SPUBLISH included.
        survivors = [node for node in cluster.nodes if node is not victim]
        wait_until(lambda: all(node.state() == "fail" for node in survivors), 20,
                   message="the survivors to declare the cluster down")
        for order in orders[1:]:
            pay(client, order)  # the database has the payment, whatever Redis does: 200
        answers = [answer(waits[order["id"]], 15) for order in orders[1:]]
        assert {a["status"] for a in answers} == {"completed"}
        assert any(f"Redis subscriber on {victim.address} disconnected" in line for line in log_lines)
    finally:
        victim.start()  # its own nodes.conf: the same id and slots
        wait_until(cluster.healthy, 30, 0.2, "the cluster to be whole again")

    wait_until(lambda: hub.connected, 30, message="the subscriber to reconnect to the restarted primary")
    assert listener_connected() == 1
    assert client.get("/readyz").status_code == 200
    assert any(f"Redis subscriber connected on {victim.address}" in line for line in log_lines)
    with victim.client() as redis_client:
        wait_until(lambda: redis_client.execute_command("PUBSUB SHARDCHANNELS", hub.channel(kept["id"])), 10,
                   message="the held order resubscribed on the restarted primary")
    wait_until(lambda: any(f"Redis subscriber on {victim.address} resubscribed 1 channels" in line
                           for line in log_lines), 5, message="the resubscription logged")
    assert not waits[kept["id"]].ready()
    pay(client, kept)
    assert answer(waits[kept["id"]], 5)["status"] == "completed"
    wait_until(lambda: f"Order {kept['id']} status changed via Redis" in "\n".join(log_lines), 5,
               message="delivery by Redis, not by the re-check")


# -- gunicorn processes --------------------------------------------------------------------------

@pytest.mark.live
def test_two_instances_of_two_workers_on_one_cluster(live_server_factory, cluster):
    one = live_server_factory(WEB_CONCURRENCY="2", REDIS_URL=cluster.url, REDIS_PREFIX="cluster-two:")
    other = live_server_factory(WEB_CONCURRENCY="2", REDIS_URL=cluster.nodes[2].url,  # any node will do
                                REDIS_PREFIX="cluster-two:", DATABASE_URL=one.env["DATABASE_URL"])
    try:
        orders = assert_answered_across(one, other, rounds=6, within=5)  # a message, not the 15 s re-check
        log = one.log() + other.log()
        assert all(f"Order {order['id']} status changed via Redis" in log for order in orders)
        assert "Redis subscriber connected on 127.0.0.1:" in log
        for name, count in ((n, c) for node in cluster.nodes for n, c in
                            collections.Counter(c.get("name") for c in node.client().client_list()).items()):
            assert not name.startswith("eventi-sub-") or count == 1, f"{name} has {count} connections to one node"
    finally:
        one.stop()
        other.stop()


@pytest.mark.env(LINE_FORCE="1", LINE_TICK="0.1")
def test_a_line_on_the_cluster_keeps_its_keys_in_one_slot_and_serves_everyone(app, client, wire, cluster, settings):
    from redis.crc import key_slot

    queued = [client.post("/api/orders", json=DEMO).get_json()["queue"]["id"] for _ in range(3)]

    def outcome(place_id):
        current = client.get(f"/api/queue/{place_id}").get_json()
        return current if current["status"] != "queued" else None

    outcomes = [wait_until(lambda: outcome(place_id), timeout=15, message="admitted") for place_id in queued]
    assert [o["status"] for o in outcomes] == ["admitted"] * 3
    keys = [key for node in cluster.nodes for key in node.client().keys(settings["REDIS_PREFIX"] + "line:{*")]
    assert len(keys) > 5 and len({key_slot(key) for key in keys}) == 1
