"""What the line's routes take and answer (API.md, "The line"), described for the OpenAPI document.

The answers themselves are plain dicts built in service.py (place_body); these schemas describe them.
"""
from marshmallow import Schema, fields, validate

from ..errors import ErrorDetailSchema
from ..orders.schemas import OrderSchema, WaitArgsSchema, _required

STATUSES = ["queued", "admitted", "sold_out", "refused", "left"]


class PlaceSchema(Schema):
    id = _required(fields.String, metadata={"description": "Unguessable; GET /api/queue/<id>"})
    status = _required(fields.String, validate=validate.OneOf(STATUSES),
                       metadata={"description": "queued while waiting; the others are final"})
    position = _required(fields.Integer, validate=validate.Range(min=0), metadata={"description": "1 = next; 0 once final"})
    ahead = _required(fields.Integer, validate=validate.Range(min=0))
    estimated_wait_s = _required(fields.Integer, validate=validate.Range(min=0),
                                 metadata={"description": "The people ahead over the measured serving rate"})
    version = _required(fields.Integer, validate=validate.Range(min=0),
                        metadata={"description": "Moves when the place moves (at most once a second), and when final"})
    order = _required(fields.Nested, OrderSchema, allow_none=True,
                      metadata={"description": "Once admitted: the order, as POST would have answered 201"})
    error = _required(fields.Nested, ErrorDetailSchema, allow_none=True,
                      metadata={"description": "sold_out or refused: the error POST would have given"})


class QueuedPlaceSchema(Schema):
    id = _required(fields.String)
    position = _required(fields.Integer, validate=validate.Range(min=1))
    ahead = _required(fields.Integer, validate=validate.Range(min=0))
    estimated_wait_s = _required(fields.Integer, validate=validate.Range(min=0))
    version = _required(fields.Integer, validate=validate.Range(min=0))


class QueuedSchema(Schema):
    """POST /api/orders's 202: a place in the event's line; nothing reserved yet."""

    status = _required(fields.String, validate=validate.OneOf(["queued"]))
    queue = _required(fields.Nested, QueuedPlaceSchema)


class EventLineSchema(Schema):
    length = _required(fields.Integer, validate=validate.Range(min=0), metadata={"description": "Places waiting"})
    serving_rate = _required(fields.Float, validate=validate.Range(min=0), metadata={"description": "Orders a second"})
    estimated_wait_s = _required(fields.Integer, validate=validate.Range(min=0),
                                 metadata={"description": "For someone joining now"})


class PlaceWaitArgsSchema(WaitArgsSchema):
    """timeout and since, as the order's wait takes them; no since: answer at once."""
