"""The events service layer."""
import re

from sqlalchemy import select

from ..errors import ApiError
from ..extensions import db
from .models import Event
from .schemas import serialize_event

# What a slug can be: anything else is unknown without asking the database.
SLUG = re.compile(r"[A-Za-z0-9_-]{1,100}")


def event_by_slug(slug):
    event = db.session.scalar(select(Event).where(Event.slug == slug)) if SLUG.fullmatch(slug) else None
    if event is None:
        raise ApiError(404, "event_not_found", f"No event called {slug!r}.")
    return serialize_event(event)
