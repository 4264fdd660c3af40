"""The order state machine: plain code, no database, no Flask.

An order starts `pending` and moves once, to `completed`, `cancelled` or
`failed`; it never leaves a final status.  Every payment outcome, whether
from a callback, a transaction-status query or the expiry of a forgotten
order, goes through decide().
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

PLAIN_REASONS = {
    RESULT_SUCCESS: "Payment received.",
    RESULT_INSUFFICIENT_FUNDS: "Your M-Pesa balance was not enough for this payment.",
    RESULT_CANCELLED: "The payment was cancelled on the phone.",
    RESULT_WRONG_PIN: "The M-Pesa PIN was wrong.",
    RESULT_UNREACHABLE: "Your phone could not be reached. Is it on and has signal?",
    RESULT_EXPIRED: "The payment request expired before it was answered.",
    RESULT_IN_PROGRESS: "Another M-Pesa payment was in progress on this phone.",
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
    (RESULT_IN_PROGRESS, re.compile(r"already in process|in progress", re.I)),
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
    APPLY = "applied"  # the order moves to a final status
    REPEAT = "repeat"  # the same outcome again: nothing changes
    IGNORED_FINAL = "ignored_final"  # a different outcome for a final order: recorded only
    AMOUNT_MISMATCH = "amount_mismatch"  # money does not match: the order stays pending


@dataclass(frozen=True)
class Transition:
    decision: Decision
    status: Status  # the order's status after the decision

    @property
    def changes(self):
        return self.decision is Decision.APPLY


def decide(current, order_amount, outcome):
    """Decide what `outcome` does to an order now in status `current` costing `order_amount`."""
    current = Status(current)
    target = outcome.status
    if current.final:
        decision = Decision.REPEAT if target is current else Decision.IGNORED_FINAL
        return Transition(decision, current)
    if target is Status.COMPLETED and outcome.amount is not None and outcome.amount != order_amount:
        return Transition(Decision.AMOUNT_MISMATCH, current)
    return Transition(Decision.APPLY, target)
