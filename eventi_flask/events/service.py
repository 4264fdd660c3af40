"""The events service layer: each public function owns its transaction."""
import re
from datetime import datetime

from marshmallow import ValidationError
from sqlalchemy import exists, func, select

from ..clock import as_utc, east_africa_time, utcnow
from ..errors import ApiError
from ..extensions import db
from ..orders.models import Order
from ..orders.state import Status
from .models import Event, TicketType
from .schemas import EventFileSchema, first_problem, serialize_event

# What a slug can be: anything else is unknown without asking the database.
SLUG = re.compile(r"[A-Za-z0-9_-]{1,100}")
event_file_schema = EventFileSchema()


class ImportRefused(Exception):
    """An event file that cannot be applied as it is; the message names the problem.  Nothing was changed."""


def event_by_slug(slug, now=None):
    """The event as the API shows it, on sale or not at `now` (default: now)."""
    event = db.session.scalar(select(Event).where(Event.slug == slug)) if SLUG.fullmatch(slug) else None
    if event is None:
        raise ApiError(404, "event_not_found", f"No event called {slug!r}.")
    return serialize_event(event, now)


def order_refusal(event_slug, ticket_type_code, quantity, now):
    """Why an order the reservation did not take (orders.rows.create_order) could not be had, at `now`: an ApiError."""
    ticket_type = db.session.scalar(select(TicketType).join(TicketType.event)
                                    .where(Event.slug == event_slug, TicketType.code == ticket_type_code))
    if ticket_type is None:
        if db.session.scalar(select(Event.id).where(Event.slug == event_slug)) is None:
            return ApiError(404, "event_not_found", f"No event called {event_slug!r}.", {"event": "Unknown event."})
        return ApiError(404, "ticket_type_not_found", f"No ticket type {ticket_type_code!r} for this event.",
                        {"ticket_type": "Unknown ticket type."})
    if quantity > ticket_type.max_per_order:
        most = f"Choose at most {ticket_type.max_per_order} {ticket_type.name} tickets."
        return ApiError(400, "invalid_request", most, {"quantity": most})
    event = ticket_type.event
    state = event.sales_state(now)
    if state == "not_open":
        return ApiError(409, "sales_not_open", f"Sales open on {east_africa_time(event.sales_start)}.")
    if state == "closed":
        return ApiError(409, "sales_closed", "Sales for this event have closed.")
    left = ticket_type.available
    return ApiError(409, "sold_out", f"Only {left} {ticket_type.name} tickets are left.", {"quantity": f"Only {left} left."})


# -- putting an event on sale from a file --

def import_event(file_data):
    """Create or update the event an event file describes (`file_data`: the parsed TOML), in one transaction.

    Returns (outcome, changes, event): outcome "created", "updated" or "unchanged"; changes, what
    moved, in words.  Raises ImportRefused, having changed nothing, for a missing or bad field, a
    quantity below the tickets already held, or a ticket type with orders missing from the file.
    """
    try:
        data = event_file_schema.load(file_data)
    except ValidationError as err:
        raise ImportRefused(first_problem(err, file_data)) from None
    try:
        outcome, changes, event = _apply_event_file(data)
    except ImportRefused:
        db.session.rollback()
        raise
    db.session.commit()
    return outcome, changes, event


def _apply_event_file(data):
    section = data["event"]
    # Locked: two imports of one event queue up, and no order takes tickets while quantities are checked.
    event = db.session.scalar(select(Event).where(Event.slug == section["slug"]).with_for_update()
                              .execution_options(populate_existing=True))
    if event is None:
        event = Event(**section)
        event.ticket_types = [_new_ticket_type(entry) for entry in data["ticket_types"]]
        db.session.add(event)
        return "created", [f"{len(data['ticket_types'])} ticket types"], event
    changes = _assign(event, section, "")
    current = {tt.code: tt for tt in db.session.scalars(
        select(TicketType).where(TicketType.event_id == event.id).with_for_update(of=TicketType)
        .execution_options(populate_existing=True)).unique()}
    for entry in data["ticket_types"]:
        ticket_type = current.pop(entry["id"], None)
        if ticket_type is None:
            event.ticket_types.append(_new_ticket_type(entry))
            changes.append(f"{entry['id']} added")
            continue
        if entry["quantity"] < ticket_type.reserved:
            raise ImportRefused(f'ticket type "{entry["id"]}": quantity {entry["quantity"]} is below the '
                                f"{ticket_type.reserved} tickets already held (paid or pending).")
        changes += _assign(ticket_type, _ticket_type_columns(entry), f"{entry['id']}.")
    for code, ticket_type in current.items():
        if db.session.scalar(select(exists().where(Order.ticket_type_id == ticket_type.id))):
            raise ImportRefused(f'ticket type "{code}" has orders, so it cannot be removed: keep it in the file '
                                f"(its quantity can go down to the {ticket_type.reserved} tickets held).")
        db.session.delete(ticket_type)
        changes.append(f"{code} removed")
    return ("updated" if changes else "unchanged"), changes, event


def _ticket_type_columns(entry):
    return {"name": entry["name"], "price": entry["price"], "capacity": entry["quantity"],
            "max_per_order": entry["max_per_order"]}


def _new_ticket_type(entry):
    return TicketType(code=entry["id"], reserved=0, **_ticket_type_columns(entry))


def _assign(row, values, prefix):
    """Set the columns of `row` that differ from `values`; the names of those changed (an unchanged file changes nothing)."""
    changed = []
    for name, value in values.items():
        current = getattr(row, name)
        if isinstance(current, datetime):
            current = as_utc(current)  # SQLite hands back naive UTC
        if current != value:
            setattr(row, name, value)
            changed.append(prefix + ("quantity" if name == "capacity" else name))
    return changed


# -- what operators read --

def all_events(now=None):
    """Every event, soonest first, with its sales window and whether it is on sale."""
    now = now or utcnow()
    events = db.session.scalars(select(Event).order_by(Event.starts_at)).all()
    return [{**serialize_event(event, now), "sales_state": event.sales_state(now)} for event in events]


def event_sales(slug):
    """The event and, per ticket type: price, quantity, sold, pending, available, revenue; None if unknown."""
    event = db.session.scalar(select(Event).where(Event.slug == slug)) if SLUG.fullmatch(slug) else None
    if event is None:
        return None
    totals = db.session.execute(
        select(Order.ticket_type_id, Order.status, func.sum(Order.quantity), func.sum(Order.amount))
        .join(TicketType, Order.ticket_type_id == TicketType.id)
        .where(TicketType.event_id == event.id, Order.status.in_([Status.COMPLETED.value, Status.PENDING.value]))
        .group_by(Order.ticket_type_id, Order.status)).all()
    by_type = {(type_id, status): (tickets, amount) for type_id, status, tickets, amount in totals}
    ticket_types = []
    for tt in event.ticket_types:
        sold, revenue = by_type.get((tt.id, Status.COMPLETED.value), (0, 0))
        pending, _ = by_type.get((tt.id, Status.PENDING.value), (0, 0))
        ticket_types.append({"id": tt.code, "name": tt.name, "price": tt.price, "quantity": tt.capacity,
                             "sold": int(sold), "pending": int(pending), "available": tt.available,
                             "revenue": int(revenue), "max_per_order": tt.max_per_order})
    line = {"enabled": event.line_enabled, "max_rate": event.line_max_rate,
            "pre_queue_minutes": event.line_pre_queue_minutes}
    return {**serialize_event(event), "sales_state": event.sales_state(utcnow()), "ticket_types": ticket_types,
            "line": line}
