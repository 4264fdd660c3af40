"""What an event file holds (marshmallow, API.md's TOML), and what the events API answers
(plain dicts, described for the OpenAPI document by the schemas)."""
from datetime import datetime, timezone

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from ..clock import utcnow
from ..orders.schemas import StrictInteger, Text, _required, isoformat
from .models import MAX_PER_ORDER

NAME_IN_URL = validate.Regexp(r"^[a-z0-9-]+$", error="Use only a-z, 0-9 and -.")


# -- the event file --

class AwareDateTime(fields.Field):
    """ISO 8601 with an offset, written as a string or as a TOML date-time; read as UTC."""

    default_error_messages = {"invalid": "Give a date and time with an offset, like 2027-02-14T19:00:00+03:00."}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise self.make_error("invalid") from None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise self.make_error("invalid")
        return value.astimezone(timezone.utc)


def _text(max_length, **kwargs):
    return Text(validate=validate.Length(min=1, max=max_length), **kwargs)


class LineSection(Schema):
    """[event.line]: the fair line at sales open (API.md, "The line")."""

    class Meta:
        unknown = RAISE

    enabled = fields.Boolean(load_default=True, truthy={True}, falsy={False})
    max_rate = StrictInteger(load_default=None, validate=validate.Range(min=1, error="Must be 1 or more orders a second."))
    pre_queue_minutes = StrictInteger(load_default=15, validate=validate.Range(min=0, max=24 * 60,
                                                                               error="Must be 0 to 1440 minutes."))


LINE_DEFAULTS = LineSection().load({})


class EventSection(Schema):
    class Meta:
        unknown = RAISE

    slug = fields.String(required=True, validate=[validate.Length(min=1, max=100), NAME_IN_URL])
    name = _text(200, required=True)
    venue = _text(200, required=True)
    starts_at = AwareDateTime(required=True)
    sales_start = AwareDateTime(load_default=None)
    sales_end = AwareDateTime(load_default=None)
    line = fields.Nested(LineSection, load_default=lambda: dict(LINE_DEFAULTS))

    @post_load
    def _line_columns(self, data, **kwargs):
        """[event.line]'s settings as the event's columns (line_enabled, line_max_rate, line_pre_queue_minutes)."""
        line = data.pop("line")
        data.update({f"line_{name}": value for name, value in line.items()})
        return data

    @validates_schema
    def _window_is_a_window(self, data, **kwargs):
        start, end = data.get("sales_start"), data.get("sales_end") or data.get("starts_at")
        if start is not None and end is not None and start >= end:
            field = "sales_end" if data.get("sales_end") else "sales_start"
            raise ValidationError("Sales must open before they close (sales_end, or starts_at).", field)


class TicketTypeSection(Schema):
    class Meta:
        unknown = RAISE

    id = fields.String(required=True, validate=[validate.Length(min=1, max=50), NAME_IN_URL])
    name = _text(100, required=True)
    price = StrictInteger(required=True, validate=validate.Range(min=1, error="Must be whole KES above 0."))
    quantity = StrictInteger(required=True, validate=validate.Range(min=0, error="Must be 0 or more."))
    max_per_order = StrictInteger(load_default=MAX_PER_ORDER,
                                  validate=validate.Range(min=1, max=MAX_PER_ORDER, error="Must be 1 to {max}."))


class EventFileSchema(Schema):
    class Meta:
        unknown = RAISE

    event = fields.Nested(EventSection, required=True)
    ticket_types = fields.List(fields.Nested(TicketTypeSection), required=True,
                               validate=validate.Length(min=1, error="List at least one [[ticket_types]]."))

    @validates_schema
    def _ids_are_unique(self, data, **kwargs):
        seen = set()
        for index, ticket_type in enumerate(data.get("ticket_types") or []):
            if ticket_type["id"] in seen:
                raise ValidationError({index: {"id": [f"{ticket_type['id']!r} is used twice."]}}, "ticket_types")
            seen.add(ticket_type["id"])


def first_problem(err, data):
    """The first thing wrong in an event file, as "where: what", in the file's own terms:
    `ticket_types[2] ("vip").price: Must be whole KES above 0.` (counted from 1, as people count)."""
    path, message = [], err.normalized_messages()
    while isinstance(message, dict):
        key = next(iter(message))
        path.append(key)
        message = message[key]
    message = message[0] if isinstance(message, list) else message
    if path[0] == "ticket_types" and len(path) > 1 and isinstance(path[1], int):
        entries = data.get("ticket_types") if isinstance(data, dict) else None
        entry = entries[path[1]] if isinstance(entries, list) and path[1] < len(entries) else None
        named = f' ("{entry["id"]}")' if isinstance(entry, dict) and isinstance(entry.get("id"), str) else ""
        return ".".join([f"ticket_types[{path[1] + 1}]{named}", *map(str, path[2:])]) + f": {message}"
    return ".".join(map(str, path)) + f": {message}"


# -- what the API answers --

class TicketTypeSchema(Schema):
    id = _required(fields.String)
    name = _required(fields.String)
    price = _required(fields.Integer, metadata={"description": "KES per ticket"})
    available = _required(fields.Integer, validate=validate.Range(min=0))
    max_per_order = _required(fields.Integer, validate=validate.Range(min=1, max=MAX_PER_ORDER),
                              metadata={"description": "The most tickets of this type in one order"})


class EventSchema(Schema):
    slug = _required(fields.String)
    name = _required(fields.String)
    venue = _required(fields.String)
    starts_at = _required(fields.DateTime)
    sales_start = _required(fields.DateTime, allow_none=True, metadata={"description": "null: on sale at once"})
    sales_end = _required(fields.DateTime, allow_none=True, metadata={"description": "null: until starts_at"})
    on_sale = _required(fields.Boolean, metadata={"description": "Now between sales_start and sales_end"})
    currency = _required(fields.String, validate=validate.OneOf(["KES"]))
    ticket_types = _required(fields.List, fields.Nested(TicketTypeSchema))
    line = _required(fields.Nested, "EventLineSchema", allow_none=True,
                     metadata={"description": "The event's line now; null while its store cannot be reached"})


def _isoformat_or_none(moment):
    return None if moment is None else isoformat(moment)


def serialize_event(event, now=None):
    return {
        "slug": event.slug,
        "name": event.name,
        "venue": event.venue,
        "starts_at": isoformat(event.starts_at),
        "sales_start": _isoformat_or_none(event.sales_start),
        "sales_end": _isoformat_or_none(event.sales_end),
        "on_sale": event.sales_state(now or utcnow()) == "open",
        "currency": "KES",
        "ticket_types": [
            {"id": tt.code, "name": tt.name, "price": tt.price, "available": tt.available,
             "max_per_order": tt.max_per_order}
            for tt in event.ticket_types
        ],
    }
