"""The one error type of the API and the one handler that renders errors as JSON."""
import logging

from flask import jsonify
from marshmallow import Schema, fields
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from . import database

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer to a bad request: an HTTP status, a code, a sentence, and bad fields."""

    def __init__(self, status, code, message, fields=None, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        self.headers = headers or {}


def database_unavailable(message):
    """The 503 every route answers while the database cannot take work (API.md, "Every route")."""
    return ApiError(503, "database_unavailable", message, headers={"Retry-After": database.RETRY_AFTER})


def error_response(status, code, message, fields=None, headers=None):
    body = {"error": {"code": code, "message": message, "fields": fields or {}}}
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _code_for(exc):
    return exc.name.lower().replace(" ", "_").replace("'", "")


def handle_error(exc):
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.fields, exc.headers)
    if isinstance(exc, HTTPException):
        headers = {}
        retry_after = getattr(exc, "retry_after", None) or (exc.response.headers.get("Retry-After") if exc.response else None)
        if retry_after:
            headers["Retry-After"] = str(retry_after)
        return error_response(exc.code, _code_for(exc), exc.description, headers=headers)
    if isinstance(exc, PoolTimeout):
        # Every database connection is busy: shed load with a retryable answer, not a 500.
        log.warning("Database pool exhausted; answering 503")
        return handle_error(database_unavailable("The server is busy; please try again in a moment."))
    if database.is_unavailable(exc):
        # The outage itself is logged once (database.py), not once per request.
        log.debug("Database unavailable for %s: %s", type(exc).__name__, database.cause(exc))
        return handle_error(database_unavailable("We cannot reach our database just now; please try again in a moment."))
    log.exception("Unhandled error")
    return error_response(500, "internal_error", "Something went wrong on our side; please try again.")


def init_app(app):
    app.register_error_handler(Exception, handle_error)


class ErrorDetailSchema(Schema):
    code = fields.String(required=True, metadata={"example": "invalid_request"})
    message = fields.String(required=True, metadata={"description": "A sentence a person can read"})
    bad_fields = fields.Dict(keys=fields.String(), values=fields.String(), required=True, data_key="fields",
                             metadata={"description": "Each bad field, with what is wrong with it"})


class ErrorSchema(Schema):
    """Every error the API answers (described for the OpenAPI document)."""

    error = fields.Nested(ErrorDetailSchema, required=True)
