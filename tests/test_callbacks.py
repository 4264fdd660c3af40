"""POST /api/payhero/callback: every status code of API.md, and a payment is never lost."""
import json
import re

import pytest
import requests
from sqlalchemy import func, select

from eventi_flask import database
from eventi_flask.extensions import db
from eventi_flask.events.models import TicketType
from eventi_flask.orders.models import Ticket
from eventi_flask.payhero.models import PayheroCallback
from tests.conftest import PUBLIC, forward_to
from tests.support import DEMO, RoundTrips, buyers_holding_every_connection, callback_body, wait_until

URL = "/api/payhero/callback?token=sandbox"


@pytest.fixture
def order(client, wire):
    wire.reset_mock()
    response = client.post("/api/orders", json={**DEMO, "quantity": 2, "phone": "0708000004"})  # sandbox: no callback
    assert response.status_code == 201
    return response.get_json()


def stored(app):
    with app.app_context():
        rows = db.session.scalars(select(PayheroCallback).order_by(PayheroCallback.id)).all()
        return [(r.outcome, r.order_id, r.body) for r in rows]


def counted(outcome):
    from eventi_flask import metrics

    return metrics.registry.get_sample_value("eventi_callbacks_total", {"outcome": outcome}) or 0.0


def reserved(app):
    with app.app_context():
        return db.session.scalar(select(TicketType.reserved).where(TicketType.code == "early-bird"))


@pytest.mark.parametrize("shape", ["classic", "flat"])
def test_success_completes_the_order_and_issues_tickets(app, client, order, shape):
    response = client.post(URL, json=callback_body(order, shape=shape))
    assert response.status_code == 200
    assert response.get_json() == {"received": True, "order": order["id"], "status": "completed"}
    done = client.get(f"/api/orders/{order['id']}").get_json()
    assert done["status"] == "completed" and done["version"] == order["version"] + 1
    assert done["payment"]["receipt"] and done["payment"]["result_code"] == 0
    assert len(done["tickets"]) == 2 and len({t["code"] for t in done["tickets"]}) == 2
    assert [row[:2] for row in stored(app)] == [("applied", order["id"])]


@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
@pytest.mark.parametrize("code, status", [(0, "completed"), (1, "failed")])
def test_a_callback_is_a_locking_read_and_one_write_on_postgresql(app, client, order, code, status):
    """Under a storm one worker holds thousands of waits, and each round trip to PostgreSQL waits its turn
    of that busy event loop, holding one of the callbacks' connections: the transaction's BEGIN goes with
    the order's locking read, and its change, tickets, messages (or the tickets it gives back) and the
    stored callback go as one statement with the COMMIT.  2 round trips; it was 8 for a success (BEGIN,
    the read, UPDATE, INSERTs of tickets, messages, callback, COMMIT), 7 for a failure.  A failure gives its
    tickets back on the ticket type's row, which every arriving order updates too: committed with the
    statement, the row is not held while the worker's loop comes round."""
    trips = RoundTrips(app, database.callbacks_engine)
    try:
        response = client.post(URL, json=callback_body(order, result_code=code))
    finally:
        trips.close()
    assert response.status_code == 200 and response.get_json()["status"] == status
    assert trips.count() == 2
    assert [row[:2] for row in stored(app)] == [("applied", order["id"])]
    # The connection went back to the pool as its other users expect it: not in autocommit.
    assert {connection.autocommit for connection, _ in trips.traces} == {False}


@pytest.mark.env(DB_POOL_SIZE="2", DB_MAX_OVERFLOW="1")
def test_a_callback_is_applied_at_once_while_buyers_hold_every_pooled_connection(backend, app, client, order):
    """PayHero never resends: a callback must not wait behind buyers for a database connection (issue 24)."""
    if backend != "postgres-redis":
        pytest.skip("SQLite: one writer at a time, in turn; callbacks use the app's engine")
    import gevent

    from tests.test_missed_callbacks import held_wait

    waiting = held_wait(app, client, order)
    with buyers_holding_every_connection(app):
        paying = gevent.spawn(client.post, URL, json=callback_body(order))
        # Well before the app's pool would give up (10 s, then a 503 PayHero never resends).
        response = paying.get(timeout=5)
        assert response.status_code == 200 and response.get_json()["status"] == "completed"
        assert waiting.get(timeout=5).get_json()["status"] == "completed"  # the buyer's page learns it
    done = client.get(f"/api/orders/{order['id']}").get_json()
    assert done["status"] == "completed" and len(done["tickets"]) == 2
    assert [row[:2] for row in stored(app)] == [("applied", order["id"])]


def test_a_repeat_is_200_and_changes_nothing(app, client, order):
    body = callback_body(order)
    assert client.post(URL, json=body).status_code == 200
    first = client.get(f"/api/orders/{order['id']}").get_json()
    again = client.post(URL, json=body)
    assert again.status_code == 200 and again.get_json()["status"] == "completed"
    assert client.get(f"/api/orders/{order['id']}").get_json() == first
    with app.app_context():
        assert db.session.scalar(select(func.count(Ticket.id))) == 2
    assert [row[0] for row in stored(app)] == ["applied", "repeat"]


def test_a_late_failure_after_success_is_recorded_not_applied(app, client, order):
    client.post(URL, json=callback_body(order))
    late = client.post(URL, json=callback_body(order, result_code=1))
    assert late.status_code == 200 and late.get_json()["status"] == "completed"
    assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "completed"
    assert [row[0] for row in stored(app)] == ["applied", "ignored_final"]


@pytest.mark.parametrize("code, status", [(1032, "cancelled"), (1, "failed"), (2001, "failed"), (1037, "failed")])
def test_failures_release_the_tickets(app, client, order, code, status):
    assert reserved(app) == 2
    response = client.post(URL, json=callback_body(order, result_code=code))
    assert response.status_code == 200 and response.get_json()["status"] == status
    body = client.get(f"/api/orders/{order['id']}").get_json()
    assert body["payment"]["result_code"] == code and "tickets" not in body
    assert reserved(app) == 0


def test_amount_mismatch_is_422_and_the_order_stays_pending(app, client, order):
    response = client.post(URL, json=callback_body(order, amount=1))
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "amount_mismatch"
    assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "pending"
    assert stored(app)[0][0] == "amount_mismatch"


@pytest.mark.parametrize("url", ["/api/payhero/callback", "/api/payhero/callback?token=wrong"])
def test_missing_or_wrong_token_is_401(app, client, order, url):
    response = client.post(url, json=callback_body(order))
    assert response.status_code == 401
    assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "pending"
    assert stored(app)[0][0] == "unauthorized"


@pytest.mark.parametrize("data, content_type, status", [
    (b"{not json", "application/json", 400),
    (b'{"response": {"ResultCode": "zero"}}', "application/json", 400),
    (b"[]", "application/json", 400),
    (b"ResultCode=0", "application/x-www-form-urlencoded", 415),
])
def test_malformed_bodies_are_rejected_and_still_stored(app, client, order, data, content_type, status):
    response = client.post(URL, data=data, content_type=content_type)
    assert response.status_code == status
    assert "error" in response.get_json()
    assert stored(app) == [("invalid", None, data.decode())]


def test_unknown_reference_is_404(app, client, order):
    body = callback_body(order)
    body["response"]["ExternalReference"] = "no-such-order"
    body["response"]["CheckoutRequestID"] = "ws_CO_unknown"
    assert client.post(URL, json=body).status_code == 404
    assert stored(app)[0][0] == "unknown_order"


def test_found_by_checkout_request_id_when_the_external_reference_is_missing(client, order):
    body = callback_body(order)
    del body["response"]["ExternalReference"]
    assert client.post(URL, json=body).get_json()["status"] == "completed"


@pytest.mark.env(PAYHERO_VERIFY_CALLBACKS="1")
def test_verification_completes_only_what_payhero_confirms(app, client, order, wire):
    # The sandbox reference of this order says "never answered": transaction-status stays QUEUED.
    response = client.post(URL, json=callback_body(order))
    assert response.status_code == 200 and response.get_json()["status"] == "pending"
    assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "pending"
    assert stored(app)[0][0] == "unverified"
    assert any(r.path.endswith("/transaction-status") for r in wire.request_history)


@pytest.mark.env(PAYHERO_VERIFY_CALLBACKS="1", SANDBOX_CALLBACK_DELAY="0")
def test_verification_lets_a_confirmed_payment_complete(client, wire):
    order = client.post("/api/orders", json=DEMO).get_json()
    response = client.post(URL, json=callback_body(order))
    assert response.get_json()["status"] == "completed"


def test_a_body_over_the_limit_is_413_and_still_leaves_a_trace(app, client, order):
    response = client.post(URL, data=b'{"padding": "' + b"x" * 70_000 + b'"}', content_type="application/json")
    assert response.status_code == 413
    [(outcome, order_id, body)] = stored(app)
    assert (outcome, order_id, body) == ("too_large", None, "")


def test_a_callback_that_beats_a_lost_payhero_answer_stands(client, wire):
    """PayHero times out after the STK push went out and the customer paid: no 502, no 'nothing was charged'."""
    import requests

    def paid_then_timeout(request, context):
        order = client.get(f"/api/orders/{request.json()['external_reference']}").get_json()
        assert client.post(URL, json=callback_body(order)).status_code == 200
        raise requests.ReadTimeout("PayHero answered too late")

    wire.post("http://eventi.test/sandbox/payhero/api/v2/payments", content=paid_then_timeout)
    response = client.post("/api/orders", json=DEMO)
    assert response.status_code == 201
    assert response.get_json()["status"] == "completed" and len(response.get_json()["tickets"]) == 1


@pytest.mark.parametrize("payhero_answer", ["timeout", "accepted"])
def test_a_callback_from_another_request_during_the_payhero_call_stands(app, client, wire, payhero_answer):
    """The callback is handled by another request (its own session) while ours waits on PayHero."""
    import gevent
    import requests

    def paid_elsewhere(request, context):
        order_id = request.json()["external_reference"]

        def pay():
            other = app.test_client()
            order = other.get(f"/api/orders/{order_id}").get_json()
            return other.post(URL, json=callback_body(order)).status_code

        assert gevent.spawn(pay).get(timeout=10) == 200
        if payhero_answer == "timeout":
            raise requests.ReadTimeout("PayHero answered too late")
        context.status_code = 201
        return {"success": True, "status": "QUEUED", "reference": "REF-" + order_id, "CheckoutRequestID": "ws_CO_x"}

    wire.post("http://eventi.test/sandbox/payhero/api/v2/payments", json=paid_elsewhere)
    response = client.post("/api/orders", json=DEMO)
    assert response.status_code == 201
    created = response.get_json()
    assert created["status"] == "completed" and len(created["tickets"]) == 1
    assert client.get(f"/api/orders/{created['id']}").get_json() == created  # nothing moved it back or re-versioned it


def test_a_callback_holding_the_order_while_payhero_answers_shows_its_tickets_in_the_201(backend, app, client, wire,
                                                                                         monkeypatch):
    """The callback has the order's row locked when PayHero's answer is to be saved: the save waits, then
    answers the completed order with its tickets, as the database has them."""
    if backend != "postgres-redis":
        pytest.skip("a row lock to wait on: PostgreSQL")
    import gevent
    import gevent.event

    from eventi_flask.orders import rows

    execute_then_commit, holding = rows._execute_then_commit, gevent.event.Event()

    def hold_then_change(*args):  # the change is sent with its COMMIT: hold the row lock before both
        holding.set()
        gevent.sleep(0.5)  # the row lock held: our own request reaches it meanwhile and waits
        return execute_then_commit(*args)

    def paid_while_answering(request, context):
        order_id = request.json()["external_reference"]

        def pay():
            other = app.test_client()
            return other.post(URL, json=callback_body(other.get(f"/api/orders/{order_id}").get_json())).status_code

        gevent.spawn(pay)
        assert holding.wait(10)
        context.status_code = 201
        return {"success": True, "status": "QUEUED", "reference": "REF-" + order_id, "CheckoutRequestID": "ws_CO_x"}

    monkeypatch.setattr(rows, "_execute_then_commit", hold_then_change)
    wire.post("http://eventi.test/sandbox/payhero/api/v2/payments", json=paid_while_answering)
    response = client.post("/api/orders", json=DEMO)
    assert response.status_code == 201
    created = response.get_json()
    assert created["status"] == "completed" and len(created["tickets"]) == 1
    assert client.get(f"/api/orders/{created['id']}").get_json() == created


def test_a_callback_that_fails_midway_changes_nothing_and_is_kept(app, client, order, monkeypatch):
    """A database failure while applying: 503 so PayHero sends it again, the order untouched, the body kept."""
    from sqlalchemy.exc import OperationalError

    from eventi_flask.orders import rows

    change_order, execute_then_commit = rows.change_order, rows._execute_then_commit

    def lost_connection(*args):  # SQLite: the order's change made, the caller's commit never
        change_order(*args)
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    def lost_as_sent(connection, statement, params):  # PostgreSQL: the server gone as the change and COMMIT go
        backend_pid = connection.connection.driver_connection.info.backend_pid
        another_process(app, "SELECT pg_terminate_backend(:pid, 5000)", pid=backend_pid)  # waits for its end
        return execute_then_commit(connection, statement, params)

    monkeypatch.setattr(rows, "change_order", lost_connection)
    monkeypatch.setattr(rows, "_execute_then_commit", lost_as_sent)
    before = {outcome: counted(outcome) for outcome in ("applied", "error")}
    response = client.post(URL, json=callback_body(order))
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.get_json()["error"]["code"] == "try_again"
    assert client.get(f"/api/orders/{order['id']}").get_json() == order
    assert [row[0] for row in stored(app)] == ["error"] and '"ResultCode": 0' in stored(app)[0][2]
    # /metrics counts what was committed, not what was rolled back
    assert {outcome: counted(outcome) - n for outcome, n in before.items()} == {"applied": 0, "error": 1}
    monkeypatch.undo()
    assert client.post(URL, json=callback_body(order)).get_json()["status"] == "completed"
    assert [row[0] for row in stored(app)] == ["error", "applied"]


def test_a_bug_while_applying_still_keeps_the_body(backend, app, client, order, monkeypatch):
    from eventi_flask.orders import rows

    change_order = rows.change_order

    def bug(*args):  # SQLite: the change made, the caller's commit not yet
        change_order(*args)
        raise KeyError("code")

    def bug_before_sending(*args):  # PostgreSQL: the change goes with its COMMIT; the bug comes before both
        raise KeyError("code")

    if backend == "postgres-redis":
        monkeypatch.setattr(rows, "_execute_then_commit", bug_before_sending)
    else:
        monkeypatch.setattr(rows, "change_order", bug)
    response = client.post(URL, json=callback_body(order))
    assert response.status_code == 500 and response.get_json()["error"]["code"] == "internal_error"
    assert client.get(f"/api/orders/{order['id']}").get_json() == order
    assert [row[0] for row in stored(app)] == ["error"] and order["id"] in stored(app)[0][2]


def another_process(app, sql, **params):
    """Change the database as another worker or the reconcile clock would: its own connection, committed."""
    from sqlalchemy import create_engine, text

    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    with engine.begin() as connection:
        connection.execute(text(sql), params)
    engine.dispose()


SQLITE_ONLY = "PostgreSQL's row lock already makes a second writer wait for the first"


def test_sqlite_a_callback_never_overwrites_a_change_made_since_it_read_the_order(backend, app, client, order,
                                                                                    monkeypatch):
    """SQLite has no row locks: two processes can read `pending` at once; only the first write may land."""
    if backend != "sqlite-local":
        pytest.skip(SQLITE_ONLY)
    from eventi_flask.orders import rows

    real_find = rows.find_for_payment

    def read_then_cancelled_elsewhere(*args, **kwargs):
        row = real_find(*args, **kwargs)
        if row is not None and row["status"] == "pending":
            another_process(app, "UPDATE orders SET status = 'cancelled', version = version + 1 WHERE id = :id",
                            id=order["id"])
        return row

    monkeypatch.setattr(rows, "find_for_payment", read_then_cancelled_elsewhere)
    response = client.post(URL, json=callback_body(order, result_code=1))
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    after = client.get(f"/api/orders/{order['id']}").get_json()
    assert (after["status"], after["version"], "tickets" in after) == ("cancelled", order["version"] + 1, False)
    assert [row[:2] for row in stored(app)] == [("ignored_final", order["id"])]


def test_sqlite_expiring_an_order_never_overwrites_a_payment_made_since_it_read_it(backend, app, client, order,
                                                                                    monkeypatch):
    if backend != "sqlite-local":
        pytest.skip(SQLITE_ONLY)
    from eventi_flask.orders import service

    real_lock = service._lock_order

    def read_then_paid_elsewhere(order_id):
        locked = real_lock(order_id)
        if locked.status == "pending":
            another_process(app, "UPDATE orders SET status = 'completed', version = version + 1 WHERE id = :id",
                            id=order_id)
        return locked

    monkeypatch.setattr(service, "_lock_order", read_then_paid_elsewhere)
    with app.app_context():
        changed, body = service.fail_pending_order(order["id"], "expired")
    assert not changed and body["status"] == "completed"
    assert reserved(app) == order["quantity"]  # the paid-for tickets stay taken


@pytest.mark.env(PAYHERO_VERIFY_CALLBACKS="1")
def test_verification_stores_the_body_before_asking_payhero(app, client, order, wire):
    seen_while_asking = []

    def transaction_status(request, context):
        seen_while_asking.extend(stored(app))
        context.status_code = 503
        return b"{}"

    wire.get("http://eventi.test/sandbox/payhero/api/v2/transaction-status", content=transaction_status)
    response = client.post(URL, json=callback_body(order))
    assert response.get_json()["status"] == "pending"
    assert [row[:2] for row in seen_while_asking] == [("received", order["id"])]
    assert [row[:2] for row in stored(app)] == [("unverified", order["id"])]  # the same row, now decided


@pytest.mark.env(PAYHERO_VERIFY_CALLBACKS="1")
def test_a_late_success_for_a_failed_order_is_verified_like_any_other(app, client, order, wire):
    assert client.post(URL, json=callback_body(order, result_code=1)).get_json()["status"] == "failed"
    wire.reset_mock()
    late = client.post(URL, json=callback_body(order))  # the sandbox's status for this phone stays QUEUED
    assert late.status_code == 200 and late.get_json()["status"] == "failed"
    assert any(r.path.endswith("/transaction-status") for r in wire.request_history)
    assert client.get(f"/api/orders/{order['id']}").get_json()["payment"]["refund_due"] is False
    assert [row[0] for row in stored(app)] == ["applied", "unverified"]


def test_a_completed_order_is_not_verified_again(app, client, order, wire):
    assert client.post(URL, json=callback_body(order)).get_json()["status"] == "completed"
    app.config["PAYHERO_VERIFY_CALLBACKS"] = True
    wire.reset_mock()
    assert client.post(URL, json=callback_body(order)).get_json()["status"] == "completed"
    assert not any(r.path.endswith("/transaction-status") for r in wire.request_history)
    assert [row[0] for row in stored(app)] == ["applied", "repeat"]


def test_concurrent_failures_give_every_ticket_back(backend, app, client, wire):
    import gevent

    orders = [client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json() for _ in range(30)]
    assert reserved(app) == 30
    jobs = [gevent.spawn(client.post, URL, json=callback_body(order, result_code=1)) for order in orders]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert {job.value.status_code for job in jobs} == {200}
    assert reserved(app) == 0


def test_a_nul_character_is_400_and_the_body_is_still_stored(app, client, order):
    body = callback_body(order)
    body["response"]["ExternalReference"] = order["id"] + "\u0000"
    response = client.post(URL, json=body)
    assert response.status_code == 400
    [(outcome, _, stored_body)] = stored(app)
    assert outcome == "invalid" and "\\u0000" in stored_body
    raw = client.post(URL, data=b'{"a": "\x00"}', content_type="application/json")
    assert raw.status_code == 400 and stored(app)[1][0] == "invalid"


# PayHero's current webhook reference, verbatim but for our order's id and amount.
FLAT_SUCCESS = {"success": True, "status": "success", "message": "The service request is processed successfully.",
                "reference": "UFD004453187.iI", "external_reference": "test_ext", "amount": 1, "currency": "KES",
                "transaction_id": "", "transaction_date": "2026-06-30T00:44:53Z", "transaction_type": "inbound_payment",
                "provider_reference": "UFU51A2XO2", "provider": "mpesa_dc", "callback_urls": None}
FLAT_CANCELLED = {"success": False, "status": "failed", "message": "Request Cancelled by user.",
                  "reference": "UFD00452113.iI", "external_reference": "test_ext", "amount": 1, "currency": "KES",
                  "transaction_id": "", "transaction_date": "2026-06-30T00:45:21Z", "transaction_type": "inbound_payment",
                  "provider_reference": "", "provider": "mpesa_dc", "callback_urls": None}
# A failure as the reference's short example has it: no amount, no currency.
FLAT_INSUFFICIENT = {"success": False, "status": "failed", "message": "The balance is insufficient for the transaction.",
                     "reference": "UFD00452114.iI", "external_reference": "test_ext",
                     "transaction_type": "inbound_payment", "provider": "mpesa_dc"}


@pytest.mark.parametrize("reference_body, status, code", [
    (FLAT_SUCCESS, "completed", 0), (FLAT_CANCELLED, "cancelled", 1032), (FLAT_INSUFFICIENT, "failed", 1),
])
def test_flat_callbacks_as_payhero_sends_them(app, client, order, reference_body, status, code):
    from eventi_flask.orders.state import PLAIN_REASONS

    body = {**reference_body, "external_reference": order["id"]}
    if "amount" in body:
        body["amount"] = order["amount"]
    response = client.post(URL, json=body)
    assert response.status_code == 200 and response.get_json()["status"] == status
    payment = client.get(f"/api/orders/{order['id']}").get_json()["payment"]
    assert (payment["result_code"], payment["result_desc"]) == (code, body["message"])  # PayHero's words kept
    assert payment["receipt"] == (body["provider_reference"] if status == "completed" else None)
    page = client.get(f"/orders/{order['id']}").get_data(as_text=True)
    if status != "completed":
        assert PLAIN_REASONS[code] in page  # the plain reason, not PayHero's wording
    [(outcome, order_id, kept)] = stored(app)
    assert (outcome, order_id, json.loads(kept)) == ("applied", order["id"], body)


def test_a_flat_failure_with_a_message_we_do_not_know_fails_with_payhero_s_words(client, order):
    body = {**FLAT_CANCELLED, "external_reference": order["id"], "message": "System busy. Try again later."}
    assert client.post(URL, json=body).get_json()["status"] == "failed"
    payment = client.get(f"/api/orders/{order['id']}").get_json()["payment"]
    assert (payment["result_code"], payment["result_desc"]) == (None, "System busy. Try again later.")


@pytest.mark.env(SANDBOX_CALLBACK_SHAPE="flat")
@pytest.mark.parametrize("phone, status, code", [
    (DEMO["phone"], "completed", 0), ("0708000001", "cancelled", 1032), ("0708000002", "failed", 1),
    ("0708000003", "failed", 2001), ("0708000005", "failed", 1037),
])
def test_the_sandbox_sends_flat_callbacks_end_to_end(app, client, wire, phone, status, code):
    order = client.post("/api/orders", json={**DEMO, "phone": phone}).get_json()
    done = client.get(f"/api/orders/{order['id']}/wait", query_string={"since": order["version"], "timeout": 10})
    payment = done.get_json()["payment"]
    assert (done.get_json()["status"], payment["result_code"]) == (status, code)
    [(outcome, _, body)] = stored(app)
    sent = json.loads(body)
    assert outcome == "applied" and "response" not in sent and "result_code" not in sent
    assert set(FLAT_SUCCESS) <= set(sent) and sent["provider"] == "mpesa_dc" and sent["callback_urls"] is None
    assert payment["result_desc"] == sent["message"]


# -- the sandbox sends as a careful sender does -----------------------------------------------------

CALLBACK_ROUTE = re.compile("^" + re.escape(PUBLIC) + "/api/payhero/callback")


def test_a_sandbox_callback_whose_first_attempt_is_reset_is_delivered_on_the_next(app, client, wire, log_lines):
    reset = requests.ConnectionError(ConnectionResetError(104, "Connection reset by peer"))
    wire.register_uri("POST", CALLBACK_ROUTE, [{"exc": reset}, {"content": forward_to(app)}])
    order = client.post("/api/orders", json=DEMO).get_json()  # any other phone: the sandbox says paid
    wait_until(lambda: client.get(f"/api/orders/{order['id']}").get_json()["status"] == "completed", 5,
               message="the callback's second attempt")
    failed = [line for line in log_lines if "Sandbox PayHero callback for" in line and "failed" in line]
    assert len(failed) == 1 and order["id"] in failed[0] and "(attempt 1)" in failed[0]
    assert "Connection reset by peer" in failed[0]
    assert sum(f"Sandbox PayHero callback for {order['id']} answered 200" in line for line in log_lines) == 1


@pytest.mark.env(SANDBOX_CALLBACK_RETRY_FOR="3")  # room for 2 pauses: at most 0.75 s, then 1.5 s
def test_a_sandbox_callback_refused_with_5xx_is_sent_again_then_given_up_naming_its_order(client, wire, log_lines):
    wire.register_uri("POST", CALLBACK_ROUTE, status_code=503, json={"error": {"code": "try_again"}})
    order = client.post("/api/orders", json=DEMO).get_json()
    wait_until(lambda: any("gave up" in line for line in log_lines), 8, message="the sandbox to give up")
    attempts = [line for line in log_lines if f"Sandbox PayHero callback for {order['id']} failed" in line]
    assert len(attempts) >= 2 and all("answered 503" in line for line in attempts)
    gave_up = [line for line in log_lines if "gave up" in line]
    assert gave_up == [f"Sandbox PayHero gave up on the callback for {order['id']} after {len(attempts) + 1} "
                       f"attempts in {gave_up[0].split(' in ')[1]}"]
    assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "pending"
