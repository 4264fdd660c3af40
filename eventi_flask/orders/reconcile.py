"""Settling orders whose callback never came: `flask --app wsgi reconcile`.

Pending orders older than RECONCILE_AFTER that have a PayHero reference are
looked up with transaction-status, and the answer goes through the same
state machine as a callback (apply_payment_outcome), so held waits are woken
as usual.  A status other than SUCCESS or FAILED means PayHero has not
processed the payment yet: that order waits for the next run.  An order with
no reference (PayHero did not answer its STK push in time) is asked about with
the reference of its stored success callback, verified and applied as that
callback was (payhero.service.verify_claimed_success).  Orders still pending
after RECONCILE_EXPIRE_AFTER become `failed` with a plain reason and give
their tickets back; one whose success callback PayHero neither confirmed nor
said FAILED is also left refund_due with the receipt it claimed, so that
someone checks it in PayHero's dashboard (`flask orders unsettled`).  Idempotency-Keys older
than 24 hours are deleted (a retry with one then makes a new order, as API.md allows).  Safe to run as often as
you like, from several places at once: every change is made under the
order's row lock and only ever moves an order forward.
"""
import logging
from datetime import timedelta
from functools import partial

from flask import current_app
from sqlalchemy import select

from ..extensions import db
from ..payhero.service import verify_claimed_success
from ..payhero.verify import ask_payhero
from .models import Order, as_utc, utcnow
from .refunds import unsettled_count
from .service import add_note, apply_payment_outcome, fail_pending_order, purge_idempotency_keys, save_note
from .state import Status

log = logging.getLogger(__name__)

NOTE = "reconcile"  # its kind in the order's log (`orders show`)

# In the order's timeline (`orders show`) when it expires with a success claimed for it (refund_due).
UNCONFIRMED_RESULT = "expired, refund due: success claimed but not confirmed: check before refunding"
EXPIRED_REASON = "No answer came from M-Pesa in time, so this order has expired. Please try again."


def _pending_older_than(seconds):
    cutoff = utcnow() - timedelta(seconds=seconds)
    rows = db.session.execute(
        select(Order.id, Order.payhero_reference, Order.created_at)
        .where(Order.status == Status.PENDING.value, Order.created_at < cutoff)
        .order_by(Order.created_at)
    ).all()
    db.session.remove()  # no connection held across the calls to PayHero
    return rows


def reconcile():
    """Settle forgotten pending orders; return counts by what happened to them.

    Each check goes in the order's log (`orders show`), with what came of it.
    """
    config = current_app.config
    expire_after = config["RECONCILE_EXPIRE_AFTER"]
    expire_cutoff = utcnow() - timedelta(seconds=expire_after)
    summary = {"checked": 0, "settled": 0, "still_pending": 0, "expired": 0, "errors": 0}
    for order_id, reference, created_at in _pending_older_than(config["RECONCILE_AFTER"]):
        check = {"reference": reference}
        claim = None  # a success callback PayHero has not confirmed, when the order has no reference to ask with
        if not reference:
            claim, transition, asked = verify_claimed_success(order_id, partial(_noted_if_settled, order_id))
            if claim is not None:
                summary["checked"] += 1
                check = asked
                if transition is not None and transition.changes:
                    log.info("Reconcile: order %s settled as %s from PayHero's transaction status for its "
                             "callback's reference", order_id, transition.status.value)
                    summary["settled"] += 1
                    continue
                summary["errors"] += "error" in check
                if transition is not None or check.get("status") == "FAILED":
                    claim = None  # answered by PayHero or by the state machine: no doubt left to flag
        else:
            summary["checked"] += 1
            transition, check = ask_and_apply(order_id, reference, NOTE)
            if "error" in check:
                # Not knowing is no reason to fail an order the customer may have paid: next run.
                log.warning("Reconcile: could not ask PayHero about order %s: %s", order_id, check["error"])
                summary["errors"] += 1
                save_note(order_id, NOTE, {**check, "result": "error"})
                continue
            if transition is not None and transition.changes:
                log.info("Reconcile: order %s settled as %s from PayHero's transaction status",
                         order_id, transition.status.value)
                summary["settled"] += 1
                continue
        if as_utc(created_at) < expire_cutoff:
            expired, _ = fail_pending_order(order_id, EXPIRED_REASON, unconfirmed_success=claim)
            if expired:
                log.info("Reconcile: order %s expired after %gs pending", order_id, expire_after)
                summary["expired"] += 1
                save_note(order_id, NOTE, {**check, "result": UNCONFIRMED_RESULT if claim else "expired"})
                continue
        summary["still_pending"] += 1
        save_note(order_id, NOTE, {**check, "result": "still pending"})
    # Money owed back to customers, until someone records the refund (`flask orders settle`).
    summary["refund_due"] = unsettled_count()
    purged = purge_idempotency_keys()
    if purged:
        log.info("Reconcile: deleted %d Idempotency-Keys older than 24 hours", purged)
    return summary


def ask_and_apply(order_id, reference, kind, detail=None):
    """Ask PayHero's transaction-status about `reference`, order `order_id`'s own, and apply a
    definitive answer as a callback's would be: apply_payment_outcome, the state machine under the
    order's row lock, the change published (held waits learn it).  Reconcile's ask, and the
    workers' for an order whose callback never came (missed_callbacks.py).

    Returns (transition, check): `transition` None while PayHero has no outcome to give (not
    processed yet, or it could not be asked: check["error"]); `check` {**detail, "reference",
    "status" or "error"}.  A settlement is noted in the order's log as `kind`, with `check`, in the
    transaction that makes it.
    """
    outcome, asked = ask_payhero(reference)
    check = {**(detail or {}), **asked}
    if outcome is None:
        return None, check
    transition, _ = apply_payment_outcome(outcome, order_id, record=_noted_if_settled(order_id, check, kind))
    return transition, check


def _noted_if_settled(order_id, check, kind=NOTE):
    """apply_payment_outcome's `record`: note a settlement in the transaction that makes it."""
    def record(_, transition):
        if transition is not None and transition.changes:
            add_note(order_id, kind, {**check, "result": f"settled: {transition.status.value}"})
    return record
