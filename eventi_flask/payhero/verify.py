"""Asking PayHero whether a payment happened: when its success callback lands, and again soon after.

PayHero's transaction-status can lag its own callback by seconds, the callback can
beat our STK push's answer (no reference to ask with yet), and PayHero may not
answer in PAYHERO_VERIFY_TIMEOUT.  Rather than leave a customer who paid watching
"Waiting for payment" until reconcile (RECONCILE_AFTER), the worker that received
the callback asks again in a greenlet at PAYHERO_REVERIFY_AFTER seconds, and settles
the order with PayHero's answer as reconcile does: apply_payment_outcome, under
the order's row lock, waiters woken.  Nothing is completed that PayHero has not
confirmed.  How it ended goes in the order's log (`orders show`).  Several
workers or instances doing this for one order is harmless: the first changes
it, the others find it final and change nothing.  A worker that stops
meanwhile loses nothing: reconcile still settles the order.
"""
import logging
import time

import gevent
from flask import current_app
from sqlalchemy.exc import SQLAlchemyError

from .. import database
from ..errors import ApiError
from ..extensions import db
from ..orders import service as orders
from ..orders.state import Decision, Status
from .client import PayHeroError, get_payhero
from .schemas import parse_transaction_status

log = logging.getLogger(__name__)

EXTENSION = "eventi.payhero.reverifying"
NOTE = "reverify"  # its kind in the order's log (`orders show`)
# Past this many at once in one worker (PayHero down at a sales opening), the rest are left to reconcile.
MAX_REVERIFYING = 1000


def ask_payhero(reference):
    """PayHero's outcome for `reference` (None while it has none to give), and the check as the
    order's log keeps it: {"reference", "status"}, or {"reference", "error"} when PayHero did not
    answer within PAYHERO_VERIFY_TIMEOUT; no reference yet, nothing asked."""
    check = {"reference": reference}
    if not reference:
        return None, check
    try:
        answer = get_payhero().transaction_status(reference, current_app.config["PAYHERO_VERIFY_TIMEOUT"])
    except PayHeroError as exc:
        return None, {**check, "error": str(exc)[:500]}
    check["status"] = answer.get("status")
    return parse_transaction_status(reference, answer), check


def unconfirmed(check):
    """Why a check (ask_payhero) did not confirm a payment, in words."""
    if "error" in check:
        return f"could not ask PayHero to confirm it: {check['error']}"
    if not check.get("reference"):
        return "the order has no PayHero reference yet to check the payment with"
    return f"PayHero's transaction status is {check['status']!r}, not 'SUCCESS'"


def amount_doubt(said, order_amount):
    return f"PayHero's transaction status says KES {said}, the order is KES {order_amount}"


def init_app(app):
    app.extensions[EXTENSION] = {}  # order id -> the greenlet asking PayHero again about it


def reverify_later(order_id, callback_reference=None):
    """Ask PayHero about `order_id` again in the background; at most one greenlet per order in a worker.

    `callback_reference`: the callback's reference, asked about when the order has none of its own
    (PayHero did not answer its STK push in time); then only a confirmed amount completes it.
    """
    app = current_app._get_current_object()
    schedule, running = app.config["PAYHERO_REVERIFY_AFTER"], app.extensions[EXTENSION]
    if not schedule or order_id in running or len(running) >= MAX_REVERIFYING:
        return
    running[order_id] = greenlet = gevent.spawn(_reverify, app, order_id, schedule, callback_reference)
    greenlet.link(lambda _: running.pop(order_id, None))


def stop(app):
    """Drop this worker's re-verifications (reconcile settles their orders)."""
    gevent.killall(list(app.extensions[EXTENSION].values()))


def _reverify(app, order_id, schedule, callback_reference):
    started = time.monotonic()
    check = {}
    for after in schedule:
        gevent.sleep(max(0.0, started + after - time.monotonic()))
        with app.app_context(), database.on_callbacks_engine():  # settles as a callback would: on its connections
            try:
                settled, check = _settle(order_id, started, callback_reference)
            except SQLAlchemyError as exc:  # the database is down: ask again at the next step
                settled, check = False, {"error": f"the database could not be reached ({type(exc).__name__})"}
            except Exception:  # a bug of ours: say so once, and leave the order to reconcile
                log.exception("Re-verifying the payment for order %s failed", order_id)
                return
            finally:
                db.session.remove()
        if settled:
            return
    with app.app_context(), database.on_callbacks_engine():
        try:
            orders.save_note(order_id, NOTE, {**check, "after_seconds": schedule[-1], "result": "left to reconcile"})
        except SQLAlchemyError:
            pass  # the log line says it; the order's log cannot just now
        finally:
            db.session.remove()
    log.warning("Payment for order %s not confirmed by PayHero in %gs (%s); reconcile will settle it",
                order_id, schedule[-1], unconfirmed(check))


def _settle(order_id, started, callback_reference=None):
    """Ask PayHero once and apply a definitive answer: (True, None) when nothing is left to ask,
    else (False, the check that settled nothing)."""
    try:
        order = orders.order_by_id(order_id)
    except ApiError:
        return True, None  # gone: nothing to settle
    if order["status"] == Status.COMPLETED or order["payment"]["refund_due"]:
        return True, None  # paid meanwhile: a later callback, another worker, reconcile
    ours = order["payment"]["reference"]
    outcome, check = ask_payhero(ours or callback_reference)
    if outcome is not None and outcome.success and not ours and outcome.amount is None:
        outcome, check = None, {**check, "status": "SUCCESS without an amount, for the callback's reference"}
    if outcome is None:
        return False, check
    check["after_seconds"] = round(time.monotonic() - started, 1)

    def noted(_, transition):  # in the transaction that settles the order, as reconcile's notes are
        if transition is None:
            return
        if transition.changes:
            orders.add_note(order_id, NOTE, {**check, "result": f"settled: {transition.status.value}"})
        elif transition.decision is Decision.AMOUNT_MISMATCH:
            orders.add_note(order_id, NOTE, {**check, "result": f"not completed: PayHero says KES {outcome.amount}"})

    # PayHero's own answer, success or failure, applied as reconcile applies it.
    transition, order = orders.apply_payment_outcome(outcome, order_id, record=noted)
    if transition.changes:
        log.info("Payment for order %s settled as %s from PayHero's transaction status, %gs after its callback",
                 order_id, order["status"], check["after_seconds"])
    elif transition.decision is Decision.AMOUNT_MISMATCH:
        log.warning("Payment for order %s not completed: %s", order_id, amount_doubt(outcome.amount, order["amount"]))
    return True, None
