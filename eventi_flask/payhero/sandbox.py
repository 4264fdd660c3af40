"""The sandbox PayHero: the live wire format, served by the app itself.

It keeps no state: a payment's outcome, amount and start time are encoded in
the reference it hands out, so any worker or instance can answer
transaction-status for it.  The callback is POSTed over HTTP to the
callback_url, through the real callback route, from a greenlet; sent again, backing off,
after a failure (SANDBOX_CALLBACK_RETRY_FOR), as a careful sender does.
"""
import base64
import hashlib
import itertools
import logging
import random
import secrets
import time

import gevent
import gevent.pool
import requests
from flask import Blueprint, current_app, jsonify, request

from ..orders.phone import normalize_phone
from .client import pooled_session

log = logging.getLogger(__name__)

bp = Blueprint("sandbox", __name__, url_prefix="/sandbox/payhero")
EXTENSION = "eventi.sandbox_callbacks"  # the callbacks still to be sent (a gevent Group)

# phone -> (ResultCode, ResultDesc); None: the customer never answers, so no callback.
SANDBOX_PHONES = {
    "254708000001": (1032, "Request Cancelled by user."),
    "254708000002": (1, "The balance is insufficient for the transaction"),
    "254708000003": (2001, "The initiator information is invalid"),
    "254708000004": None,
    "254708000005": (1037, "DS timeout user cannot be reached"),
}
SUCCESS = (0, "The service request is processed successfully.")
NO_ANSWER_CODE = -1
# M-Pesa's description of each result code, as callbacks carry it (the simulators' too).
RESULT_DESCRIPTIONS = {
    **dict(outcome for outcome in [SUCCESS, *SANDBOX_PHONES.values()] if outcome),
    1019: "Transaction has expired",
    1001: "Unable to lock subscriber, a transaction is already in process for the current subscriber",
}


def result_description(result_code):
    return RESULT_DESCRIPTIONS.get(result_code, f"Failed with result code {result_code}")


def _refuse(status, message):
    response = jsonify({"success": False, "error_message": message})
    response.status_code = status
    return response


def _outcome_for(phone):
    return SANDBOX_PHONES.get(phone, SUCCESS)


def _receipt(reference):
    return "S" + base64.b32encode(hashlib.sha256(reference.encode()).digest()).decode()[:9]


def make_reference(result_code, amount, started_ms):
    return f"SBX_{result_code}_{amount}_{started_ms}_{secrets.token_hex(4)}"


def read_reference(reference):
    """(result_code, amount, started_ms) from a sandbox reference, or None."""
    parts = (reference or "").split("_")
    if len(parts) != 5 or parts[0] != "SBX":
        return None
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


def classic_callback(reference, checkout_request_id, order_id, amount, phone, result_code, result_desc):
    success = result_code == 0
    return {
        "forward_url": "",
        "status": success,
        "response": {
            "Amount": amount,
            "CheckoutRequestID": checkout_request_id,
            "ExternalReference": order_id,
            "MerchantRequestID": reference,
            "MpesaReceiptNumber": _receipt(reference) if success else "",
            "Phone": "+" + phone,
            "ResultCode": result_code,
            "ResultDesc": result_desc,
            "Status": "Success" if success else "Failed",
        },
    }


def flat_callback(reference, order_id, amount, result_code, message):
    """The flat shape of PayHero's current webhook reference (SANDBOX_CALLBACK_SHAPE=flat).

    It carries no result code: `result_code` only decides success, and `message`
    is all that says why a payment failed, as it is from PayHero.
    """
    success = result_code == 0
    return {
        "success": success,
        "status": "success" if success else "failed",
        "message": message,
        "reference": reference,
        "external_reference": order_id,
        "amount": amount,
        "currency": "KES",
        "transaction_id": "",
        "transaction_date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "transaction_type": "inbound_payment",
        "provider_reference": _receipt(reference) if success else "",
        "provider": "mpesa_dc",
        "callback_urls": None,
    }


def sandbox_callback(shape, reference, checkout_request_id, order_id, amount, phone, result_code, result_desc):
    """The callback the sandbox sends, in the configured shape."""
    if shape == "flat":
        return flat_callback(reference, order_id, amount, result_code, result_desc)
    return classic_callback(reference, checkout_request_id, order_id, amount, phone, result_code, result_desc)


# Callbacks go out over kept-alive connections, as PayHero's client does: a new connection per
# callback (requests.post) cost a Session, a connect, an address lookup in gevent's thread pool and
# an accept by the server (py-spy: 11% of a journey's samples, and the pool's threads 7% more).
_callback_sessions = {}


def _callback_session(url):
    origin = url.split("/", 3)[:3]
    key = "/".join(origin)
    if key not in _callback_sessions:
        _callback_sessions[key] = pooled_session(key)
    return _callback_sessions[key]


# A careful sender: a callback that failed goes again, sooner at first, never all at once.
RETRY_FIRST = 0.5  # seconds before the second attempt (times a jitter of 0.5-1.5)
RETRY_LONGEST = 30.0  # the longest pause between two attempts
AGAIN = 429  # and every 5xx: the receiver asks to be called again


def _pause(attempt, response):
    """Seconds before attempt `attempt` + 1: exponential with jitter, at least the receiver's Retry-After."""
    pause = min(RETRY_LONGEST, RETRY_FIRST * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
    try:
        asked = float(response.headers.get("Retry-After", 0)) if response is not None else 0.0
    except ValueError:
        asked = 0.0
    return min(RETRY_LONGEST, max(pause, asked))


def _send_callback(url, order_id, body, retry_for):
    """POST the callback; again after a connection failure, a timeout, a 429 or a 5xx, for `retry_for` seconds.

    The callback route is idempotent (a repeat is 200 and changes nothing), so a callback that may
    have landed before its connection failed is safe to send again.
    """
    started = time.monotonic()
    for attempt in itertools.count(1):
        response = None
        try:
            response = _callback_session(url).post(url, json=body, timeout=(5, 10))
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            error = str(exc) or exc.__class__.__name__  # it may or may not have landed: send again
        except requests.RequestException as exc:  # a bad URL, say: sending again would not help
            log.error("Sandbox PayHero could not send the callback for %s: %s", order_id, exc)
            return
        else:
            if response.status_code < 500 and response.status_code != AGAIN:
                log.info("Sandbox PayHero callback for %s answered %s", order_id, response.status_code)
                return
            error = f"answered {response.status_code}"
        pause = _pause(attempt, response)
        if time.monotonic() - started + pause > retry_for:
            log.error("Sandbox PayHero gave up on the callback for %s after %d attempts in %.0f s: %s",
                      order_id, attempt, time.monotonic() - started, error)
            return
        log.warning("Sandbox PayHero callback for %s failed (attempt %d): %s; sending again in %.1f s",
                    order_id, attempt, error, pause)
        gevent.sleep(pause)


def init_app(app):
    app.register_blueprint(bp)
    app.extensions[EXTENSION] = gevent.pool.Group()


def stop(app):
    """Drop the callbacks not sent yet: none outlives its app (a test's stand-in PayHero)."""
    if EXTENSION in app.extensions:
        app.extensions[EXTENSION].kill()


@bp.before_request
def _require_basic_auth():
    if request.authorization is None or request.authorization.type != "basic":
        return _refuse(401, "Basic authentication is required")
    return None


@bp.post("/api/v2/payments")
def start_payment():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return _refuse(400, "Send a JSON body")
    amount, phone, url = body.get("amount"), normalize_phone(body.get("phone_number")), body.get("callback_url")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        return _refuse(400, "amount must be a positive whole number")
    if phone is None:
        return _refuse(400, "phone_number is not a valid Kenyan number")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return _refuse(400, "callback_url must be an http(s) URL")
    outcome = _outcome_for(phone)
    result_code = NO_ANSWER_CODE if outcome is None else outcome[0]
    reference = make_reference(result_code, amount, int(time.time() * 1000))
    checkout_request_id = "ws_CO_" + secrets.token_hex(10)
    if outcome is not None:
        order_id = body.get("external_reference")
        callback = sandbox_callback(current_app.config["SANDBOX_CALLBACK_SHAPE"], reference, checkout_request_id,
                                    order_id, amount, phone, *outcome)
        current_app.extensions[EXTENSION].add(
            gevent.spawn_later(current_app.config["SANDBOX_CALLBACK_DELAY"], _send_callback, url, order_id, callback,
                               current_app.config["SANDBOX_CALLBACK_RETRY_FOR"]))
    return jsonify({"success": True, "status": "QUEUED", "reference": reference, "CheckoutRequestID": checkout_request_id})


@bp.get("/api/v2/transaction-status")
def transaction_status():
    reference = request.args.get("reference", "")
    decoded = read_reference(reference)
    if decoded is None:
        return _refuse(404, "No transaction with that reference")
    result_code, amount, started_ms = decoded
    answered = time.time() * 1000 >= started_ms + current_app.config["SANDBOX_CALLBACK_DELAY"] * 1000
    if not answered or result_code == NO_ANSWER_CODE:
        status = "QUEUED"
    else:
        status = "SUCCESS" if result_code == 0 else "FAILED"
    return jsonify({
        "status": status,
        "reference": reference,
        "amount": amount,
        "result_code": result_code if status != "QUEUED" else None,
        "provider_reference": _receipt(reference) if status == "SUCCESS" else "",
        "third_party_reference": _receipt(reference) if status == "SUCCESS" else "",
    })
