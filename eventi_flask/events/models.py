"""Events and their ticket types."""
from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy import true as sa_true
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..clock import as_utc
from ..extensions import db

# The most tickets one order may hold (the API's own bound on quantity); a type may allow fewer.
MAX_PER_ORDER = 10


class Event(db.Model):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    venue: Mapped[str] = mapped_column(String(200))
    starts_at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True))
    # The sales window: no start means on sale at once, no end means until the event starts.
    sales_start: Mapped[datetime | None] = mapped_column(db.DateTime(timezone=True))
    sales_end: Mapped[datetime | None] = mapped_column(db.DateTime(timezone=True))
    # The line ([event.line] in the event file, API.md "The line"): on by default; an optional cap on
    # orders admitted a second (what PayHero takes), and how long before sales_start arrivals may wait.
    line_enabled: Mapped[bool] = mapped_column(default=True, server_default=sa_true())
    line_max_rate: Mapped[int | None]
    line_pre_queue_minutes: Mapped[int] = mapped_column(default=15, server_default="15")
    ticket_types: Mapped[list["TicketType"]] = relationship(back_populates="event", order_by="TicketType.price")

    @property
    def sales_close(self):
        return self.sales_end or self.starts_at

    def sales_state(self, now):
        """"not_open", "open" or "closed" at `now` (an aware datetime)."""
        if self.sales_start is not None and now < as_utc(self.sales_start):
            return "not_open"
        if now >= as_utc(self.sales_close):
            return "closed"
        return "open"


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
    max_per_order: Mapped[int] = mapped_column(default=MAX_PER_ORDER, server_default=str(MAX_PER_ORDER))
    event: Mapped[Event] = relationship(back_populates="ticket_types", lazy="joined", innerjoin=True)

    __table_args__ = (db.UniqueConstraint("event_id", "code"),)

    @property
    def available(self):
        return max(self.capacity - self.reserved, 0)
