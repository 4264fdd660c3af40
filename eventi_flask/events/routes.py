"""The events API: thin views over the service layer."""
from flask import Blueprint, jsonify

from ..line import service as line
from . import service

bp = Blueprint("events", __name__, url_prefix="/api")


@bp.get("/events/<slug>")
def event(slug):
    """An event and its ticket types.
    ---
    get:
      summary: An event, with what is left of each ticket type
      tags: [events]
      responses:
        200: {description: The event., content: {application/json: {schema: EventSchema}}}
        404: NotFound
        503: ServiceUnavailable
    """
    return jsonify({**service.event_by_slug(slug), "line": line.event_summary(slug)})
