"""Issue 24: an order whose callback never came is settled by asking PayHero, once, with no clock
process: the held page learns the outcome.  Short PAYHERO_ASK_AFTER values stand for 75 s."""
import json
import threading
from collections import Counter
from datetime import timedelta

import gevent
import gevent.pywsgi
import pytest
import requests
from sqlalchemy import select, update

from eventi_flask import metrics
from eventi_flask.extensions import db
from eventi_flask.notify.service import HUB
from eventi_flask.orders import missed_callbacks
from eventi_flask.orders.history import timeline
from eventi_flask.orders.models import Order, as_utc, utcnow
from tests.support import DEMO, buyers_holding_every_connection, callback_body, free_port, get_wait, wait_until
from tests.test_reconcile import QUEUED_FOREVER, lost_callbacks  # noqa: F401 (a fixture)
from tests.test_verification import CALLBACK, LIVE, RECEIPT, PayHeroStandIn, other_worker  # noqa: F401 (a fixture)

FAST = {"PAYHERO_ASK_AFTER": "0.3,0.6"}


def held_wait(app, client, order, timeout=15):
    """A wait held on `order` (since its version), as the status page holds one; its greenlet."""
    hub = app.extensions[HUB]
    held = hub.waiter_count
    waiting = gevent.spawn(client.get, f"/api/orders/{order['id']}/wait",
                           query_string={"since": order["version"], "timeout": timeout})
    wait_until(lambda: hub.waiter_count > held, message="the wait to be held")
    return waiting


def asked_notes(app, order):
    with app.app_context():
        return [entry for entry in timeline(db.session.get(Order, order["id"]))["timeline"] if entry["event"] == "asked"]


def counted(metric, **labels):
    return (metric.labels(**labels) if labels else metric)._value.get()


@pytest.mark.env(**FAST, SANDBOX_CALLBACK_DELAY="0")
def test_sandbox_order_whose_callback_was_lost_is_settled_by_asking_once(app, client, lost_callbacks):  # noqa: F811
    missing, completed = counted(metrics.callbacks_missing), counted(metrics.payments_asked, outcome="completed")
    order = client.post("/api/orders", json=DEMO).get_json()
    waiting = held_wait(app, client, order)

    answered = waiting.get(timeout=10).get_json()  # no callback, no reconcile: the worker asked
    assert answered["status"] == "completed" and answered["payment"]["receipt"] and len(answered["tickets"]) == 1
    [note] = asked_notes(app, order)
    assert note["summary"] == "no callback after 0.3 s" and note["status"] == "SUCCESS"
    assert note["result"] == "settled: completed"
    assert counted(metrics.callbacks_missing) == missing + 1
    assert counted(metrics.payments_asked, outcome="completed") == completed + 1
    shown = app.test_cli_runner().invoke(args=["orders", "show", order["id"]]).output
    assert "asked PayHero" in shown and "no callback after 0.3 s: transaction-status SUCCESS -> settled: completed" in shown


@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
@pytest.mark.env(**FAST, SANDBOX_CALLBACK_DELAY="0", DB_POOL_SIZE="2", DB_MAX_OVERFLOW="1")
def test_a_lost_callback_is_settled_by_asking_while_buyers_hold_every_pooled_connection(app, client, lost_callbacks):  # noqa: F811
    """The worker's asking settles on the callbacks' connections, as a callback would (issue 24)."""
    order = client.post("/api/orders", json=DEMO).get_json()
    waiting = held_wait(app, client, order)
    with buyers_holding_every_connection(app):
        answered = waiting.get(timeout=8).get_json()  # asked 0.3 s after the push; the app's pool gives up at 10 s
    assert answered["status"] == "completed" and len(answered["tickets"]) == 1
    assert [note["result"] for note in asked_notes(app, order)] == ["settled: completed"]


@pytest.mark.env(PAYHERO_ASK_AFTER="0.2,0.4", RECONCILE_EXPIRE_AFTER="1.5", SANDBOX_CALLBACK_DELAY="0")
def test_a_payment_payhero_has_not_processed_is_asked_again_until_reconcile_takes_over(app, client, lost_callbacks):  # noqa: F811
    order = client.post("/api/orders", json={**DEMO, "phone": QUEUED_FOREVER}).get_json()  # the sandbox says QUEUED

    notes = wait_until(lambda: [n for n in asked_notes(app, order) if n["result"] == "left to reconcile"] and
                       asked_notes(app, order), timeout=10, message="asks until the order is old enough to expire")
    assert [(n["status"], n["result"].split(" in ")[0]) for n in notes] == [
        ("QUEUED", "asking again"), ("QUEUED", "left to reconcile")]
    assert notes[0]["summary"] == "no callback after 0.2 s" and notes[1]["summary"].startswith("ask 2, ")
    assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "pending"  # reconcile expires it
    with app.app_context():
        row = db.session.get(Order, order["id"])
        assert (row.asks, row.ask_at) == (2, None)


@pytest.mark.env(**LIVE, **FAST)
def test_live_order_with_no_callback_is_completed_from_payhero_s_transaction_status(app, client, wire):
    payhero = PayHeroStandIn(wire)  # takes the push, never calls back
    order = client.post("/api/orders", json=DEMO).get_json()
    reference = order["payment"]["reference"]
    payhero.status[reference] = "SUCCESS"  # the customer paid; the callback was lost
    waiting = held_wait(app, client, order)

    answered = waiting.get(timeout=10).get_json()
    assert answered["status"] == "completed" and answered["payment"]["receipt"] == RECEIPT
    assert payhero.asked == [reference]  # once, not once per held wait or per look


@pytest.mark.env(**LIVE, PAYHERO_ASK_AFTER="0.2,0.4")
def test_payhero_unreachable_or_not_done_yet_is_asked_again_and_the_page_still_learns(app, client, wire):
    payhero = PayHeroStandIn(wire)
    order = client.post("/api/orders", json=DEMO).get_json()
    reference = order["payment"]["reference"]
    answers = iter([requests.ConnectionError("Connection reset by peer"), "QUEUED", "SUCCESS"])
    payhero.status[reference] = lambda: next(answers)
    errors, pending = counted(metrics.payments_asked, outcome="error"), counted(metrics.payments_asked, outcome="pending")
    waiting = held_wait(app, client, order)

    assert waiting.get(timeout=15).get_json()["status"] == "completed"
    assert payhero.asked == [reference] * 3
    assert [note["result"] for note in asked_notes(app, order)] == [
        "asking again in 1 s", "asking again in 1 s", "settled: completed"]
    assert "could not be reached" in asked_notes(app, order)[0]["error"]
    assert counted(metrics.payments_asked, outcome="error") == errors + 1
    assert counted(metrics.payments_asked, outcome="pending") == pending + 1


@pytest.mark.env(**LIVE, **FAST)
def test_no_ask_when_the_callback_came(app, client, wire):
    payhero = PayHeroStandIn(wire)
    order = client.post("/api/orders", json={**DEMO, "phone": "0708000002"}).get_json()
    assert client.post(CALLBACK, json=callback_body(order, result_code=1)).get_json()["status"] == "failed"
    with app.app_context():
        due = as_utc(db.session.scalar(select(Order.ask_at).where(Order.id == order["id"])))
        db.session.remove()
    wait_until(lambda: utcnow() > due, message="the order's ask to fall due")

    with app.app_context():
        app.extensions[missed_callbacks.EXTENSION].ask_due()  # a look once it is due: nothing pending to ask about
    assert payhero.asked == []


# Several processes on one database: PostgreSQL's (SQLite serves one worker process).
@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
@pytest.mark.env(**LIVE, PAYHERO_ASK_AFTER="60")  # the loops stay asleep: the test makes the looks
def test_two_workers_looking_at_once_ask_once_per_order(app, other_worker, client, wire):  # noqa: F811
    payhero = PayHeroStandIn(wire)
    orders = [client.post("/api/orders", json=DEMO).get_json() for _ in range(30)]
    for number, order in enumerate(orders):  # each paid, with its own receipt
        reference = order["payment"]["reference"]
        payhero.status[reference] = {"status": "SUCCESS", "reference": reference, "success": True,
                                     "provider_reference": f"SKQ{number:04d}XYZ", "third_party_reference": ""}
    with app.app_context():  # all due now
        db.session.execute(update(Order).values(ask_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        db.session.remove()

    def look(worker):
        with worker.app_context():
            return worker.extensions[missed_callbacks.EXTENSION].ask_due()

    looks = [gevent.spawn(look, worker) for worker in (app, other_worker, app, other_worker)]
    gevent.joinall(looks, raise_error=True)
    assert sorted(payhero.asked) == sorted(order["payment"]["reference"] for order in orders)  # each once
    assert {client.get(f"/api/orders/{order['id']}").get_json()["status"] for order in orders} == {"completed"}


class CountingPayHero:
    """A stand-in PayHero on a spare port (HTTP, in this process): takes every push, never calls back,
    and says SUCCESS to every transaction-status, counting them per reference."""

    def __init__(self):
        self.asked = Counter()
        self.pushes = 0
        self._lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = gevent.pywsgi.WSGIServer(("127.0.0.1", self.port), self._app, log=None)

    def _app(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/api/v2/payments":
            with self._lock:
                self.pushes += 1
                number = self.pushes
            body = {"success": True, "status": "QUEUED", "reference": f"ref-{number:04d}",
                    "CheckoutRequestID": f"ws_CO_{number:04d}"}
        elif path == "/api/v2/transaction-status":
            reference = environ["QUERY_STRING"].split("reference=", 1)[1]
            with self._lock:
                self.asked[reference] += 1
            body = {"status": "SUCCESS", "reference": reference, "success": True,
                    "provider_reference": f"R{reference[-4:]}XYZ01", "third_party_reference": ""}
        else:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"error_message": "no such route"}']
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]


@pytest.fixture
def counting_payhero():
    payhero = CountingPayHero()
    payhero.server.start()
    yield payhero
    payhero.server.stop()


@pytest.mark.live
def test_two_gunicorn_workers_ask_once_per_order(live_server_factory, counting_payhero):
    server = live_server_factory(
        WEB_CONCURRENCY="2", PAYHERO_MODE="live", SECRET_KEY="s", PAYHERO_BASE_URL=counting_payhero.url,
        PAYHERO_API_USERNAME="user", PAYHERO_API_PASSWORD="secret", PAYHERO_CHANNEL_ID="911",
        PAYHERO_CALLBACK_TOKEN="t0ken", PAYHERO_ASK_AFTER="1,2")
    orders = [server.create_order() for _ in range(20)]
    waits = [gevent.spawn(get_wait, server, order, timeout=20) for order in orders]

    for order, waiting in zip(orders, waits):
        answered = waiting.get(timeout=30)
        assert answered.status_code == 200 and answered.json()["status"] == "completed", answered.text
    # Final now: no worker asks about them again.  Each was asked exactly once, by one of the two workers.
    assert counting_payhero.asked == Counter({order["payment"]["reference"]: 1 for order in orders})
    settled = "no callback after 1 s: asked PayHero: SUCCESS: settled completed"
    wait_until(lambda: server.log().count(settled) == len(orders), message="each settlement's log line")
    assert "Traceback" not in server.log()
