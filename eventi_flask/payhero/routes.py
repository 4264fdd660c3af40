"""The PayHero webhook."""
from flask import Blueprint, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from . import service

bp = Blueprint("payhero", __name__)


@bp.post("/api/payhero/callback")
def callback():
    """PayHero's webhook.
    ---
    post:
      summary: A PayHero payment result (the webhook), in either of PayHero's shapes
      description: >
        Every body is stored as received, whatever its outcome, and applied at most once;
        a final order never changes.
      tags: [payhero]
      parameters:
        - {in: query, name: token, required: true, schema: {type: string},
           description: PAYHERO_CALLBACK_TOKEN (or PAYHERO_CALLBACK_TOKEN_PREVIOUS while rotating)}
      requestBody:
        required: true
        content:
          application/json:
            schema: {oneOf: [ClassicCallbackSchema, FlatCallbackSchema]}
      responses:
        200:
          description: Stored and applied, or a repeat of one already applied.
          content: {application/json: {schema: CallbackReceiptSchema}}
        400: BadRequest
        401: Unauthorized
        404: NotFound
        409: Conflict
        413: TooLarge
        415: UnsupportedMediaType
        422: AmountMismatch
        503: ServiceUnavailable
    """
    try:
        raw_body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        service.record_refused_body(request.content_type, request.remote_addr, request.content_length)
        raise
    status, body = service.handle_callback(raw_body, request.content_type, request.args.get("token"), request.remote_addr)
    return jsonify(body), status
