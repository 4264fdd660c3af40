"""Real faults.  Redis: our own redis-server on a spare port, stopped, frozen and restarted under
held waits.  gunicorn: workers killed with SIGKILL, stopped with SIGTERM, two instances on one
Redis and one PostgreSQL.  Every wait below is on a condition with a deadline."""
import logging
import os
import signal
import subprocess
import time

import gevent
import pytest
import redis
import requests

from eventi_flask import metrics
from eventi_flask.notify import subscriber
from tests.support import (DEMO, assert_answered_across, callback_body, free_port, get_wait, held_waits,
                           post_callback, wait_until)

CALLBACK = "/api/payhero/callback?token=sandbox"
NO_CALLBACK = {**DEMO, "phone": "0708000004"}  # the sandbox never calls back for this phone
DEGRADED = 2.0  # WAIT_RECHECK_INTERVAL_DEGRADED's default: how stale a waiter may be while Redis is down


class RedisServer:
    """A redis-server of our own, to stop, freeze and restart at will."""

    def __init__(self, workdir):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 10, 0.05, f"redis-server on port {self.port}")

    def answers(self):
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return client.ping()
        except redis.RedisError:
            return False

    def channels(self):
        with redis.Redis(port=self.port, socket_timeout=2) as client:
            return {channel.decode() for channel in client.pubsub_channels()}

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.terminate()
            self.proc.wait(10)

    def freeze(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


# The in-process tests run over PostgreSQL and our own Redis (overriding conftest's fixtures).
@pytest.fixture
def backend():
    return "postgres-redis"


@pytest.fixture
def settings(settings, redis_server):
    return {**settings, "REDIS_URL": redis_server.url}


def sample(name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def new_order(client):
    response = client.post("/api/orders", json=NO_CALLBACK)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def hold(client, order, timeout=20):
    """Start a held wait in a greenlet; return (greenlet, start time)."""
    path = f"/api/orders/{order['id']}/wait"
    return gevent.spawn(client.get, path, query_string={"since": order["version"], "timeout": timeout})


def answered_within(waiting, seconds):
    response = waiting.get(timeout=seconds)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def pay(client, order, **kwargs):
    response = client.post(CALLBACK, json=callback_body(order, **kwargs))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


@pytest.mark.env(ORDER_LIMIT_PER_PHONE="5 per minute")
def test_redis_down_at_start_then_started(app, client, wire, hub, redis_server, log_lines):
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["notifications"].startswith("error")
    order = new_order(client)  # the order limiter falls back to memory: no Redis, still orders
    waiting = hold(client, order)
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
    assert not hub.connected

    sent = time.monotonic()
    assert pay(client, order)["status"] == "completed"  # the database has the payment: 200
    assert answered_within(waiting, DEGRADED + 2)["status"] == "completed"
    assert time.monotonic() - sent < DEGRADED + 1.5
    assert "Redis publish failed, waiters will re-check the database" in "\n".join(log_lines)

    connects = sample("eventi_redis_transitions_total", state="connected")
    redis_server.start()
    later = new_order(client)
    waiting = hold(client, later)  # the listener is retrying with backoff; it finds Redis and subscribes
    wait_until(lambda: hub.connected, 15, message="the listener to reconnect")
    wait_until(lambda: hub.channel(later["id"]) in redis_server.channels(), 5, message="the subscription")
    assert client.get("/readyz").status_code == 200
    assert sample("eventi_redis_transitions_total", state="connected") == connects + 1
    assert sample("eventi_redis_listener_connected", node=f"127.0.0.1:{redis_server.port}") == 1
    assert "Redis subscriber connected" in log_lines
    sent = time.monotonic()
    pay(client, later)
    assert answered_within(waiting, 2)["status"] == "completed"
    assert time.monotonic() - sent < 1


def test_redis_outage_mid_wait_then_restart_resubscribes(app, client, wire, hub, redis_server, log_lines):
    redis_server.start()
    first, second = new_order(client), new_order(client)
    waiting_first, waiting_second = hold(client, first, 30), hold(client, second, 30)
    channels = {hub.channel(first["id"]), hub.channel(second["id"])}
    wait_until(lambda: channels <= redis_server.channels(), 5, message="both channels subscribed")
    disconnects = sample("eventi_redis_transitions_total", state="disconnected")
    connects = sample("eventi_redis_transitions_total", state="connected")

    redis_server.stop()
    wait_until(lambda: not hub.connected, 5, message="the listener to notice")
    assert sample("eventi_redis_transitions_total", state="disconnected") == disconnects + 1
    assert sample("eventi_redis_listener_connected", node=f"127.0.0.1:{redis_server.port}") == 0
    assert sum("Redis subscriber disconnected" in line for line in log_lines) == 1
    assert client.get("/readyz").status_code == 503

    sent = time.monotonic()
    assert pay(client, first)["status"] == "completed"
    assert answered_within(waiting_first, DEGRADED + 2)["status"] == "completed"
    assert time.monotonic() - sent < DEGRADED + 1.5
    assert not waiting_second.ready()

    redis_server.start()
    wait_until(lambda: hub.connected, 15, message="the listener to reconnect")
    wait_until(lambda: hub.channel(second["id"]) in redis_server.channels(), 5, message="the resubscription")
    assert hub.channel(first["id"]) not in redis_server.channels()  # answered: not resubscribed
    assert sample("eventi_redis_transitions_total", state="connected") == connects + 1
    assert client.get("/readyz").status_code == 200
    sent = time.monotonic()
    pay(client, second, result_code=1032)
    assert answered_within(waiting_second, 2)["status"] == "cancelled"
    assert time.monotonic() - sent < 1
    wait_until(lambda: f"Order {second['id']} status changed via Redis" in "\n".join(log_lines), 2,
               message="delivery by Redis, not by the re-check")


@pytest.mark.env(WAIT_RECHECK_INTERVAL_DEGRADED="30")
def test_reconnect_wakes_every_waiter_to_recheck(app, client, wire, hub, redis_server):
    """With the degraded re-check out of the way, only the re-check after resubscribing can answer."""
    redis_server.start()
    order = new_order(client)
    waiting = hold(client, order, 30)
    wait_until(lambda: hub.channel(order["id"]) in redis_server.channels(), 5, message="the subscription")
    redis_server.stop()
    wait_until(lambda: not hub.connected, 5, message="the listener to notice")
    pay(client, order)  # published into the void
    gevent.sleep(DEGRADED + 0.5)
    assert not waiting.ready()
    redis_server.start()
    assert answered_within(waiting, 15)["status"] == "completed"


def test_a_frozen_redis_is_detected_by_ping_and_the_webhook_still_answers(app, client, wire, hub, redis_server,
                                                                         log_lines):
    hub.ping_interval = 0.5  # before the listener starts: detection within about a second
    redis_server.start()
    order = new_order(client)
    waiting = hold(client, order, 30)
    wait_until(lambda: hub.channel(order["id"]) in redis_server.channels(), 5, message="the subscription")
    # Held, its cache read done: a read caught by the freeze would first wait out its own timeouts.
    wait_until(lambda: f"Long polling started for order: {order['id']}" in log_lines, 5, message="the hold")

    redis_server.freeze()  # the socket stays open; nothing answers on it
    wait_until(lambda: not hub.connected, 5, message="the dead socket to be noticed")
    assert any("no PONG from Redis" in line for line in log_lines)
    started = time.monotonic()
    assert pay(client, order)["status"] == "completed"  # the publish times out; the webhook answers
    assert time.monotonic() - started < 6
    assert answered_within(waiting, DEGRADED + 2)["status"] == "completed"
    assert client.get("/readyz").status_code == 503

    redis_server.thaw()
    wait_until(lambda: hub.connected, 15, message="the listener to reconnect")


@pytest.mark.env(WAIT_RECHECK_INTERVAL="60", WAIT_RECHECK_INTERVAL_DEGRADED="60")
def test_a_wait_that_stopped_waiting_for_its_subscription_is_rechecked_once_it_is_confirmed(
        app, client, wire, hub, redis_server, log_lines):
    """Redis stalls past the 2 s a wait gives its SUBSCRIBE: the wait reads on; the late confirmation re-checks."""
    hub.ping_interval = 60  # before the listener starts: the stall must not be taken for a dead Redis
    redis_server.start()
    warm = new_order(client)
    answered_within(hold(client, warm, 0), 5)  # the listener is connected
    order = new_order(client)
    redis_server.freeze()
    try:
        waiting = hold(client, order, 60)
        wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
        # Past the subscription's confirmation deadline it reads on (the database) and holds.
        wait_until(lambda: f"Long polling started for order: {order['id']}" in log_lines, 10,
                   message="the wait to give up on its confirmation and hold")
        assert not waiting.ready()
        pay(client, order)  # committed; its publish times out against the stalled Redis
    finally:
        redis_server.thaw()
    assert answered_within(waiting, 5)["status"] == "completed"


@pytest.mark.env(WAIT_RECHECK_INTERVAL="1")
def test_a_lost_message_costs_latency_not_the_answer(app, client, wire, hub, redis_server, monkeypatch):
    redis_server.start()
    order = new_order(client)
    waiting = hold(client, order, 30)
    wait_until(lambda: hub.channel(order["id"]) in redis_server.channels(), 5, message="the subscription")
    monkeypatch.setattr(hub, "publish", lambda message: None)  # the message is lost on the way
    sent = time.monotonic()
    pay(client, order)
    assert answered_within(waiting, 3)["status"] == "completed"
    assert time.monotonic() - sent < 2.5


def test_a_listener_failing_the_same_way_over_and_over_says_so_once_then_counts(app, client, wire, hub,
                                                                                  redis_server, monkeypatch):
    """One traceback for the first failure, then one ERROR with a count: not a traceback a second."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("eventi_flask").addHandler(handler)
    monkeypatch.setattr(subscriber.RepeatedFailures, "REPORT_EVERY", 1.0)

    def fails(self, conn):
        raise ValueError("filedescriptor out of range in select()")

    monkeypatch.setattr(subscriber.Subscriber, "_serve", fails)
    redis_server.start()
    try:
        order = new_order(client)
        waiting = hold(client, order, 30)
        counted = wait_until(lambda: [r for r in records if "Redis subscriber failing" in r.getMessage()], 10,
                             message="a line counting the failures")
        assert counted[0].levelno == logging.ERROR
        assert "ValueError: filedescriptor out of range in select() (" in counted[0].getMessage()
        assert " times in the last " in counted[0].getMessage()
        assert len([r for r in records if r.exc_info]) == 1, "one traceback, for the first failure"
        assert sum("Redis subscriber disconnected" in r.getMessage() for r in records) == 1
        # Meanwhile the wait is answered from the database's re-check.
        pay(client, order)
        assert answered_within(waiting, DEGRADED + 2)["status"] == "completed"
    finally:
        logging.getLogger("eventi_flask").removeHandler(handler)


# -- gunicorn processes --------------------------------------------------------------------------

def worker_pids(server):
    path = f"/proc/{server.proc.pid}/task/{server.proc.pid}/children"
    with open(path) as children:
        return {int(pid) for pid in children.read().split()}


@pytest.fixture
def stopping(request):
    """Servers to stop at the end of this test, even when it fails."""
    servers = []
    yield servers.append
    for server in servers:
        server.stop()


@pytest.mark.live
def test_sigkill_mid_wait_the_next_request_is_answered(live_server_factory, stopping):
    server = live_server_factory(WEB_CONCURRENCY="1")
    stopping(server)
    order = server.create_order(phone=NO_CALLBACK["phone"])
    doomed = gevent.spawn(get_wait, server, order)
    wait_until(lambda: held_waits(server, 1), message="the wait to be held")
    (worker,) = worker_pids(server)

    os.kill(worker, signal.SIGKILL)
    with pytest.raises(requests.ConnectionError):
        doomed.get(timeout=10)  # the connection dies with the worker: no answer, certainly no wrong one

    again = gevent.spawn(get_wait, server, order)  # the client asks again at once
    wait_until(lambda: held_waits(server, 2), 15, message="the new worker to hold the repeated wait")
    assert worker not in worker_pids(server)
    sent = time.monotonic()
    post_callback(server, order)
    response = again.get(timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "completed"
    assert time.monotonic() - sent < 1.5


@pytest.mark.live
def test_sigterm_answers_held_waits_503_shutting_down(live_server_factory, stopping):
    server = live_server_factory(WEB_CONCURRENCY="2")
    stopping(server)
    orders = [server.create_order(phone=NO_CALLBACK["phone"]) for _ in range(3)]
    paid = orders[0]
    post_callback(server, paid)  # one order is completed before the holds start: its waits answer at once
    waits = [gevent.spawn(get_wait, server, order, 50) for order in orders[1:] for _ in range(3)]
    wait_until(lambda: held_waits(server, len(waits)), message="every wait to be held")

    stopped = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    responses = [waiting.get(timeout=10) for waiting in waits]
    assert time.monotonic() - stopped < 5  # far inside the graceful timeout (25 s), far before the hold (50 s)
    # API.md: so that the page reconnects (to the new worker) instead of counting a hold.
    assert [r.status_code for r in responses] == [503] * len(waits)
    assert {r.json()["error"]["code"] for r in responses} == {"shutting_down"}
    assert all(1 <= int(r.headers["Retry-After"]) <= 5 for r in responses)
    assert server.proc.wait(10) == 0
    log = server.log()
    assert "Shutting down: answering" in log and "Worker graceful timeout" not in log


@pytest.mark.live
def test_two_instances_share_one_redis_and_one_database(live_server_factory, stopping):
    one = live_server_factory(WEB_CONCURRENCY="2", REDIS_PREFIX="two-instances:")
    stopping(one)
    other = live_server_factory(WEB_CONCURRENCY="2", REDIS_PREFIX="two-instances:", DATABASE_URL=one.env["DATABASE_URL"])
    stopping(other)
    assert_answered_across(one, other, rounds=3, within=1)
