"""Orders: the order state machine and the long poll."""
from . import commands, routes


def init_app(app):
    app.register_blueprint(routes.bp)
    commands.init_app(app)
    from ..notify.service import get_hub
    from .service import current_versions

    def versions_in_app_context(order_ids):
        with app.app_context():
            return current_versions(order_ids)

    with app.app_context():
        get_hub().set_version_source(versions_in_app_context)
