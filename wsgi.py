"""The WSGI entry point: gunicorn -c gunicorn.conf.py wsgi:app, and flask --app wsgi."""
import sys

from config import ConfigError

try:
    from eventi_flask import create_app

    app = create_app()
except ConfigError as exc:
    print(f"Configuration error: {exc}", file=sys.stderr)
    sys.exit(1)
