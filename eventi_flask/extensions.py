"""The bare extension objects, created once and bound in create_app()."""
from flask import g
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session as FlaskSession
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


# Where database.on_callbacks_engine() points db.session, for the rest of an app context (flask.g).
SESSION_ENGINE = "eventi_session_engine"


class Session(FlaskSession):
    """db.session: the app's engine, or the engine database.on_callbacks_engine() gave this app
    context (the callbacks' own pool), even after db.session.remove() made a new session."""

    def get_bind(self, mapper=None, clause=None, bind=None, **kwargs):
        if bind is None:
            bind = g.get(SESSION_ENGINE)
        return super().get_bind(mapper, clause=clause, bind=bind, **kwargs)


# Objects keep their loaded values after commit: the service layer serialises
# them after committing without a second round trip.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False, "class_": Session})
migrate = Migrate()
# Limits on order creation (security.py): storage and limits come from the app's config.
# A storage outage falls back to per-process memory instead of refusing orders.
limiter = Limiter(key_func=get_remote_address, headers_enabled=True, in_memory_fallback_enabled=True,
                  swallow_errors=True)
