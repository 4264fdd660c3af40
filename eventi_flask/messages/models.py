"""The outbox: one row per message a completed order sends (its SMS, its email)."""
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ..clock import utcnow
from ..extensions import db

CHANNELS = ("sms", "email")
PENDING, SENT, FAILED = "pending", "sent", "failed"


class OutboxMessage(db.Model):
    """Written in the transaction that completes its order; sent after the commit (sender.py).

    Only the recipient is kept: the text is made when it is sent, from the order and its tickets,
    so completing an order costs one INSERT and nothing rendered.  `next_attempt_at` is also the
    claim: a sender moves it past its lease before sending, so no other sender takes the message
    meanwhile, and a sender that dies mid-send leaves it to be taken again once the lease ends.
    """

    __tablename__ = "outbox_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"))
    channel: Mapped[str] = mapped_column(String(8))  # sms | email
    recipient: Mapped[str] = mapped_column(String(254))  # the order's phone (2547...) or email, as it was
    state: Mapped[str] = mapped_column(String(8), default=PENDING)  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    sent_at: Mapped[datetime | None] = mapped_column(db.DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("order_id", "channel", name="uq_outbox_messages_order_channel"),
        # What a sender looks for: pending and due.
        Index("ix_outbox_messages_state_next_attempt", "state", "next_attempt_at"),
    )
