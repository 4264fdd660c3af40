"""GET /api/orders/<id>/wait and the notification hub, over both hubs and both databases."""
import json
import time

import gevent
import pytest
import redis
from sqlalchemy import event, text

from eventi_flask.extensions import db
from eventi_flask.notify.publisher import Publisher, redis_connection
from tests.support import DEMO, REDIS_URL, callback_body, wait_until

CALLBACK = "/api/payhero/callback?token=sandbox"
NO_CALLBACK = {**DEMO, "phone": "0708000004"}


@pytest.fixture
def order(client, wire):
    return client.post("/api/orders", json=NO_CALLBACK).get_json()


def wait(client, order, **params):
    params.setdefault("since", order["version"])
    params.setdefault("timeout", 10)
    return client.get(f"/api/orders/{order['id']}/wait", query_string=params)


@pytest.mark.parametrize("params", [
    {"timeout": -1}, {"timeout": 61}, {"timeout": "abc"}, {"timeout": "nan"}, {"since": "x"}, {"since": "1.5"},
])
def test_bad_parameters_are_400_naming_them(client, order, params):
    response = client.get(f"/api/orders/{order['id']}/wait", query_string=params)
    assert response.status_code == 400
    assert set(response.get_json()["error"]["fields"]) == set(params)


def test_unknown_order_is_404_at_once(client):
    started = time.monotonic()
    response = client.get("/api/orders/nope/wait?timeout=5")
    assert response.status_code == 404 and time.monotonic() - started < 1


def test_answers_at_once_when_the_version_is_newer_than_since(client, order):
    response = wait(client, order, since=order["version"] - 1)
    assert response.status_code == 200 and response.get_json()["version"] == order["version"]
    assert response.headers["Cache-Control"] == "no-store"


def test_answers_at_once_when_final(client, order):
    client.post(CALLBACK, json=callback_body(order, result_code=1032))
    started = time.monotonic()
    assert wait(client, order, since=99).get_json()["status"] == "cancelled"
    assert time.monotonic() - started < 1


def test_holds_until_the_timeout_then_answers_pending(client, order):
    started = time.monotonic()
    response = wait(client, order, timeout=0.3)
    assert response.status_code == 200 and response.get_json()["status"] == "pending"
    assert time.monotonic() - started >= 0.3


def test_timeout_zero_answers_at_once(client, order):
    assert wait(client, order, timeout=0).get_json()["status"] == "pending"


def test_answers_the_moment_the_callback_lands(client, order, hub):
    waiting = gevent.spawn(wait, client, order)
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
    sent = time.monotonic()
    client.post(CALLBACK, json=callback_body(order))
    response = waiting.get(timeout=5)
    assert response.get_json()["status"] == "completed"
    assert len(response.get_json()["tickets"]) == 1
    assert time.monotonic() - sent < 1
    assert hub.waiter_count == 0


def test_without_since_it_holds_while_pending(client, wire, hub):
    order = client.post("/api/orders", json=NO_CALLBACK).get_json()
    assert client.get(f"/api/orders/{order['id']}/wait?timeout=0.2").get_json()["status"] == "pending"
    waiting = gevent.spawn(client.get, f"/api/orders/{order['id']}/wait?timeout=10")
    wait_until(lambda: hub.waiter_count == 1)
    client.post(CALLBACK, json=callback_body(order, result_code=1))
    assert waiting.get(timeout=5).get_json()["status"] == "failed"


def test_wait_and_callback_started_together_200_times_none_missed(client, wire):
    orders = [client.post("/api/orders", json=NO_CALLBACK).get_json() for _ in range(200)]

    def pay_and_wait(order, delay):
        waiting = gevent.spawn(wait, client, order)
        gevent.sleep(delay)  # vary the interleaving: the callback lands before, during or after subscribing
        assert client.post(CALLBACK, json=callback_body(order)).status_code == 200
        return waiting.get(timeout=15).get_json()

    jobs = [gevent.spawn(pay_and_wait, order, (i % 5) * 0.001) for i, order in enumerate(orders)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    answers = [job.value for job in jobs]
    assert [a["status"] for a in answers] == ["completed"] * 200
    assert all(a["version"] == o["version"] + 1 for a, o in zip(answers, orders))


def test_a_stopping_worker_answers_held_and_new_waits_503_shutting_down(client, order, hub):
    waiting = gevent.spawn(wait, client, order)
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
    started = time.monotonic()
    hub.shut_down()  # what the SIGTERM handler does (gunicorn.conf.py)
    for response in (waiting.get(timeout=5), wait(client, order)):
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "shutting_down"
        assert 1 <= int(response.headers["Retry-After"]) <= 5
    assert time.monotonic() - started < 1
    assert hub.waiter_count == 0


def test_200_waits_arriving_together_each_get_their_own_order(client, wire, hub, monkeypatch):
    orders = [client.post("/api/orders", json=NO_CALLBACK).get_json() for _ in range(200)]
    client.post(CALLBACK, json=callback_body(orders[0]))  # one with tickets, among them
    monkeypatch.setattr(hub, "latest", lambda order_id: None)  # as after a deploy: the cache has expired
    waits = [gevent.spawn(wait, client, order, since=0) for order in orders + orders[:50]]
    gevent.joinall(waits, timeout=30, raise_error=True)
    answers = [w.value.get_json() for w in waits]
    assert [a["id"] for a in answers] == [o["id"] for o in orders + orders[:50]]
    assert answers[0]["status"] == "completed" and len(answers[0]["tickets"]) == 1
    assert all(a["status"] == "pending" and "tickets" not in a for a in answers[1:200])


class QueriesByGreenlet:
    """Counts SQL statements executed by one greenlet: what one request costs the database."""

    def __init__(self, engine):
        self.engine, self.counts = engine, {}
        event.listen(engine, "before_cursor_execute", self.count)

    def count(self, *_):
        me = gevent.getcurrent()
        self.counts[me] = self.counts.get(me, 0) + 1

    def close(self):
        event.remove(self.engine, "before_cursor_execute", self.count)


def test_a_woken_wait_costs_at_most_one_query(app, client, order, hub):
    with app.app_context():
        queries = QueriesByGreenlet(db.engine)
    try:
        # The worker's first wait connects the listener, which then has every held order re-checked
        # once (it cannot know what it missed before): let that happen before the wait we count.
        assert wait(client, order, timeout=0).status_code == 200
        wait_until(lambda: hub.connected)
        waiting = gevent.spawn(wait, client, order)
        wait_until(lambda: hub.waiter_count == 1)
        client.post(CALLBACK, json=callback_body(order))
        assert waiting.get(timeout=5).get_json()["status"] == "completed"
        assert queries.counts.get(waiting, 0) <= 1
        # The order was published when it was created, so the cache answered and the message carried the order.
        assert queries.counts.get(waiting, 0) == 0
    finally:
        queries.close()


def redis_only(backend):
    if backend != "postgres-redis":
        pytest.skip("about the Redis hub")


def subscriber_connections(prefix_pid):
    clients = redis.Redis.from_url(REDIS_URL).client_list()
    return [c for c in clients if c["name"] == f"eventi-sub-{prefix_pid}"]


def test_100_waiters_share_one_subscriber_connection_and_unsubscribe_when_answered(backend, client, wire, hub):
    redis_only(backend)
    import os

    orders = [client.post("/api/orders", json=NO_CALLBACK).get_json() for _ in range(100)]
    waits = [gevent.spawn(wait, client, order) for order in orders]
    wait_until(lambda: hub.waiter_count == 100, message="100 held waits")
    connections = wait_until(lambda: [c for c in subscriber_connections(os.getpid()) if int(c["sub"]) == 100],
                             message="one connection subscribed to 100 channels")
    assert len(subscriber_connections(os.getpid())) == 1 and len(connections) == 1
    for order in orders:
        client.post(CALLBACK, json=callback_body(order))
    gevent.joinall(waits, timeout=20, raise_error=True)
    assert all(w.value.get_json()["status"] == "completed" for w in waits)
    wait_until(lambda: [c for c in subscriber_connections(os.getpid()) if int(c["sub"]) == 0],
               message="every channel unsubscribed")


def test_a_failed_publish_still_commits_and_answers_200(backend, app, client, order, hub):
    redis_only(backend)
    hub._publisher.stop()
    hub._publisher = Publisher(lambda: redis_connection("redis://127.0.0.1:1/0", "eventi-pub"))  # nothing listens
    response = client.post(CALLBACK, json=callback_body(order))
    assert response.status_code == 200 and response.get_json()["status"] == "completed"
    assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "completed"


def test_a_publish_reaches_its_waiter_while_cache_reads_saturate_their_pool(backend, app, client, order, hub):
    """A burst of arriving waits must not hold up the notifications of the ones already held."""
    redis_only(backend)
    waiting = gevent.spawn(wait, client, order)
    wait_until(lambda: hub.waiter_count == 1)
    pool = hub._client.connection_pool
    taken = [pool.get_connection() for _ in range(pool.max_connections)]  # every cache connection busy
    try:
        readers = [gevent.spawn(hub.latest, order["id"]) for _ in range(50)]  # and cache reads queued for them
        client.post(CALLBACK, json=callback_body(order))
        assert waiting.get(timeout=5).get_json()["status"] == "completed"  # not after the 15 s re-check
        assert not any(reader.ready() for reader in readers)  # the pool was still saturated
    finally:
        for conn in taken:
            pool.release(conn)
    gevent.joinall(readers, timeout=10)


def test_a_burst_of_publishes_goes_out_on_one_connection(backend, app, client, wire, hub, redis_client):
    redis_only(backend)
    import os

    orders = [client.post("/api/orders", json=NO_CALLBACK).get_json() for _ in range(40)]
    waits = [gevent.spawn(wait, client, order) for order in orders]
    wait_until(lambda: hub.waiter_count == 40)
    payments = [gevent.spawn(client.post, CALLBACK, json=callback_body(order)) for order in orders]
    gevent.joinall(payments + waits, timeout=20, raise_error=True)
    assert [w.value.get_json()["status"] for w in waits] == ["completed"] * 40
    names = [c["name"] for c in redis_client.client_list()]
    assert names.count(f"eventi-pub-{os.getpid()}") == 1


@pytest.mark.env(WAIT_RECHECK_INTERVAL="0.3")
def test_a_lost_message_costs_latency_not_the_answer(app, client, order, monkeypatch, hub):
    monkeypatch.setattr(hub, "publish", lambda message: None)  # every notification lost
    waiting = gevent.spawn(wait, client, order)
    wait_until(lambda: hub.waiter_count == 1)
    client.post(CALLBACK, json=callback_body(order))
    assert waiting.get(timeout=5).get_json()["status"] == "completed"


def test_a_slow_query_in_one_request_does_not_delay_a_notification(backend, app, client, order, hub):
    if backend != "postgres-redis":
        pytest.skip("pg_sleep is PostgreSQL's; SQLite's long query and write are in test_sqlite.py")

    def slow_query():
        with app.app_context():
            db.session.execute(text("SELECT pg_sleep(2)"))
            db.session.remove()
        return time.monotonic()

    waiting = gevent.spawn(wait, client, order)
    wait_until(lambda: hub.waiter_count == 1)
    slow = gevent.spawn(slow_query)
    gevent.sleep(0.1)  # let the slow query reach the server
    sent = time.monotonic()
    client.post(CALLBACK, json=callback_body(order))
    answered = waiting.get(timeout=5)
    answered_at = time.monotonic()
    assert answered.get_json()["status"] == "completed"
    assert answered_at - sent < 0.5
    assert slow.get(timeout=5) > answered_at  # the slow query was still running when the wait answered


def test_publishing_holds_no_database_connection(app, client, order, hub, monkeypatch):
    checked_out = []
    publish = hub.publish

    def observed(message):
        checked_out.append(app.extensions["sqlalchemy"].engine.pool.checkedout())
        publish(message)

    monkeypatch.setattr(hub, "publish", observed)
    client.post(CALLBACK, json=callback_body(order))
    assert checked_out == [0]


def test_a_foreign_message_on_our_channel_rechecks_and_the_listener_lives_on(backend, client, order, hub):
    redis_only(backend)
    waiting = gevent.spawn(wait, client, order)
    wait_until(lambda: hub.waiter_count == 1)
    publisher = redis.Redis.from_url(REDIS_URL)
    # The API's bare shape (no order inside) and garbage: the database decides, and it says pending.
    publisher.publish(hub.channel(order["id"]), '{"id": "x", "status": "completed", "version": "9"}')
    publisher.publish(hub.channel(order["id"]), "not json")
    waiting.join(timeout=0.5)
    assert not waiting.ready() and not hub._listener.dead
    client.post(CALLBACK, json=callback_body(order))
    assert waiting.get(timeout=5).get_json()["status"] == "completed"


@pytest.mark.parametrize("foreign", [b"not json", b'{"id": "x", "status": "completed", "version": 9}'])
def test_a_foreign_value_under_the_cache_key_leaves_the_answer_to_the_database(backend, client, order, hub,
                                                                               redis_client, foreign):
    redis_only(backend)
    redis_client.set(hub.cache_key(order["id"]), foreign, ex=60)
    response = wait(client, order, timeout=0)
    assert response.status_code == 200 and response.get_json() == client.get(f"/api/orders/{order['id']}").get_json()


def test_a_publish_goes_out_while_our_subscriber_is_still_reconnecting(backend, client, order, hub, redis_client):
    redis_only(backend)
    # Redis is back, but this process's subscriber has not reconnected yet (its backoff runs up to 15 s):
    # the other processes' waiters, subscribed already, must still hear of the change.
    listener = redis_client.pubsub()
    listener.subscribe(hub.channel(order["id"]))
    wait_until(lambda: listener.get_message(timeout=0.1), message="our own subscription confirmed")
    hub._subscriber.connected = False
    try:
        assert client.post(CALLBACK, json=callback_body(order)).get_json()["status"] == "completed"
        message = wait_until(lambda: listener.get_message(timeout=0.1), message="the publish")
        assert json.loads(message["data"])["status"] == "completed"
    finally:
        hub._subscriber.connected = True
        listener.close()


def test_one_redis_keeps_its_names(backend, settings, hub, client, order, redis_client):
    """Not a cluster (INFO cluster says cluster_enabled:0): classic pub/sub under today's names."""
    redis_only(backend)
    prefix = settings["REDIS_PREFIX"]
    assert type(hub).__name__ == "RedisHub"
    assert hub.channel(order["id"]) == f"{prefix}order:status:{order['id']}"
    assert redis_client.get(f"{prefix}order:latest:{order['id']}")  # cached when the order was created
