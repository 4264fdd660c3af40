"""Events: what is on sale, their ticket types, the events API and commands."""
from . import commands, routes


def init_app(app):
    app.register_blueprint(routes.bp)
    commands.init_app(app)
