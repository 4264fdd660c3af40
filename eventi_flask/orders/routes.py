"""The orders API: thin views over the service layer."""
from flask import Blueprint, current_app, jsonify, request
from marshmallow import ValidationError

from ..errors import ApiError
from ..security import limit_order_creation
from . import service
from .schemas import OrderCreateSchema, WaitArgsSchema, field_errors

bp = Blueprint("orders", __name__, url_prefix="/api")
# Built once: a schema is reusable, and building one per request showed in the wait route's profile.
order_create_schema = OrderCreateSchema()
wait_args_schema = WaitArgsSchema()


def _load(schema, data, message):
    try:
        return schema.load(data)
    except ValidationError as err:
        raise ApiError(400, "invalid_request", message, field_errors(err)) from None


@bp.get("/events/<slug>")
def event(slug):
    return jsonify(service.event_by_slug(slug))


@bp.post("/orders")
@limit_order_creation
def create_order():
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # JSON nested thousands deep: not an order
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "Send the order as a JSON object.")
    data = _load(order_create_schema, body, "Some details need fixing.")
    order = service.create_order(data)
    response = jsonify(order)
    response.status_code = 201
    response.headers["Location"] = f"/api/orders/{order['id']}"
    return response


@bp.get("/orders/<order_id>")
def get_order(order_id):
    response = jsonify(service.order_by_id(order_id))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/orders/<order_id>/wait")
def wait(order_id):
    args = _load(wait_args_schema, request.args, "Bad wait parameters.")
    timeout = args["timeout"] if args["timeout"] is not None else current_app.config["WAIT_TIMEOUT_DEFAULT"]
    order, _ = service.wait_for_order(order_id, timeout, args["since"])
    response = jsonify(order)
    response.headers["Cache-Control"] = "no-store"
    return response
