"""Retrying an order safely (Idempotency-Key) and shedding orders past what a worker can answer quickly."""
import time
import uuid

import gevent.pool
import psycopg
import pytest
import requests
from sqlalchemy import func, select

from eventi_flask.events.models import Event
from eventi_flask.extensions import db
from eventi_flask.orders.models import Order
from tests.support import DEMO, wait_until

PAYMENTS_URL = "http://eventi.test/sandbox/payhero/api/v2/payments"


def tickets_left(client, ticket_type="early-bird"):
    event = client.get("/api/events/test-this-end-to-end").get_json()
    return next(t["available"] for t in event["ticket_types"] if t["id"] == ticket_type)


def order_count(app):
    with app.app_context():
        count = db.session.scalar(select(func.count()).select_from(Order))
        db.session.remove()
    return count


def orders_shed(client):
    metrics = client.get("/metrics").get_data(as_text=True)
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("eventi_orders_shed_total ")))


def post_order(client, body=DEMO, key=None):
    return client.post("/api/orders", json=body, headers={"Idempotency-Key": key} if key is not None else {})


def test_a_retry_with_the_same_key_answers_the_first_order_and_makes_no_second(app, client, wire):
    key = str(uuid.uuid4())
    first = post_order(client, key=key)
    left = tickets_left(client)
    # Sent again as a phone on a bad network would: the same body, another spelling of the phone.
    again = post_order(client, {**DEMO, "phone": "+254712345678"}, key=key)

    assert first.status_code == again.status_code == 201
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert tickets_left(client) == left and order_count(app) == 1
    assert sum(r.url == PAYMENTS_URL for r in wire.request_history) == 1  # one STK push on the phone


def test_the_same_key_with_another_body_is_422_and_makes_nothing(app, client, wire):
    key = str(uuid.uuid4())
    assert post_order(client, key=key).status_code == 201
    left = tickets_left(client)

    response = post_order(client, {**DEMO, "quantity": 2}, key=key)

    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "idempotency_key_reused"
    assert tickets_left(client) == left and order_count(app) == 1


def test_other_keys_make_other_orders(app, client, wire):
    assert post_order(client, key="one").get_json()["id"] != post_order(client, key="two").get_json()["id"]
    assert order_count(app) == 2


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_a_key_that_is_empty_or_over_255_characters_is_400(app, client, wire, key):
    response = post_order(client, key=key)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_idempotency_key" and "Idempotency-Key" in error["fields"]
    assert order_count(app) == 0 and wire.call_count == 0


def test_a_key_of_255_characters_is_accepted(client, wire):
    key = "é" * 255
    first = post_order(client, key=key.encode().decode("latin-1"))  # HTTP carries a header's bytes as latin-1
    assert first.status_code == 201
    assert post_order(client, key=key.encode().decode("latin-1")).get_json()["id"] == first.get_json()["id"]


def test_a_payhero_refusal_is_answered_again_as_it_was(app, client, wire):
    wire.post(PAYMENTS_URL, status_code=500, json={"error_message": "down"})
    key = str(uuid.uuid4())
    first = post_order(client, key=key)
    again = post_order(client, key=key)
    assert first.status_code == again.status_code == 502
    assert again.get_json() == first.get_json()
    assert again.headers["X-Order-Id"] == first.headers["X-Order-Id"]
    assert order_count(app) == 1 and wire.call_count == 1  # the refused STK push is not sent again


def test_a_sold_out_key_is_let_go_so_a_retry_can_buy_once_tickets_are_back(app, client, wire):
    from eventi_flask.orders.models import TicketType

    with app.app_context():
        db.session.execute(db.update(TicketType).values(capacity=TicketType.reserved))
        db.session.commit()
    key = str(uuid.uuid4())
    assert post_order(client, key=key).status_code == 409
    with app.app_context():
        db.session.execute(db.update(TicketType).values(capacity=TicketType.reserved + 1))
        db.session.commit()
    assert post_order(client, key=key).status_code == 201


def test_identical_keyed_orders_racing_on_two_workers_make_one_order(live_server_factory):
    server = live_server_factory(WEB_CONCURRENCY="2", LOG_LEVEL="warning", DB_POOL_SIZE="4", DB_MAX_OVERFLOW="4")
    key = str(uuid.uuid4())

    def buy(_):
        response = requests.post(server.url + "/api/orders", json=DEMO, headers={"Idempotency-Key": key}, timeout=60)
        return response.status_code, response.json()

    answers = gevent.pool.Pool(20).map(buy, range(20))

    assert {status for status, _ in answers} == {201}
    assert len({body["id"] for _, body in answers}) == 1
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        [(orders, reserved)] = conn.execute(
            "SELECT count(*), (SELECT reserved FROM ticket_types WHERE code = 'early-bird') FROM orders")
    assert (orders, reserved) == (1, 1)


@pytest.mark.env(ORDER_SHED_LAG="0,0")  # every order shed: the limit forced down
def test_a_shed_order_is_503_busy_with_a_spread_retry_after_and_reserves_nothing(app, client, wire):
    with app.app_context():  # no line to hold them ([event.line] enabled = false; tests/test_line.py has the line)
        db.session.execute(db.update(Event).values(line_enabled=False))
        db.session.commit()
    left, shed_before = tickets_left(client), orders_shed(client)

    answers = [post_order(client, key=str(uuid.uuid4())) for _ in range(20)]

    assert {response.status_code for response in answers} == {503}
    assert {response.get_json()["error"]["code"] for response in answers} == {"busy"}
    retry_after = [int(response.headers["Retry-After"]) for response in answers]
    assert all(1 <= seconds <= 5 for seconds in retry_after) and len(set(retry_after)) > 1
    assert tickets_left(client) == left and order_count(app) == 0 and wire.call_count == 0
    assert orders_shed(client) == shed_before + 20


@pytest.mark.env(ORDER_SHED_LAG="off")
def test_shedding_off_admits_every_order(client, wire):
    assert post_order(client).status_code == 201


def test_the_loops_lag_is_measured_beside_the_orders_not_by_each_of_them():
    """An arriving order reads the worker's lag without a timer of its own (that cost every order one more
    turn of a busy loop); a loop held up sheds, and once it runs freely again every order is admitted."""
    from eventi_flask.orders.admission import Admission

    admission = Admission(0.02, 0.1)
    try:
        others_ran = []
        gevent.spawn(others_ran.append, True)
        assert admission.shed_share() == 0
        assert others_ran == []  # no turn of the loop was taken: the other greenlet has not run yet
        gevent.sleep(0.1)
        busy_until = time.perf_counter() + 0.5
        while time.perf_counter() < busy_until:  # the loop held up, as by a CPU-bound burst
            pass
        wait_until(lambda: admission.shed_share() > 0, timeout=2, message="a late loop sheds")
        wait_until(lambda: admission.shed_share() == 0, timeout=5, message="a free loop admits again")
    finally:
        admission.stop()
