"""The embedded default (SQLite) works off the event loop: a long query or write holds up no one else."""
import time

import gevent
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from eventi_flask.extensions import db
from tests.support import DEMO, callback_body, wait_until

pytestmark = pytest.mark.parametrize("backend", ["sqlite-local"], indirect=True)

CALLBACK = "/api/payhero/callback?token=sandbox"
# Seconds of SQLite's own work (about 1 µs a row): each is interrupted once the test has seen what it
# needs, and runs out on its own (failing the test, not hanging it) if it held the event loop.
LONG_QUERY = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 20000000) SELECT count(*) FROM n"
LONG_WRITE = ("INSERT INTO ballast WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 3000000) "
              "SELECT x, randomblob(16) FROM n")
ON_TIME = 0.1  # seconds a timer or an answer may be late while SQLite works


@pytest.fixture
def order(client, wire):
    return client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json()  # the sandbox never calls back


def run_until_interrupted(app, statement, running):
    """Run `statement` on a pooled connection, appending that connection to `running`; SQLite's error, e.g. interrupted."""
    with app.app_context():
        try:
            running.append(db.session.connection().connection.driver_connection)
            db.session.execute(text(statement))
            db.session.commit()
            return "finished"
        except OperationalError as exc:
            return str(exc.orig)
        finally:
            db.session.remove()


def worst_timer_lateness(seconds, period=0.02):
    """How late, at worst, a timer due every `period` s fired during `seconds`."""
    worst, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        due = time.monotonic() + period
        gevent.sleep(period)
        worst = max(worst, time.monotonic() - due)
    return worst


def start(app, statement):
    running = []
    greenlet = gevent.spawn(run_until_interrupted, app, statement, running)
    # Once it has its connection it goes straight to the pool's thread; it yields only to wait for it there.
    wait_until(lambda: running, timeout=5, message="the statement to start")
    return greenlet, running[0]


def test_a_long_query_holds_up_no_timer_and_no_wait(app, client, order, hub):
    waiting = gevent.spawn(client.get, f"/api/orders/{order['id']}/wait",
                           query_string={"since": order["version"], "timeout": 20})
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
    query, connection = start(app, LONG_QUERY)

    assert worst_timer_lateness(0.5) < ON_TIME
    sent = time.monotonic()
    assert client.post(CALLBACK, json=callback_body(order)).status_code == 200  # a write beside the long read
    answer = waiting.get(timeout=5)
    assert answer.get_json()["status"] == "completed" and time.monotonic() - sent < ON_TIME * 3

    connection.interrupt()
    assert query.get(timeout=10) == "interrupted"  # it ran all along


def test_a_long_write_holds_up_no_timer_and_no_reader(app, client, order):
    with app.app_context():
        db.session.execute(text("CREATE TABLE ballast (x INTEGER, pad BLOB)"))
        db.session.commit()
    write, connection = start(app, LONG_WRITE)

    assert worst_timer_lateness(0.3) < ON_TIME
    for _ in range(5):  # WAL: readers go on beside the writer
        asked = time.monotonic()
        assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "pending"
        assert time.monotonic() - asked < ON_TIME

    connection.interrupt()
    assert write.get(timeout=10) == "interrupted"
    # The write after it takes its turn as usual.
    assert client.post(CALLBACK, json=callback_body(order)).get_json()["status"] == "completed"


def test_writers_waiting_for_their_turn_hold_no_thread(app, client, wire, log_lines):
    """More write transactions waiting than gevent's pool has threads: a read is still answered, and all land."""
    writers = gevent.get_hub().threadpool.maxsize + 2
    with app.app_context():
        pool = db.engine.pool
        assert writers + 3 <= pool.size() + pool._max_overflow  # a pooled connection each, the long write's and the read's
        db.session.execute(text("CREATE TABLE ballast (x INTEGER, pad BLOB)"))
        db.session.commit()
    orders = [client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json() for _ in range(writers)]
    write, connection = start(app, LONG_WRITE)
    callbacks = [gevent.spawn(client.post, CALLBACK, json=callback_body(order)) for order in orders]
    wait_until(lambda: log_lines.count("PAYHERO Callback received") == writers, message="every callback to arrive")
    asked = time.monotonic()
    assert client.get(f"/api/orders/{orders[0]['id']}").get_json()["status"] == "pending"
    # Beside the callbacks' own work; a read queued behind writers waiting in threads waits out the long write.
    assert time.monotonic() - asked < 1.0

    connection.interrupt()
    assert write.get(timeout=10) == "interrupted"
    gevent.joinall(callbacks, timeout=20, raise_error=True)
    assert [c.value.get_json()["status"] for c in callbacks] == ["completed"] * writers
