"""The PayHero API client (live, or the built-in sandbox: same wire format).

A payment POST is never retried: it may already have reached the customer's
phone, and a second STK push would ask them to pay twice.  So a kept-alive
connection is not reused once it has been idle long enough for the server to
be closing it (IDLE_REUSE_MOST): a request sent as the server closes answers
"Remote end closed connection without response", and the buyer is refused.
"""
import logging
import os
import time

import gevent
import requests
import requests.adapters
import requests.utils
import urllib3
from flask import current_app

log = logging.getLogger(__name__)

EXTENSION = "eventi.payhero"
POOL_SIZE = 200  # kept-alive connections to PayHero per process
# Seconds a kept-alive connection may have been idle and still be reused: under the shortest keep-alive a
# server is likely to have (gunicorn's 5 s, the sandbox's; nginx 75 s).  At a sale's opening 1-2 buyers a
# run were refused with RemoteDisconnected, each sent on a connection the sandbox closed that instant.
IDLE_REUSE_MOST = 4.0


class _FreshConnections:
    """A pool that closes, rather than reuses, a connection idle for more than IDLE_REUSE_MOST seconds
    (urllib3 then opens a new one for the request, as it does for a connection found dropped)."""

    def _put_conn(self, conn):
        if conn is not None:
            conn.idle_since = time.monotonic()
        super()._put_conn(conn)

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)
        if time.monotonic() - getattr(conn, "idle_since", float("inf")) > IDLE_REUSE_MOST:
            conn.close()
        return conn


class FreshHTTPConnectionPool(_FreshConnections, urllib3.HTTPConnectionPool):
    pass


class FreshHTTPSConnectionPool(_FreshConnections, urllib3.HTTPSConnectionPool):
    pass


def pooled_session(base_url, size=POOL_SIZE):
    """A requests Session keeping `size` connections alive (urllib3 keeps 10 and opens, then drops,
    one for each extra caller), with the environment's proxy and CA settings for `base_url` read
    once here rather than on every request (scanning os.environ was a tenth of the client's CPU per order)."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=size)
    adapter.poolmanager.pool_classes_by_scheme = {"http": FreshHTTPConnectionPool, "https": FreshHTTPSConnectionPool}
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.proxies = requests.utils.get_environ_proxies(base_url)
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    session.trust_env = False
    return session


class PayHeroError(Exception):
    """PayHero refused a request or did not answer.  public_message is safe to show;
    the exception's text adds the cause (PayHero's error_message, the network error) for the log."""

    def __init__(self, public_message, detail=None, unanswered=False):
        super().__init__(f"{public_message}: {detail}" if detail else public_message)
        self.public_message = public_message
        # The request reached PayHero but no answer came back in time: it may have been acted on
        # (an STK push may be on the customer's phone), so this is not a refusal.
        self.unanswered = unanswered


class PayHeroClient:
    def __init__(self, base_url, username, password, channel_id, connect_timeout=5.0, read_timeout=20.0):
        self.base_url = base_url.rstrip("/")
        self.channel_id = channel_id
        self.timeout = (connect_timeout, read_timeout)
        # Every order calls PayHero, from as many greenlets as there are buyers at once.
        self.session = pooled_session(self.base_url)
        self.session.auth = (username, password)
        self.session.headers["Accept"] = "application/json"
        # The payment POST, every order's: prepared once (URL, auth, headers) and copied with each
        # body, rather than Session.request merging the session's settings again per call (a
        # quarter of the client's CPU per order).  A cookie PayHero may set still goes back.
        self._payment = self.session.prepare_request(requests.Request("POST", f"{self.base_url}/api/v2/payments"))

    def _call(self, request, timeout=None):
        """Send a prepared request through the session; PayHero's JSON answer, or PayHeroError."""
        try:
            response = self.session.send(request, timeout=timeout or self.timeout)
        except requests.Timeout as exc:
            # A connect timeout sent nothing; a read timeout sent the whole request.
            raise PayHeroError("PayHero did not answer in time", str(exc),
                               unanswered=isinstance(exc, requests.ReadTimeout)) from exc
        except requests.RequestException as exc:
            raise PayHeroError("PayHero could not be reached", str(exc)) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise PayHeroError(f"PayHero answered {response.status_code}", response.text[:200])
        # PayHero's errors: {"error_code", "error_message", "status_code"}, whatever the HTTP status.
        if response.status_code >= 400 or body.get("error_code") or body.get("error_message"):
            status = body["status_code"] if isinstance(body.get("status_code"), int) else response.status_code
            reason = body.get("error_message") or body.get("message") or response.text[:200]
            code = f"{body['error_code']}: " if body.get("error_code") else ""
            raise PayHeroError(f"PayHero answered {status}", f"{code}{reason}")
        return body

    def start_payment(self, amount, phone, external_reference, customer_name, callback_url):
        """Send the STK push; return {"reference", "checkout_request_id"}."""
        request = self._payment.copy()
        if self.session.cookies:
            request.prepare_cookies(self.session.cookies)
        request.prepare_body(None, None, json={
            "amount": amount,
            "phone_number": phone,
            "channel_id": self.channel_id,
            "provider": "m-pesa",
            "external_reference": external_reference,
            "customer_name": customer_name,
            "callback_url": callback_url,
        })
        body = self._call(request)
        if not body.get("success") or not body.get("reference"):
            raise PayHeroError("PayHero refused the payment request", str(body)[:200])
        return {"reference": str(body["reference"]), "checkout_request_id": body.get("CheckoutRequestID")}

    def transaction_status(self, reference, deadline=None):
        """PayHero's view of one payment: {"status", "provider_reference", ...} (schemas.parse_transaction_status).

        `deadline`: seconds for the whole exchange, connecting and reading included (requests'
        own timeouts bound each step, not their sum); past it, PayHeroError as for any timeout.
        """
        request = self.session.prepare_request(requests.Request(
            "GET", f"{self.base_url}/api/v2/transaction-status", params={"reference": reference}))
        if deadline is None:
            return self._call(request)
        timer = gevent.Timeout(deadline)
        timer.start()
        try:
            return self._call(request, timeout=(min(self.timeout[0], deadline), deadline))
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise PayHeroError("PayHero did not answer in time", f"no answer within {deadline:g}s") from None
        finally:
            timer.close()


def init_app(app):
    config = app.config
    app.extensions[EXTENSION] = PayHeroClient(
        config["PAYHERO_BASE_URL"],
        config["PAYHERO_API_USERNAME"],
        config["PAYHERO_API_PASSWORD"],
        config["PAYHERO_CHANNEL_ID"],
        config["PAYHERO_CONNECT_TIMEOUT"],
        config["PAYHERO_READ_TIMEOUT"],
    )


def get_payhero():
    return current_app.extensions[EXTENSION]
