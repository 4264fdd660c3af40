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


def serialize_order(order):
    body = {
        "id": order.id,
        "status": order.status,
        "version": order.version,
        "event": order.ticket_type.event.slug,
        "ticket_type": order.ticket_type.code,
        "quantity": order.quantity,
        "amount": order.amount,
        "currency": "KES",
        "phone": mask_phone(order.phone),
        "created_at": isoformat(order.created_at),
        "updated_at": isoformat(order.updated_at),
        "payment": {
            "reference": order.payhero_reference,
            "checkout_request_id": order.checkout_request_id,
            "receipt": order.receipt,
            "result_code": order.result_code,
            "result_desc": order.result_desc,
        },
    }
    if order.status == "completed":
        body["tickets"] = [{"code": t.code} for t in order.tickets]
    return body
