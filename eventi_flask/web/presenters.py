"""What the pages show, in words a customer reads: money, dates, reasons, sandbox phones.

Plain functions over the API's own dicts, so the pages and the JSON API can
never disagree about an order.
"""
import segno
from markupsafe import Markup

from ..clock import as_utc, from_iso
from ..messages.service import delivery_channels
from ..orders import phone as phone_rules
from ..orders.schemas import PhoneField
from ..orders.state import (PLAIN_REASONS, RESULT_IN_PROGRESS, RESULT_NOT_PERMITTED, RESULT_PROMPT_NOT_SENT,
                            RESULT_RULE_LIMITED, RESULT_SUCCESS, RESULT_SYSTEM_ERROR)
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
    """The ticket type, quantity and total the form starts with: a valid request, else the first that is left."""
    on_offer = {ticket["id"]: ticket for ticket in event["ticket_types"] if ticket["available"]}
    chosen = ticket_type if ticket_type in on_offer else next(iter(on_offer), None)
    most = on_offer[chosen]["max_per_order"] if chosen else 1
    quantity = quantity if quantity in range(1, most + 1) else 1
    price = on_offer[chosen]["price"] if chosen else 0
    return {"ticket_type": chosen, "quantity": quantity, "total": price * quantity, "max_per_order": most}


def _epoch_ms(moment):
    return round(as_utc(moment).timestamp() * 1000)


def sales_window(event, now, pre_queue=None):
    """Where the checkout stands at `now` (the server's clock; `event` the API's, read at `now`): state "not_open", "open", "closed" or
    "sold_out" (open, and every type taken), and the moments the page counts to, in ms since the epoch.
    With the event's line on (`pre_queue`: how long before the opening it takes arrivals, else None),
    `line_opens_at`: from then on, before the opening, Pay joins the line."""
    opens_at, closes_at = event["sales_start"], event["sales_end"] or event["starts_at"]
    if event["on_sale"]:  # as the API says it at `now`
        state = "open" if any(ticket["available"] for ticket in event["ticket_types"]) else "sold_out"
    else:
        state = "not_open" if opens_at is not None and now < from_iso(opens_at) else "closed"
    line_opens_at = None
    if state == "not_open" and pre_queue:
        line_opens_at = from_iso(opens_at) - pre_queue
    return {"state": state, "opens_at": opens_at, "closes_at": closes_at, "server_now_ms": _epoch_ms(now),
            "opens_at_ms": _epoch_ms(from_iso(opens_at)) if opens_at else "", "closes_at_ms": _epoch_ms(from_iso(closes_at)),
            "line_opens_at": line_opens_at.isoformat() if line_opens_at else None,
            "line_opens_at_ms": _epoch_ms(line_opens_at) if line_opens_at else ""}


# Said before sales open, on the form and in the line: why arriving early gives no better place than on time.
PRE_QUEUE_SENTENCE = ("Everyone who joins the line before sales open is put in a random order at the opening; "
                      "people who come after the opening join behind them, in the order they arrive.")


def line_hold_seconds(config):
    """How long the checkout holds each wait for its place: the usual hold, but at most half of LINE_PATIENCE,
    so that a page that is open never has its place given up between two asks."""
    return min(config["WAIT_TIMEOUT_DEFAULT"], config["LINE_PATIENCE"] / 2)


def ticket_qr_code(code):
    """A ticket's code as a QR code a gate scanner reads: inline SVG, sized by CSS, black on white."""
    qr = segno.make_qr(code, error="m")
    return Markup(qr.svg_inline(scale=1, border=4, omitsize=True, dark="#000", light="#fff", svgclass="qr",
                                lineclass=None))


def ticket_delivery(config):
    """How a paid order's tickets reach the buyer besides the page: {"sms": bool, "email": bool}.
    The SMS sandbox only logs its messages: the page promises no SMS it does not send."""
    channels = delivery_channels(config)
    return {"sms": "sms" in channels, "email": "email" in channels}


def failure_reason(order):
    """Why a cancelled or failed order did not go through, in one plain sentence; "" otherwise."""
    if order["status"] not in UNSUCCESSFUL_STATUSES:
        return ""
    payment = order["payment"]
    return PLAIN_REASONS.get(payment["result_code"]) or payment["result_desc"] or FALLBACK_REASON


# M-Pesa's rules that decide what a buyer should do before trying again: the checkout repeats the
# sentence when "Try again" brings them back (?after=<result code>).
ADVICE_ON_RETRY = (RESULT_RULE_LIMITED, RESULT_IN_PROGRESS, RESULT_PROMPT_NOT_SENT, RESULT_SYSTEM_ERROR,
                   RESULT_NOT_PERMITTED)


def page_state(order):
    """Which of the status page's states shows `order`: its status, or `refund-due` when it was paid
    too late to be given tickets (whatever its status says, the customer's money is owed back)."""
    return "refund-due" if order["payment"]["refund_due"] else order["status"]


def retry_advice(result_code):
    """What to do before paying again, after an order that M-Pesa's rule `result_code` stopped; "" if nothing."""
    return PLAIN_REASONS[result_code] if result_code in ADVICE_ON_RETRY else ""


def try_again_query(order):
    """The checkout's query string for "Try again": the same tickets, and M-Pesa's rule if one stopped it."""
    query = {"ticket_type": order["ticket_type"], "quantity": order["quantity"]}
    if order["payment"]["result_code"] in ADVICE_ON_RETRY:
        query["after"] = order["payment"]["result_code"]
    return query


def reasons_for_browser():
    """The result-code sentences the status page needs when an order changes under it."""
    plain = {str(code): text for code, text in PLAIN_REASONS.items() if code != RESULT_SUCCESS}
    return {"codes": plain, "fallback": FALLBACK_REASON, "advice_on_retry": [str(code) for code in ADVICE_ON_RETRY]}


def local_phone(normalised):
    """254708000001 -> 0708000001, the way people type their own number."""
    return "0" + normalised[3:]


def sandbox_phones():
    """[(phone, outcome sentence)] for the sandbox banner, from the sandbox's own table."""
    return [
        (local_phone(phone), NO_ANSWER if outcome is None else SANDBOX_OUTCOMES.get(outcome[0], outcome[1]))
        for phone, outcome in sorted(SANDBOX_PHONES.items())
    ]
