"""What the orders API accepts (marshmallow) and what it answers (plain dicts)."""
from flask import current_app
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates

from ..errors import ApiError
from ..web.ticket_links import ticket_url
from .models import as_utc
from .phone import PHONE_WITH_SEPARATORS, mask_phone, normalize_phone
from .state import Status


class PhoneField(fields.String):
    default_error_messages = {"invalid_phone": "Enter a Safaricom or Airtel Kenya number, like 0712 345 678."}

    def _deserialize(self, value, attr, data, **kwargs):
        phone = normalize_phone(super()._deserialize(value, attr, data, **kwargs))
        if phone is None:
            raise self.make_error("invalid_phone")
        return phone


class StrictInteger(fields.Integer):
    """A JSON integer: 3, or 3.0 (the same number in JSON); never true, "3" or 3.5."""

    def _validated(self, value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._validated(value)


class Text(fields.String):
    """A string PostgreSQL can store: no NUL character.  One with it is refused naming the
    field, and the OpenAPI document says so (the pattern)."""

    default_error_messages = {"nul": "Contains a character that is not allowed."}
    WITHOUT_NUL = r"^[^\x00]*$"

    def __init__(self, **kwargs):
        kwargs["metadata"] = {"pattern": self.WITHOUT_NUL, **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in value:
            raise self.make_error("nul")
        return value


class OrderCreateSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    # The examples go into the OpenAPI document: the demo event, so a client trying it gets a 201.
    event = Text(required=True, validate=validate.Length(min=1, max=100),
                 metadata={"example": "test-this-end-to-end"})
    ticket_type = Text(required=True, validate=validate.Length(min=1, max=50), metadata={"example": "early-bird"})
    quantity = StrictInteger(required=True, validate=validate.Range(min=1, max=10, error="Choose between 1 and 10 tickets."),
                             metadata={"example": 1})
    name = Text(required=True, validate=validate.Length(min=1, max=200, error="Enter your name (up to 200 characters)."),
                metadata={"example": "Wanjiku Kamau", "pattern": r"^[^\x00]*[^\s\x00][^\x00]*$"})
    email = fields.Email(required=True, validate=validate.Length(max=254), error_messages={"invalid": "Enter a valid email address."},
                         metadata={"example": "wanjiku@example.com"})
    phone = PhoneField(required=True, metadata={
        "example": "0712345678", "pattern": PHONE_WITH_SEPARATORS,
        "description": "07XXXXXXXX, 01XXXXXXXX, 7XXXXXXXX, 2547XXXXXXXX or +2547XXXXXXXX (and the 1 forms)"})

    @validates("name")
    def _name_not_blank(self, value, **kwargs):
        if not value.strip():
            raise ValidationError("Enter your name.")


IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_MAX = 255


def idempotency_key(headers):
    """The request's Idempotency-Key: any string of 1 to 255 characters, or None without one."""
    key = headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is None:
        return None
    try:  # WSGI hands a header over as latin-1; a client that sent UTF-8 meant its characters
        key = key.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    if not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
        raise ApiError(400, "invalid_idempotency_key", f"The Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters.",
                       {IDEMPOTENCY_KEY_HEADER: f"Between 1 and {IDEMPOTENCY_KEY_MAX} characters, got {len(key)}."})
    return key


class UpToSetting(validate.Range):
    """0 to the app's setting `name`, read when used: the check and the OpenAPI
    document (which reads `max` too) always agree with the running app."""

    def __init__(self, name, error):
        self.setting = name
        super().__init__(min=0, error=error)

    @property
    def max(self):
        return current_app.config[self.setting]

    @max.setter
    def max(self, _):
        pass  # Range.__init__ assigns it; the setting is the bound


class WaitArgsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    timeout = fields.Float(allow_nan=False,
                           validate=UpToSetting("WAIT_TIMEOUT_MAX", "timeout must be between {min} and {max:g} seconds."),
                           error_messages={"invalid": "timeout must be a number of seconds."},
                           metadata={"description": "Seconds to hold at most; WAIT_TIMEOUT_DEFAULT when absent."})
    since = fields.Integer(strict=False, error_messages={"invalid": "since must be an integer version."},
                           metadata={"description": "The version the client has; absent: hold while the order is pending."})


# What the API answers.  The bodies themselves are built as plain dicts below (the
# hot paths); these describe them for the OpenAPI document, and the fuzz test
# checks every answer against them.
def _required(field_class, *args, **kwargs):
    return field_class(*args, required=True, **kwargs)


class PaymentSchema(Schema):
    reference = _required(fields.String, allow_none=True, metadata={"description": "PayHero's reference"})
    checkout_request_id = _required(fields.String, allow_none=True)
    receipt = _required(fields.String, allow_none=True, metadata={"description": "The M-Pesa receipt number"})
    result_code = _required(fields.Integer, allow_none=True, metadata={"description": "M-Pesa's result code"})
    result_desc = _required(fields.String, allow_none=True)
    refund_due = _required(fields.Boolean, metadata={
        "description": "Paid after the order failed or was cancelled, with no tickets left to give: the money is owed back"})


class TicketSchema(Schema):
    code = _required(fields.String)


class OrderSchema(Schema):
    id = _required(fields.String)
    status = _required(fields.String, validate=validate.OneOf([status.value for status in Status]),
                       metadata={"description": "completed, failed and cancelled are final"})
    version = _required(fields.Integer, validate=validate.Range(min=1),
                        metadata={"description": "1 when created, +1 on every change"})
    event = _required(fields.String)
    ticket_type = _required(fields.String)
    quantity = _required(fields.Integer, validate=validate.Range(min=1, max=10))
    amount = _required(fields.Integer, metadata={"description": "KES"})
    currency = _required(fields.String, validate=validate.OneOf(["KES"]))
    phone = _required(fields.String, metadata={"description": "Masked: 2547******78", "example": "2547******78"})
    created_at = _required(fields.DateTime)
    updated_at = _required(fields.DateTime)
    payment = _required(fields.Nested, PaymentSchema)
    tickets = fields.List(fields.Nested(TicketSchema), metadata={"description": "Once completed: one per ticket"})
    tickets_url = fields.Url(metadata={"description": "Once completed: the tickets' page, signed (GET /t/<token>); "
                                                      "the link the SMS and the email carry"})


def field_errors(err):
    """Flatten marshmallow's messages to {field: "first sentence"}; a nested field is "outer.inner"."""
    return dict(_first_messages(err.normalized_messages()))


def _first_messages(messages, prefix=""):
    for name, message in messages.items():
        if isinstance(message, dict):
            yield from _first_messages(message, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", message[0] if isinstance(message, list) else str(message)


def isoformat(moment):
    return as_utc(moment).isoformat().replace("+00:00", "Z")


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
            "refund_due": bool(values["refund_due"]),
        },
    }
    if values["status"] == "completed":
        body["tickets"] = [{"code": code} for code in ticket_codes]
        body["tickets_url"] = ticket_url(values["id"])  # an HMAC: microseconds
    return body


def serialize_order(order):
    """The public order from an ORM Order."""
    values = {column.key: getattr(order, column.key) for column in order.__table__.columns}
    values["event_slug"] = order.ticket_type.event.slug
    values["ticket_type_code"] = order.ticket_type.code
    return order_body(values, [ticket.code for ticket in order.tickets])
