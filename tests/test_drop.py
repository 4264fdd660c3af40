"""The ticket drop, functionally: every buyer is answered 201 or 409, nothing is oversold,
and a buyer who got an error holds no tickets.

Speed is not checked here (`python -m bench drop` and BENCHMARKS.md measure it).
"""
import collections
import random
import time
import uuid

import gevent.pool
import psycopg
import pytest
import requests
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from eventi_flask.extensions import db
from eventi_flask.orders import rows
from eventi_flask.events.models import TicketType
from eventi_flask.orders.models import Order
from tests.support import DEMO, callback_body

NO_CALLBACK = {**DEMO, "phone": "0708000004"}  # the sandbox never calls back for this phone


def ledger(app):
    """(tickets reserved on the demo's early-bird type, {status: tickets of orders in that status})."""
    with app.app_context():
        reserved = db.session.scalar(select(TicketType.reserved).where(TicketType.code == "early-bird"))
        held = collections.Counter()
        for status, quantity in db.session.execute(select(Order.status, Order.quantity)):
            held[status] += quantity
        db.session.remove()
    return reserved, held


@pytest.fixture
def drop_server(live_server_factory):
    """Two gunicorn workers on PostgreSQL, selling 300 early-bird tickets."""
    # A small pool: the machine's PostgreSQL (max_connections 100) is shared with other test runs.
    server = live_server_factory(WEB_CONCURRENCY="2", LOG_LEVEL="warning", DB_POOL_SIZE="4", DB_MAX_OVERFLOW="4")
    with psycopg.connect(server.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("UPDATE ticket_types SET capacity = 300, reserved = 0 WHERE code = 'early-bird'")
    return server


def buy_all_at_once(server, buyers):
    """[(status, body)] of `buyers` orders sent at once, each on its own connection (as browsers are);
    a buyer given a place in the line holds its wait until its turn, and one answered 503 busy asks
    again after Retry-After with its Idempotency-Key, as the page does."""
    def buy(_):
        key = str(uuid.uuid4())
        while True:
            response = requests.post(server.url + "/api/orders", json=NO_CALLBACK, headers={"Idempotency-Key": key},
                                     timeout=120)
            if response.status_code == 202:
                return follow_the_line(server, {"status": "queued", **response.json()["queue"]})
            if response.status_code != 503 or response.json()["error"]["code"] != "busy":
                return response.status_code, response.json()
            time.sleep(float(response.headers["Retry-After"]) * random.uniform(1, 1.5))

    return gevent.pool.Pool(buyers).map(buy, range(buyers))


OUTAGE_SECONDS = 10  # the connections killed again and again for this long, then the database is back
LINE_DEADLINE = 60  # seconds a buyer of these drops may wait in the line: 400 orders take a few


def follow_the_line(server, place):
    """(201, the order) once the place's turn came; (409, POST's error) when it was sold out."""
    deadline = time.monotonic() + LINE_DEADLINE
    while place["status"] == "queued":
        assert time.monotonic() < deadline, f"still in the line after {LINE_DEADLINE} s: {place}"
        response = requests.get(f"{server.url}/api/queue/{place['id']}/wait",
                                params={"since": place["version"], "timeout": 20}, timeout=60)
        if response.status_code == 200:
            place = response.json()
        else:  # 503 (the database or a worker going away): ask again, as the page does
            time.sleep(float(response.headers.get("Retry-After", 1)) * random.uniform(0.5, 1))
    if place["status"] == "admitted":
        return 201, place["order"]
    return (409 if place["status"] == "sold_out" else place["status"]), {"error": place["error"]}


@pytest.mark.load
def test_400_buyers_at_once_for_300_tickets_on_two_workers(drop_server):
    server = drop_server
    answers = buy_all_at_once(server, 400)

    others = [(status, body) for status, body in answers if status not in (201, 409)]
    assert collections.Counter(status for status, _ in answers) == {201: 300, 409: 100}, others[:3]
    assert all(body["error"]["code"] == "sold_out" for status, body in answers if status == 409)
    sold = {body["id"] for status, body in answers if status == 201}
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        [(capacity, reserved)] = conn.execute("SELECT capacity, reserved FROM ticket_types WHERE code = 'early-bird'")
        orders = dict(conn.execute("SELECT id, status FROM orders").fetchall())
    assert (capacity, reserved) == (300, 300)
    assert set(orders) == sold and set(orders.values()) == {"pending"}  # every order was answered 201
    event = requests.get(server.url + "/api/events/test-this-end-to-end", timeout=10).json()
    assert [t["available"] for t in event["ticket_types"] if t["id"] == "early-bird"] == [0]


def test_a_503_forced_mid_order_leaves_nothing_reserved(app, client, wire, monkeypatch):
    """The database fails after the reservation statement may have committed: the buyer is told 503
    and holds nothing."""
    create_order = rows.create_order

    def created_then_lost(connection, *args):
        result = create_order(connection, *args)
        raise OperationalError("INSERT ...", {}, Exception("server closed the connection unexpectedly"))
        return result

    before = ledger(app)
    monkeypatch.setattr(rows, "create_order", created_then_lost)
    response = client.post("/api/orders", json=NO_CALLBACK)

    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.get_json()["error"]["code"] == "database_unavailable"
    reserved, held = ledger(app)
    assert reserved == before[0]
    assert not held["pending"] and not held["completed"]
    assert wire.call_count == 0  # no STK push for an order the buyer was told failed


def test_an_unsaved_payhero_answer_still_answers_201_with_the_order(app, client, wire, monkeypatch):
    """The STK push is on the phone but the database is busy: the buyer learns the order they hold,
    and its callback still completes it (it names the order by our id)."""
    def busy(*args):
        raise PoolTimeout("QueuePool limit reached")

    monkeypatch.setattr(rows, "save_payhero_answer", busy)
    response = client.post("/api/orders", json=NO_CALLBACK)

    assert response.status_code == 201
    order = response.get_json()
    assert order["status"] == "pending" and client.get(f"/api/orders/{order['id']}").get_json() == order
    monkeypatch.undo()
    paid = client.post("/api/payhero/callback?token=sandbox", json=callback_body(order))
    assert paid.status_code == 200 and paid.get_json()["status"] == "completed"


def test_an_idle_pooled_connection_that_died_is_replaced_before_use(backend, app, client, wire, monkeypatch):
    if backend != "postgres-redis":
        pytest.skip("about PostgreSQL connections")
    from eventi_flask import database

    order = client.post("/api/orders", json=NO_CALLBACK).get_json()
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0)  # every pooled connection counts as idle
    with app.app_context():
        with db.engine.connect() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar()
    with psycopg.connect(app.config["SQLALCHEMY_DATABASE_URI"].replace("+psycopg", ""), autocommit=True) as admin:
        killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]
    assert killed >= 1

    response = client.get(f"/api/orders/{order['id']}")
    assert response.status_code == 200 and response.get_json()["id"] == order["id"]


def test_payhero_refusing_during_a_database_hiccup_still_frees_the_tickets(app, client, wire, monkeypatch):
    from eventi_flask.orders import service

    fail_pending_order, calls = service.fail_pending_order, []

    def hiccup_once(order_id, *args):
        calls.append(order_id)
        if len(calls) == 1:
            raise OperationalError("UPDATE ...", {}, Exception("server closed the connection unexpectedly"))
        return fail_pending_order(order_id, *args)

    monkeypatch.setattr(service, "fail_pending_order", hiccup_once)
    monkeypatch.setattr(service, "UNDO_RETRY_DELAYS", (0, 0))
    wire.post("http://eventi.test/sandbox/payhero/api/v2/payments", status_code=500, json={"error_message": "down"})
    before = ledger(app)
    response = client.post("/api/orders", json=NO_CALLBACK)

    assert response.status_code == 502 and len(calls) == 2
    reserved, held = ledger(app)
    assert reserved == before[0] and held["failed"] == before[1]["failed"] + 1


@pytest.mark.load
def test_database_connections_killed_during_a_drop_leave_no_buyer_holding_tickets_unanswered(drop_server):
    """The real fault: PostgreSQL ends the server's connections again and again for 10 s while 400
    buyers order on two workers.  Some buyers may be told 503 (those in the line wait it out); none of
    them holds a ticket, and nothing is oversold."""
    database = drop_server.env["DATABASE_URL"]
    name = database.rsplit("/", 1)[1]
    buyers = gevent.spawn(buy_all_at_once, drop_server, 400)
    kills, outage_ends = 0, time.monotonic() + OUTAGE_SECONDS
    with psycopg.connect(database, autocommit=True) as admin:
        while not buyers.ready() and time.monotonic() < outage_ends:
            kills += admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]
            gevent.sleep(0.3)
    answers = buyers.get(timeout=LINE_DEADLINE + 30)

    assert kills, "no server connection was there to end"
    assert {status for status, _ in answers} <= {201, 409, 503}, [a for a in answers if a[0] not in (201, 409, 503)][:3]
    sold = {body["id"] for status, body in answers if status == 201}
    with psycopg.connect(database) as conn:
        [reserved] = conn.execute("SELECT reserved FROM ticket_types WHERE code = 'early-bird'").fetchone()
        holding = dict(conn.execute("SELECT id, quantity FROM orders WHERE status IN ('pending', 'completed')"))
    assert reserved == sum(holding.values()) <= 300
    assert set(holding) == sold  # every ticket held belongs to a buyer answered 201
