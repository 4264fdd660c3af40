"""The PayHero webhook."""
from flask import Blueprint, jsonify, request

from . import service

bp = Blueprint("payhero", __name__)


@bp.post("/api/payhero/callback")
def callback():
    status, body = service.handle_callback(
        request.get_data(cache=False), request.content_type, request.args.get("token"), request.remote_addr
    )
    return jsonify(body), status
