"""Payments owed back: `flask orders unsettled` and `flask orders settle`.

A success that came after its order failed or was cancelled, when the order's
tickets had gone to others, leaves the order `refund_due` (state.late_success):
the customer paid and has nothing.  Someone refunds them by hand (M-Pesa's
reversal, or PayHero's dashboard), then records it here with the refund's
reference: the order keeps `refund_due` (it did take money it could not honour)
and leaves the unsettled list; the refund goes in its timeline (`orders show`).
"""
import re

from sqlalchemy import func, select

from ..extensions import db
from .models import Order
from .phone import mask_phone
from .schemas import isoformat
from .service import ORDER_ID, add_note, changing_order

REFUND_NOTE = "refund"  # its kind in the order's log
REFUND_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,99}")
_UNSETTLED = (Order.refund_due.is_(True), Order.refund_reference.is_(None))


class RefundRefused(Exception):
    """Why a refund cannot be recorded, in one sentence for the operator."""


def unsettled_orders():
    """Every order owed a refund and not yet refunded, oldest first, as plain dicts (for --json)."""
    try:
        orders = db.session.scalars(select(Order).where(*_UNSETTLED).order_by(Order.updated_at)).unique().all()
        return [{
            "id": order.id,
            "status": order.status,
            "amount": order.amount,
            "currency": "KES",
            "receipt": order.receipt,
            "reference": order.payhero_reference,
            "phone": mask_phone(order.phone),
            "event": order.ticket_type.event.slug,
            "ticket_type": order.ticket_type.code,
            "paid_at": isoformat(order.updated_at),
        } for order in orders]
    finally:
        db.session.commit()


def unsettled_count():
    try:
        return db.session.scalar(select(func.count()).select_from(Order).where(*_UNSETTLED))
    finally:
        db.session.commit()


def settle(order_id, refund_reference):
    """Record that the money `order_id` was owed has been refunded, as `refund_reference`; the order's
    amount and receipt.  Recording the same reference again changes nothing; RefundRefused otherwise."""
    refund_reference = refund_reference.strip()
    if not REFUND_REFERENCE.fullmatch(refund_reference):
        raise RefundRefused(f"A refund reference is 1 to 100 letters, digits or ._:/- (got {refund_reference!r}).")

    if not ORDER_ID.fullmatch(order_id):
        raise RefundRefused(f"No order {order_id!r}.")

    def record(order):
        if order is None:
            raise RefundRefused(f"No order {order_id!r}.")
        if not order.refund_due:
            raise RefundRefused(f"Order {order_id} is {order.status} and owed no refund.")
        if order.refund_reference not in (None, refund_reference):
            raise RefundRefused(f"Order {order_id} was already refunded, as {order.refund_reference}.")
        if order.refund_reference is None:
            order.refund_reference = refund_reference
            add_note(order_id, REFUND_NOTE, {"reference": refund_reference, "amount": order.amount,
                                             "receipt": order.receipt})
        return {"id": order.id, "amount": order.amount, "receipt": order.receipt}

    try:
        return changing_order(order_id, record)
    except RefundRefused:
        db.session.rollback()
        raise
