"""Handling a PayHero callback: store it as received, then apply it at most once."""
import dataclasses
import hmac
import json
import logging
import time

from flask import current_app
from marshmallow import ValidationError
from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError

from .. import metrics
from ..errors import ApiError
from ..extensions import db
from ..orders import service as orders
from ..orders.models import utcnow
from ..orders.schemas import field_errors
from ..orders.state import Decision
from .client import PayHeroError, get_payhero
from .models import PayheroCallback
from .schemas import parse_callback

log = logging.getLogger(__name__)

_INSERT_CALLBACK = insert(PayheroCallback.__table__)  # built once: this is the hot path


class StoredCallback:
    """One callback as received.  It is written once, with what became of it, in the
    transaction that applies it (or alone when it cannot be applied): a callback
    is never applied without its record, nor recorded as applied when it was not."""

    def __init__(self, raw_body, content_type, remote_addr):
        self.values = {
            "received_at": utcnow(),
            # Kept as received, but for NUL, which PostgreSQL text cannot hold: written as its JSON escape.
            "body": raw_body.decode("utf-8", errors="replace").replace("\x00", "\\u0000"),
            "content_type": (content_type or "")[:200] or None,
            "remote_addr": remote_addr,
        }

    def add(self, outcome, detail=None, order_id=None):
        """Write the record in the current transaction; the caller commits."""
        db.session.connection().execute(
            _INSERT_CALLBACK, {**self.values, "outcome": outcome, "detail": detail, "order_id": order_id})
        metrics.callbacks.labels(outcome).inc()

    def save(self, outcome, detail=None, order_id=None):
        self.add(outcome, detail, order_id)
        db.session.commit()


def record_refused_body(content_type, remote_addr, length):
    """A body too large to read is still a callback received: keep a trace of it."""
    log.info("PAYHERO Callback received")
    StoredCallback(b"", content_type, remote_addr).save("too_large", f"{length} bytes, over the 64 KB limit; body not kept")


def token_matches(given):
    expected = current_app.config["PAYHERO_CALLBACK_TOKEN"]
    return hmac.compare_digest((given or "").encode(), expected.encode())


def handle_callback(raw_body, content_type, token, remote_addr=None):
    """Return (status code, body) for one callback.  Every body is stored."""
    started = time.monotonic()
    log.info("PAYHERO Callback received")
    record = StoredCallback(raw_body, content_type, remote_addr)
    try:
        return _handle(record, raw_body, content_type, token)
    except SQLAlchemyError as exc:
        _save_after_error(record, exc)
        log.warning("PayHero callback not applied, database error: %s", type(exc).__name__)
        # Nothing was applied: a 503 makes PayHero send it again rather than give up.
        raise ApiError(503, "try_again", "The payment could not be recorded just now; please send it again.",
                       headers={"Retry-After": "5"}) from exc
    finally:
        metrics.callback_duration.observe(time.monotonic() - started)


def _save_after_error(record, exc):
    # Applying failed, and its transaction with it: the body is kept alone if it still can be.
    db.session.rollback()
    try:
        record.save("error", type(exc).__name__)
    except SQLAlchemyError:
        db.session.rollback()
        log.error("Could not store a PayHero callback: the database is unavailable")


def _handle(record, raw_body, content_type, token):
    if not token_matches(token):
        record.save("unauthorized")
        raise ApiError(401, "unauthorized", "Missing or wrong callback token.")
    if not (content_type or "").lower().startswith("application/json"):
        record.save("invalid", "content type")
        raise ApiError(415, "unsupported_media_type", "Callbacks must be sent as application/json.")
    try:
        if b"\\u0000" in raw_body:
            raise ValueError("NUL character")  # no PayHero field holds one, and PostgreSQL cannot
        outcome = parse_callback(json.loads(raw_body))
    except (ValueError, RecursionError, ValidationError) as exc:  # RecursionError: JSON nested thousands deep
        fields = field_errors(exc) if isinstance(exc, ValidationError) else {}
        record.save("invalid", json.dumps(fields) if fields else "not JSON")
        raise ApiError(400, "invalid_callback", "The callback body is not a PayHero payment result.", fields)
    order_id = None
    if outcome.success and current_app.config["PAYHERO_VERIFY_CALLBACKS"]:
        order_id, reference = orders.find_order_for_payment(outcome)
        if order_id is not None:
            outcome = _verified(outcome, order_id, reference)
            if outcome is None:
                record.save("unverified", "PayHero did not confirm the payment", order_id)
                return 200, {"received": True, "order": order_id, "status": "pending"}

    def add_record(found_id, transition):
        record.add(transition.decision.value if transition else "unknown_order", order_id=found_id)

    transition, order = orders.apply_payment_outcome(outcome, order_id, record=add_record)
    if transition is None:
        raise ApiError(404, "order_not_found", "No order matches this payment's reference.")
    if transition.decision is Decision.AMOUNT_MISMATCH:
        raise ApiError(422, "amount_mismatch",
                       f"The payment amount ({outcome.amount}) does not match the order ({order['amount']}).",
                       {"amount": f"Expected {order['amount']}."})
    return 200, {"received": True, "order": order["id"], "status": order["status"]}


def _verified(outcome, order_id, reference):
    """Ask PayHero to confirm a success before completing; None if it does not."""
    reference = outcome.reference or reference
    if not reference:
        return None
    try:
        status = get_payhero().transaction_status(reference)
    except PayHeroError as exc:
        log.warning("Could not verify payment for order %s: %s", order_id, exc)
        return None
    if status["status"] != "SUCCESS":
        return None
    return dataclasses.replace(outcome, receipt=outcome.receipt or status.get("provider_reference"))
