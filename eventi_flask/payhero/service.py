"""Handling a PayHero callback: store it as received, then apply it at most once."""
import dataclasses
import hmac
import json
import logging
import time

from flask import current_app
from marshmallow import ValidationError
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.exc import SQLAlchemyError

from .. import database, metrics
from ..errors import ApiError
from ..extensions import db
from ..orders import rows
from ..orders import service as orders
from ..orders.models import utcnow
from ..orders.schemas import field_errors
from ..orders.state import Decision, Status
from .models import PayheroCallback
from .schemas import parse_callback
from .verify import amount_doubt, ask_payhero, reverify_later, unconfirmed

log = logging.getLogger(__name__)

CALLBACKS = PayheroCallback.__table__
# Built once: this is the hot path.  Its parameters named apart from an order's: on PostgreSQL the
# record goes in the statement that applies it (rows.change_order).
_VALUES = {name: bindparam("callback_" + name, type_=CALLBACKS.c[name].type)
           for name in ("received_at", "content_type", "remote_addr", "body", "outcome", "detail", "order_id")}
_INSERT_CALLBACK = insert(CALLBACKS).values(_VALUES).returning(CALLBACKS.c.id)
_UPDATE_CALLBACK = (update(CALLBACKS).where(CALLBACKS.c.id == bindparam("callback_id"))
                    .values({name: _VALUES[name] for name in ("outcome", "detail", "order_id")})
                    .returning(CALLBACKS.c.id))
RECEIVED = "received"  # stored, not yet handled (only while PayHero is asked to confirm it)


class StoredCallback:
    """One callback as received, and what became of it.

    Normally written once, with its outcome, in the transaction that applies
    it: a callback is never applied without its record, nor recorded as
    applied when it was not.  When it cannot be applied (bad input, or an
    error that rolled the transaction back) it is written alone.
    """

    def __init__(self, raw_body, content_type, remote_addr):
        self.values = {
            "received_at": utcnow(),
            # Kept as received, but for NUL, which PostgreSQL text cannot hold: written as its JSON escape.
            "body": raw_body.decode("utf-8", errors="replace").replace("\x00", "\\u0000"),
            "content_type": (content_type or "")[:200] or None,
            "remote_addr": remote_addr,
        }
        self.id = None  # once a committed row exists
        self._written = None

    def write(self, outcome, detail=None, order_id=None):
        """Write the record, or its new outcome, in the current transaction; the caller commits."""
        rows.write_row(db.session.connection(), self.row(outcome, detail, order_id))

    def row(self, outcome, detail=None, order_id=None):
        """The record, or its new outcome, as a rows.RowWrite: written by whoever sends it, in its transaction."""
        values = {"outcome": outcome, "detail": detail, "order_id": order_id}
        if self.id is None:
            statement, values = _INSERT_CALLBACK, {**self.values, **values}
        else:
            statement, values = _UPDATE_CALLBACK, {"id": self.id, **values}

        def written(callback_id):
            self._written = (callback_id, outcome)
        return rows.RowWrite(statement, {"callback_" + name: value for name, value in values.items()}, written)

    def committed(self):
        self.id, outcome = self._written
        if outcome != RECEIVED:  # not an outcome yet: counted when it has one
            metrics.callbacks.labels(outcome).inc()

    def save(self, outcome, detail=None, order_id=None):
        self.write(outcome, detail, order_id)
        db.session.commit()
        self.committed()

    def save_after_error(self, exc):
        """Applying failed and was rolled back: keep the body alone if the database still can; True if kept."""
        db.session.rollback()
        try:
            self.save("error", type(exc).__name__)
        except SQLAlchemyError:
            db.session.rollback()
            return False
        return True


def record_refused_body(content_type, remote_addr, length):
    """A body too large to read is still a callback received: keep a trace of it."""
    log.info("PAYHERO Callback received")
    with database.on_callbacks_engine():
        StoredCallback(b"", content_type, remote_addr).save("too_large", f"{length} bytes, over the 64 KB limit; body not kept")


def token_matches(given):
    """The current token, or the previous one while it is rotated (payments started before carry it)."""
    config = current_app.config
    given = (given or "").encode()
    accepted = (config["PAYHERO_CALLBACK_TOKEN"], config["PAYHERO_CALLBACK_TOKEN_PREVIOUS"])
    return any(hmac.compare_digest(given, token.encode()) for token in accepted if token)


def handle_callback(raw_body, content_type, token, remote_addr=None):
    """Return (status code, body) for one callback.  Every body is stored.

    On the callbacks' own connections (database.callbacks_engine): buyers holding every
    connection of the app's pool at sales open neither delay a callback nor make it a 503.
    """
    started = time.monotonic()
    log.info("PAYHERO Callback received")
    record = StoredCallback(raw_body, content_type, remote_addr)
    with database.on_callbacks_engine():
        try:
            return _handle(record, raw_body, content_type, token)
        except (ApiError, PoolTimeout):
            # Answered as such.  A pool timeout: the callbacks' connections all stayed busy for
            # CALLBACK_POOL_TIMEOUT (a database that slow), and none is free to store the body with.
            raise
        except SQLAlchemyError as exc:
            kept = record.save_after_error(exc)
            log.warning("PayHero callback not applied (%s), database error: %s",
                        "body kept" if kept else "not stored", database.cause(exc))
            # Nothing was applied: a 503 makes PayHero send it again rather than give up.
            raise ApiError(503, "try_again", "The payment could not be recorded just now; please send it again.",
                           headers={"Retry-After": "5"}) from exc
        except Exception as exc:  # a bug of ours: still keep the body, then answer 500
            record.save_after_error(exc)
            raise
        finally:
            metrics.callback_duration.observe(time.monotonic() - started)


def _handle(record, raw_body, content_type, token):
    if not token_matches(token):
        record.save("unauthorized")
        raise ApiError(401, "unauthorized", "Missing or wrong callback token.")
    if not (content_type or "").lower().startswith("application/json"):
        record.save("invalid", "content type")
        raise ApiError(415, "unsupported_media_type", "Callbacks must be sent as application/json.")
    try:
        outcome = parse_callback(current_app.json.loads(raw_body))  # refuses JSON nested deep (json_provider.py)
    except (ValueError, ValidationError) as exc:
        fields = field_errors(exc) if isinstance(exc, ValidationError) else {}
        record.save("invalid", json.dumps(fields) if fields else "not JSON")
        raise ApiError(400, "invalid_callback", "The callback body is not a PayHero payment result.", fields)
    order_id = None
    if outcome.success and current_app.config["PAYHERO_VERIFY_CALLBACKS"]:
        found = orders.find_order_for_payment(outcome)
        if found is not None and _worth_verifying(found, outcome):
            order_id = found["id"]
            # Stored before asking PayHero: that call can take seconds, and a restart then must not lose it.
            record.save(RECEIVED, "asking PayHero to confirm", order_id)
            callback = outcome
            outcome, doubt, _ = _verified(callback, found)
            if doubt is not None:
                # Answered 200 all the same: the body is kept, and PayHero is asked again shortly
                # (reconcile settles the order should this worker stop first).
                log.warning("Payment for order %s not completed: %s", order_id, doubt)
                record.save("unverified", doubt, order_id)
                reverify_later(order_id, callback.reference)
                return 200, {"received": True, "order": order_id, "status": found["status"]}

    def record_row(found_id, transition):
        return record.row(transition.decision.value if transition else "unknown_order", order_id=found_id)

    transition, order = orders.apply_payment_outcome(outcome, order_id, record_row=record_row)
    record.committed()
    if transition is None:
        raise ApiError(404, "order_not_found", "No order matches this payment's reference.")
    if transition.decision is Decision.AMOUNT_MISMATCH:
        raise ApiError(422, "amount_mismatch",
                       f"The payment amount ({outcome.amount}) does not match the order ({order['amount']}).",
                       {"amount": f"Expected {order['amount']}."})
    if transition.decision is Decision.PAYMENT_REUSED:
        raise ApiError(409, "payment_reused", "This payment's receipt or reference already paid for another order.",
                       {"reference": "Already used by another order."})
    return 200, {"received": True, "order": order["id"], "status": order["status"]}


def _worth_verifying(found, outcome):
    """Whether this success could change its order, so PayHero must confirm it first.

    A completed or refund-due order never takes another payment, a wrong amount is refused as it
    is, and so is a payment already another order's: none of those needs PayHero.
    """
    if found["status"] == Status.COMPLETED or found["refund_due"] or found["paid_another_order"]:
        return False
    return outcome.amount == found["amount"]


def _verified(outcome, order):
    """(outcome, None, check) when PayHero's transaction-status confirms this success; (None, why,
    check) otherwise; `check` as ask_payhero gives it.

    Asked with the order's own reference.  An order whose STK push PayHero did not answer in
    time has none: then the callback's reference is asked about, which no other order holds
    (_worth_verifying), and PayHero must confirm the amount too, as the reference is not ours.
    """
    ours = order["payhero_reference"]
    confirmed, check = ask_payhero(ours or outcome.reference)
    if confirmed is None or not confirmed.success:
        return None, unconfirmed(check), check
    if confirmed.amount is None and not ours:
        return None, "PayHero's transaction status names no amount for the callback's reference", check
    if confirmed.amount is not None and confirmed.amount != order["amount"]:
        return None, amount_doubt(confirmed.amount, order["amount"]), check
    # PayHero's receipt over the callback's: only the former is vouched for.
    return dataclasses.replace(outcome, receipt=confirmed.receipt or outcome.receipt,
                               reference=ours or outcome.reference), None, check


def verify_claimed_success(order_id, record_for):
    """For reconcile: the success callback stored for pending order `order_id`, which has no PayHero
    reference of its own, and never applied (PayHero did not confirm it, or the worker stopped while
    asking), verified again and applied as when it came (_worth_verifying, _verified).

    Returns (claim, transition, check): `claim` the callback's outcome, None when there is none
    still to answer for (none stored, or its payment already another order's); `transition` once
    PayHero confirmed it and it was applied (apply_payment_outcome, with `record_for(check)` as its
    `record`); `check` what PayHero was asked and said, as ask_payhero gives it.
    """
    claim = _claimed_success(order_id)
    found = orders.find_order_for_payment(claim) if claim is not None else None
    if found is None or found["id"] != order_id or not _worth_verifying(found, claim):
        return None, None, {}
    confirmed, _, check = _verified(claim, found)
    if confirmed is None:
        return claim, None, check
    transition, _ = orders.apply_payment_outcome(confirmed, order_id, record=record_for(check))
    return claim, transition, check


def _claimed_success(order_id):
    """The latest success callback stored for `order_id` and not applied, as a PaymentOutcome; or None."""
    bodies = db.session.scalars(
        select(CALLBACKS.c.body).where(CALLBACKS.c.order_id == order_id,
                                       CALLBACKS.c.outcome.in_(("unverified", RECEIVED)))
        .order_by(CALLBACKS.c.id.desc())).all()
    db.session.commit()  # ends the read: no connection held while PayHero is asked
    for body in bodies:
        try:
            outcome = parse_callback(current_app.json.loads(body))
        except (ValueError, ValidationError):
            continue
        if outcome.success:
            return outcome
    return None
