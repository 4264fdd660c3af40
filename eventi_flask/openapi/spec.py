"""Building the OpenAPI document with apispec.

Each JSON view says, in the YAML part of its docstring, which schemas it
takes and answers with which status codes; the schemas themselves are the
marshmallow classes the views already use to validate (and, for answers, the
ones in each package's schemas.py).  Documented are every route under /api
and the platform's /healthz and /readyz; the test suite checks that this
matches app.url_map and fuzzes the app against the result.
"""
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.common import resolve_schema_cls
from apispec_webframeworks.flask import FlaskPlugin
from flask import current_app

from ..errors import ErrorSchema
from ..ops import schemas as ops_schemas  # noqa: F401  (the docstrings name schemas; marshmallow finds them once imported)

EXTENSION = "eventi.openapi"
OPERATIONS_PATHS = ("/healthz", "/readyz")

RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}

# The error answers the views refer to by name: (description, headers).
ERRORS = {
    "BadRequest": ("Invalid input; `fields` names each bad field.", {}),
    "NotFound": ("No such thing (the message says which).", {}),
    "Unauthorized": ("The callback token is missing or wrong.", {}),
    "Conflict": ("Not enough tickets left (`sold_out`), outside the event's sales window (`sales_not_open`, "
                 "`sales_closed`), an M-Pesa prompt already open on the phone (`payment_in_progress`: the order "
                 "is failed), or, for a callback, a payment whose receipt or reference already paid for another "
                 "order (`payment_reused`).", {}),
    "TooLarge": ("The body is over 64 KB.", {}),
    "UnsupportedMediaType": ("The body is not sent as application/json.", {}),
    "TooManyRequests": ("Too many requests of this kind; try again after Retry-After seconds.",
                        {"Retry-After": RETRY_AFTER}),
    "KeyReused": ("This Idempotency-Key already made an order from another body (`idempotency_key_reused`).", {}),
    "AmountMismatch": ("The amount paid does not match the order, which does not become completed.", {}),
    "BadGateway": ("PayHero refused the payment (`payhero_unavailable`; `payment_refused` when M-Pesa's rule says "
                   "why, in the message); the order is kept, failed.",
                   {"X-Order-Id": {"description": "The failed order", "required": True, "schema": {"type": "string"}}}),
    "ServiceUnavailable": ("The database cannot be reached or is busy (`database_unavailable`, `server_busy`), "
                           "or, for a wait, the worker is stopping (`shutting_down`), or, for an order, this worker "
                           "has more buyers than it can answer quickly (`busy`: nothing was saved); "
                           "try again after Retry-After seconds.", {"Retry-After": RETRY_AFTER}),
}


class SchemaPlugin(MarshmallowPlugin):
    """apispec's marshmallow plugin, plus the rules a schema checks in code (@validates_schema)
    and states in JSON Schema as its `json_schema_rules`."""

    def schema_helper(self, name, definition, **kwargs):
        json_schema = super().schema_helper(name, definition, **kwargs)
        rules = getattr(resolve_schema_cls(kwargs["schema"]), "json_schema_rules", None)
        return {**json_schema, **rules} if rules else json_schema


def _documented(rule):
    return rule.rule.startswith("/api/") or rule.rule in OPERATIONS_PATHS


def build_document(app):
    spec = APISpec(
        title="Eventi payment status",
        version="1",
        openapi_version="3.1.0",
        info={"description": "Tickets paid with M-Pesa through PayHero, and the long poll that "
                             "tells the browser the outcome. Every error is "
                             "`{\"error\": {\"code\", \"message\", \"fields\"}}`."},
        plugins=[FlaskPlugin(), SchemaPlugin()],
    )
    spec.components.schema("Error", schema=ErrorSchema)
    for name, (description, headers) in ERRORS.items():
        spec.components.response(name, {
            "description": description,
            "headers": headers,
            "content": {"application/json": {"schema": "Error"}},
        })
    for rule in sorted(app.url_map.iter_rules(), key=lambda rule: rule.rule):
        if _documented(rule):
            path_parameters = [{"in": "path", "name": name, "required": True, "schema": {"type": "string"}}
                               for name in sorted(rule.arguments)]
            spec.path(view=app.view_functions[rule.endpoint], app=app, parameters=path_parameters)
    document = spec.to_dict()
    return {"openapi": document.pop("openapi"), "info": document.pop("info"), **document}  # the usual order


def openapi_document():
    """The document for the current app, built once."""
    app = current_app._get_current_object()
    if EXTENSION not in app.extensions:
        app.extensions[EXTENSION] = build_document(app)
    return app.extensions[EXTENSION]
