"""Orders and their tickets."""
import secrets
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, text
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..clock import as_utc, utcnow  # noqa: F401 (where the order modules import them from)
from ..events.models import TicketType
from ..extensions import db


def new_order_id():
    # 128 random bits, URL-safe: the id is the only key to a customer's order.
    return secrets.token_urlsafe(16)


class Order(db.Model):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_order_id)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    version: Mapped[int] = mapped_column(default=1)
    ticket_type_id: Mapped[int] = mapped_column(ForeignKey("ticket_types.id"))
    quantity: Mapped[int]
    amount: Mapped[int]
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(254))
    phone: Mapped[str] = mapped_column(String(12))
    # One PayHero payment never completes two orders: its reference and its M-Pesa receipt are
    # each on one order at most (decide() refuses a reuse; these catch a race past that check).
    payhero_reference: Mapped[str | None] = mapped_column(String(100), index=True, unique=True)
    checkout_request_id: Mapped[str | None] = mapped_column(String(100), index=True)
    receipt: Mapped[str | None] = mapped_column(String(100), index=True, unique=True)
    result_code: Mapped[int | None]
    result_desc: Mapped[str | None] = mapped_column(Text)
    # Paid, but too late to be given tickets (a success after the order failed or was cancelled,
    # and none left to hold): the money is owed back.  Stays true once refunded; the refund's
    # own reference (`flask orders settle`) is what takes it off `flask orders unsettled`.
    refund_due: Mapped[bool] = mapped_column(server_default=sa_false())  # no Python default: see rows._insert_order_for
    refund_reference: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True), default=utcnow)
    # When PayHero's transaction-status is next due to be asked about this order, had its callback
    # not come (set when PayHero takes the STK push; None: never), and how many times it was
    # (missed_callbacks.py).  No Python default for `asks`: see rows._insert_order_for.
    ask_at: Mapped[datetime | None] = mapped_column(db.DateTime(timezone=True))
    asks: Mapped[int] = mapped_column(server_default=text("0"))

    # Joined eagerly so that reading an order for an answer is one SELECT.
    ticket_type: Mapped[TicketType] = relationship(lazy="joined", innerjoin=True)
    tickets: Mapped[list["Ticket"]] = relationship(order_by="Ticket.id", lazy="joined")

    __table_args__ = (Index("ix_orders_status_created", "status", "created_at"),
                      Index("ix_orders_status_ask_at", "status", "ask_at"))
    # Every ORM UPDATE says WHERE version = <the version read> and raises StaleDataError
    # if another writer got there first (see rows.py); our code moves the version itself.
    __mapper_args__ = {"version_id_col": version, "version_id_generator": False}


class Ticket(db.Model):
    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)


class OrderLogEntry(db.Model):
    """What happened to an order that neither its row nor its stored callbacks keep:
    PayHero's answer to the STK push, reconcile's checks and re-verification's outcome.  Read by `orders show`."""

    __tablename__ = "order_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # stk_push, reconcile, reverify, asked
    detail: Mapped[dict] = mapped_column(db.JSON)


class IdempotencyKey(db.Model):
    """A client's Idempotency-Key on POST /api/orders, and the order its first request made.

    Claimed in the statement that reserves the tickets and inserts the order (rows.py), so two
    requests racing with one key make one order.  No foreign key to the order: a claim whose
    order could not be made (sold out) is written, then deleted, by that one request.
    """

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # sha256 of the validated body: the same key with another body is refused, not answered.
    body_hash: Mapped[str] = mapped_column(String(64))
    order_id: Mapped[str] = mapped_column(String(32))
    # The first answer's status; None while that answer is being made.  A 201 is answered again
    # with the order as it is now; any other status with `answer`, the error as first given.
    status_code: Mapped[int | None]
    answer: Mapped[dict | None] = mapped_column(db.JSON)
    # Keys are kept 24 hours (IDEMPOTENCY_KEY_TTL); reconcile deletes older ones.
    created_at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True), index=True)
