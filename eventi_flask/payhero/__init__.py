"""PayHero: the API client, the webhook, and the built-in sandbox."""
import logging

from . import client, commands, routes, sandbox, verify

log = logging.getLogger(__name__)


def init_app(app):
    client.init_app(app)
    commands.init_app(app)
    verify.init_app(app)
    app.register_blueprint(routes.bp)
    if app.config["PAYHERO_MODE"] == "sandbox":
        sandbox.init_app(app)
    elif not app.config["PAYHERO_VERIFY_CALLBACKS"]:
        log.warning("PAYHERO_VERIFY_CALLBACKS is off in live mode: a success callback completes its order on the "
                    "callback token alone, so anyone who reads the token (router or proxy logs) can get tickets "
                    "without paying. Set PAYHERO_VERIFY_CALLBACKS=1.")
