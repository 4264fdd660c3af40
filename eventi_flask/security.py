"""Security headers on every response, and the limits on order creation.

Each order sends an STK push to a phone, so creating orders is limited per
normalised phone number (ORDER_LIMIT_PER_PHONE) and per client address
(ORDER_LIMIT_PER_CLIENT; behind proxies ProxyFix has already put the real
client in remote_addr).  Counts live in Redis when REDIS_URL is set, so every
worker and instance shares them, and fall back to this process's memory while
Redis is unreachable: an outage never stops customers from paying.
"""
import functools
import logging
import re
from urllib.parse import parse_qs, urlsplit

from flask import current_app, g, request
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import HTTPException

from .extensions import limiter
from .notify.cluster_hub import is_cluster
from .orders.phone import mask_phone, normalize_phone

# No inline script or style anywhere: pages load one script and one stylesheet from this host.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # Order ids in page URLs are capabilities: never hand them to another site.
    "Referrer-Policy": "no-referrer",
}

PHONE_LIMIT_MESSAGE = "Too many payment requests for this phone number. Please wait a few minutes and try again."
CLIENT_LIMIT_MESSAGE = "Too many orders from your connection. Please wait a minute and try again."


_PHONE = re.compile(r"(?<![\w])(?:\+?254|0)?[17]\d{8}(?!\d)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_TOKEN = re.compile(r"(token=)[^&\s\"']+", re.I)


def redact(text):
    """Mask phone numbers, emails and callback tokens in a log line."""
    text = _PHONE.sub(lambda m: mask_phone(m.group(0)), text)
    text = _EMAIL.sub("<email>", text)
    return _TOKEN.sub(r"\1<redacted>", text)


class RedactingFilter(logging.Filter):
    """Our own lines never name a customer, but text from elsewhere (PayHero's error bodies,
    exception messages) might: every record our handlers write passes through redact()."""

    def filter(self, record):
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def add_security_headers(response):
    # By the names already there, lowercased: werkzeug's Headers.setdefault and pop raise and catch
    # an HTTPException per missing name, which made this a tenth of the sandbox's Flask cost.
    headers = response.headers
    present = {name.lower() for name, _ in headers}
    for name, value in SECURITY_HEADERS.items():
        if name.lower() not in present:
            headers.add(name, value)
    if "retry-after" in present and response.status_code not in (429, 503):
        # The limiter stamps Retry-After on every limited answer; it only means something on a refusal.
        del headers["Retry-After"]
    return response


def _order_phone():
    """The normalised phone of the order being created, or None (the view then answers 400)."""
    if "order_phone" not in g:
        try:
            body = request.get_json(silent=True)
        except HTTPException:  # too large: the view refuses it
            body = None
        g.order_phone = normalize_phone(body.get("phone")) if isinstance(body, dict) else None
    return g.order_phone


def _phone_key():
    return f"phone:{_order_phone()}"


def _limit(name):
    # When a limit is "off" the exemption below skips it; the string only has to parse.
    return lambda: current_app.config[name] or "1 per second"


def _phone_limit_off():
    return current_app.config["ORDER_LIMIT_PER_PHONE"] is None or _order_phone() is None


def _client_limit_off():
    return current_app.config["ORDER_LIMIT_PER_CLIENT"] is None


def limit_order_creation(view):
    """Decorate POST /api/orders: 429 with Retry-After past either limit."""
    limited = limiter.limit(_limit("ORDER_LIMIT_PER_CLIENT"), key_func=get_remote_address,
                            exempt_when=_client_limit_off, error_message=CLIENT_LIMIT_MESSAGE)(view)
    limited = limiter.limit(_limit("ORDER_LIMIT_PER_PHONE"), key_func=_phone_key,
                            exempt_when=_phone_limit_off, error_message=PHONE_LIMIT_MESSAGE)(limited)

    @functools.wraps(view)
    def maybe_limited(*args, **kwargs):
        # Both limits off (a load test): the view alone.  The limiter, even disabled, still
        # identified the request and filtered its limits for every order.
        if current_app.config["RATELIMIT_ENABLED"]:
            return limited(*args, **kwargs)
        return view(*args, **kwargs)

    return maybe_limited


def init_app(app):
    """Security headers, and the limiter's settings (limiter.init_app(app) follows in create_app)."""
    app.after_request(add_security_headers)
    for handler in logging.getLogger("eventi_flask").handlers:  # set up by logs.configure()
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    config = app.config
    config["RATELIMIT_ENABLED"] = bool(config["ORDER_LIMIT_PER_PHONE"] or config["ORDER_LIMIT_PER_CLIENT"])
    config["RATELIMIT_STRATEGY"] = "moving-window"
    if config.get("REDIS_URL"):
        config["RATELIMIT_STORAGE_URI"] = config["REDIS_URL"]
        config["RATELIMIT_STORAGE_OPTIONS"] = {
            "key_prefix": f"{config.get('REDIS_PREFIX', '')}limits",
            "socket_connect_timeout": 1,
            "socket_timeout": 1,
        }
        if is_cluster(config["REDIS_URL"]):
            # Each count is a key of its own slot: a one-node client would be answered MOVED
            # (and fall back to memory) for most of them.
            url = urlsplit(config["REDIS_URL"])
            config["RATELIMIT_STORAGE_URI"] = f"redis+cluster://{url.netloc}"
            if url.scheme == "rediss":  # TLS, with the URL's certificate settings (REDIS_SSL_CERT_REQS)
                tls = {name: values[-1] for name, values in parse_qs(url.query).items() if name.startswith("ssl_")}
                config["RATELIMIT_STORAGE_OPTIONS"].update(ssl=True, **tls)
    else:
        config["RATELIMIT_STORAGE_URI"] = "memory://"


def init_limiter(app):
    """The limiter, for the views that carry a limit (limit_order_creation) and nothing else."""
    limiter.init_app(app)
    # Every limit here is one view's own, checked by its decorator.  The limiter's before_request hook, there
    # for application-wide limits this service does not set, still identified and filtered every request while
    # the order limits are on (production): 0.11 ms of each wait, callback and page, a third of a bare route.
    hooks = app.before_request_funcs.get(None, [])
    if limiter._check_request_limit in hooks:  # not there with the limits off: the limiter sets nothing up
        hooks.remove(limiter._check_request_limit)
