"""The order state machine: plain code, no database, no Flask.

An order starts `pending` and moves once, to `completed`, `cancelled` or
`failed`; it never leaves a final status.  Every payment outcome, whether
from a callback, a transaction-status query or the expiry of a forgotten
order, goes through decide().
"""
import enum
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

PLAIN_REASONS = {
    0: "Payment received.",
    1: "Your M-Pesa balance was not enough for this payment.",
    1032: "The payment was cancelled on the phone.",
    2001: "The M-Pesa PIN was wrong.",
    1037: "Your phone could not be reached. Is it on and has signal?",
    1019: "The payment request expired before it was answered.",
    1001: "Another M-Pesa payment was in progress on this phone.",
}


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
