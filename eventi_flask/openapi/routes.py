"""GET /api/openapi.json"""
from flask import Blueprint, jsonify

from .spec import openapi_document

bp = Blueprint("openapi", __name__)


@bp.get("/api/openapi.json")
def openapi_json():
    """The document you are reading.
    ---
    get:
      summary: This OpenAPI document
      tags: [operations]
      responses:
        200:
          description: The OpenAPI 3.1 document of this API.
          content:
            application/json:
              schema: {type: object}
    """
    return jsonify(openapi_document())
