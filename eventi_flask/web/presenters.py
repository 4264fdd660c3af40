"""What the pages show, in words a customer reads: money, dates, reasons, sandbox phones.

Plain functions over the API's own dicts, so the pages and the JSON API can
never disagree about an order.
"""
from ..orders import phone as phone_rules
from ..orders.schemas import PhoneField
from ..orders.state import PLAIN_REASONS, RESULT_SUCCESS
from ..payhero.sandbox import SANDBOX_PHONES

FALLBACK_REASON = "M-Pesa did not complete the payment."
# Short names for the sandbox banner; the status page uses the full PLAIN_REASONS sentences.
SANDBOX_OUTCOMES = {1032: "Cancelled on the phone", 1: "Insufficient funds", 2001: "Wrong PIN", 1037: "Phone unreachable"}
NO_ANSWER = "Never answered: no result arrives"
UNSUCCESSFUL_STATUSES = ("cancelled", "failed")

# The server's own phone rule and wording, handed to the browser so the
# client-side check cannot drift from the API's.
PHONE_PATTERN = phone_rules.PHONE.pattern
PHONE_SEPARATORS = phone_rules.SEPARATORS.pattern
PHONE_MESSAGE = PhoneField.default_error_messages["invalid_phone"]


def kes(amount):
    return f"KES {amount:,}"


def checkout_choice(event, ticket_type=None, quantity=None):
    """The ticket type, quantity and total the form starts with: a valid request, else the first."""
    prices = {ticket["id"]: ticket["price"] for ticket in event["ticket_types"] if ticket["available"]}
    chosen = ticket_type if ticket_type in prices else next(iter(prices), None)
    quantity = quantity if quantity in range(1, 11) else 1
    return {"ticket_type": chosen, "quantity": quantity, "total": prices.get(chosen, 0) * quantity}


def failure_reason(order):
    """Why a cancelled or failed order did not go through, in one plain sentence; "" otherwise."""
    if order["status"] not in UNSUCCESSFUL_STATUSES:
        return ""
    payment = order["payment"]
    return PLAIN_REASONS.get(payment["result_code"]) or payment["result_desc"] or FALLBACK_REASON


def reasons_for_browser():
    """The result-code sentences the status page needs when an order changes under it."""
    plain = {str(code): text for code, text in PLAIN_REASONS.items() if code != RESULT_SUCCESS}
    return {"codes": plain, "fallback": FALLBACK_REASON}


def local_phone(normalised):
    """254708000001 -> 0708000001, the way people type their own number."""
    return "0" + normalised[3:]


def sandbox_phones():
    """[(phone, outcome sentence)] for the sandbox banner, from the sandbox's own table."""
    return [
        (local_phone(phone), NO_ANSWER if outcome is None else SANDBOX_OUTCOMES.get(outcome[0], outcome[1]))
        for phone, outcome in sorted(SANDBOX_PHONES.items())
    ]
