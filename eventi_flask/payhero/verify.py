"""Asking PayHero whether a payment happened: when its success callback lands, and again soon after.

PayHero's transaction-status can lag its own callback by seconds, the callback can
beat our STK push's answer (no reference to ask with yet), and PayHero may not
answer in PAYHERO_VERIFY_TIMEOUT.  Rather than leave a customer who paid watching
"Waiting for payment" until reconcile (RECONCILE_AFTER), the worker that received
the callback asks again in a greenlet at PAYHERO_REVERIFY_AFTER seconds, and settles
the order with PayHero's answer as reconcile does: apply_payment_outcome, under
the order's row lock, waiters woken.  Nothing is completed that PayHero has not
confirmed.  Several workers or instances doing this for one order is harmless: the
first changes it, the others find it final and change nothing.  A worker that
stops meanwhile loses nothing: reconcile still settles the order.
"""
import logging
import time

import gevent
from flask import current_app
from sqlalchemy.exc import SQLAlchemyError

from ..errors import ApiError
from ..extensions import db
from ..orders import service as orders
from ..orders.state import Decision, Status
from .client import PayHeroError, get_payhero
from .schemas import parse_transaction_status

log = logging.getLogger(__name__)

EXTENSION = "eventi.payhero.reverifying"
# Past this many at once in one worker (PayHero down at a sales opening), the rest are left to reconcile.
MAX_REVERIFYING = 1000


def ask_payhero(reference):
    """(PayHero's outcome for `reference`, None), or (None, why it has none to give yet).

    None yet: no reference to ask with, PayHero not answering within
    PAYHERO_VERIFY_TIMEOUT, or a payment it has not processed (QUEUED).
    """
    if not reference:
        return None, "the order has no PayHero reference yet to check the payment with"
    try:
        answer = get_payhero().transaction_status(reference, current_app.config["PAYHERO_VERIFY_TIMEOUT"])
    except PayHeroError as exc:
        return None, f"could not ask PayHero to confirm it: {exc}"
    outcome = parse_transaction_status(reference, answer)
    if outcome is None:
        return None, f"PayHero's transaction status is {answer.get('status')!r}, not 'SUCCESS'"
    return outcome, None


def amount_doubt(said, order_amount):
    return f"PayHero's transaction status says KES {said}, the order is KES {order_amount}"


def init_app(app):
    app.extensions[EXTENSION] = {}  # order id -> the greenlet asking PayHero again about it


def reverify_later(order_id):
    """Ask PayHero about `order_id` again in the background; at most one greenlet per order in a worker."""
    app = current_app._get_current_object()
    schedule, running = app.config["PAYHERO_REVERIFY_AFTER"], app.extensions[EXTENSION]
    if not schedule or order_id in running or len(running) >= MAX_REVERIFYING:
        return
    running[order_id] = greenlet = gevent.spawn(_reverify, app, order_id, schedule)
    greenlet.link(lambda _: running.pop(order_id, None))


def stop(app):
    """Drop this worker's re-verifications (reconcile settles their orders)."""
    gevent.killall(list(app.extensions[EXTENSION].values()))


def _reverify(app, order_id, schedule):
    started = time.monotonic()
    why = None
    for after in schedule:
        gevent.sleep(max(0.0, started + after - time.monotonic()))
        with app.app_context():
            try:
                settled, why = _settle(order_id, started)
            except SQLAlchemyError as exc:  # the database is down: ask again at the next step
                settled, why = False, f"database error: {type(exc).__name__}"
            except Exception:  # a bug of ours: say so once, and leave the order to reconcile
                log.exception("Re-verifying the payment for order %s failed", order_id)
                return
            finally:
                db.session.remove()
        if settled:
            return
    log.warning("Payment for order %s not confirmed by PayHero in %gs (%s); reconcile will settle it",
                order_id, schedule[-1], why)


def _settle(order_id, started):
    """Ask PayHero once; apply a definitive answer.  (True, None) once nothing is left to ask, else (False, why)."""
    try:
        order = orders.order_by_id(order_id)
    except ApiError:
        return True, None  # gone: nothing to settle
    if order["status"] != Status.PENDING:
        return True, None  # settled meanwhile: a later callback, another worker, reconcile
    outcome, why = ask_payhero(order["payment"]["reference"])
    if outcome is None:
        return False, why
    # PayHero's own answer, success or failure, applied as reconcile applies it.
    transition, order = orders.apply_payment_outcome(outcome, order_id)
    if transition.changes:
        log.info("Payment for order %s settled as %s from PayHero's transaction status, %.1fs after its callback",
                 order_id, order["status"], time.monotonic() - started)
    elif transition.decision is Decision.AMOUNT_MISMATCH:
        log.warning("Payment for order %s not completed: %s", order_id, amount_doubt(outcome.amount, order["amount"]))
    return True, None
