"""The bare extension objects, created once and bound in create_app()."""
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


# Objects keep their loaded values after commit: the service layer serialises
# them after committing without a second round trip.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
migrate = Migrate()
# Limits on order creation (security.py): storage and limits come from the app's config.
# A storage outage falls back to per-process memory instead of refusing orders.
limiter = Limiter(key_func=get_remote_address, headers_enabled=True, in_memory_fallback_enabled=True,
                  swallow_errors=True)
