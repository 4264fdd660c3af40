"""gunicorn settings: gevent workers, each holding thousands of long polls."""
import os
import sys

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_class = "gevent"
# 10,000 held waits plus room for callbacks, page loads and health checks.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "12000"))
backlog = 4096
# A held wait lasts up to WAIT_TIMEOUT_MAX (60 s); on SIGTERM they are answered
# at once with the current state, so the graceful window only drains stragglers.
graceful_timeout = 30
timeout = 30
keepalive = 75
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def on_starting(server):
    """Refuse to start on a configuration mistake, with one line and no traceback."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from config import Config, ConfigError

    try:
        Config()
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        sys.exit(1)
