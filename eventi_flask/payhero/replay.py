"""Replaying a stored callback: `flask --app wsgi callbacks replay <id>`.

The stored body goes through handle_callback(), the path a live callback
takes: stored again (as a new callback, marked as a replay), verified with
PayHero when that is configured, applied at most once under the order's row
lock, and published to waiters after the commit.  A repeat changes nothing,
so replaying twice is safe.  It is sent with the current token and as JSON:
what a replay retries is the payment result, not how it was delivered (a
token rotated since, a database that was down).
"""
import secrets

from flask import current_app
from sqlalchemy import select

from ..errors import ApiError
from ..extensions import db
from .models import PayheroCallback
from .service import handle_callback

REPLAY = "replay:"  # stored as the replay's remote_addr: replay:<original id>:<random>


def replayed_from(remote_addr):
    """The id of the callback a stored callback replays, or None."""
    if remote_addr and remote_addr.startswith(REPLAY):
        return int(remote_addr.split(":")[1])
    return None


def replay_callback(callback_id):
    """Send stored callback `callback_id` through the live path again: (the new stored callback,
    HTTP status, answer).  LookupError if there is no such callback."""
    original = db.session.get(PayheroCallback, callback_id)
    if original is None:
        raise LookupError(f"No stored callback #{callback_id}.")
    body = original.body.encode()
    db.session.commit()
    mark = f"{REPLAY}{callback_id}:{secrets.token_hex(4)}"
    try:
        status, answer = handle_callback(body, "application/json", current_app.config["PAYHERO_CALLBACK_TOKEN"], mark)
    except ApiError as exc:
        status, answer = exc.status, {"error": {"code": exc.code, "message": exc.message, "fields": exc.fields}}
    replay = db.session.scalar(select(PayheroCallback).where(PayheroCallback.remote_addr == mark))
    db.session.commit()
    return replay, status, answer
