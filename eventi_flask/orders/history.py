"""What happened to an order, for the engineer on call: `orders show` and `orders stuck`.

Read only, from the order's row, its log (PayHero's answer to the STK push,
reconcile's checks: OrderLogEntry) and the callbacks stored for it.  A
callback that could not be tied to its order (a wrong token, a body we could
not read, a database error) has no order_id, so those are found by the order
id appearing in their body.  Each entry is a plain dict, ready for --json.
"""
from datetime import datetime, timedelta

from sqlalchemy import select

from ..extensions import db
from ..messages.service import messages_of
from ..payhero.models import PayheroCallback
from ..payhero.replay import replayed_from
from ..payhero.schemas import describe_callback
from .models import Order, OrderLogEntry, as_utc, utcnow
from .phone import mask_phone, normalize_phone
from .schemas import isoformat, serialize_order
from .service import ORDER_ID
from .state import Status

LATEST_FOR_A_PHONE = 10


def find_orders(term):
    """The orders `term` names, newest first: an order id, a phone (its latest ten), or an M-Pesa
    receipt (on the order, or only in a callback, such as a success that came after a failure)."""
    term = term.strip()
    try:
        if ORDER_ID.fullmatch(term) and (order := db.session.get(Order, term)) is not None:
            return [order]
        newest_first = select(Order).order_by(Order.created_at.desc())
        phone = normalize_phone(term)
        if phone is not None:
            return db.session.scalars(newest_first.where(Order.phone == phone).limit(LATEST_FOR_A_PHONE)).unique().all()
        if not term:
            return []
        return db.session.scalars(newest_first.where((Order.receipt == term) | Order.id.in_(_orders_in_callbacks(term))))\
            .unique().all()
    finally:
        db.session.commit()


def _orders_in_callbacks(term):
    """Ids of the orders of the callbacks whose body holds `term`; an untied one's from its body."""
    found = db.session.execute(select(PayheroCallback.order_id, PayheroCallback.body)
                               .where(PayheroCallback.body.contains(term, autoescape=True))).all()
    return {order_id or describe_callback(body)["order_id"] for order_id, body in found} - {None}


def _callbacks_about(orders):
    """{order id: its stored callbacks, in the order they came} for `orders`, in two queries:
    those tied to them (indexed), and the few untied ones received since the oldest, whose
    body names one of them."""
    found = {order.id: [] for order in orders}
    if not orders:
        return found
    tied = db.session.scalars(select(PayheroCallback).where(PayheroCallback.order_id.in_(list(found)))).all()
    untied = db.session.scalars(select(PayheroCallback).where(
        PayheroCallback.order_id.is_(None), PayheroCallback.received_at >= min(order.created_at for order in orders))).all()
    for callback in tied:
        found[callback.order_id].append(callback)
    for callback in untied:
        for order_id in found:
            if order_id in callback.body:
                found[order_id].append(callback)
    for callbacks in found.values():
        callbacks.sort(key=lambda callback: callback.id)
    return found


def _entry(moment, event, **details):
    """(when, what): the moment to sort by, and the entry as shown."""
    return as_utc(moment), {"at": isoformat(moment), "event": event, **details}


def timeline(order):
    """The order as the API shows it, and its history in time order."""
    entries = [_entry(order.created_at, "created", amount=order.amount, quantity=order.quantity,
                      ticket_type=order.ticket_type.code, event_slug=order.ticket_type.event.slug)]
    notes = db.session.scalars(select(OrderLogEntry).where(OrderLogEntry.order_id == order.id)
                               .order_by(OrderLogEntry.id)).all()
    entries += [_entry(note.at, note.kind, **note.detail) for note in notes]
    for callback in _callbacks_about([order])[order.id]:
        said = describe_callback(callback.body)
        del said["order_id"]  # this order's
        entries.append(_entry(callback.received_at, "callback", id=callback.id, **said, outcome=callback.outcome,
                              detail=callback.detail, replay_of=replayed_from(callback.remote_addr)))
    for message in messages_of(order.id):  # the tickets' SMS and email, when it was sent (or queued)
        entries.append(_entry(message["sent_at"] or message["created_at"], "message",
                              **{key: isoformat(value) if isinstance(value, datetime) else value
                                 for key, value in message.items()}))
    body = serialize_order(order)
    # A final status when it was reached; a pending one is how things stand now.
    reached = utcnow() if body["status"] == Status.PENDING else order.updated_at
    entries.append(_entry(reached, "status", status=body["status"], version=body["version"], **body["payment"],
                          tickets=[ticket["code"] for ticket in body.get("tickets", [])]))
    db.session.commit()
    entries.sort(key=lambda pair: pair[0])  # stable: at the same moment, the order above
    return {"order": body, "timeline": [entry for _, entry in entries]}


def stuck_orders(older_than):
    """Orders still pending after `older_than` seconds, oldest first, with the callbacks stored for each."""
    now = utcnow()
    orders = db.session.scalars(select(Order).where(Order.status == Status.PENDING.value,
                                                    Order.created_at < now - timedelta(seconds=older_than))
                                .order_by(Order.created_at)).unique().all()
    callbacks = _callbacks_about(orders)
    stuck = []
    for order in orders:
        stuck.append({
            "id": order.id,
            "age_seconds": int((now - as_utc(order.created_at)).total_seconds()),
            "amount": order.amount,
            "phone": mask_phone(order.phone),
            "reference": order.payhero_reference,
            "callbacks": [callback.outcome for callback in callbacks[order.id]],
        })
    db.session.commit()
    return stuck
