"""What the events API answers: plain dicts, described for the OpenAPI document by the schemas."""
from marshmallow import Schema, fields, validate

from ..orders.schemas import _required, isoformat


class TicketTypeSchema(Schema):
    id = _required(fields.String)
    name = _required(fields.String)
    price = _required(fields.Integer, metadata={"description": "KES per ticket"})
    available = _required(fields.Integer, validate=validate.Range(min=0))


class EventSchema(Schema):
    slug = _required(fields.String)
    name = _required(fields.String)
    venue = _required(fields.String)
    starts_at = _required(fields.DateTime)
    currency = _required(fields.String, validate=validate.OneOf(["KES"]))
    ticket_types = _required(fields.List, fields.Nested(TicketTypeSchema))



def serialize_event(event):
    return {
        "slug": event.slug,
        "name": event.name,
        "venue": event.venue,
        "starts_at": isoformat(event.starts_at),
        "currency": "KES",
        "ticket_types": [
            {"id": tt.code, "name": tt.name, "price": tt.price, "available": tt.available}
            for tt in event.ticket_types
        ],
    }
