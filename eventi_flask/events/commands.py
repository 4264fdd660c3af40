"""flask --app wsgi seed-demo"""
from datetime import datetime, timedelta, timezone

import click
from sqlalchemy import select

from ..extensions import db
from .models import Event, TicketType

DEMO_EVENT = {
    "slug": "test-this-end-to-end",
    "name": "Test This End to End",
    "venue": "KICC, Nairobi",
}
DEMO_TICKET_TYPES = [("early-bird", "Early bird", 300), ("regular", "Regular", 500)]
DEMO_CAPACITY = 1_000_000


def seed_demo():
    """Create the demo event and its ticket types if missing; return the event."""
    event = db.session.scalar(select(Event).where(Event.slug == DEMO_EVENT["slug"]))
    if event is None:
        starts = datetime.now(timezone.utc).replace(hour=18, minute=0, second=0, microsecond=0) + timedelta(days=30)
        event = Event(starts_at=starts, **DEMO_EVENT)
        db.session.add(event)
    existing = {tt.code for tt in event.ticket_types}
    for code, name, price in DEMO_TICKET_TYPES:
        if code not in existing:
            event.ticket_types.append(TicketType(code=code, name=name, price=price, capacity=DEMO_CAPACITY, reserved=0))
    db.session.commit()
    return event


@click.command("seed-demo")
def seed_demo_command():
    """Create the demo event test-this-end-to-end (idempotent)."""
    event = seed_demo()
    click.echo(f"Demo event ready: /events/{event.slug}/checkout")


def init_app(app):
    app.cli.add_command(seed_demo_command)
