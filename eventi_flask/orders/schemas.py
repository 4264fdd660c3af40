"""What the orders API accepts (marshmallow) and what it answers (plain dicts)."""
from datetime import timezone

from flask import current_app
from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load, validate, validates

from .phone import mask_phone, normalize_phone


class PhoneField(fields.String):
    default_error_messages = {"invalid_phone": "Enter a Safaricom or Airtel Kenya number, like 0712 345 678."}

    def _deserialize(self, value, attr, data, **kwargs):
        phone = normalize_phone(super()._deserialize(value, attr, data, **kwargs))
        if phone is None:
            raise self.make_error("invalid_phone")
        return phone


class StrictInteger(fields.Integer):
    """An integer that refuses booleans and "3"; JSON clients send numbers."""

    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._validated(value)


class OrderCreateSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    @pre_load
    def _no_nul_characters(self, data, **kwargs):
        # PostgreSQL cannot store NUL in text; say which field instead of failing later.
        if isinstance(data, dict):
            bad = {name: "Contains a character that is not allowed." for name, value in data.items()
                   if isinstance(value, str) and "\x00" in value}
            if bad:
                raise ValidationError(bad)
        return data

    event = fields.String(required=True, validate=validate.Length(min=1, max=100))
    ticket_type = fields.String(required=True, validate=validate.Length(min=1, max=50))
    quantity = StrictInteger(required=True, validate=validate.Range(min=1, max=10, error="Choose between 1 and 10 tickets."))
    name = fields.String(required=True, validate=validate.Length(min=1, max=200, error="Enter your name (up to 200 characters)."))
    email = fields.Email(required=True, validate=validate.Length(max=254), error_messages={"invalid": "Enter a valid email address."})
    phone = PhoneField(required=True)

    @validates("name")
    def _name_not_blank(self, value, **kwargs):
        if not value.strip():
            raise ValidationError("Enter your name.")


class WaitArgsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    timeout = fields.Float(load_default=None, allow_nan=False, error_messages={"invalid": "timeout must be a number of seconds."})
    since = fields.Integer(load_default=None, strict=False, error_messages={"invalid": "since must be an integer version."})

    @validates("timeout")
    def _timeout_in_range(self, value, **kwargs):
        maximum = current_app.config["WAIT_TIMEOUT_MAX"]
        if value is not None and not 0 <= value <= maximum:
            raise ValidationError(f"timeout must be between 0 and {maximum:g} seconds.")


def field_errors(err):
    """Flatten marshmallow's messages to {field: "first sentence"}."""
    out = {}
    for name, messages in err.normalized_messages().items():
        out[name] = messages[0] if isinstance(messages, list) else str(messages)
    return out


def isoformat(moment):
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; we only ever store UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


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


def order_body(values, ticket_codes=()):
    """The public order (API.md) from a flat mapping: a row of the orders table
    plus `event_slug` and `ticket_type_code`, and the codes of its tickets."""
    body = {
        "id": values["id"],
        "status": values["status"],
        "version": values["version"],
        "event": values["event_slug"],
        "ticket_type": values["ticket_type_code"],
        "quantity": values["quantity"],
        "amount": values["amount"],
        "currency": "KES",
        "phone": mask_phone(values["phone"]),
        "created_at": isoformat(values["created_at"]),
        "updated_at": isoformat(values["updated_at"]),
        "payment": {
            "reference": values["payhero_reference"],
            "checkout_request_id": values["checkout_request_id"],
            "receipt": values["receipt"],
            "result_code": values["result_code"],
            "result_desc": values["result_desc"],
        },
    }
    if values["status"] == "completed":
        body["tickets"] = [{"code": code} for code in ticket_codes]
    return body


def serialize_order(order):
    """The public order from an ORM Order."""
    values = {column.key: getattr(order, column.key) for column in order.__table__.columns}
    values["event_slug"] = order.ticket_type.event.slug
    values["ticket_type_code"] = order.ticket_type.code
    return order_body(values, [ticket.code for ticket in order.tickets])
