"""The orders API: thin views over the service layer."""
from flask import Blueprint, current_app, jsonify, request
from marshmallow import ValidationError

from ..errors import ApiError
from ..notify.departure import client_socket
from ..security import limit_order_creation
from ..line import service as line
from . import service
from .schemas import OrderCreateSchema, WaitArgsSchema, field_errors, idempotency_key

bp = Blueprint("orders", __name__, url_prefix="/api")
# Built once: a schema is reusable, and building one per request showed in the wait route's profile.
order_create_schema = OrderCreateSchema()
wait_args_schema = WaitArgsSchema()


def no_store(body):
    """`body` as JSON that no cache keeps: an order or a place is only true for the moment it is read."""
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    return response


def _load(schema, data, message):
    try:
        return schema.load(data)
    except ValidationError as err:
        raise ApiError(400, "invalid_request", message, field_errors(err)) from None


@bp.post("/orders")
@limit_order_creation
def create_order():
    """Save a pending order, then ask PayHero to send the STK push.
    ---
    post:
      summary: Order tickets and start the M-Pesa payment
      description: >
        The order is saved before PayHero is called; follow it with the wait route.  With an
        Idempotency-Key, a retry of the same body within 24 hours answers the order the key first
        made (with `Idempotent-Replayed: true`), and makes no second one.
      tags: [orders]
      parameters:
        - {in: header, name: Idempotency-Key, required: false, schema: {type: string, minLength: 1, maxLength: 255},
           description: "Any string naming this order attempt; the same one on every retry of it"}
      requestBody:
        required: true
        content: {application/json: {schema: OrderCreateSchema}}
      responses:
        201:
          description: The order, pending while the customer answers the STK push.
          headers:
            Location: {description: "/api/orders/<id>", required: true, schema: {type: string}}
          content: {application/json: {schema: OrderSchema}}
        202:
          description: >
            A place in the event's line (more buyers than are served quickly, or before sales open);
            nothing reserved yet.  Follow it with GET /api/queue/<id>/wait.
          headers:
            Location: {description: "/api/queue/<id>", required: true, schema: {type: string}}
          content: {application/json: {schema: QueuedSchema}}
        400: BadRequest
        404: NotFound
        409: Conflict
        413: TooLarge
        422: KeyReused
        429: TooManyRequests
        502: BadGateway
        503: ServiceUnavailable
    """
    key = idempotency_key(request.headers)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "Send the order as a JSON object.")
    data = _load(order_create_schema, body, "Some details need fixing.")
    queued = line.route_order(data, key)  # past what is served quickly, or while a line waits: the line
    if queued is not None:
        return queued
    order, replayed = service.create_order(data, key)
    response = jsonify(order)
    response.status_code = 201
    response.headers["Location"] = f"/api/orders/{order['id']}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("/orders/<order_id>")
def get_order(order_id):
    """An order as it is now.
    ---
    get:
      summary: An order as it is now
      tags: [orders]
      responses:
        200: {description: The order., content: {application/json: {schema: OrderSchema}}}
        404: NotFound
        503: ServiceUnavailable
    """
    return no_store(service.order_by_id(order_id))


@bp.get("/orders/<order_id>/wait")
def wait(order_id):
    """The long poll.
    ---
    get:
      summary: Wait for an order to change (the long poll)
      description: >
        Answers at once when the order is final or its version is above `since`; otherwise
        holds until it changes or `timeout` runs out, and then answers with the order as it is.
        A stopping worker (a deploy) answers its held and new waits 503 `shutting_down` with a
        short Retry-After: ask again, it is not a hold that ran its course.
      tags: [orders]
      parameters:
        - {in: query, schema: WaitArgsSchema}
      responses:
        200:
          description: The order, changed or final, or unchanged when the timeout ran out.
          headers:
            Cache-Control: {required: true, schema: {type: string, const: no-store}}
          content: {application/json: {schema: OrderSchema}}
        400: BadRequest
        404: NotFound
        429: TooManyRequests
        503: ServiceUnavailable
    """
    args = _load(wait_args_schema, request.args, "Bad wait parameters.")
    timeout = args.get("timeout", current_app.config["WAIT_TIMEOUT_DEFAULT"])
    order, _ = service.wait_for_order(order_id, timeout, args.get("since"), client_socket(request.environ))
    return no_store(order)
