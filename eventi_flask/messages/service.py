"""The tickets' messages: written to the outbox with the order's completion, listed, sent again.

orders.service._apply writes the outbox_rows() of an order in the transaction that completes it (every
path does: a callback, a late success, reconcile, re-verification; on PostgreSQL in the very statement
that completes it), so the order is never completed without its messages, nor its messages written for
an order that is not.  After that transaction commits, this process's sender is woken (sender.py,
wake_after_commit); a message it does not send (another process completed the order, or this one
stopped) is found by a sweep.
"""
from dataclasses import dataclass
from datetime import datetime

from flask import current_app
from sqlalchemy import event, insert, select, update
from sqlalchemy.orm import Session

from ..clock import utcnow
from ..events.models import Event, TicketType
from ..extensions import db
from ..orders.models import Order, Ticket
from .models import PENDING, OutboxMessage

SENDER = "eventi.messages.sender"
_WAKE = "eventi.messages.wake"
_WAKE_COMMITTED = "eventi.messages.wake_committed"
MESSAGES = OutboxMessage.__table__
_QUEUE = insert(MESSAGES)


def queued_channels(config):
    """The channels a completed order gets a message on: SMS unless SMS_MODE=off, email when SMTP_URL is set."""
    return tuple(channel for channel, on in (("sms", config["SMS_MODE"] != "off"), ("email", bool(config["SMTP_URL"])))
                 if on)


def delivery_channels(config=None):
    """The channels that reach the buyer ("sms" with Africa's Talking, "email" with SMTP_URL): the success
    page tells them where their tickets went, or, when this is empty, to keep the link."""
    config = current_app.config if config is None else config
    return tuple(channel for channel in queued_channels(config)
                 if channel != "sms" or config["SMS_MODE"] == "africastalking")


def outbox_rows(order):
    """`order`'s messages (a row with id, phone, email) as outbox rows, one a channel configured, nothing rendered:
    the caller writes them in the transaction that completes it, then wake_after_commit()."""
    config = current_app.config
    now = utcnow()
    recipients = {"sms": order["phone"], "email": order["email"]}
    return [{"order_id": order["id"], "channel": channel, "recipient": recipients[channel], "state": PENDING,
             "attempts": 0, "next_attempt_at": now, "created_at": now} for channel in queued_channels(config)]


def wake_after_commit(session):
    """Wake this process's sender once `session` commits: it wrote messages (outbox_rows) in its transaction."""
    session.info[_WAKE] = current_app.extensions[SENDER]


@event.listens_for(Session, "after_commit")
def _committed(session):
    session.info[_WAKE_COMMITTED] = session.info.pop(_WAKE, None)


@event.listens_for(Session, "after_transaction_end")
def _wake_sender(session, transaction):
    # After the connection is back in the pool, as notify/service.py publishes.
    if transaction.parent is None:
        sender = session.info.pop(_WAKE_COMMITTED, None)
        if sender is not None:
            sender.wake()


@event.listens_for(Session, "after_rollback")
def _rolled_back(session):
    session.info.pop(_WAKE, None)


@dataclass
class TicketMessage:
    """What a message says: the order, its event and its ticket codes, as stored."""

    order_id: str
    name: str
    quantity: int
    receipt: str | None
    event_name: str
    venue: str
    starts_at: datetime
    ticket_type_name: str
    codes: list


_TICKET = (select(Order.id, Order.name, Order.quantity, Order.receipt, Event.name.label("event_name"), Event.venue,
                  Event.starts_at, TicketType.name.label("ticket_type_name"))
           .join_from(Order, TicketType, Order.ticket_type_id == TicketType.id).join(Event))


def read_tickets(order_ids):
    """{order id: TicketMessage} of the orders in `order_ids` that exist, in two queries whatever their number (the
    sender reads a whole batch's at once); in this app context's session, whose transaction the caller ends."""
    order_ids = list(order_ids)
    rows = db.session.execute(_TICKET.where(Order.id.in_(order_ids))).all()
    codes = {}
    for order_id, code in db.session.execute(select(Ticket.order_id, Ticket.code).where(Ticket.order_id.in_(order_ids))
                                             .order_by(Ticket.id)):
        codes.setdefault(order_id, []).append(code)
    return {row.id: TicketMessage(order_id=row.id, name=row.name, quantity=row.quantity, receipt=row.receipt,
                                  event_name=row.event_name, venue=row.venue, starts_at=row.starts_at,
                                  ticket_type_name=row.ticket_type_name, codes=codes.get(row.id, []))
            for row in rows}


def messages_of(order_id):
    """The order's outbox messages, as dicts for `orders show` (--json too)."""
    found = db.session.scalars(select(OutboxMessage).where(OutboxMessage.order_id == order_id)
                               .order_by(OutboxMessage.id)).all()
    return [{"channel": m.channel, "state": m.state, "attempts": m.attempts, "created_at": m.created_at,
             "sent_at": m.sent_at, "next_attempt_at": m.next_attempt_at if m.state == PENDING else None,
             "last_error": m.last_error, "provider_message_id": m.provider_message_id} for m in found]


class ResendRefused(Exception):
    """Why an order's messages cannot be sent again, in one line."""


def queue_again(order_id):
    """Make `order_id`'s messages due now, as new (created if it has none on a channel now configured, say
    SMTP_URL set since); the channels queued.  ResendRefused for an unknown or uncompleted order."""
    order = db.session.get(Order, order_id.strip())
    if order is None:
        raise ResendRefused(f"No order with the id {order_id.strip()!r}.")
    if order.status != "completed":
        raise ResendRefused(f"Order {order.id} is {order.status}: only a completed order has tickets to send.")
    channels = queued_channels(current_app.config)
    if not channels:
        raise ResendRefused("No channel is configured: SMS_MODE is off and SMTP_URL is not set.")
    now = utcnow()
    existing = set(db.session.scalars(select(OutboxMessage.channel).where(OutboxMessage.order_id == order.id)))
    fresh = {"state": PENDING, "attempts": 0, "next_attempt_at": now, "last_error": None, "sent_at": None,
             "provider_message_id": None}
    recipients = {"sms": order.phone, "email": order.email}
    for channel in channels:
        if channel in existing:
            db.session.execute(update(MESSAGES).where(MESSAGES.c.order_id == order.id, MESSAGES.c.channel == channel)
                               .values(**fresh, recipient=recipients[channel], created_at=now))
        else:
            db.session.execute(_QUEUE, {**fresh, "order_id": order.id, "channel": channel,
                                        "recipient": recipients[channel], "created_at": now})
    db.session.commit()
    return order.id, channels
