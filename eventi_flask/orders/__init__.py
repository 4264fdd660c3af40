"""Orders: the order state machine and the long poll."""
from . import admission, commands, missed_callbacks, routes


def init_app(app):
    app.register_blueprint(routes.bp)
    admission.init_app(app)
    commands.init_app(app)
    from ..notify.service import get_hub
    from .batched_reads import BatchedReads
    from .service import BATCHED_KEY_READS, BATCHED_READS, current_versions, read_keys_used, read_orders

    def in_app_context(function):
        # Run from greenlets of their own, outside any request.
        def run(order_ids):
            with app.app_context():
                return function(order_ids)
        return run

    app.extensions[BATCHED_READS] = BatchedReads(in_app_context(read_orders))
    app.extensions[BATCHED_KEY_READS] = BatchedReads(in_app_context(read_keys_used))
    with app.app_context():
        get_hub().set_version_source(in_app_context(current_versions))
    missed_callbacks.init_app(app)
