"""Handling a PayHero callback: store it as received, then apply it at most once."""
import dataclasses
import hmac
import json
import logging
import time

from flask import current_app
from marshmallow import ValidationError

from .. import metrics
from ..errors import ApiError
from ..extensions import db
from ..orders import service as orders
from ..orders.schemas import field_errors
from ..orders.state import Decision
from .client import PayHeroError, get_payhero
from .models import PayheroCallback
from .schemas import parse_callback

log = logging.getLogger(__name__)


def _store(raw_body, content_type, remote_addr):
    record = PayheroCallback(
        # Kept as received, but for NUL, which PostgreSQL text cannot hold: written as its JSON escape.
        body=raw_body.decode("utf-8", errors="replace").replace("\x00", "\\u0000"),
        content_type=(content_type or "")[:200] or None,
        remote_addr=remote_addr,
    )
    db.session.add(record)
    db.session.commit()
    return record


def _close(record, outcome, detail=None, order_id=None):
    record.outcome = outcome
    record.detail = detail
    record.order_id = order_id
    db.session.commit()
    metrics.callbacks.labels(outcome).inc()


def record_refused_body(content_type, remote_addr, length):
    """A body too large to read is still a callback received: keep a trace of it."""
    log.info("PAYHERO Callback received")
    _close(_store(b"", content_type, remote_addr), "too_large", f"{length} bytes, over the 64 KB limit; body not kept")


def token_matches(given):
    expected = current_app.config["PAYHERO_CALLBACK_TOKEN"]
    return hmac.compare_digest((given or "").encode(), expected.encode())


def handle_callback(raw_body, content_type, token, remote_addr=None):
    """Return (status code, body) for one callback.  Every body is stored first."""
    started = time.monotonic()
    log.info("PAYHERO Callback received")
    record = _store(raw_body, content_type, remote_addr)
    try:
        return _handle(record, raw_body, content_type, token)
    finally:
        metrics.callback_duration.observe(time.monotonic() - started)


def _handle(record, raw_body, content_type, token):
    if not token_matches(token):
        _close(record, "unauthorized")
        raise ApiError(401, "unauthorized", "Missing or wrong callback token.")
    if not (content_type or "").lower().startswith("application/json"):
        _close(record, "invalid", "content type")
        raise ApiError(415, "unsupported_media_type", "Callbacks must be sent as application/json.")
    try:
        if b"\\u0000" in raw_body:
            raise ValueError("NUL character")  # no PayHero field holds one, and PostgreSQL cannot
        outcome = parse_callback(json.loads(raw_body))
    except (ValueError, RecursionError, ValidationError) as exc:  # RecursionError: JSON nested thousands deep
        fields = field_errors(exc) if isinstance(exc, ValidationError) else {}
        _close(record, "invalid", json.dumps(fields) if fields else "not JSON")
        raise ApiError(400, "invalid_callback", "The callback body is not a PayHero payment result.", fields)
    order_id = orders.find_order_for_payment(outcome)
    if order_id is None:
        _close(record, "unknown_order")
        raise ApiError(404, "order_not_found", "No order matches this payment's reference.")
    if outcome.success and current_app.config["PAYHERO_VERIFY_CALLBACKS"]:
        outcome = _verified(outcome, order_id)
        if outcome is None:
            _close(record, "unverified", "PayHero did not confirm the payment", order_id)
            return 200, {"received": True, "order": order_id, "status": "pending"}
    transition, order = orders.apply_payment_outcome(order_id, outcome, record)
    metrics.callbacks.labels(transition.decision.value).inc()
    if transition.decision is Decision.AMOUNT_MISMATCH:
        raise ApiError(422, "amount_mismatch",
                       f"The payment amount ({outcome.amount}) does not match the order ({order['amount']}).",
                       {"amount": f"Expected {order['amount']}."})
    return 200, {"received": True, "order": order["id"], "status": order["status"]}


def _verified(outcome, order_id):
    """Ask PayHero to confirm a success before completing; None if it does not."""
    reference = outcome.reference or orders.payhero_reference(order_id)
    db.session.commit()  # ends the read transaction: no connection held across the HTTP call
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
