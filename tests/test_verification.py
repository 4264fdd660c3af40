"""Issue 13: a leaked callback token must not buy tickets; and a payment PayHero confirms
late is still the customer's within seconds (re-verification), never unconfirmed.

Live mode, against a PayHero stand-in (requests-mock) speaking the documented wire
format: the STK push answer, and transaction-status answers as PayHero documents them
(no amount, the receipt in provider_reference and third_party_reference).
"""
import subprocess
import sys

import gevent
import gevent.event
import pytest
import requests
from sqlalchemy import func, select

import config
from eventi_flask import create_app
from eventi_flask.extensions import db
from eventi_flask.notify.service import HUB
from eventi_flask.orders import service as orders
from eventi_flask.orders.models import Ticket
from eventi_flask.payhero import verify
from eventi_flask.payhero.models import PayheroCallback
from tests.conftest import shut_down
from tests.support import DEMO, ROOT, callback_body, reference_asked, wait_until

PAYHERO = "https://payhero.test"
TOKEN, PREVIOUS = "current-token-5b1e", "previous-token-77c0"
CALLBACK = f"/api/payhero/callback?token={TOKEN}"
RECEIPT = "SKQ96C7K7H"
LIVE = {"PAYHERO_MODE": "live", "SECRET_KEY": "s", "PAYHERO_BASE_URL": PAYHERO, "PAYHERO_API_USERNAME": "user",
        "PAYHERO_API_PASSWORD": "secret", "PAYHERO_CHANNEL_ID": "911", "PAYHERO_CALLBACK_TOKEN": TOKEN}

# The callback alone, and reconcile as the backstop: re-verification's own tests turn it on.
pytestmark = pytest.mark.env(**LIVE, PAYHERO_CALLBACK_TOKEN_PREVIOUS=PREVIOUS, RECONCILE_AFTER="0",
                             PAYHERO_REVERIFY_AFTER="off")


class PayHeroStandIn:
    """PayHero's payments and transaction-status endpoints; `status[reference]` is what it says
    (a status, a whole answer, an exception to raise, or a function giving one of those per ask)."""

    def __init__(self, mocker):
        self.payments, self.status, self.asked = [], {}, []
        mocker.post(f"{PAYHERO}/api/v2/payments", json=self._payment, status_code=201)
        mocker.get(f"{PAYHERO}/api/v2/transaction-status", json=self._transaction_status)

    def _payment(self, request, context):
        self.payments.append(request.json())
        reference = f"f0e1d2c3-{len(self.payments):04d}"
        self.status[reference] = "QUEUED"
        return {"success": True, "status": "QUEUED", "reference": reference,
                "CheckoutRequestID": f"ws_CO_2611202614{len(self.payments):04d}"}

    def _transaction_status(self, request, context):
        reference = reference_asked(request)
        self.asked.append(reference)
        answer = self.status.get(reference)
        if callable(answer):
            answer = answer()
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, dict):
            return answer
        paid = answer == "SUCCESS"
        return {"transaction_date": "2026-11-26T08:41:14.160604Z", "provider": "m-pesa", "success": paid,
                "merchant": "Eventi", "payment_reference": "", "third_party_reference": RECEIPT if paid else "",
                "status": answer, "reference": reference, "CheckoutRequestID": "",
                "provider_reference": RECEIPT if paid else ""}


@pytest.fixture
def payhero(wire):
    return PayHeroStandIn(wire)


@pytest.fixture
def order(client, payhero):
    response = client.post("/api/orders", json={**DEMO, "quantity": 2})
    assert response.status_code == 201
    return response.get_json()


def current(client, order):
    return client.get(f"/api/orders/{order['id']}").get_json()


def stored(app):
    with app.app_context():
        return [(r.outcome, r.detail) for r in db.session.scalars(select(PayheroCallback).order_by(PayheroCallback.id))]


def reconcile(app):
    result = app.test_cli_runner().invoke(args=["reconcile"])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_a_success_completes_only_once_payhero_says_success(app, client, payhero, order):
    # The forger's receipt, and a reference of a real payment elsewhere: neither is what gets checked.
    forged = callback_body(order)
    forged["response"]["MpesaReceiptNumber"] = "FORGED0001"
    response = client.post(CALLBACK, json=forged)
    assert response.status_code == 200
    assert response.get_json() == {"received": True, "order": order["id"], "status": "pending"}
    assert current(client, order) == order  # not completed, not even re-versioned
    assert payhero.asked == [order["payment"]["reference"]]  # the order's own reference
    [(outcome, detail)] = stored(app)
    assert outcome == "unverified" and "QUEUED" in detail

    hub = app.extensions[HUB]
    waiting = gevent.spawn(client.get, f"/api/orders/{order['id']}/wait",
                           query_string={"since": order["version"], "timeout": 10})
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
    payhero.status[order["payment"]["reference"]] = "SUCCESS"
    assert client.post(CALLBACK, json=forged).get_json()["status"] == "completed"
    done = waiting.get(timeout=10).get_json()  # the held wait learns it like any other change
    assert done["status"] == "completed" and len(done["tickets"]) == 2
    assert done["payment"]["receipt"] == RECEIPT  # PayHero's, not the callback's
    assert [outcome for outcome, _ in stored(app)] == ["unverified", "applied"]


def test_a_flat_callback_naming_another_paid_reference_is_checked_against_the_orders_own(app, client, payhero, order):
    paid_elsewhere = client.post("/api/orders", json=DEMO).get_json()
    payhero.status[paid_elsewhere["payment"]["reference"]] = "SUCCESS"
    forged = callback_body(order, shape="flat")
    forged["reference"] = paid_elsewhere["payment"]["reference"]
    refused = client.post(CALLBACK, json=forged)  # another order's payment: refused, PayHero not asked
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "payment_reused"
    assert payhero.asked == []
    assert current(client, order)["status"] == "pending"


def test_another_amount_in_payhero_s_answer_is_recorded_and_changes_nothing(app, client, payhero, order):
    reference = order["payment"]["reference"]
    payhero.status[reference] = {"status": "SUCCESS", "reference": reference, "amount": 1,
                                 "provider_reference": RECEIPT, "third_party_reference": RECEIPT}
    response = client.post(CALLBACK, json=callback_body(order))
    assert response.status_code == 200 and response.get_json()["status"] == "pending"
    assert current(client, order) == order
    [(outcome, detail)] = stored(app)
    assert outcome == "unverified" and "KES 1" in detail and f"KES {order['amount']}" in detail


def test_unreachable_payhero_stores_the_callback_and_reconcile_completes_it(app, client, payhero, order, log_lines):
    payhero.status[order["payment"]["reference"]] = requests.exceptions.ConnectTimeout("connect timed out")
    response = client.post(CALLBACK, json=callback_body(order))
    assert response.status_code == 200 and response.get_json()["status"] == "pending"
    assert current(client, order) == order
    [(outcome, detail)] = stored(app)
    assert outcome == "unverified" and "could not ask PayHero" in detail and "connect timed out" in detail
    assert any(f"Payment for order {order['id']} not completed" in line for line in log_lines)

    payhero.status[order["payment"]["reference"]] = "SUCCESS"
    assert reconcile(app) == "Reconciled: 1 checked, 1 settled, 0 still pending, 0 expired, 0 errors, 0 refund due"
    done = current(client, order)
    assert done["status"] == "completed" and done["payment"]["receipt"] == RECEIPT and len(done["tickets"]) == 2


@pytest.mark.parametrize("code, status", [(1032, "cancelled"), (1, "failed")])
def test_failures_need_no_verification(client, payhero, order, code, status):
    response = client.post(CALLBACK, json=callback_body(order, result_code=code))
    assert response.status_code == 200 and current(client, order)["status"] == status
    assert payhero.asked == []


def test_the_previous_token_still_lands_and_an_unknown_one_is_refused(app, client, payhero, order):
    # New payments carry only the current token.
    [payment] = payhero.payments
    assert payment["callback_url"] == f"http://eventi.test/api/payhero/callback?token={TOKEN}"
    assert PREVIOUS not in payment["callback_url"]

    unknown = client.post("/api/payhero/callback?token=leaked-long-ago", json=callback_body(order))
    assert unknown.status_code == 401 and current(client, order)["status"] == "pending"

    payhero.status[order["payment"]["reference"]] = "SUCCESS"
    started_before_rotation = client.post(f"/api/payhero/callback?token={PREVIOUS}", json=callback_body(order))
    assert started_before_rotation.status_code == 200 and current(client, order)["status"] == "completed"
    assert [outcome for outcome, _ in stored(app)] == ["unauthorized", "applied"]


def start_up_lines(**env):
    """What `flask --app wsgi routes` (the app's start-up, no database needed) writes to stderr."""
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "routes"], cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", **LIVE, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stderr.splitlines() if "WARNING" in line]


def test_turning_verification_off_in_live_mode_warns_at_start_up():
    [warning] = start_up_lines(PAYHERO_VERIFY_CALLBACKS="0")
    assert "PAYHERO_VERIFY_CALLBACKS is off in live mode" in warning and "without paying" in warning
    assert start_up_lines() == []  # on by default in live mode: nothing to warn about


# Re-verification: the worker that stored an unconfirmed success asks PayHero again shortly.
REVERIFY_FAST = {"PAYHERO_REVERIFY_AFTER": "0.05,0.1,0.2,0.4"}


def answers(*said):
    """PayHero saying each of `said` in turn, then the last one for good."""
    said = list(said)
    return lambda: said.pop(0) if len(said) > 1 else said[0]


def hold_wait(app, client, order):
    hub = app.extensions[HUB]
    held = hub.waiter_count
    waiting = gevent.spawn(client.get, f"/api/orders/{order['id']}/wait",
                           query_string={"since": order["version"], "timeout": 30})
    wait_until(lambda: hub.waiter_count == held + 1, message="the wait to be held")
    return waiting


def available(client):
    return {t["id"]: t["available"] for t in client.get(f"/api/events/{DEMO['event']}").get_json()["ticket_types"]}


def shown(app, order, *words):
    """The line of `flask orders show` (the on-call view of the order's history) holding all `words`."""
    result = app.test_cli_runner().invoke(args=["orders", "show", order["id"]])
    assert result.exit_code == 0, result.output
    found = [line for line in result.output.splitlines() if all(word in line for word in words)]
    assert len(found) == 1, f"{words} in one line of:\n{result.output}"
    return found[0]


def order_lines(log_lines, order):
    return [line for line in log_lines if order["id"] in line and line.startswith("Payment for order")]


@pytest.mark.env(**REVERIFY_FAST)
def test_a_payment_payhero_confirms_late_reaches_the_held_wait_without_reconcile(app, client, payhero, order,
                                                                                 log_lines):
    reference = order["payment"]["reference"]
    payhero.status[reference] = answers("QUEUED", "QUEUED", "SUCCESS")  # PayHero's status lags its callback
    waiting = hold_wait(app, client, order)
    response = client.post(CALLBACK, json=callback_body(order))
    assert response.status_code == 200 and response.get_json()["status"] == "pending"

    done = waiting.get(timeout=10).get_json()  # the customer learns it, with nobody running reconcile
    assert done["status"] == "completed" and len(done["tickets"]) == 2 and done["payment"]["receipt"] == RECEIPT
    assert payhero.asked == [reference] * 3  # once with the callback, then until PayHero said SUCCESS
    assert [outcome for outcome, _ in stored(app)] == ["unverified"]  # the callback as it was decided
    not_yet, settled = order_lines(log_lines, order)  # one line per outcome, none per ask
    assert "not completed" in not_yet and "QUEUED" in not_yet
    assert "settled as completed from PayHero's transaction status" in settled
    shown(app, order, "re-verify (+", "transaction-status SUCCESS -> settled: completed")


@pytest.mark.env(**REVERIFY_FAST)
def test_a_callback_that_beats_our_stk_push_answer_is_verified_once_the_reference_is_saved(app, client, payhero,
                                                                                          wire):
    def callback_first(request, context):
        # PayHero calls back before its answer to our STK push, with the reference, is saved.
        body = payhero._payment(request, context)
        payhero.status[body["reference"]] = "SUCCESS"
        ahead = {"id": request.json()["external_reference"], "amount": request.json()["amount"],
                 "payment": {"reference": None, "checkout_request_id": body["CheckoutRequestID"]}}
        early = client.post(CALLBACK, json=callback_body(ahead))
        assert early.status_code == 200 and early.get_json()["status"] == "pending"
        return body

    wire.post(f"{PAYHERO}/api/v2/payments", json=callback_first, status_code=201)
    order = client.post("/api/orders", json=DEMO).get_json()
    wait_until(lambda: current(client, order)["status"] == "completed", message="the order to complete")
    assert payhero.asked == [order["payment"]["reference"]]  # never before there was a reference to ask with
    [(outcome, detail)] = stored(app)
    assert outcome == "unverified" and "no PayHero reference yet" in detail


@pytest.mark.env(PAYHERO_VERIFY_TIMEOUT="0.5", **REVERIFY_FAST)
def test_a_slow_payhero_does_not_hold_the_callback(app, client, payhero, order, wire):
    def slow_then_paid():
        if len(payhero.asked) == 1:
            gevent.sleep(60)  # no answer for a minute; the verification timeout cuts it short
        return "SUCCESS"

    payhero.status[order["payment"]["reference"]] = slow_then_paid
    with gevent.Timeout(10):  # a deadline for the test, well under PAYHERO_READ_TIMEOUT's 20 s
        response = client.post(CALLBACK, json=callback_body(order))
    assert response.status_code == 200 and response.get_json()["status"] == "pending"
    [(outcome, detail)] = stored(app)
    assert outcome == "unverified" and "did not answer in time" in detail
    asked = [r for r in wire.request_history if r.path.endswith("/transaction-status")]
    assert asked[0].timeout == (0.5, 0.5)  # the verification's own timeout, not the STK push's
    wait_until(lambda: current(client, order)["status"] == "completed", message="re-verification to complete it")


@pytest.mark.env(**REVERIFY_FAST)
def test_payhero_unreachable_at_every_ask_leaves_the_order_to_reconcile(app, client, payhero, order, log_lines):
    reference = order["payment"]["reference"]
    payhero.status[reference] = requests.exceptions.ConnectionError("connection refused")
    assert client.post(CALLBACK, json=callback_body(order)).get_json()["status"] == "pending"
    gave_up = wait_until(lambda: [line for line in order_lines(log_lines, order) if "reconcile will" in line],
                         message="re-verification to give up")
    assert "not confirmed by PayHero in 0.4s" in gave_up[0] and "connection refused" in gave_up[0]
    assert payhero.asked == [reference] * 5  # the callback's ask and four more, then no more
    assert len(order_lines(log_lines, order)) == 2  # the callback's line, and the one giving up
    assert current(client, order) == order  # nothing completed unverified, nor failed
    shown(app, order, "re-verify (+0.4s)", "could not ask PayHero", "connection refused", "-> left to reconcile")

    payhero.status[reference] = "SUCCESS"
    assert reconcile(app) == "Reconciled: 1 checked, 1 settled, 0 still pending, 0 expired, 0 errors, 0 refund due"
    assert current(client, order)["status"] == "completed"


@pytest.mark.env(**REVERIFY_FAST)
@pytest.mark.parametrize("said", [("FAILED",), ("QUEUED", "FAILED")], ids=["at-once", "later"])
def test_a_success_payhero_says_failed_fails_the_order_as_reconcile_would(app, client, payhero, order, log_lines,
                                                                        said):
    before = available(client)
    payhero.status[order["payment"]["reference"]] = answers(*said)
    waiting = hold_wait(app, client, order)
    assert client.post(CALLBACK, json=callback_body(order)).get_json()["status"] == "pending"
    done = waiting.get(timeout=10).get_json()
    assert done["status"] == "failed" and "tickets" not in done and done["payment"]["receipt"] is None
    assert available(client)[DEMO["ticket_type"]] == before[DEMO["ticket_type"]] + 2  # back on sale
    assert [outcome for outcome, _ in stored(app)] == ["unverified"]
    assert "settled as failed" in order_lines(log_lines, order)[-1]


@pytest.fixture
def other_worker(settings, app):
    """A second worker process (or instance) of the same deployment: same database, same Redis."""
    worker = create_app(config.TestConfig(settings))
    yield worker
    shut_down(worker)


# Several processes on one database: PostgreSQL's (SQLite serves one worker process).
@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
@pytest.mark.env(**REVERIFY_FAST)
def test_workers_re_verifying_one_order_at_once_complete_it_once(app, other_worker, client, payhero, order,
                                                                 log_lines, monkeypatch):
    """PayHero sends its callback again, to another worker: both ask again, and both hear SUCCESS."""
    together, applying = gevent.event.Event(), []
    apply_payment_outcome = orders.apply_payment_outcome

    def both_at_once(*args, **kwargs):
        # Both found the order pending and heard SUCCESS: now both apply it, under the row lock.
        applying.append(args)
        if len(applying) == 2:
            together.set()
        together.wait(10)
        return apply_payment_outcome(*args, **kwargs)

    monkeypatch.setattr(orders, "apply_payment_outcome", both_at_once)
    # QUEUED until both callbacks are in: the first worker's re-verification may start before the second
    # callback is sent (0.05 s on a busy machine), and must not make that callback's own ask the SUCCESS.
    both_received = gevent.event.Event()
    payhero.status[order["payment"]["reference"]] = lambda: "SUCCESS" if both_received.is_set() else "QUEUED"
    waiting = hold_wait(app, client, order)
    for worker in (app, other_worker):
        response = worker.test_client().post(CALLBACK, json=callback_body(order))
        assert response.status_code == 200 and response.get_json()["status"] == "pending"
    both_received.set()
    assert waiting.get(timeout=10).get_json()["status"] == "completed"
    running = [worker.extensions[verify.EXTENSION] for worker in (app, other_worker)]
    wait_until(lambda: not any(running), message="both re-verifications to finish")
    assert len(applying) == 2
    done = current(client, order)
    assert done["version"] == order["version"] + 1 and len(done["tickets"]) == 2  # changed once
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Ticket)) == 2
    assert log_lines.count("Order status updated: completed") == 1
    assert len([line for line in order_lines(log_lines, order) if "settled as completed" in line]) == 1
