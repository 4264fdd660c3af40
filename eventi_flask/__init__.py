"""Eventi payment status: the Flask application factory."""
import logging

from flask import Flask
from flask.sessions import SessionInterface
from sqlalchemy import event
from sqlalchemy.engine import Engine
from werkzeug.middleware.proxy_fix import ProxyFix

from . import database, errors, events, line, logs, messages, metrics, notify, openapi, ops, orders, payhero, security, web
from .extensions import db, migrate
from .json_provider import JSONProvider

log = logging.getLogger(__name__)


@event.listens_for(Engine, "before_cursor_execute")
def _count_query(*_):
    metrics.db_queries.inc()


class NoSessions(SessionInterface):
    """The service keeps no session, pages and API alike: no cookie parsed and no signer built per request
    (Flask's default did both for every request: 4 % of the workers' CPU at a sale's opening)."""

    def open_session(self, app, request):
        return None  # Flask then hands out a NullSession, which refuses to be written to

    def save_session(self, app, session, response):
        pass


def create_app(config=None):
    """Build the app.  `config`: a Config instance, or None to read the environment."""
    if config is None:
        from config import Config

        config = Config()
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_object(config)
    app.json = JSONProvider(app)
    app.session_interface = NoSessions()
    logs.configure(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    if app.config["PROXY_HOPS"]:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=app.config["PROXY_HOPS"], x_proto=app.config["PROXY_HOPS"])
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///"):
        import os

        os.makedirs(app.instance_path, exist_ok=True)

    db.init_app(app)
    migrate.init_app(app, db, render_as_batch=True)
    database.init_app(app)
    errors.init_app(app)
    security.init_app(app)
    security.init_limiter(app)
    notify.init_app(app)
    payhero.init_app(app)
    events.init_app(app)
    orders.init_app(app)
    line.init_app(app)
    messages.init_app(app)
    ops.init_app(app)
    openapi.init_app(app)
    web.init_app(app)
    return app
