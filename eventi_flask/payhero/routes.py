"""The PayHero webhook."""
from flask import Blueprint, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from . import service

bp = Blueprint("payhero", __name__)


@bp.post("/api/payhero/callback")
def callback():
    try:
        raw_body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        service.record_refused_body(request.content_type, request.remote_addr, request.content_length)
        raise
    status, body = service.handle_callback(raw_body, request.content_type, request.args.get("token"), request.remote_addr)
    return jsonify(body), status
