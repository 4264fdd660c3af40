"""Issue 13: a leaked callback token must not buy tickets.

Live mode, against a PayHero stand-in (requests-mock) speaking the documented wire
format: the STK push answer, and transaction-status answers as PayHero documents them
(no amount, the receipt in provider_reference and third_party_reference).
"""
import subprocess
import sys

import gevent
import pytest
import requests
from sqlalchemy import select

from eventi_flask.extensions import db
from eventi_flask.notify.service import HUB
from eventi_flask.payhero.models import PayheroCallback
from tests.support import DEMO, ROOT, callback_body, reference_asked, wait_until

PAYHERO = "https://payhero.test"
TOKEN, PREVIOUS = "current-token-5b1e", "previous-token-77c0"
CALLBACK = f"/api/payhero/callback?token={TOKEN}"
RECEIPT = "SKQ96C7K7H"
LIVE = {"PAYHERO_MODE": "live", "PAYHERO_BASE_URL": PAYHERO, "PAYHERO_API_USERNAME": "user",
        "PAYHERO_API_PASSWORD": "secret", "PAYHERO_CHANNEL_ID": "911", "PAYHERO_CALLBACK_TOKEN": TOKEN}

pytestmark = pytest.mark.env(**LIVE, PAYHERO_CALLBACK_TOKEN_PREVIOUS=PREVIOUS, RECONCILE_AFTER="0")


class PayHeroStandIn:
    """PayHero's payments and transaction-status endpoints; `status[reference]` is what it says."""

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
    assert client.post(CALLBACK, json=forged).get_json()["status"] == "pending"
    assert payhero.asked == [order["payment"]["reference"]]
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
    assert reconcile(app) == "Reconciled: 1 checked, 1 settled, 0 still pending, 0 expired, 0 errors"
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
