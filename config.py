"""Settings, read from the environment once at start-up.

Every variable is documented in docs/configuration.md (the contract's own in docs/api.md).  A bad or
missing required value raises ConfigError with one line naming the variable;
wsgi.py and gunicorn.conf.py turn that into a clean exit, never a traceback.
"""
import math
import os
import re
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit


class ConfigError(Exception):
    """A configuration mistake, described in one line."""


def _text(env, name, default=None, required=False):
    value = env.get(name, "").strip()
    if not value:
        if required:
            raise ConfigError(f"{name} is required but not set")
        return default
    return value


def read_number(env, name, default, kind=int, minimum=None, maximum=None):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {raw!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {raw!r}")
    return value


def _flag(env, name, default=False):
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")


def _choice(env, name, default, choices):
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


_RATE = re.compile(r"^\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day)s?$", re.I)


def _rate_limit(env, name, default):
    value = env.get(name, "").strip() or default
    if value.lower() == "off":
        return None
    if not _RATE.match(value):
        raise ConfigError(f"{name} must look like '3 per 5 minutes' or 'off', got {value!r}")
    return value


def _seconds_list(env, name, default):
    """Ascending seconds, comma-separated ("2,5,10"); `off` for none."""
    raw = env.get(name, "").strip() or default
    if raw.lower() == "off":
        return ()
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 <= v < math.inf for v in values) or list(values) != sorted(values):
        raise ConfigError(f"{name} must be ascending seconds such as '2,5,10' or 'off', got {raw!r}")
    return values


def database_url(raw):
    """Heroku hands out postgres:// URLs; SQLAlchemy wants a dialect+driver."""
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://"):]
    if raw.startswith("postgresql://"):
        # psycopg 3 cooperates with gevent once select is monkey-patched.
        raw = "postgresql+psycopg://" + raw[len("postgresql://"):]
    return raw


def redis_url(raw, cert_reqs):
    """REDIS_URL, with REDIS_SSL_CERT_REQS added to a rediss:// URL whose query does not say it.

    Heroku Redis serves TLS with a self-signed certificate, and its add-on owns REDIS_URL (a
    credential rotation rewrites it), so the setting lives beside it.  Every Redis client of
    ours (the hub, the order limits) reads this one URL.
    """
    if raw is None or cert_reqs is None or not raw.startswith("rediss://"):
        return raw
    parts = urlsplit(raw)
    if "ssl_cert_reqs" in parse_qs(parts.query):
        return raw
    query = "&".join(filter(None, (parts.query, urlencode({"ssl_cert_reqs": cert_reqs}))))
    return urlunsplit(parts._replace(query=query))


def smtp_url(raw):
    """SMTP_URL checked: smtp://[user:password@]host[:port] (STARTTLS when offered) or smtps://...; None if unset."""
    if raw is None:
        return None
    parts = urlsplit(raw)
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"SMTP_URL has a bad port: {parts.netloc.rpartition('@')[2]!r}") from None
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError("SMTP_URL must look like smtp://user:password@host:587 or smtps://user:password@host:465")
    return raw


def messages_settings(env):
    """The tickets' SMS and email (eventi_flask/messages): providers, and when and where they are sent."""
    sms_mode = _choice(env, "SMS_MODE", "sandbox", ("sandbox", "africastalking", "off"))
    live_sms = sms_mode == "africastalking"
    username = _text(env, "AFRICASTALKING_USERNAME", "sandbox", required=live_sms)
    default_base = ("https://api.sandbox.africastalking.com" if username == "sandbox"
                    else "https://api.africastalking.com")
    url = smtp_url(_text(env, "SMTP_URL"))
    retry = _seconds_list(env, "MESSAGES_RETRY", "30,1800")
    if len(retry) != 2:
        raise ConfigError(f"MESSAGES_RETRY must be two ascending seconds such as '30,1800', "
                          f"got {env.get('MESSAGES_RETRY')!r}")
    return {
        "SMS_MODE": sms_mode,
        "AFRICASTALKING_USERNAME": username,
        "AFRICASTALKING_API_KEY": _text(env, "AFRICASTALKING_API_KEY", required=live_sms),
        "AFRICASTALKING_SENDER_ID": _text(env, "AFRICASTALKING_SENDER_ID"),
        "AFRICASTALKING_BASE_URL": (_text(env, "AFRICASTALKING_BASE_URL") or default_base).rstrip("/"),
        "SMTP_URL": url,
        "MAIL_FROM": _text(env, "MAIL_FROM", required=url is not None),
        # web: each web worker sends from its own event loop; process: only `flask messages send --forever` does.
        "MESSAGES_SENDER": _choice(env, "MESSAGES_SENDER", "web", ("web", "process")),
        # A failed send is tried again after the first delay, doubling up to the second, for MESSAGES_RETRY_FOR.
        "MESSAGES_RETRY": retry,
        "MESSAGES_RETRY_FOR": read_number(env, "MESSAGES_RETRY_FOR", 26 * 3600.0, float, minimum=0),
        # How often due retries are looked for (a completed order's messages leave at once, without waiting for it).
        "MESSAGES_SWEEP_INTERVAL": read_number(env, "MESSAGES_SWEEP_INTERVAL", 5.0, float, minimum=0.05, maximum=3600),
    }


class Config:
    """Production settings.  Instantiate to read (and validate) the environment."""

    TESTING = False
    JSON_SORT_KEYS = False
    # Webhook and API bodies are tiny; anything bigger is refused with 413.
    MAX_CONTENT_LENGTH = 64 * 1024

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.PORT = read_number(env, "PORT", 8000, minimum=1, maximum=65535)
        instance_db = "sqlite:///" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance", "eventi.sqlite3")
        self.SQLALCHEMY_DATABASE_URI = database_url(_text(env, "DATABASE_URL", instance_db))
        # hide_parameters: a failed statement's log line never carries a phone, email or callback body.
        # No pool_pre_ping: create_app pings only connections that sat idle (ping_idle_connections).
        self.SQLALCHEMY_ENGINE_OPTIONS = {"hide_parameters": True}
        # SQLite: callbacks use the app's engine (one writer at a time); see database.callbacks_engine.
        self.DB_CALLBACK_POOL_SIZE = None
        if self.SQLALCHEMY_DATABASE_URI.startswith("postgresql"):
            # The callbacks' own connections, which order creations cannot take (database.callbacks_engine).
            self.DB_CALLBACK_POOL_SIZE = read_number(env, "DB_CALLBACK_POOL_SIZE", 16, minimum=1)
            # Held waits give their connection back, so a small pool serves many.  No overflow by default:
            # SQLAlchemy closes an overflow connection as it comes back, and a line's ticks (a batch of orders
            # every second) opened and closed 760-860 PostgreSQL sessions per 6,000 buyers, each a backend
            # forked and set up; a pool of the same 24 kept open made 89 (BENCHMARKS.md, seventh sitting).
            self.SQLALCHEMY_ENGINE_OPTIONS.update(
                pool_size=read_number(env, "DB_POOL_SIZE", 24, minimum=1),
                max_overflow=read_number(env, "DB_MAX_OVERFLOW", 0, minimum=0),
                pool_timeout=10,
                connect_args={
                    # psycopg prepares a statement on the server after 5 runs on one connection;
                    # behind a transaction-mode pooler (PgBouncer before 1.21, Heroku's buildpack)
                    # the next run may reach another server connection that never saw it. Off
                    # unless asked for: a pooler cannot be detected, and our statements plan in
                    # microseconds (README: "Behind a connection pooler").
                    "prepare_threshold": 5 if _flag(env, "DB_PREPARED_STATEMENTS") else None,
                    # A database host that drops packets answers 503 in seconds, not after TCP's minutes.
                    "connect_timeout": read_number(env, "DB_CONNECT_TIMEOUT", 5, minimum=1, maximum=600),
                },
            )

        cert_reqs = env.get("REDIS_SSL_CERT_REQS", "").strip() or None
        if cert_reqs is not None:
            cert_reqs = _choice(env, "REDIS_SSL_CERT_REQS", None, ("none", "optional", "required"))
        self.REDIS_URL = redis_url(_text(env, "REDIS_URL"), cert_reqs)
        self.REDIS_PREFIX = env.get("REDIS_PREFIX", "")

        self.PAYHERO_MODE = _choice(env, "PAYHERO_MODE", "sandbox", ("sandbox", "live"))
        live = self.PAYHERO_MODE == "live"
        self.PUBLIC_BASE_URL = (_text(env, "PUBLIC_BASE_URL") or f"http://127.0.0.1:{self.PORT}").rstrip("/")
        self.PAYHERO_BASE_URL = (
            _text(env, "PAYHERO_BASE_URL")
            or ("https://backend.payhero.co.ke" if live else self.PUBLIC_BASE_URL + "/sandbox/payhero")
        ).rstrip("/")
        self.PAYHERO_API_USERNAME = _text(env, "PAYHERO_API_USERNAME", "sandbox", required=live)
        self.PAYHERO_API_PASSWORD = _text(env, "PAYHERO_API_PASSWORD", "sandbox", required=live)
        channel = _text(env, "PAYHERO_CHANNEL_ID", "0", required=live)
        if not channel.isdigit():
            raise ConfigError(f"PAYHERO_CHANNEL_ID must be a whole number, got {channel!r}")
        self.PAYHERO_CHANNEL_ID = int(channel)
        self.PAYHERO_CALLBACK_TOKEN = _text(env, "PAYHERO_CALLBACK_TOKEN", "sandbox", required=live)
        # Accepted beside the current token while it is rotated; never put into new callback URLs.
        self.PAYHERO_CALLBACK_TOKEN_PREVIOUS = _text(env, "PAYHERO_CALLBACK_TOKEN_PREVIOUS")
        # On by default in live mode: the token alone, which router logs show, must not complete an order.
        self.PAYHERO_VERIFY_CALLBACKS = _flag(env, "PAYHERO_VERIFY_CALLBACKS", default=live)
        self.PAYHERO_CONNECT_TIMEOUT = read_number(env, "PAYHERO_CONNECT_TIMEOUT", 5.0, float, minimum=0.1)
        self.PAYHERO_READ_TIMEOUT = read_number(env, "PAYHERO_READ_TIMEOUT", 20.0, float, minimum=0.1)
        # Checking a success with PayHero holds its callback: a short bound of its own (a whole-exchange
        # deadline), so a slow PayHero costs a re-check later, not a callback held for PAYHERO_READ_TIMEOUT.
        self.PAYHERO_VERIFY_TIMEOUT = read_number(env, "PAYHERO_VERIFY_TIMEOUT", min(5.0, self.PAYHERO_READ_TIMEOUT),
                                                  float, minimum=0.1, maximum=self.PAYHERO_READ_TIMEOUT)
        # Seconds after an unconfirmed success at which its worker asks PayHero again (reconcile is the backstop).
        self.PAYHERO_REVERIFY_AFTER = _seconds_list(env, "PAYHERO_REVERIFY_AFTER", "2,5,10,20,40")
        # Seconds after PayHero took an STK push at which a pending order with no callback is asked
        # about with transaction-status, once across workers; past the last, every last gap, until
        # RECONCILE_EXPIRE_AFTER (orders/missed_callbacks.py).  The M-Pesa prompt lasts about 60 s.
        self.PAYHERO_ASK_AFTER = _seconds_list(env, "PAYHERO_ASK_AFTER", "75,105,165,285,525")
        self.SANDBOX_CALLBACK_DELAY = read_number(env, "SANDBOX_CALLBACK_DELAY", 3.0, float, minimum=0, maximum=3600)
        # classic: the shape of PayHero's v2 docs; flat: its current webhook reference (no result code).
        self.SANDBOX_CALLBACK_SHAPE = _choice(env, "SANDBOX_CALLBACK_SHAPE", "classic", ("classic", "flat"))
        # How long the sandbox keeps sending a callback that failed (connection, timeout, 5xx), backing off.
        self.SANDBOX_CALLBACK_RETRY_FOR = read_number(env, "SANDBOX_CALLBACK_RETRY_FOR", 300.0, float, minimum=0,
                                                      maximum=86400)

        # Heroku's router (a dyno has DYNO set) cuts a request with no answer at 30 s (H12): hold less there.
        on_dyno = bool(env.get("DYNO", "").strip())
        self.WAIT_TIMEOUT_MAX = read_number(env, "WAIT_TIMEOUT_MAX", 28.0 if on_dyno else 60.0, float,
                                            minimum=0, maximum=3600)
        self.WAIT_TIMEOUT_DEFAULT = read_number(env, "WAIT_TIMEOUT_DEFAULT",
                                                min(25.0 if on_dyno else 55.0, self.WAIT_TIMEOUT_MAX), float,
                                                minimum=0, maximum=self.WAIT_TIMEOUT_MAX)
        self.WAIT_MAX_PER_ORDER = read_number(env, "WAIT_MAX_PER_ORDER", 20, minimum=1)
        self.WAIT_MAX_PER_WORKER = read_number(env, "WAIT_MAX_PER_WORKER", 10000, minimum=1)
        # A held wait re-reads the database this often even with Redis up, so a
        # lost message costs latency, never the answer; much faster while Redis is down.
        self.WAIT_RECHECK_INTERVAL = read_number(env, "WAIT_RECHECK_INTERVAL", 15.0, float, minimum=0.1)
        self.WAIT_RECHECK_INTERVAL_DEGRADED = read_number(env, "WAIT_RECHECK_INTERVAL_DEGRADED", 2.0, float, minimum=0.1)

        self.ORDER_LIMIT_PER_PHONE = _rate_limit(env, "ORDER_LIMIT_PER_PHONE", "3 per 5 minutes")
        self.ORDER_LIMIT_PER_CLIENT = _rate_limit(env, "ORDER_LIMIT_PER_CLIENT", "30 per minute")
        # Seconds the event loop runs late: from the first, a growing share of new orders is
        # answered 503 busy; from the second, all of them (orders/admission.py).  `off`: none.
        # An order waits on the loop about ten times (request, two statements, PayHero, publish,
        # answer): 0.1 s late keeps an admitted order near a second.  At 300 buyers/s, 0.05,0.25
        # answered p50 9.9 s and 0.02,0.1 p50 1.2 s (a loaded machine; p99 was 21 s for both).
        self.ORDER_SHED_LAG = _seconds_list(env, "ORDER_SHED_LAG", "0.02,0.1")
        if len(self.ORDER_SHED_LAG) not in (0, 2):
            raise ConfigError(f"ORDER_SHED_LAG must be two ascending seconds such as '0.02,0.1' or 'off', "
                              f"got {env.get('ORDER_SHED_LAG')!r}")
        self.PROXY_HOPS = read_number(env, "PROXY_HOPS", 0, minimum=0, maximum=10)
        # The line (eventi_flask/line): seconds a place is kept without its page asking (then `left`);
        # LINE_FORCE=1 sends every order of an event whose line is on into the line (tests, demos, rehearsals);
        # LINE_TICK: seconds between two moves of the line; LINE_START_RATE: orders a second admitted
        # before any has been measured (the admitter then follows what the service takes).
        self.LINE_PATIENCE = read_number(env, "LINE_PATIENCE", 60.0, float, minimum=1)
        self.LINE_FORCE = _flag(env, "LINE_FORCE")
        self.LINE_TICK = read_number(env, "LINE_TICK", 1.0, float, minimum=0.05, maximum=10)
        self.LINE_START_RATE = read_number(env, "LINE_START_RATE", 40.0, float, minimum=0.1)

        self.RECONCILE_AFTER = read_number(env, "RECONCILE_AFTER", 120.0, float, minimum=0)
        self.RECONCILE_EXPIRE_AFTER = read_number(env, "RECONCILE_EXPIRE_AFTER", 900.0, float, minimum=0)

        self.__dict__.update(messages_settings(env))
        # Signs the ticket links /t/<token> (web/ticket_links.py).  Every worker and instance must agree on it,
        # and a link sent by SMS must still open after a restart: never a random default.  Live mode does not
        # start without one (a forged link would show someone's tickets); the sandbox signs with a public key.
        self.SECRET_KEY = _text(env, "SECRET_KEY", None if live else "sandbox")
        self.TICKET_LINK_SECRET = _text(env, "TICKET_LINK_SECRET") or self.SECRET_KEY
        if self.TICKET_LINK_SECRET is None:
            raise ConfigError("SECRET_KEY is required but not set (or TICKET_LINK_SECRET): it signs the ticket links")
        # Accepted beside the current secret while it is rotated; never signs a new link.
        self.TICKET_LINK_SECRET_PREVIOUS = _text(env, "TICKET_LINK_SECRET_PREVIOUS")

        self.LOG_LEVEL = _choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper()
        self.LOG_FORMAT = _choice(env, "LOG_FORMAT", "text", ("text", "json"))


class TestConfig(Config):
    TESTING = True
