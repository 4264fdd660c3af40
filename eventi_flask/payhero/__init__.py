"""PayHero: the API client, the webhook, and the built-in sandbox."""
from . import client, routes, sandbox


def init_app(app):
    client.init_app(app)
    app.register_blueprint(routes.bp)
    if app.config["PAYHERO_MODE"] == "sandbox":
        app.register_blueprint(sandbox.bp)
