"""The line's API: thin views over the service layer."""
from flask import Blueprint, current_app, request

from ..notify.departure import client_socket
from ..orders.routes import _load, no_store
from . import service
from .schemas import PlaceWaitArgsSchema

bp = Blueprint("line", __name__, url_prefix="/api")
wait_args_schema = PlaceWaitArgsSchema()


@bp.get("/queue/<place_id>")
def place(place_id):
    """A place in an event's line, as it is now (asking keeps it: LINE_PATIENCE).
    ---
    get:
      summary: A place in an event's line
      tags: [line]
      responses:
        200: {description: The place., content: {application/json: {schema: PlaceSchema}}}
        404: NotFound
        503: ServiceUnavailable
    """
    return no_store(service.place_by_id(place_id))


@bp.get("/queue/<place_id>/wait")
def wait(place_id):
    """The place's long poll.
    ---
    get:
      summary: Wait for a place in the line to move (the long poll)
      description: >
        Without `since`, answers at once.  Otherwise holds until the place is admitted (with its
        order), sold out, refused or left, or until it moved and has been held a moment (a second
        near the front, longer far back), or until `timeout` runs out.
      tags: [line]
      parameters:
        - {in: query, schema: PlaceWaitArgsSchema}
      responses:
        200:
          description: The place.
          headers:
            Cache-Control: {required: true, schema: {type: string, const: no-store}}
          content: {application/json: {schema: PlaceSchema}}
        400: BadRequest
        404: NotFound
        503: ServiceUnavailable
    """
    args = _load(wait_args_schema, request.args, "Bad wait parameters.")
    timeout = args.get("timeout", current_app.config["WAIT_TIMEOUT_DEFAULT"])
    return no_store(service.wait_for_place(place_id, timeout, args.get("since"), client_socket(request.environ)))
