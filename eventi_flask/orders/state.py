"""The order state machine: plain code, no database, no Flask.

An order starts `pending` and moves once, to `completed`, `cancelled` or
`failed`.  Money decides the rest: M-Pesa's failures are not proof that no
money moved (1037, 1019, a PayHero timeout), so a confirmed success for a
`failed` or `cancelled` order completes it when its tickets can be held
again, and otherwise marks it `refund_due` (late_success()).  A `completed`
order never changes.  Every payment outcome, whether from a callback, a
transaction-status query or the expiry of a forgotten order, goes through
decide().
"""
import enum
import re
from dataclasses import dataclass


class Status(str, enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self):
        return self is not Status.PENDING


# M-Pesa result codes, as PayHero forwards them.
RESULT_SUCCESS = 0
RESULT_CANCELLED = 1032
RESULT_INSUFFICIENT_FUNDS = 1
RESULT_WRONG_PIN = 2001
RESULT_UNREACHABLE = 1037
RESULT_EXPIRED = 1019
RESULT_IN_PROGRESS = 1001
# M-Pesa's rules, which refuse a payment before the customer sees a prompt.
RESULT_RULE_LIMITED = 17  # the same amount to the same phone within 2 minutes
RESULT_PROMPT_NOT_SENT = 1025
RESULT_SYSTEM_ERROR = 9999  # "Error while sending push request": the prompt was not sent either
RESULT_NOT_PERMITTED = 2028

PLAIN_REASONS = {
    RESULT_SUCCESS: "Payment received.",
    RESULT_INSUFFICIENT_FUNDS: "Your M-Pesa balance was not enough for this payment.",
    RESULT_CANCELLED: "The payment was cancelled on the phone.",
    RESULT_WRONG_PIN: "The M-Pesa PIN was wrong.",
    RESULT_UNREACHABLE: "Your phone could not be reached. Is it on and has signal?",
    RESULT_EXPIRED: "The payment request expired before it was answered.",
    RESULT_IN_PROGRESS: "Another M-Pesa payment was in progress on this phone. Answer or cancel the M-Pesa "
                        "prompt on your phone first, then try again in a minute.",
    RESULT_RULE_LIMITED: "M-Pesa refuses the same amount to the same phone twice within 2 minutes. "
                         "Please wait 2 minutes, then try again.",
    RESULT_PROMPT_NOT_SENT: "M-Pesa could not send the payment prompt to your phone. Nothing was charged; "
                            "please try again in a minute.",
    RESULT_SYSTEM_ERROR: "M-Pesa could not send the payment prompt just now. Nothing was charged; "
                         "please try again in a minute.",
    RESULT_NOT_PERMITTED: "M-Pesa does not permit this payment from your line. Nothing was charged; "
                          "please pay from another M-Pesa number, or ask Safaricom.",
}

# PayHero's flat callback carries no result code, only M-Pesa's description of it
# ("Request Cancelled by user."), worded variously: each result code by what its
# descriptions say.  The first that matches wins; none matching is a plain failure.
_RESULT_MESSAGES = [
    (RESULT_CANCELLED, re.compile(r"cancell?ed by (the )?(user|customer|subscriber)", re.I)),
    (RESULT_INSUFFICIENT_FUNDS, re.compile(r"insufficient|not enough (funds|balance|money)", re.I)),
    (RESULT_WRONG_PIN, re.compile(r"initiator information is invalid|(wrong|invalid|incorrect) pin", re.I)),
    (RESULT_UNREACHABLE, re.compile(r"cannot be reached|unreachable|no response from (the )?user|ds timeout", re.I)),
    (RESULT_EXPIRED, re.compile(r"expired", re.I)),
    (RESULT_IN_PROGRESS, re.compile(r"already in process|in progress|unable to lock subscriber", re.I)),
    (RESULT_RULE_LIMITED, re.compile(r"rule limited", re.I)),
    (RESULT_NOT_PERMITTED, re.compile(r"not permitted", re.I)),
    (RESULT_PROMPT_NOT_SENT, re.compile(r"while sending (a )?push request", re.I)),
]


def result_code_for_message(message):
    """The M-Pesa result code a failure message describes, or None when it names none we know."""
    if not isinstance(message, str):
        return None
    return next((code for code, pattern in _RESULT_MESSAGES if pattern.search(message)), None)


def status_for_result(success, result_code):
    if success and result_code in (None, RESULT_SUCCESS):
        return Status.COMPLETED
    if result_code == RESULT_CANCELLED:
        return Status.CANCELLED
    return Status.FAILED


@dataclass(frozen=True)
class PaymentOutcome:
    """What PayHero says happened to one payment, whatever shape it came in."""

    success: bool
    result_code: int | None = None
    result_desc: str | None = None
    receipt: str | None = None
    amount: int | None = None
    reference: str | None = None
    checkout_request_id: str | None = None
    order_id: str | None = None

    @property
    def status(self):
        return status_for_result(self.success, self.result_code)


class Decision(str, enum.Enum):
    APPLY = "applied"  # the order moves to a final status (or, late, from failed/cancelled to completed)
    REPEAT = "repeat"  # the same outcome again: nothing changes
    IGNORED_FINAL = "ignored_final"  # a different outcome for a final order: recorded only
    AMOUNT_MISMATCH = "amount_mismatch"  # money does not match: the order does not change
    # A success for a failed or cancelled order: late_success() says what it becomes once it is
    # known whether the order's tickets can be held again.  Never stored as an outcome.
    LATE_SUCCESS = "late_success"
    REFUND_DUE = "refund_due"  # paid, but no tickets left: the status stays, the receipt is kept, a refund is owed
    PAYMENT_REUSED = "payment_reused"  # the receipt or reference already paid for another order: refused


@dataclass(frozen=True)
class Transition:
    decision: Decision
    status: Status  # the order's status after the decision

    @property
    def changes(self):
        return self.decision in (Decision.APPLY, Decision.REFUND_DUE)

    @property
    def releases_tickets(self):
        """A pending order that fails or is cancelled gives its tickets back (only a pending one is APPLYed there)."""
        return self.decision is Decision.APPLY and self.status is not Status.COMPLETED


def holds_tickets(status):
    """A pending order holds its tickets (reserved for it), and a completed one owns them."""
    return Status(status) in (Status.PENDING, Status.COMPLETED)


def decide(current, order_amount, outcome, refund_due=False, paid_another_order=False):
    """Decide what `outcome` does to an order now in status `current` costing `order_amount`.

    `refund_due`: the order already took a payment it could not honour.  `paid_another_order`:
    the outcome's receipt or PayHero reference belongs to another order (one payment never
    completes two orders).
    """
    current = Status(current)
    target = outcome.status
    if target is not Status.COMPLETED:  # a failure moves a pending order only
        if current.final:
            return Transition(Decision.REPEAT if target is current else Decision.IGNORED_FINAL, current)
        return Transition(Decision.APPLY, target)
    if paid_another_order:
        return Transition(Decision.PAYMENT_REUSED, current)
    if current is Status.COMPLETED or refund_due:  # already paid for: with tickets, or owed back
        return Transition(Decision.REPEAT, current)
    if outcome.amount is not None and outcome.amount != order_amount:
        return Transition(Decision.AMOUNT_MISMATCH, current)
    if current.final:  # a failure (perhaps premature: 1037, a timeout) made it final; money says otherwise
        return Transition(Decision.LATE_SUCCESS, Status.COMPLETED)
    return Transition(Decision.APPLY, Status.COMPLETED)


def late_success(current, tickets_held):
    """What a LATE_SUCCESS becomes: completed when the order's tickets could be held again (the
    caller has held them, atomically, against the quantity), else refund due, the status kept."""
    if tickets_held:
        return Transition(Decision.APPLY, Status.COMPLETED)
    return Transition(Decision.REFUND_DUE, Status(current))


def decide_payment(current, order_amount, outcome, refund_due, paid_another_order, hold_again):
    """decide(), with a late success settled: `hold_again()` takes the order's tickets back, all
    at once and only if they are free, and says whether it did.  (Transition, whether it held them.)"""
    transition = decide(current, order_amount, outcome, refund_due, paid_another_order)
    if transition.decision is not Decision.LATE_SUCCESS:
        return transition, False
    held = hold_again()
    return late_success(current, held), held
