"""flask --app wsgi reconcile: orders whose callback never came, settled from PayHero's
transaction-status (the sandbox's, over the wire) or expired after RECONCILE_EXPIRE_AFTER."""
import re
from datetime import timedelta

import gevent
import pytest
import requests
from sqlalchemy import update

from eventi_flask.extensions import db
from eventi_flask.notify.service import HUB
from eventi_flask.orders.models import Order, utcnow
from eventi_flask.orders.reconcile import EXPIRED_REASON
from eventi_flask.orders.state import PLAIN_REASONS
from tests.support import DEMO, reference_asked, wait_until

QUEUED_FOREVER = "0708000004"
# The sandbox's transaction-status answers once its callback would have been sent: at once.
pytestmark = pytest.mark.env(SANDBOX_CALLBACK_DELAY="0")


@pytest.fixture
def lost_callbacks(wire):
    """PayHero's callbacks never arrive: the sandbox's POSTs to our callback URL fail on the way."""
    wire.post(re.compile(r".*/api/payhero/callback"), exc=requests.exceptions.ConnectTimeout)
    return wire


def place(client, phone=DEMO["phone"], age=200, quantity=1, reference=True):
    order = client.post("/api/orders", json={**DEMO, "phone": phone, "quantity": quantity}).get_json()
    values = {"created_at": utcnow() - timedelta(seconds=age)}
    if not reference:  # as if the process died between saving the order and PayHero's answer
        values["payhero_reference"] = None
    db.session.execute(update(Order).where(Order.id == order["id"]).values(**values))
    db.session.commit()
    return order


def available(client):
    return client.get("/api/events/test-this-end-to-end").get_json()["ticket_types"][0]["available"]


def reconcile(app):
    result = app.test_cli_runner().invoke(args=["reconcile"])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_reconcile_settles_from_transaction_status_and_expires_the_forgotten(app, client, lost_callbacks):
    before = available(client)
    with app.app_context():
        paid = place(client)
        broke = place(client, "0708000002")
        cancelled = place(client, "0708000001")
        queued = place(client, QUEUED_FOREVER)
        forgotten = place(client, QUEUED_FOREVER, age=1000, quantity=2)
        unsent = place(client, QUEUED_FOREVER, age=1000, reference=False)
        late_but_paid = place(client, age=1000)
        young = place(client, age=30)
        db.session.remove()
    hub = app.extensions[HUB]
    waiting = gevent.spawn(client.get, f"/api/orders/{paid['id']}/wait", query_string={"timeout": 10})
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")

    assert reconcile(app) == "Reconciled: 6 checked, 4 settled, 1 still pending, 2 expired, 0 errors, 0 refund due"

    answered = waiting.get(timeout=5).get_json()  # woken as by a callback
    assert answered["status"] == "completed" and answered["payment"]["receipt"] and len(answered["tickets"]) == 1

    def order(o):
        return client.get(f"/api/orders/{o['id']}").get_json()

    assert order(late_but_paid)["status"] == "completed"  # PayHero's answer wins over expiry
    assert (order(broke)["status"], order(broke)["payment"]["result_code"]) == ("failed", 1)
    assert order(broke)["payment"]["result_desc"] == PLAIN_REASONS[1]
    assert (order(cancelled)["status"], order(cancelled)["payment"]["result_code"]) == ("cancelled", 1032)
    assert order(queued)["status"] == "pending" and order(young)["status"] == "pending"
    for expired in (forgotten, unsent):
        body = order(expired)
        assert body["status"] == "failed" and body["payment"]["result_desc"] == EXPIRED_REASON
        assert body["version"] == expired["version"] + 1
    # Tickets: the paid and the pending keep theirs; every failed, cancelled or expired order gave them back.
    assert available(client) == before - 4

    versions = {o["id"]: order(o)["version"] for o in (paid, broke, queued, forgotten, young)}
    assert reconcile(app) == "Reconciled: 1 checked, 0 settled, 1 still pending, 0 expired, 0 errors, 0 refund due"
    assert {o["id"]: order(o)["version"] for o in (paid, broke, queued, forgotten, young)} == versions


def test_an_unreachable_payhero_never_expires_an_order_it_may_have_charged(app, client, lost_callbacks):
    with app.app_context():
        old = place(client, age=1000)
        db.session.remove()
    lost_callbacks.get(re.compile(r".*/api/v2/transaction-status"), exc=requests.exceptions.ConnectTimeout)
    assert reconcile(app) == "Reconciled: 1 checked, 0 settled, 0 still pending, 0 expired, 1 errors, 0 refund due"
    assert client.get(f"/api/orders/{old['id']}").get_json()["status"] == "pending"


@pytest.mark.env(RECONCILE_AFTER="0", RECONCILE_EXPIRE_AFTER="60")
def test_the_ages_are_configurable(app, client, lost_callbacks):
    with app.app_context():
        fresh = place(client, age=1)
        queued = place(client, QUEUED_FOREVER, age=61)
        db.session.remove()
    assert reconcile(app) == "Reconciled: 2 checked, 1 settled, 0 still pending, 1 expired, 0 errors, 0 refund due"
    assert client.get(f"/api/orders/{fresh['id']}").get_json()["status"] == "completed"
    assert client.get(f"/api/orders/{queued['id']}").get_json()["status"] == "failed"


def test_the_procfile_runs_reconcile_on_a_clock():
    from tests.support import procfile_command

    assert procfile_command("clock") == ["flask", "--app", "wsgi", "reconcile", "--every", "60"]


def test_a_status_payhero_does_not_document_leaves_that_order_pending_and_settles_the_rest(app, client, lost_callbacks,
                                                                                           log_lines):
    with app.app_context():
        paid, failed, processing, refused = (place(client) for _ in range(4))
        db.session.remove()
    answers = {
        paid["payment"]["reference"]: (200, {"status": "SUCCESS", "provider_reference": "",
                                             "third_party_reference": "SKQ96C7K7H"}),
        failed["payment"]["reference"]: (200, {"status": "FAILED"}),
        processing["payment"]["reference"]: (200, {"status": "PROCESSING", "provider_reference": ""}),
        refused["payment"]["reference"]: (400, {"error_code": "invalid_argument",
                                                "error_message": "transaction reference not found", "status_code": 400}),
    }

    def transaction_status(request, context):
        context.status_code, answer = answers[reference_asked(request)]
        return answer

    lost_callbacks.get(re.compile(r".*/api/v2/transaction-status"), json=transaction_status)
    assert reconcile(app) == "Reconciled: 4 checked, 2 settled, 1 still pending, 0 expired, 1 errors, 0 refund due"

    def order(o):
        return client.get(f"/api/orders/{o['id']}").get_json()

    assert (order(paid)["status"], order(paid)["payment"]["receipt"]) == ("completed", "SKQ96C7K7H")
    assert order(failed)["status"] == "failed"
    # "not processed yet", as QUEUED (expired only past RECONCILE_EXPIRE_AFTER); PayHero's refusal is no verdict either
    assert order(processing)["status"] == "pending" and order(refused)["status"] == "pending"
    [line] = [line for line in log_lines if refused["id"] in line and line.startswith("Reconcile")]
    assert "invalid_argument: transaction reference not found" in line
