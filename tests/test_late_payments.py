"""Issue 17: every shilling accounted for.

A success after its order failed completes it while its tickets can be held, or
leaves a refund that someone sees (log, metric, `orders unsettled`, the status
page, reconcile's summary) until it is settled; an STK push PayHero does not
answer in time leaves the order pending for its callback; one payment never
completes two orders; M-Pesa's own refusals say what to do.  The sandbox runs
in-process over the `wire`; live mode talks to a PayHero stand-in (requests-mock).
"""
import json
from datetime import timedelta

import pytest
import requests
from sqlalchemy import select, update

from eventi_flask import metrics
from eventi_flask.extensions import db
from eventi_flask.events.models import TicketType
from eventi_flask.orders.models import Order, utcnow
from eventi_flask.orders.reconcile import EXPIRED_REASON
from eventi_flask.orders.state import PLAIN_REASONS
from eventi_flask.payhero.models import PayheroCallback
from tests.conftest import PUBLIC
from tests.support import DEMO, callback_body, wait_until
from tests.test_verification import CALLBACK as LIVE_CALLBACK
from tests.test_verification import LIVE, PAYHERO, PayHeroStandIn

URL = "/api/payhero/callback?token=sandbox"
LATE_RECEIPT = "SLATE00001"


def current(client, order):
    return client.get(f"/api/orders/{order['id']}").get_json()


def settled(client, order):
    """The order once the sandbox's own callback has settled it."""
    return wait_until(lambda: (body := current(client, order))["status"] != "pending" and body,
                      message="the sandbox's callback")


def late_success(order, receipt=LATE_RECEIPT, **kwargs):
    body = callback_body(order, **kwargs)
    body["response"]["MpesaReceiptNumber"] = receipt
    return body


def ticket_type(app):
    with app.app_context():
        return db.session.scalar(select(TicketType).where(TicketType.code == "early-bird"))


def set_capacity(app, capacity):
    with app.app_context():
        db.session.execute(update(TicketType).where(TicketType.code == "early-bird").values(capacity=capacity))
        db.session.commit()


def refunds_counted():
    return metrics.registry.get_sample_value("eventi_payments_refund_due_total") or 0.0


def outcomes(app):
    with app.app_context():
        return [row.outcome for row in db.session.scalars(select(PayheroCallback).order_by(PayheroCallback.id))]


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()
    return lambda *args: runner.invoke(args=list(args))


def test_a_success_after_an_unreachable_phone_completes_the_order(app, client, wire, hub):
    order = client.post("/api/orders", json={**DEMO, "phone": "0708000005"}).get_json()  # sandbox: 1037
    failed = settled(client, order)
    assert (failed["status"], failed["payment"]["result_code"]) == ("failed", 1037)
    assert ticket_type(app).reserved == 0  # given back when it failed

    response = client.post(URL, json=late_success(failed))
    assert response.status_code == 200 and response.get_json()["status"] == "completed"
    done = current(client, order)
    assert done["status"] == "completed" and done["version"] == failed["version"] + 1
    assert done["payment"]["receipt"] == LATE_RECEIPT and not done["payment"]["refund_due"]
    assert len(done["tickets"]) == 1
    assert ticket_type(app).reserved == 1  # held again
    assert outcomes(app)[-1] == "applied"
    # Published like any change: what a held wait (or the cache a new one reads first) is told.
    assert wait_until(lambda: (hub.latest(order["id"]) or {}).get("order") == done, message="the new version published")


def test_two_late_successes_for_the_last_tickets_complete_one_order_and_owe_the_other(app, client, wire):
    import gevent

    set_capacity(app, 2)
    first, second = (settled(client, client.post("/api/orders", json={**DEMO, "phone": "0708000005"}).get_json())
                     for _ in range(2))
    client.post("/api/orders", json={**DEMO, "phone": "0708000004"})  # one of the two tickets taken meanwhile

    def pay(order, receipt):
        return app.test_client().post(URL, json=late_success(order, receipt=receipt)).status_code

    paying = [gevent.spawn(pay, order, f"SRACE0000{n}") for n, order in enumerate((first, second))]
    assert [greenlet.get(timeout=20) for greenlet in paying] == [200, 200]
    ended = sorted((current(client, order)["status"], current(client, order)["payment"]["refund_due"])
                   for order in (first, second))
    assert ended == [("completed", False), ("failed", True)]
    assert ticket_type(app).reserved == 2  # never oversold


def test_a_success_with_no_ticket_left_is_a_refund_someone_sees_until_it_is_settled(app, client, wire, cli, log_lines):
    set_capacity(app, 1)
    order = client.post("/api/orders", json={**DEMO, "phone": "0708000005"}).get_json()
    failed = settled(client, order)
    assert failed["status"] == "failed"
    last = client.post("/api/orders", json={**DEMO, "phone": "0708000004"})  # another buyer takes the last ticket
    assert last.status_code == 201
    counted = refunds_counted()

    response = client.post(URL, json=late_success(failed))
    assert response.status_code == 200 and response.get_json()["status"] == "failed"
    owed = current(client, order)
    assert (owed["status"], owed["payment"]["refund_due"], owed["payment"]["receipt"]) == ("failed", True, LATE_RECEIPT)
    assert owed["version"] == failed["version"] + 1 and "tickets" not in owed
    assert ticket_type(app).reserved == 1  # never oversold
    assert refunds_counted() == counted + 1
    [warning] = [line for line in log_lines if line.startswith("Refund due")]
    assert order["id"] in warning and LATE_RECEIPT in warning
    # The same success again changes nothing and counts nothing.
    assert client.post(URL, json=late_success(failed)).status_code == 200
    assert current(client, order) == owed and refunds_counted() == counted + 1
    assert outcomes(app)[-2:] == ["refund_due", "repeat"]

    page = client.get(f"/orders/{order['id']}").get_data(as_text=True)
    assert "Payment received: refund due" in page and LATE_RECEIPT in page and "will be refunded" in page

    listed = cli("orders", "unsettled")
    assert listed.exit_code == 0 and order["id"] in listed.output and LATE_RECEIPT in listed.output
    assert "KES 300" in listed.output
    [entry] = json.loads(cli("orders", "unsettled", "--json").output)
    assert (entry["id"], entry["receipt"], entry["amount"]) == (order["id"], LATE_RECEIPT, 300)
    reconciled = cli("reconcile")
    assert reconciled.exit_code == 0 and "1 refund due" in reconciled.output

    settle = cli("orders", "settle", order["id"], "--refund-reference", "RFD7Q2X9K1")
    assert settle.exit_code == 0 and "RFD7Q2X9K1" in settle.output, settle.output
    assert cli("orders", "unsettled").output.strip() == "No order is owed a refund."
    assert "0 refund due" in cli("reconcile").output
    shown = cli("orders", "show", order["id"]).output
    assert "refund due" in shown and "refunded for receipt SLATE00001: reference RFD7Q2X9K1" in shown
    assert cli("orders", "settle", order["id"], "--refund-reference", "RFD7Q2X9K1").exit_code == 0  # the same: a no-op
    again = cli("orders", "settle", order["id"], "--refund-reference", "OTHER")
    assert again.exit_code != 0 and len(again.output.strip().splitlines()) == 1
    assert "already refunded, as RFD7Q2X9K1" in again.output


@pytest.mark.parametrize("args, problem", [
    (["no-such-order", "--refund-reference", "R1"], "No order"),
    (["{completed}", "--refund-reference", "R1"], "owed no refund"),
    (["{completed}", "--refund-reference", "'; drop"], "A refund reference is"),
])
def test_settling_what_is_not_owed_is_one_line_and_a_non_zero_exit(app, client, wire, cli, args, problem):
    completed = settled(client, client.post("/api/orders", json=DEMO).get_json())
    result = cli("orders", "settle", *[arg.format(completed=completed["id"]) for arg in args])
    assert result.exit_code != 0 and problem in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_one_payment_never_completes_two_orders(app, client, wire):
    paid = settled(client, client.post("/api/orders", json=DEMO).get_json())
    other = client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json()  # never answered
    failed = settled(client, client.post("/api/orders", json={**DEMO, "phone": "0708000002"}).get_json())
    for victim in (other, failed):
        response = client.post(URL, json=late_success(victim, receipt=paid["payment"]["receipt"]))
        assert response.status_code == 409 and response.get_json()["error"]["code"] == "payment_reused"
        assert current(client, victim) == victim
    assert outcomes(app)[-2:] == ["payment_reused", "payment_reused"]


# -- M-Pesa's rules --

def test_a_failure_naming_another_orders_receipt_fails_its_order_and_takes_not_the_receipt(app, client, wire):
    """M-Pesa's failures carry no receipt; one that names another order's (malformed, or replayed) still fails
    its own order, answered 200 (not 503 from the receipt's unique index), and the receipt stays with the payer."""
    paid = settled(client, client.post("/api/orders", json=DEMO).get_json())
    pending = client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json()  # never answered
    response = client.post(URL, json=late_success(pending, receipt=paid["payment"]["receipt"], result_code=1))
    assert response.status_code == 200 and response.get_json()["status"] == "failed"
    assert current(client, pending)["payment"]["receipt"] is None
    assert current(client, paid) == paid

def test_a_prompt_already_open_on_the_phone_is_409_payment_in_progress(app, client, wire):
    wire.post(f"{PUBLIC}/sandbox/payhero/api/v2/payments", status_code=400, json={
        "error_code": "invalid_argument", "status_code": 400,
        "error_message": "Unable to lock subscriber, a transaction is already in process for the current subscriber"})
    response = client.post("/api/orders", json=DEMO)
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "payment_in_progress"
    assert "Answer or cancel the M-Pesa prompt on your phone first, then try again in a minute." in error["message"]
    order = client.get(f"/api/orders/{response.headers['X-Order-Id']}").get_json()
    assert (order["status"], order["payment"]["result_code"]) == ("failed", 1001)
    assert ticket_type(app).reserved == 0


@pytest.mark.parametrize("error_message, status, code, result_code", [
    ("Rule limited.", 502, "payment_refused", 17),
    ("The transaction is not permitted", 502, "payment_refused", 2028),
    ("Insufficient float", 502, "payhero_unavailable", None),  # the merchant's, not the customer's balance
])
def test_other_refusals_of_the_prompt_say_m_pesa_s_rule_when_it_names_one(client, wire, error_message, status, code,
                                                                           result_code):
    wire.post(f"{PUBLIC}/sandbox/payhero/api/v2/payments", status_code=400,
              json={"error_code": "invalid_argument", "status_code": 400, "error_message": error_message})
    response = client.post("/api/orders", json=DEMO)
    assert (response.status_code, response.get_json()["error"]["code"]) == (status, code)
    order = client.get(f"/api/orders/{response.headers['X-Order-Id']}").get_json()
    assert (order["status"], order["payment"]["result_code"]) == ("failed", result_code)
    if result_code is not None:
        assert response.get_json()["error"]["message"] == PLAIN_REASONS[result_code]


@pytest.mark.parametrize("code, words", [
    (17, "Please wait 2 minutes, then try again."), (1025, "could not send the payment prompt"),
    (9999, "could not send the payment prompt"), (2028, "does not permit this payment"),
    (1001, "Answer or cancel the M-Pesa prompt on your phone first"),
])
def test_m_pesa_rules_are_a_plain_sentence_on_the_status_page_and_on_the_checkout_again(client, wire, code, words):
    order = client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json()
    assert client.post(URL, json=callback_body(order, result_code=code)).get_json()["status"] == "failed"
    page = client.get(f"/orders/{order['id']}").get_data(as_text=True)
    assert PLAIN_REASONS[code] in page and words in PLAIN_REASONS[code]
    assert f"after={code}" in page  # "Try again" carries the rule to the checkout
    checkout = client.get(f"/events/{DEMO['event']}/checkout?ticket_type=early-bird&quantity=1&after={code}")
    assert f"Your last payment did not go through. {PLAIN_REASONS[code]}" in checkout.get_data(as_text=True)
    assert "did not go through" not in client.get(f"/events/{DEMO['event']}/checkout?after=1").get_data(as_text=True)


# -- live mode: PayHero that does not answer the STK push in time --

@pytest.fixture
def slow_payhero(wire):
    """PayHero that takes the STK push and answers after PAYHERO_READ_TIMEOUT."""
    payhero = PayHeroStandIn(wire)
    wire.post(f"{PAYHERO}/api/v2/payments", exc=requests.exceptions.ReadTimeout("read timed out"))
    return payhero


def paid_flat(order, reference, receipt="SKQ96C7K7H"):
    body = callback_body(order, shape="flat")
    body.update(reference=reference, provider_reference=receipt)
    return body


@pytest.mark.env(**LIVE, PAYHERO_REVERIFY_AFTER="off")
def test_live_a_slow_stk_push_leaves_the_order_pending_and_its_verified_callback_completes_it(app, client, slow_payhero,
                                                                                              cli):
    response = client.post("/api/orders", json=DEMO)
    assert response.status_code == 201 and response.headers["Location"].endswith(response.get_json()["id"])
    order = response.get_json()
    assert order["status"] == "pending" and order["payment"]["reference"] is None
    assert "PayHero did not answer in time, left pending" in cli("orders", "show", order["id"]).output

    slow_payhero.status["ph-7f3a"] = {"status": "SUCCESS", "amount": 300, "provider_reference": "SKQ96C7K7H",
                                      "reference": "ph-7f3a"}
    answer = client.post(LIVE_CALLBACK, json=paid_flat(order, "ph-7f3a"))
    assert answer.status_code == 200 and answer.get_json()["status"] == "completed"
    assert slow_payhero.asked == ["ph-7f3a"]
    done = current(client, order)
    assert done["status"] == "completed" and len(done["tickets"]) == 1
    assert (done["payment"]["reference"], done["payment"]["receipt"]) == ("ph-7f3a", "SKQ96C7K7H")

    # The same PayHero payment named for another order that timed out: refused, PayHero not even asked.
    another = client.post("/api/orders", json={**DEMO, "phone": "0712000222"}).get_json()
    refused = client.post(LIVE_CALLBACK, json=paid_flat(another, "ph-7f3a", receipt="SOTHER0001"))
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "payment_reused"
    assert current(client, another) == another and slow_payhero.asked == ["ph-7f3a"]


@pytest.mark.env(**LIVE, PAYHERO_REVERIFY_AFTER="off")
def test_live_the_callbacks_reference_vouches_only_with_the_amount_confirmed(app, client, slow_payhero):
    order = client.post("/api/orders", json=DEMO).get_json()
    slow_payhero.status["ph-9c1d"] = "SUCCESS"  # PayHero's documented answer: no amount
    answer = client.post(LIVE_CALLBACK, json=paid_flat(order, "ph-9c1d"))
    assert answer.status_code == 200 and answer.get_json()["status"] == "pending"
    slow_payhero.status["ph-9c1d"] = {"status": "SUCCESS", "amount": 500, "provider_reference": "SKQ96C7K7H"}
    assert client.post(LIVE_CALLBACK, json=paid_flat(order, "ph-9c1d")).get_json()["status"] == "pending"
    assert current(client, order) == order
    assert outcomes(app) == ["unverified", "unverified"]


@pytest.mark.env(**LIVE, PAYHERO_REVERIFY_AFTER="0.05,0.1,0.2,0.4")
def test_live_a_callback_payhero_confirms_only_later_is_asked_again_with_its_reference(app, client, slow_payhero):
    order = client.post("/api/orders", json=DEMO).get_json()
    answers = iter(["QUEUED", "QUEUED"])
    slow_payhero.status["ph-2b8e"] = lambda: next(answers, {"status": "SUCCESS", "amount": 300,
                                                            "provider_reference": "SKQ96C7K7H"})
    assert client.post(LIVE_CALLBACK, json=paid_flat(order, "ph-2b8e")).get_json()["status"] == "pending"
    done = wait_until(lambda: (body := current(client, order))["status"] == "completed" and body,
                      message="re-verification with the callback's reference")
    assert done["payment"]["reference"] == "ph-2b8e" and set(slow_payhero.asked) == {"ph-2b8e"}


@pytest.mark.env(**LIVE, PAYHERO_REVERIFY_AFTER="off")
def test_live_a_connect_timeout_sent_nothing_so_the_order_fails(app, client, wire):
    PayHeroStandIn(wire)
    wire.post(f"{PAYHERO}/api/v2/payments", exc=requests.exceptions.ConnectTimeout("connect timed out"))
    response = client.post("/api/orders", json=DEMO)
    assert response.status_code == 502
    assert client.get(f"/api/orders/{response.headers['X-Order-Id']}").get_json()["status"] == "failed"


# -- live mode: reconcile, for an order PayHero gave no reference, asks with its callback's --

UNCONFIRMED = "success claimed but not confirmed: check before refunding"


def claimed_then_reconciled(app, client, slow_payhero, cli, answer_at_reconcile):
    """Slow STK push -> pending; a success callback PayHero confirms with no amount (unverified);
    then, past RECONCILE_EXPIRE_AFTER, reconcile with PayHero saying `answer_at_reconcile`.
    The order as it is then, and reconcile's summary."""
    order = client.post("/api/orders", json=DEMO).get_json()
    assert order["status"] == "pending" and order["payment"]["reference"] is None
    slow_payhero.status["ph-5e0a"] = "SUCCESS"  # PayHero's documented answer: no amount
    assert client.post(LIVE_CALLBACK, json=paid_flat(order, "ph-5e0a", receipt="SCLAIM0001")).get_json()["status"] \
        == "pending"
    with app.app_context():
        db.session.execute(update(Order).where(Order.id == order["id"])
                           .values(created_at=utcnow() - timedelta(seconds=1000)))  # past the expiry age (900 s)
        db.session.commit()
    slow_payhero.status["ph-5e0a"] = answer_at_reconcile
    reconciled = cli("reconcile")
    assert reconciled.exit_code == 0, reconciled.output
    assert slow_payhero.asked == ["ph-5e0a", "ph-5e0a"]  # at the callback, then reconcile with its reference
    return current(client, order), reconciled.output


@pytest.mark.env(**LIVE, PAYHERO_REVERIFY_AFTER="off")
@pytest.mark.parametrize("answer, asked", [
    ("SUCCESS", "transaction-status SUCCESS"),  # still no amount
    ("QUEUED", "transaction-status QUEUED"),
    (requests.exceptions.ConnectTimeout("connect timed out"), "could not ask PayHero"),
])
def test_live_an_unconfirmed_success_never_expires_out_of_sight(app, client, slow_payhero, cli, log_lines, answer,
                                                                 asked):
    counted = refunds_counted()
    order, summary = claimed_then_reconciled(app, client, slow_payhero, cli, answer)
    assert (order["status"], order["payment"]["refund_due"], order["payment"]["receipt"]) == \
        ("failed", True, "SCLAIM0001")
    assert "tickets" not in order and ticket_type(app).reserved == 0  # given back, as any expiry
    assert "1 expired" in summary and "1 refund due" in summary
    assert refunds_counted() == counted + 1
    [warning] = [line for line in log_lines if line.startswith("Refund due")]
    assert order["id"] in warning and "SCLAIM0001" in warning and "check before refunding" in warning

    listed = cli("orders", "unsettled")
    assert order["id"] in listed.output and "SCLAIM0001" in listed.output
    shown = cli("orders", "show", order["id"]).output
    assert asked in shown and f"-> expired, refund due: {UNCONFIRMED}" in shown
    assert "0 expired" in cli("reconcile").output  # once: the order is final now


@pytest.mark.env(**LIVE, PAYHERO_REVERIFY_AFTER="off")
def test_live_reconcile_completes_an_order_by_its_callbacks_reference_once_payhero_confirms_the_amount(
        app, client, slow_payhero, cli):
    order, summary = claimed_then_reconciled(app, client, slow_payhero, cli, {
        "status": "SUCCESS", "amount": 300, "provider_reference": "SKQ96C7K7H", "reference": "ph-5e0a"})
    assert order["status"] == "completed" and len(order["tickets"]) == 1 and not order["payment"]["refund_due"]
    assert (order["payment"]["reference"], order["payment"]["receipt"]) == ("ph-5e0a", "SKQ96C7K7H")  # PayHero's
    assert "1 settled" in summary and "0 expired" in summary and "0 refund due" in summary
    assert ticket_type(app).reserved == 1
    assert "transaction-status SUCCESS -> settled: completed" in cli("orders", "show", order["id"]).output


@pytest.mark.env(**LIVE, PAYHERO_REVERIFY_AFTER="off")
def test_live_a_claimed_success_payhero_says_failed_just_expires(app, client, slow_payhero, cli):
    order, summary = claimed_then_reconciled(app, client, slow_payhero, cli, "FAILED")
    assert (order["status"], order["payment"]["refund_due"], order["payment"]["receipt"]) == ("failed", False, None)
    assert order["payment"]["result_desc"] == EXPIRED_REASON
    assert "1 expired" in summary and "0 refund due" in summary
    assert cli("orders", "unsettled").output.strip() == "No order is owed a refund."
