"""PayHero callback bodies, both shapes, parsed into one PaymentOutcome."""
import json
from dataclasses import dataclass

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from ..orders.schemas import StrictInteger, Text
from ..orders.state import RESULT_SUCCESS, PaymentOutcome, Status, result_code_for_message

# Values past what the order's columns hold are bad fields (400), never a database error (500):
# result codes are 32-bit integers, references and receipts at most 100 characters.
RESULT_CODE_RANGE = (-2**31, 2**31 - 1)
FITS_COLUMN = validate.Length(max=100)


class Amount(fields.Number):
    """KES as a JSON number; a whole number of shillings (300 or 300.0)."""

    num_type = float

    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._validated(value)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class PaymentRule:
    """What makes a body a payment result, beyond its fields' types: a reference to find the
    order by, and an amount when it says the payment succeeded.  check() enforces it;
    json_schema() says the same for the OpenAPI document (openapi/spec.py reads
    `json_schema_rules` from a schema class)."""

    references: tuple
    success_field: str
    success_value: object
    amount_field: str

    def check(self, data):
        if not any(data.get(name) for name in self.references):
            raise ValidationError(f"One of {', '.join(self.references)} is required.", self.references[0])
        if data[self.success_field] == self.success_value and data[self.amount_field] is None:
            raise ValidationError(f"{self.amount_field} is required for a successful payment.", self.amount_field)

    def json_schema(self):
        return {
            "anyOf": [{"required": [name], "properties": {name: {"type": "string", "minLength": 1}}}
                      for name in self.references],
            "if": {"required": [self.success_field], "properties": {self.success_field: {"const": self.success_value}}},
            "then": {"required": [self.amount_field], "properties": {self.amount_field: {"type": "number"}}},
        }


class ClassicResponseSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    Amount = Amount(load_default=None)
    CheckoutRequestID = Text(load_default=None, validate=FITS_COLUMN)
    ExternalReference = Text(load_default=None, validate=FITS_COLUMN)
    MpesaReceiptNumber = Text(load_default=None, allow_none=True, validate=FITS_COLUMN)
    ResultCode = StrictInteger(required=True, validate=validate.Range(*RESULT_CODE_RANGE))
    ResultDesc = Text(load_default=None, allow_none=True)
    Status = Text(load_default=None)

    payment_rule = PaymentRule(("ExternalReference", "CheckoutRequestID"), "ResultCode", RESULT_SUCCESS, "Amount")
    json_schema_rules = payment_rule.json_schema()

    @validates_schema
    def _identifies_a_payment(self, data, **kwargs):
        self.payment_rule.check(data)


class ClassicCallbackSchema(Schema):
    """{"status": bool, "response": {...M-Pesa fields...}}: the shape PayHero's v2 docs show."""

    class Meta:
        unknown = EXCLUDE

    status = fields.Boolean(load_default=None, truthy={True}, falsy={False})
    response = fields.Nested(ClassicResponseSchema, required=True)


class FlatCallbackSchema(Schema):
    """{"success": bool, "status": "success|failed", "message", "external_reference", "amount", ...}.

    PayHero's current webhook reference; its other fields (currency, transaction_id,
    transaction_date, transaction_type, provider, callback_urls) are stored with the
    body and decide nothing.  It has no result code: a test body may still carry one.
    """

    class Meta:
        unknown = EXCLUDE

    success = fields.Boolean(required=True, truthy={True}, falsy={False})
    status = Text(load_default=None)
    message = Text(load_default=None, allow_none=True)
    reference = Text(load_default=None, allow_none=True, validate=FITS_COLUMN)
    external_reference = Text(load_default=None, allow_none=True, validate=FITS_COLUMN)
    amount = Amount(load_default=None)
    provider_reference = Text(load_default=None, allow_none=True, validate=FITS_COLUMN)
    result_code = StrictInteger(load_default=None, allow_none=True, validate=validate.Range(*RESULT_CODE_RANGE))

    payment_rule = PaymentRule(("external_reference", "reference"), "success", True, "amount")
    # A body with `response` is read as the classic shape.
    json_schema_rules = {**payment_rule.json_schema(), "not": {"required": ["response"]}}

    @validates_schema
    def _identifies_a_payment(self, data, **kwargs):
        self.payment_rule.check(data)


_classic, _flat = ClassicCallbackSchema(), FlatCallbackSchema()  # reusable; built once


def parse_callback(body):
    """PaymentOutcome from a decoded JSON body; ValidationError naming bad fields otherwise."""
    if not isinstance(body, dict):
        raise ValidationError("The callback body must be a JSON object.", "_schema")
    if "response" in body:
        r = _classic.load(body)["response"]
        return PaymentOutcome(
            success=r["ResultCode"] == 0,
            result_code=r["ResultCode"],
            result_desc=r["ResultDesc"],
            receipt=r["MpesaReceiptNumber"] or None,
            amount=r["Amount"],
            checkout_request_id=r["CheckoutRequestID"],
            order_id=r["ExternalReference"],
        )
    data = _flat.load(body)
    success = data["success"] and (data["status"] or "success").lower() == "success"
    result_code = data["result_code"]
    if result_code is None:  # as PayHero sends it: a failure's reason is only in its message
        result_code = RESULT_SUCCESS if success else result_code_for_message(data["message"])
    return PaymentOutcome(
        success=success,
        result_code=result_code,
        result_desc=data["message"],
        receipt=data["provider_reference"] if success else None,
        amount=data["amount"],
        reference=data["reference"],
        order_id=data["external_reference"],
    )


def _number(value):
    """A transaction-status amount (300, 300.0 or "300.00"), or None when it carries none we can read."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else value
    return None


def _text(answer, *names):
    """The first of `names` that `answer` has as a non-empty string, or None."""
    return next((answer[name] for name in names if isinstance(answer.get(name), str) and answer[name]), None)


def parse_transaction_status(reference, answer):
    """PaymentOutcome from a transaction-status answer; None while PayHero has not processed it.

    Only SUCCESS and FAILED are outcomes: QUEUED, and any status PayHero may add, mean
    "not processed yet".  PayHero's documented answer carries no amount (the sandbox's
    does); `amount` is set only when it does, so the order's amount is checked against it.
    """
    status = answer.get("status")
    if status == "SUCCESS":
        return PaymentOutcome(
            success=True, result_code=RESULT_SUCCESS, reference=reference, amount=_number(answer.get("amount")),
            receipt=_text(answer, "provider_reference", "third_party_reference"),
        )
    if status == "FAILED":
        result_code = answer.get("result_code")
        if isinstance(result_code, bool) or not isinstance(result_code, int) or result_code == RESULT_SUCCESS:
            result_code = result_code_for_message(_text(answer, "result_desc"))
        return PaymentOutcome(success=False, reference=reference, result_code=result_code,
                              result_desc=_text(answer, "result_desc"))
    return None


def describe_callback(body):
    """What a stored callback body says, as far as it can be read (for `orders show`):
    {"shape", "result_code", "message", "receipt", "order_id"}; the values as sent, whatever their type."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("response"), dict):
        classic = data["response"]
        return {"shape": "classic", "result_code": classic.get("ResultCode"), "message": classic.get("ResultDesc"),
                "receipt": classic.get("MpesaReceiptNumber") or None, "order_id": classic.get("ExternalReference")}
    if isinstance(data, dict) and "success" in data:
        return {"shape": "flat", "result_code": data.get("result_code"), "message": data.get("message"),
                "receipt": data.get("provider_reference") or None, "order_id": data.get("external_reference")}
    return {"shape": "not JSON" if data is None else "unknown", "result_code": None, "message": None,
            "receipt": None, "order_id": None}


class CallbackReceiptSchema(Schema):
    """What the webhook answers once a callback is stored (and applied, if it could be)."""

    received = fields.Boolean(required=True, validate=validate.Equal(True))
    order = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf([status.value for status in Status]))
