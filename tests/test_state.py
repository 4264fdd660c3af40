"""The order state machine, phone numbers and PayHero's two payload shapes: no database."""
import pytest
from marshmallow import ValidationError

from eventi_flask.orders.phone import mask_phone, normalize_phone
from eventi_flask.orders.state import (Decision, PaymentOutcome, Status, Transition, decide, late_success,
                                      result_code_for_message)
from eventi_flask.payhero.sandbox import classic_callback
from eventi_flask.payhero.schemas import parse_callback, parse_transaction_status

PAID = PaymentOutcome(success=True, result_code=0, amount=300, receipt="SAE3YULR0Y")


@pytest.mark.parametrize("code, status", [
    (1032, Status.CANCELLED), (1, Status.FAILED), (2001, Status.FAILED),
    (1037, Status.FAILED), (1019, Status.FAILED), (1001, Status.FAILED), (17, Status.FAILED),
])
def test_failure_codes_move_a_pending_order_to_their_final_status(code, status):
    transition = decide("pending", 300, PaymentOutcome(success=False, result_code=code))
    assert transition.decision is Decision.APPLY and transition.status is status


def test_success_with_the_right_amount_completes():
    transition = decide("pending", 300, PAID)
    assert transition.decision is Decision.APPLY and transition.status is Status.COMPLETED


def test_success_with_another_amount_leaves_the_order_pending():
    transition = decide("pending", 500, PAID)
    assert transition.decision is Decision.AMOUNT_MISMATCH and transition.status is Status.PENDING


def test_a_completed_order_never_changes():
    for outcome in (PAID, PaymentOutcome(success=False, result_code=1), PaymentOutcome(success=False, result_code=1032),
                    PaymentOutcome(success=True, result_code=0, amount=300, receipt="SOTHER0001")):
        transition = decide("completed", 300, outcome)
        assert transition.status is Status.COMPLETED and not transition.changes


@pytest.mark.parametrize("final", ["failed", "cancelled"])
def test_a_failure_never_moves_a_final_order(final):
    for outcome in (PaymentOutcome(success=False, result_code=1), PaymentOutcome(success=False, result_code=1032)):
        transition = decide(final, 300, outcome)
        assert transition.status.value == final and not transition.changes


@pytest.mark.parametrize("final", ["failed", "cancelled"])
def test_a_late_success_completes_a_failed_or_cancelled_order_when_its_tickets_can_be_held(final):
    transition = decide(final, 300, PAID)
    assert transition.decision is Decision.LATE_SUCCESS
    assert late_success(final, tickets_held=True) == Transition(Decision.APPLY, Status.COMPLETED)
    owed = late_success(final, tickets_held=False)
    assert owed.decision is Decision.REFUND_DUE and owed.status.value == final and owed.changes
    # Once owed a refund, the same success again changes nothing, nor does a failure.
    assert decide(final, 300, PAID, refund_due=True).decision is Decision.REPEAT
    assert not decide(final, 300, PaymentOutcome(success=False, result_code=1), refund_due=True).changes


def test_a_late_success_of_another_amount_changes_nothing():
    assert decide("failed", 500, PAID).decision is Decision.AMOUNT_MISMATCH


@pytest.mark.parametrize("current", ["pending", "failed", "cancelled"])
def test_one_payment_never_completes_two_orders(current):
    transition = decide(current, 300, PAID, paid_another_order=True)
    assert transition.decision is Decision.PAYMENT_REUSED and transition.status.value == current


@pytest.mark.parametrize("raw", [
    "0712345678", "712345678", "254712345678", "+254712345678", "0712 345 678", "+254-712-345-678",
])
def test_phone_forms_normalise_to_254(raw):
    assert normalize_phone(raw) == "254712345678"


@pytest.mark.parametrize("raw, expected", [("0112345678", "254112345678"), ("+254112345678", "254112345678"), ("112345678", "254112345678")])
def test_airtel_one_forms_normalise(raw, expected):
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize("raw", ["", "0812345678", "071234567", "07123456789", "2557123456789", "phone", None, 712345678])
def test_not_a_kenyan_mobile_number(raw):
    assert normalize_phone(raw) is None


def test_masked_phone_hides_the_middle():
    assert mask_phone("254712345678") == "2547******78"


def test_classic_success_shape():
    body = classic_callback("REF1", "ws_CO_1", "order-1", 300, "254708000000", 0, "ok")
    outcome = parse_callback(body)
    assert outcome.success and outcome.status is Status.COMPLETED
    assert (outcome.order_id, outcome.checkout_request_id, outcome.amount) == ("order-1", "ws_CO_1", 300)
    assert outcome.receipt and outcome.receipt.startswith("S")


def test_classic_failure_shape():
    outcome = parse_callback(classic_callback("REF1", "ws_CO_1", "order-1", 300, "254708000001", 1032, "Request cancelled by user"))
    assert not outcome.success and outcome.status is Status.CANCELLED and outcome.receipt is None


def test_flat_shape():
    outcome = parse_callback({"success": True, "status": "success", "message": "ok", "reference": "R1",
                              "external_reference": "order-1", "amount": 300.0, "currency": "KES", "provider_reference": "SAE3"})
    assert outcome.success and outcome.amount == 300 and outcome.receipt == "SAE3" and outcome.reference == "R1"
    failed = parse_callback({"success": False, "status": "failed", "message": "Insufficient", "external_reference": "o", "result_code": 1})
    assert failed.status is Status.FAILED and failed.result_code == 1


@pytest.mark.parametrize("message, code, status", [
    ("Request Cancelled by user.", 1032, Status.CANCELLED),
    ("Request cancelled by user", 1032, Status.CANCELLED),
    ("The balance is insufficient for the transaction.", 1, Status.FAILED),
    ("The initiator information is invalid.", 2001, Status.FAILED),
    ("DS timeout user cannot be reached", 1037, Status.FAILED),
    ("No response from user.", 1037, Status.FAILED),
    ("Transaction has expired", 1019, Status.FAILED),
    ("Unable to lock subscriber, a transaction is already in process for the current subscriber", 1001, Status.FAILED),
    ("Rule limited.", 17, Status.FAILED),
    ("An error occurred while sending a push request", 1025, Status.FAILED),
    ("The transaction is not permitted", 2028, Status.FAILED),
    ("System busy. Try again later.", None, Status.FAILED),
    (None, None, Status.FAILED),
])
def test_a_flat_failure_is_decided_by_its_message(message, code, status):
    assert result_code_for_message(message) == code
    outcome = parse_callback({"success": False, "status": "failed", "message": message, "external_reference": "o"})
    assert (outcome.result_code, outcome.status, outcome.result_desc) == (code, status, message)


@pytest.mark.parametrize("answer, expected", [
    ({"status": "SUCCESS", "provider_reference": "SKQ96C7K7H", "third_party_reference": "SKQ96C7K7H"},
     PaymentOutcome(success=True, result_code=0, receipt="SKQ96C7K7H", reference="R1")),
    ({"status": "SUCCESS", "provider_reference": "", "third_party_reference": "SKQ96C7K7H", "amount": "300.00"},
     PaymentOutcome(success=True, result_code=0, receipt="SKQ96C7K7H", reference="R1", amount=300)),
    ({"status": "FAILED", "result_code": 1032}, PaymentOutcome(success=False, result_code=1032, reference="R1")),
    ({"status": "FAILED"}, PaymentOutcome(success=False, reference="R1")),
    ({"status": "FAILED", "result_desc": "Request Cancelled by user."},
     PaymentOutcome(success=False, result_code=1032, result_desc="Request Cancelled by user.", reference="R1")),
    ({"status": "FAILED", "result_desc": 17}, PaymentOutcome(success=False, reference="R1")),  # not text: no reason
    ({"status": "SUCCESS", "provider_reference": 12345, "third_party_reference": "SKQ96C7K7H"},
     PaymentOutcome(success=True, result_code=0, receipt="SKQ96C7K7H", reference="R1")),
    ({"status": "QUEUED"}, None),
    ({"status": "PROCESSING"}, None),
    ({}, None),
])
def test_transaction_status_answers(answer, expected):
    assert parse_transaction_status("R1", answer) == expected


@pytest.mark.parametrize("body, field", [
    ({"response": {"ResultCode": "0", "ExternalReference": "o", "Amount": 3}}, "ResultCode"),
    ({"response": {"ResultCode": 0, "ExternalReference": "o"}}, "Amount"),
    ({"response": {"ResultCode": 1}}, "ExternalReference"),
    ({"response": {"ResultCode": 0, "ExternalReference": "o", "Amount": "300"}}, "Amount"),
    ({"success": "yes", "external_reference": "o", "amount": 1}, "success"),
    ({"success": True, "external_reference": "o"}, "amount"),
    ({"status": "x"}, "success"),
])
def test_malformed_callbacks_name_the_bad_field(body, field):
    with pytest.raises(ValidationError) as err:
        parse_callback(body)
    assert field in str(err.value.normalized_messages())


def test_only_ascii_digits_make_a_phone_number():
    assert normalize_phone("0712\u0663\u0664\u0665\u0666\u0667\u0668") is None  # Arabic-Indic digits
