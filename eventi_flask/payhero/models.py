"""Every PayHero callback, stored exactly as it arrived, with what became of it."""
from datetime import datetime

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ..extensions import db
from ..orders.models import utcnow


class PayheroCallback(db.Model):
    __tablename__ = "payhero_callbacks"

    id: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime] = mapped_column(db.DateTime(timezone=True), default=utcnow)
    content_type: Mapped[str | None] = mapped_column(String(200))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    # Filled in once the callback has been handled: applied, repeat, ignored_final,
    # amount_mismatch, unknown_order, invalid, unauthorized, unverified, too_large, and
    # error when the database failed while applying it (answered 503: PayHero sends it again).
    outcome: Mapped[str] = mapped_column(String(32), default="received")
    detail: Mapped[str | None] = mapped_column(Text)
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"), index=True)
