"""Events and their ticket types."""
from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..extensions import db


class Event(db.Model):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    venue: Mapped[str] = mapped_column(String(200))
    starts_at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True))
    ticket_types: Mapped[list["TicketType"]] = relationship(back_populates="event", order_by="TicketType.price")


class TicketType(db.Model):
    __tablename__ = "ticket_types"

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    code: Mapped[str] = mapped_column(String(50))
    name: Mapped[str] = mapped_column(String(100))
    price: Mapped[int]
    capacity: Mapped[int]
    # Tickets held by pending or completed orders; released when an order fails.
    reserved: Mapped[int] = mapped_column(default=0)
    event: Mapped[Event] = relationship(back_populates="ticket_types", lazy="joined", innerjoin=True)

    __table_args__ = (db.UniqueConstraint("event_id", "code"),)

    @property
    def available(self):
        return max(self.capacity - self.reserved, 0)
